"""Tokenizers from GGUF metadata (byte-level BPE and SentencePiece), BOS handling, chat templates.

The Gemma-3 tokenizer is checked against transformers' ids (tests/fixtures/make_tokenizer_golden.py);
the chat templates are rendered with jinja2 as transformers renders them.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from pathlib import Path

import gguf
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from specdec.chat_template import ChatTemplate, ChatTemplateError
from specdec.fetch import model_file
from specdec.gguf_loader import GGUFError
from specdec.tokenizer import tokenizer_from_gguf, tokenizer_from_hf_dir
from training.data import render_chat, reply_end

pytestmark = pytest.mark.real

FIXTURES = Path(__file__).resolve().parent / "fixtures"
GOLDEN = json.loads((FIXTURES / "gemma3_tokenizer_golden.json").read_text())
S = "\u2581"
SMOL_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
CHATML_DEFAULT_SYSTEM = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nBe brief.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
GEMMA_STYLE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] not in ['user', 'assistant'] %}"
    "{{ raise_exception('Conversation roles must be user or assistant, got ' + message['role']) }}{% endif %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<start_of_turn>{{ role }}\n{{ message['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
TURNS = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"},
         {"role": "user", "content": "Count to 3"}, {"role": "assistant", "content": "1, 2, 3"}]


@pytest.fixture(scope="session")
def gemma3_gguf() -> Path:
    return model_file("gemma3-270m")


@pytest.fixture(scope="module")
def gemma(gemma3_gguf):
    """The Gemma-3 tokenizer (reading a 262k-token GGUF's metadata takes a while: once per module)."""
    return tokenizer_from_gguf(gguf.GGUFReader(gemma3_gguf))


@pytest.fixture(scope="module")
def gemma_chat(gemma):
    """The Gemma-3 tokenizer with a Gemma-style chat template (the base model's file has none)."""
    template = ChatTemplate(source=GEMMA_STYLE, origin="the test's Gemma-style template", bos_token="<bos>",
                            eos_token="<eos>")
    return dataclasses.replace(gemma, chat_template=template)


@pytest.mark.parametrize("case", GOLDEN["cases"], ids=range(len(GOLDEN["cases"])))
def test_gemma3_ids_match_transformers(gemma, case):
    assert gemma.encode(case["text"]) == case["ids"]
    # transformers puts BOS in front even of a text that starts with it; specdec does not repeat it
    bos_first = case["ids"][:1] == [GOLDEN["bos_token_id"]]
    assert gemma.encode_prompt(case["text"], chat=False) == (case["ids"] if bos_first else case["ids_with_bos"])
    assert gemma.decode(case["ids_with_bos"]) == case["decoded"]
    assert gemma.decode(case["ids_with_bos"], skip_special=False) == case["decoded_special"]


def test_gemma3_tokenizer_facts(gemma):
    assert gemma.vocab_size == 262144 and gemma.bos_id == 2 and gemma.add_bos
    assert gemma.eos_ids == (1, 106)  # <eos> and <end_of_turn>
    assert gemma.chat_template is None  # the base model's file has no template, and no ChatML tokens
    with pytest.raises(ValueError, match="no chat template; pass chat=False"):
        gemma.encode_prompt("hi")
    for case in GOLDEN["cases"][:12]:  # texts without special-token text: decoding gives them back
        assert gemma.decode(gemma.encode(case["text"])) == case["text"]


def test_gemma_style_template_with_bos(gemma_chat):
    assert gemma_chat.chat("Hi ") == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    ids = gemma_chat.encode_prompt("Hi")
    assert ids[:2] == [2, 105] and ids.count(2) == 1  # the template's <bos>, not a second one
    with pytest.raises(ChatTemplateError, match="Gemma-style template.*roles must be user or assistant, got system"):
        gemma_chat.chat("Hi", system="Be brief.")


def test_render_chat_masks_replies_for_any_template(gemma_chat):
    ex = render_chat(gemma_chat, TURNS)
    assert ex.tokens[0] == 2 and ex.tokens.count(2) == 1
    assert gemma_chat.decode(ex.tokens, skip_special=False) == gemma_chat.render(TURNS, add_generation_prompt=False)
    learned = gemma_chat.decode([t for t, m in zip(ex.tokens, ex.mask) if m], skip_special=False)
    assert learned == "Hello! How can I help?<end_of_turn>1, 2, 3<end_of_turn>"  # not the "\n" after each
    assert reply_end(gemma_chat) == [106]


def test_render_chat_refuses_a_template_that_rewrites_earlier_turns(gemma_chat):
    marks_last = GEMMA_STYLE.replace("<end_of_turn>\n{% endfor %}",
                                     "{% if loop.last %}!{% endif %}<end_of_turn>\n{% endfor %}")
    tok = dataclasses.replace(gemma_chat, chat_template=ChatTemplate(source=marks_last, origin="t", bos_token="<bos>"))
    with pytest.raises(ValueError, match="growing prefix.*rewrites the text before it"):
        render_chat(tok, TURNS)


def _smollm2():
    return tokenizer_from_gguf(gguf.GGUFReader(model_file("smollm2-135m")))


def test_smollm2_chatml_is_unchanged():
    tok = _smollm2()
    assert tok.chat("Hi") == (f"<|im_start|>system\n{SMOL_SYSTEM}<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                              "<|im_start|>assistant\n")
    assert tok.chat("Hi", system="S") == ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                                          "<|im_start|>assistant\n")
    assert tok.chat(TURNS[:3]) == (f"<|im_start|>system\n{SMOL_SYSTEM}<|im_end|>\n<|im_start|>user\nHi there"
                                   "<|im_end|>\n<|im_start|>assistant\nHello! How can I help?<|im_end|>\n"
                                   "<|im_start|>user\nCount to 3<|im_end|>\n<|im_start|>assistant\n")
    assert not tok.add_bos and tok.eos_ids == (0, 2)  # SmolLM2 prompts start without BOS, as before
    for case in json.loads((FIXTURES / "smollm2_golden.json").read_text())["cases"]:
        if case["chat"]:
            assert tok.chat(case["prompt"]) == case["text"]
        assert tok.encode_prompt(case["prompt"], chat=case["chat"]) == case["ids"]
    assert reply_end(tok) == tok.encode("<|im_end|>")


def test_chatml_template_with_a_default_system_prompt():
    t = ChatTemplate(source=CHATML_DEFAULT_SYSTEM, origin="t")
    user = [{"role": "user", "content": "hi"}]
    assert t.render(user) == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
                              "<|im_start|>assistant\n")
    assert t.render([{"role": "system", "content": "S"}, *user], add_generation_prompt=False) == \
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"


