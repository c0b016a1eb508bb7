"""Text tokenizers (the ``tokenizers`` package) built from a model's files, with its chat template and BOS."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from specdec.chat_template import CHATML, ChatTemplate, conversation

# llama.cpp pre-tokenizer names that split every digit, then apply the GPT-2 regex.
_DIGIT_SPLIT_PRE = {"smollm", "starcoder", "refact", "codeshell"}
_GPT2_PRE = {"gpt2", "default"}
_END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<end_of_turn>")
GGUF_NORMAL, GGUF_UNKNOWN, GGUF_CONTROL, GGUF_USER_DEFINED = 1, 2, 3, 4
# Architectures whose SentencePiece scores do not follow the merge order (the file's token order does),
# and whose runs of spaces are stored as spaces rather than as "▁" (as transformers reads them).
_GEMMA_ARCHS = {"gemma", "gemma2", "gemma3"}
_SPACE = "\u2581"  # SentencePiece's "▁", which stands for a space


@dataclass
class TextTokenizer:
    """Tokenizer plus what decoding needs: stop ids, the chat template and the BOS token.

    chat_template: the model's template (None: the model has none, only raw prompts work).
    bos_id, add_bos: the model's BOS id, and whether prompts should start with it.
    """

    tokenizer: Tokenizer
    eos_ids: tuple[int, ...]
    chat_template: ChatTemplate | None = None
    bos_id: int | None = None
    add_bos: bool = False

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special-token strings in it become special ids. No BOS is added."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special: bool = True) -> str:
        """Text of token ids, special tokens left out unless ``skip_special`` is False."""
        return self.tokenizer.decode(list(map(int, ids)), skip_special_tokens=skip_special)

    def render(self, messages: Sequence[dict], add_generation_prompt: bool) -> str:
        """``messages`` ({role, content} dicts) rendered by the model's chat template."""
        if self.chat_template is None:
            raise ValueError("this model has no chat template; pass chat=False (CLI: --no-chat) and a raw prompt")
        return self.chat_template.render(messages, add_generation_prompt)

    def chat(self, messages: str | Sequence[dict], system: str | None = None) -> str:
        """Render a user prompt (or a list of {role, content} messages) ready for the reply; a given
        ``system`` message goes first, else the template decides (some insert a default one)."""
        return self.render(conversation(messages, system), add_generation_prompt=True)

    def with_bos(self, ids: Sequence[int]) -> list[int]:
        """``ids`` with the BOS id in front if the model wants one and they do not start with it already."""
        if self.add_bos and self.bos_id is not None and list(ids[:1]) != [self.bos_id]:
            return [self.bos_id, *ids]
        return list(ids)

    def encode_prompt(self, prompt: str, chat: bool = True, system: str | None = None) -> list[int]:
        """Token ids a user prompt is fed to the model as: the chat template's rendering (``chat``,
        ``system``) or the raw text, with the model's BOS in front when it wants one."""
        return self.with_bos(self.encode(self.chat(prompt, system) if chat else prompt))


def _eos_ids(tok: Tokenizer, declared) -> tuple[int, ...]:
    ids = {int(i) for i in declared if i is not None}
    ids |= {tok.token_to_id(t) for t in _END_TOKENS if tok.token_to_id(t) is not None}
    return tuple(sorted(ids))


def _template(tok: Tokenizer, source: str | None, origin: str, bos_token: str | None,
              eos_token: str | None) -> ChatTemplate | None:
    """The model's template; without one, ChatML if the vocabulary has its tokens, else None."""
    if not source:
        if tok.token_to_id("<|im_start|>") is None or tok.token_to_id("<|im_end|>") is None:
            return None
        source, origin = CHATML, "specdec's ChatML fallback (the model has no template)"
    return ChatTemplate(source=source, origin=origin, bos_token=bos_token, eos_token=eos_token)


def _add_gguf_tokens(tok: Tokenizer, tokens: Sequence[str], types: Sequence[int]) -> None:
    """Control and unknown tokens become special tokens, user-defined ones plain added tokens (both
    matched whole in the text before the model splits it)."""
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty in (GGUF_UNKNOWN, GGUF_CONTROL)])
    tok.add_tokens([AddedToken(t, normalized=False) for t, ty in zip(tokens, types) if ty == GGUF_USER_DEFINED])


