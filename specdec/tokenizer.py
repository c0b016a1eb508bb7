"""Text tokenizer (the ``tokenizers`` package) and the ChatML chat template."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

# llama.cpp pre-tokenizer names that split every digit, then apply the GPT-2 regex.
_DIGIT_SPLIT_PRE = {"smollm", "starcoder", "refact", "codeshell"}
_GPT2_PRE = {"gpt2", "default"}
_CHATML_SYSTEM = re.compile(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", re.S)
_END_TOKENS = ("<|im_end|>", "<|endoftext|>")
GGUF_CONTROL, GGUF_USER_DEFINED = 3, 4


@dataclass
class TextTokenizer:
    """Tokenizer plus what decoding needs: stop ids and the chat template.

    chatml: whether the model uses ChatML (``<|im_start|>role ... <|im_end|>``).
    default_system: the system prompt the model's template inserts when none is given.
    """

    tokenizer: Tokenizer
    eos_ids: tuple[int, ...]
    chatml: bool
    default_system: str | None = None

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special-token strings in it become special ids."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special: bool = True) -> str:
        return self.tokenizer.decode(list(map(int, ids)), skip_special_tokens=skip_special)

    def chat(self, messages: str | list[dict], system: str | None = None) -> str:
        """Render a user prompt (or a list of {role, content} messages) ready for the reply."""
        if not self.chatml:
            raise ValueError("this model has no ChatML chat template; pass chat=False and a raw prompt")
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        system = system if system is not None else self.default_system
        if messages[0]["role"] != "system" and system is not None:
            messages = [{"role": "system", "content": system}, *messages]
        turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return turns + "<|im_start|>assistant\n"


def _eos_ids(tok: Tokenizer, declared) -> tuple[int, ...]:
    ids = {int(i) for i in declared if i is not None}
    ids |= {tok.token_to_id(t) for t in _END_TOKENS if tok.token_to_id(t) is not None}
    return tuple(sorted(ids))


def _chat_info(template: str | None) -> tuple[bool, str | None]:
    if not template or "<|im_start|>" not in template:
        return False, None
    found = _CHATML_SYSTEM.search(template)
    return True, (found.group(1) if found else None)


def tokenizer_from_gguf(reader) -> TextTokenizer:
    """Byte-level BPE tokenizer from a GGUF file's ``tokenizer.ggml.*`` metadata."""
    from specdec.gguf_loader import GGUFError, field

    kind = field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFError(f"tokenizer model {kind!r} is not supported; specdec reads byte-level BPE ('gpt2')")
    pre = field(reader, "tokenizer.ggml.pre", "default")
    if pre in _DIGIT_SPLIT_PRE:
        pre_tok = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                           pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    elif pre in _GPT2_PRE:
        pre_tok = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        raise GGUFError(f"pre-tokenizer {pre!r} is not supported (known: "
                        f"{', '.join(sorted(_DIGIT_SPLIT_PRE | _GPT2_PRE))})")
    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in field(reader, "tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = pre_tok
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == GGUF_CONTROL])
    tok.add_tokens([AddedToken(t, normalized=False) for t, ty in zip(tokens, types) if ty == GGUF_USER_DEFINED])
    chatml, system = _chat_info(field(reader, "tokenizer.chat_template", ""))
    eos = _eos_ids(tok, [field(reader, "tokenizer.ggml.eos_token_id", -1)])
    return TextTokenizer(tokenizer=tok, eos_ids=tuple(i for i in eos if i >= 0), chatml=chatml,
                         default_system=system)


def tokenizer_from_hf_dir(path: Path, eos_token_id) -> TextTokenizer:
    """Tokenizer from a Hugging Face directory's ``tokenizer.json`` (+ ``tokenizer_config.json``)."""
    tok_file = path / "tokenizer.json"
    if not tok_file.is_file():
        raise FileNotFoundError(f"{path} has no tokenizer.json; specdec needs it to encode text")
    tok = Tokenizer.from_file(str(tok_file))
    cfg_file = path / "tokenizer_config.json"
    template = json.loads(cfg_file.read_text()).get("chat_template") if cfg_file.is_file() else None
    chatml, system = _chat_info(template if isinstance(template, str) else None)
    declared = eos_token_id if isinstance(eos_token_id, list) else [eos_token_id]
    return TextTokenizer(tokenizer=tok, eos_ids=_eos_ids(tok, declared), chatml=chatml, default_system=system)