def test_jinja_environment_as_transformers_has_it():
    blocks = ChatTemplate(source="{% for m in messages %}\n    {% if m['role'] == 'user' %}\nU: {{ m['content'] }}\n"
                                 "    {% endif %}\n{% endfor %}", origin="t")
    assert blocks.render([{"role": "user", "content": "a"}, {"role": "x", "content": "b"}]) == "U: a\n"
    as_json = ChatTemplate(source="{{ messages | tojson }}", origin="t")
    assert as_json.render([{"role": "user", "content": "東京 <b>"}]) == '[{"role": "user", "content": "東京 <b>"}]'
    year = ChatTemplate(source="{{ strftime_now('%Y') }}", origin="t")
    assert year.render([]) == str(datetime.date.today().year)
    loops = ChatTemplate(source="{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
                                "{{ m['content'] }}{% endfor %}", origin="t")
    assert loops.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]) == "a"
    with pytest.raises(ChatTemplateError, match="failed on these messages"):  # the sandbox
        ChatTemplate(source="{{ messages.append(1) }}", origin="t").render([])


def test_bad_template_is_a_clear_error_naming_it():
    bad = ChatTemplate(source="{% for m in messages %}{{ m['content'] }}", origin="my/chat_template.jinja")
    with pytest.raises(ChatTemplateError, match=r"my/chat_template\.jinja is not valid Jinja: .*endfor"):
        bad.render([{"role": "user", "content": "hi"}])


def _word_tokenizer(path: Path, post_bos: bool) -> None:
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "a", "b", "[U]", "[A]", "[SYS]"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<s>", "</s>"])
    if post_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    path.mkdir()
    tok.save(str(path / "tokenizer.json"))