def _byte_level_bpe(reader, tokens: list[str], types: list[int]) -> Tokenizer:
    from specdec.gguf_loader import GGUFError, field

    pre = field(reader, "tokenizer.ggml.pre", "default")
    if pre in _DIGIT_SPLIT_PRE:
        pre_tok = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                           pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    elif pre in _GPT2_PRE:
        pre_tok = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        raise GGUFError(f"pre-tokenizer {pre!r} is not supported (known: "
                        f"{', '.join(sorted(_DIGIT_SPLIT_PRE | _GPT2_PRE))})")
    merges = [tuple(m.split(" ", 1)) for m in field(reader, "tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = pre_tok
    tok.decoder = decoders.ByteLevel()
    _add_gguf_tokens(tok, tokens, types)
    return tok


def _sentencepiece_merges(tokens: Sequence[str], vocab: dict[str, int],
                          ranks: Sequence[float]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split of a token into two tokens,
    best first by the token's rank (higher first), then by longer left part, then longer right part,
    then by the token's place in the vocabulary (the order transformers derives them in)."""
    found = []
    for i, (token, rank) in enumerate(zip(tokens, ranks)):
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                found.append((-rank, -cut, cut - len(token), i, left, right))
    found.sort()
    return [(left, right) for *_, left, right in found]


def _sentencepiece_bpe(reader, tokens: list[str], types: list[int]) -> Tokenizer:
    """A SentencePiece BPE vocabulary (scores, byte-fallback tokens ``<0x00>``..``<0xFF>``): spaces
    become "▁" (with one "▁" in front of the text if ``tokenizer.ggml.add_space_prefix``, default
    true), merges come from the scores (Gemma: from the token order), and bytes no token covers fall
    back to byte tokens."""
    from specdec.gguf_loader import field

    if field(reader, "general.architecture", "") in _GEMMA_ARCHS:
        spelled = [_SPACE * len(t) if set(t) == {" "} else t for t in tokens]
        ranks = [-i for i in range(len(tokens))]
    else:
        spelled, ranks = tokens, field(reader, "tokenizer.ggml.scores")
    # a run of spaces respelled as "▁"s is reached by merges, not matched as an added token
    types = [GGUF_NORMAL if s != t else ty for s, t, ty in zip(spelled, tokens, types)]
    vocab = {t: i for i, t in enumerate(spelled)}
    unk = field(reader, "tokenizer.ggml.unknown_token_id", -1)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=_sentencepiece_merges(spelled, vocab, ranks),
                               unk_token=spelled[unk] if unk >= 0 else None, fuse_unk=True, byte_fallback=True))
    prefix = bool(field(reader, "tokenizer.ggml.add_space_prefix", True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=_SPACE, prepend_scheme="first" if prefix else "never",
                                                 split=False)
    tok.decoder = decoders.Sequence([decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    _add_gguf_tokens(tok, spelled, types)
    return tok


def tokenizer_from_gguf(reader) -> TextTokenizer:
    """Tokenizer from a GGUF file's ``tokenizer.*`` metadata: byte-level BPE (``tokenizer.ggml.model``
    "gpt2") or SentencePiece BPE ("llama"), with the file's chat template and BOS settings."""
    from specdec.gguf_loader import GGUFError, field

    kind = field(reader, "tokenizer.ggml.model")
    builders = {"gpt2": _byte_level_bpe, "llama": _sentencepiece_bpe}
    if kind not in builders:
        raise GGUFError(f"tokenizer model {kind!r} is not supported; specdec reads byte-level BPE ('gpt2') "
                        f"and SentencePiece BPE ('llama')")
    tokens = field(reader, "tokenizer.ggml.tokens")
    tok = builders[kind](reader, tokens, field(reader, "tokenizer.ggml.token_type"))
    bos, eos = (field(reader, f"tokenizer.ggml.{name}_token_id", -1) for name in ("bos", "eos"))
    bos, eos = (int(i) if i >= 0 else None for i in (bos, eos))
    template = _template(tok, field(reader, "tokenizer.chat_template", ""), "the GGUF's tokenizer.chat_template",
                         tokens[bos] if bos is not None else None, tokens[eos] if eos is not None else None)
    # llama.cpp adds BOS to a SentencePiece vocabulary that does not say otherwise
    add_bos = bool(field(reader, "tokenizer.ggml.add_bos_token", kind == "llama"))
    return TextTokenizer(tokenizer=tok, eos_ids=_eos_ids(tok, [eos]), chat_template=template, bos_id=bos,
                         add_bos=add_bos)


def _token_text(value) -> str | None:
    """A special token as ``tokenizer_config.json`` gives it: a string or an ``AddedToken`` dict."""
    return value.get("content") if isinstance(value, dict) else value


def _hf_template(path: Path, config: dict) -> tuple[str | None, str]:
    """The chat template of a Hugging Face directory, and where it came from: ``chat_template.jinja``,
    else ``tokenizer_config.json``'s ``chat_template`` (a string, or a list of {name, template}
    of which "default" is used)."""
    jinja_file = path / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(), str(jinja_file)
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t["name"]: t["template"] for t in template}
        return named.get("default"), f"{path / 'tokenizer_config.json'} (chat_template 'default')"
    return template, f"{path / 'tokenizer_config.json'} (chat_template)"


def tokenizer_from_hf_dir(path: Path, eos_token_id) -> TextTokenizer:
    """Tokenizer from a Hugging Face directory's ``tokenizer.json`` (+ ``tokenizer_config.json``):
    BOS from the config's ``bos_token`` / ``add_bos_token`` (without the flag, whether
    ``tokenizer.json``'s post-processor adds BOS), chat template as :func:`_hf_template` finds it."""
    tok_file = path / "tokenizer.json"
    if not tok_file.is_file():
        raise FileNotFoundError(f"{path} has no tokenizer.json; specdec needs it to encode text")
    tok = Tokenizer.from_file(str(tok_file))
    cfg_file = path / "tokenizer_config.json"
    config = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    bos_token, eos_token = _token_text(config.get("bos_token")), _token_text(config.get("eos_token"))
    bos = tok.token_to_id(bos_token) if bos_token is not None else None
    add_bos = config.get("add_bos_token", bos is not None and tok.encode("", add_special_tokens=True).ids[:1] == [bos])
    template = _template(tok, *_hf_template(path, config), bos_token, eos_token)
    declared = eos_token_id if isinstance(eos_token_id, list) else [eos_token_id]
    return TextTokenizer(tokenizer=tok, eos_ids=_eos_ids(tok, declared), chat_template=template, bos_id=bos,
                         add_bos=bool(add_bos))
