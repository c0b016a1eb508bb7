"""Autoregressive decoding through the API on a tiny random model."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

import specdec
from conftest import sampling_reference
from specdec.autoregressive import prompt_bucket
from specdec.loading import LoadedModel
from specdec.sampling import Sampling
from specdec.tokenizer import TextTokenizer

PROMPTS = [[5, 17, 3], [42] * 11, [1, 2, 3, 4, 5, 6, 7], [60]]
HOT = dict(temperature=1.0)


def test_greedy_batch_equals_uncached_reference(tiny, tiny_lm):
    out = specdec.generate(tiny_lm, PROMPTS, max_new_tokens=[6, 9, 4, 7])
    for prompt, res in zip(PROMPTS, out):
        assert res.tokens == sampling_reference(tiny, prompt, len(res.tokens))
        assert res.finish_reason == "length" and res.prompt_tokens == len(prompt)
    assert [len(r.tokens) for r in out] == [6, 9, 4, 7]


def test_long_prompts_pad_by_at_most_a_quarter_and_decode_as_unpadded(tiny, tiny_lm):
    """Past 64 tokens a prompt pads to one of four buckets per doubling, not to the next power of two."""
    assert [prompt_bucket(n) for n in (1, 16, 17, 64, 65, 81, 129, 161, 340, 513)] == [
        16, 16, 32, 64, 80, 96, 160, 192, 384, 640]
    assert all(n <= prompt_bucket(n) <= max(64, n + n // 4) for n in range(1, 5000))
    for n in (70, 150):  # buckets 80 and 160
        prompt = [(7 * i) % 90 + 1 for i in range(n)]
        assert specdec.generate(tiny_lm, prompt, max_new_tokens=5).tokens == sampling_reference(tiny, prompt, 5)


def test_sampling_matches_uncached_reference_and_batch_layout(tiny, tiny_lm):
    s = Sampling(temperature=0.9, top_k=20, top_p=0.95)
    opts = dict(max_new_tokens=8, temperature=0.9, top_k=20, top_p=0.95)
    batch = specdec.generate(tiny_lm, PROMPTS, seed=[10, 11, 12, 13], **opts)
    for i, (prompt, res) in enumerate(zip(PROMPTS, batch)):
        assert res.tokens == sampling_reference(tiny, prompt, 8, 10 + i, s)
    # the same row in another batch, at another index, gives the same tokens
    other = specdec.generate(tiny_lm, [PROMPTS[3], [9, 9], PROMPTS[1]], seed=[13, 99, 11], **opts)
    assert other[0].tokens == batch[3].tokens and other[2].tokens == batch[1].tokens
    assert specdec.generate(tiny_lm, PROMPTS[1], seed=12, **opts).tokens != batch[1].tokens


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.tuples(st.lists(st.integers(0, 96), min_size=1, max_size=20),
                               st.integers(1, 12), st.integers(0, 2**31 - 1)), min_size=1, max_size=5))
def test_any_ragged_batch_equals_rows_alone(tiny_lm, rows):
    prompts, budgets, seeds = map(list, zip(*rows))
    batch = specdec.generate(tiny_lm, prompts, max_new_tokens=budgets, seed=seeds, **HOT)
    for prompt, n, seed, res in zip(prompts, budgets, seeds, batch):
        alone = specdec.generate(tiny_lm, prompt, max_new_tokens=n, seed=seed, **HOT)
        assert res.tokens == alone.tokens and len(res.tokens) == n


def test_stop_tokens_end_rows_independently(tiny_lm):
    free = specdec.generate(tiny_lm, PROMPTS, max_new_tokens=10, seed=[1, 2, 3, 4], **HOT)
    eos = free[0].tokens[3]
    stopped = specdec.generate(tiny_lm, PROMPTS, max_new_tokens=10, seed=[1, 2, 3, 4],
                               stop_tokens=[eos], **HOT)
    for f, s in zip(free, stopped):
        if eos in f.tokens:
            cut = f.tokens.index(eos)
            assert s.tokens == f.tokens[:cut] and s.finish_reason == "eos"
        else:
            assert s.tokens == f.tokens and s.finish_reason == "length"
    assert stopped[0].tokens == free[0].tokens[:free[0].tokens.index(eos)]


def test_chunked_decoding_equals_one_chunk(tiny_lm):
    one = specdec.generate(tiny_lm, PROMPTS, max_new_tokens=13, seed=[5, 6, 7, 8], **HOT)
    chunked = specdec.generate(tiny_lm, PROMPTS, max_new_tokens=13, seed=[5, 6, 7, 8], chunk_steps=3, **HOT)
    assert [r.tokens for r in one] == [r.tokens for r in chunked]
    assert one[0].stats.target_forwards == 12 == chunked[0].stats.target_forwards


@pytest.fixture(scope="module")
def worded(tiny):
    """The tiny model with a word-level tokenizer: token i is written ``<i>``."""
    vocab = {f"<{i}>": i for i in range(97)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<0>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    text_tok = TextTokenizer(tokenizer=tok, eos_ids=())
    return LoadedModel.from_module(tiny, text_tok, name="tiny-worded")


def test_stop_strings_and_stream(worded):
    free = specdec.generate(worded, "<5> <17> <3>", max_new_tokens=12, chat=False, **HOT)
    assert free.text == " ".join(f"<{t}>" for t in free.tokens)
    target = free.tokens[4]
    first = free.tokens.index(target)
    res = specdec.generate(worded, "<5> <17> <3>", max_new_tokens=12, chat=False, stop=f"<{target}>", **HOT)
    assert res.finish_reason == "stop"
    assert res.tokens == free.tokens[:first + 1]
    assert res.text == free.text[:free.text.index(f"<{target}>")]
    pieces = list(specdec.stream(worded, ["<5> <17> <3>"], max_new_tokens=12, chat=False, chunk_steps=4, **HOT))
    assert "".join(p[0] for p in pieces) == free.text and len(pieces) >= 3
    with pytest.raises(ValueError, match="no chat template"):
        specdec.generate(worded, "<5>", max_new_tokens=2)


def test_bad_input_gets_clear_errors(tiny_lm, worded):
    with pytest.raises(ValueError, match="prompt 0 has 300 tokens.*max_new_tokens=300.*max_cache_len"):
        specdec.generate(tiny_lm, [1] * 300, max_new_tokens=300, max_cache_len=512)
    with pytest.raises(ValueError, match="model's context"):
        specdec.generate(tiny_lm, [1] * 500, max_new_tokens=20)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        specdec.generate(tiny_lm, [[1, 2], []])
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        specdec.generate(worded, "", chat=False)
    with pytest.raises(ValueError, match="outside"):
        specdec.generate(tiny_lm, [1, 200])
    with pytest.raises(ValueError, match="unknown method 'medusa-9'"):
        specdec.generate(tiny_lm, [1, 2], method="medusa-9")
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        specdec.generate(tiny_lm, [1, 2], max_new_tokens=0)
    with pytest.raises(ValueError, match="seed has 3 entries for 2 prompts"):
        specdec.generate(tiny_lm, [[1], [2]], seed=[1, 2, 3])
    with pytest.raises(ValueError, match="temperature"):
        specdec.generate(tiny_lm, [1, 2], temperature=-0.5)
    with pytest.raises(ValueError, match="no tokenizer"):
        specdec.generate(tiny_lm, "hello")
    with pytest.raises(TypeError, match="unknown generate options"):
        specdec.generate(tiny_lm, [1, 2], max_tokens=3)


def test_timed_generations_keep_the_prompts_order(tiny_lm, methods):
    """The benchmark harness runs prompts shortest first; each result still belongs to its prompt."""
    from specdec.bench import timed_generations

    runs = {"autoregressive": {}, "prompt_lookup": methods["prompt_lookup"]}
    results = timed_generations(tiny_lm, PROMPTS, runs, 5)
    for i, prompt in enumerate(PROMPTS):
        alone = specdec.generate(tiny_lm, prompt, max_new_tokens=5)
        assert [r[i].tokens for r in results.values()] == [alone.tokens] * 2