def test_hf_directory_template_and_bos(tmp_path):
    _word_tokenizer(tmp_path / "flag", post_bos=False)
    (tmp_path / "flag" / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"content": "<s>", "special": True}, "eos_token": "</s>", "add_bos_token": True,
        "chat_template": [{"name": "tool_use", "template": "unused"},
                          {"name": "default", "template": "{{ bos_token }}{% for m in messages %}[U] "
                                                          "{{ m['content'] }} {{ eos_token }} {% endfor %}[A]"}]}))
    tok = tokenizer_from_hf_dir(tmp_path / "flag", 2)
    assert tok.chat("a b") == "<s>[U] a b </s> [A]"
    assert tok.encode_prompt("a b") == [1, 5, 3, 4, 2, 6] and tok.encode_prompt("a", chat=False) == [1, 3]
    _word_tokenizer(tmp_path / "post", post_bos=True)  # no flag: BOS if tokenizer.json's post-processor adds it
    (tmp_path / "post" / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "chat_template": "{% for m in messages %}[U] {{ m['content'] }}"}))
    tok = tokenizer_from_hf_dir(tmp_path / "post", 2)
    assert tok.encode_prompt("a b", chat=False) == [1, 3, 4]
    with pytest.raises(ChatTemplateError, match=r"tokenizer_config\.json \(chat_template\) is not valid Jinja"):
        tok.chat("a")
    (tmp_path / "post" / "chat_template.jinja").write_text("[SYS] {{ messages[0]['content'] }}")
    assert tokenizer_from_hf_dir(tmp_path / "post", 2).chat("b") == "[SYS] b"  # the .jinja file comes first
    _word_tokenizer(tmp_path / "none", post_bos=False)
    tok = tokenizer_from_hf_dir(tmp_path / "none", 2)
    assert tok.chat_template is None and tok.encode_prompt("a", chat=False) == [3]


def _sentencepiece_gguf(path: Path, arch: str = "llama", prefix: bool | None = None, kind: str = "llama") -> Path:
    """A GGUF holding only a tiny SentencePiece vocabulary: "bc" scores above "ab" but comes after it."""
    pieces = [S, "a", "b", "c", "ab", "bc", "  ", "<x>"]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces]
    types = [2, 3, 3, *[6] * 256, *[1] * 6, 4, 4]
    scores = [0.0] * 259 + [-1.0, -2.0, -3.0, -4.0, -6.0, -5.0, -1000.0, -1000.0]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_tokenizer_model(kind)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_scores(scores)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    if prefix is not None:
        w.add_add_space_prefix(prefix)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_sentencepiece_from_gguf(tmp_path):
    tok = tokenizer_from_gguf(gguf.GGUFReader(_sentencepiece_gguf(tmp_path / "sp.gguf")))
    ids = {t: tok.tokenizer.token_to_id(t) for t in (S, "a", "b", "c", "ab", "bc", "  ", "<x>", "<s>")}
    assert tok.encode("abc") == [ids[S], ids["a"], ids["bc"]]  # a space in front; merges by score
    assert tok.decode(tok.encode("abc a")) == "abc a"  # the space in front is dropped again
    assert tok.encode("<x>é") == [ids["<x>"], 3 + 0xC3, 3 + 0xA9]  # user-defined whole; bytes fall back
    assert tok.decode([ids["<s>"], ids["<x>"], 3 + 0xC3, 3 + 0xA9]) == "<x>é"  # control token skipped
    assert tok.add_bos and tok.encode_prompt("a", chat=False) == [1, ids[S], ids["a"]]
    assert tok.encode_prompt("<s>a", chat=False) == [1, ids["a"]]  # BOS not repeated; "▁" only at the start
    bare = tokenizer_from_gguf(gguf.GGUFReader(_sentencepiece_gguf(tmp_path / "bare.gguf", prefix=False)))
    assert bare.encode("abc") == [ids["a"], ids["bc"]] and bare.decode(bare.encode(" a b")) == " a b"


def test_gemma_sentencepiece_merges_by_file_order(tmp_path):
    tok = tokenizer_from_gguf(gguf.GGUFReader(_sentencepiece_gguf(tmp_path / "g.gguf", arch="gemma3", prefix=False)))
    ids = {t: tok.tokenizer.token_to_id(t) for t in ("c", "ab")}
    assert tok.encode("abc") == [ids["ab"], ids["c"]]  # "ab" comes first in the file
    assert tok.encode("a  b") == [3 + 256 + 1, 3 + 256 + 6, 3 + 256 + 2]  # the "  " token, reached by merges
    assert tok.decode(tok.encode("a  b")) == "a  b"


def test_unknown_tokenizer_model_is_a_clear_error(tmp_path):
    with pytest.raises(GGUFError, match="tokenizer model 'bert' is not supported"):
        tokenizer_from_gguf(gguf.GGUFReader(_sentencepiece_gguf(tmp_path / "b.gguf", kind="bert")))
