"""Superposed decoding and the n-gram tables on tiny random models and random corpora."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers

from conftest import last_logits, sampling_reference
from specdec.autoregressive import plan_shapes, prompt_arrays
from specdec.cache import init_cache
from specdec.model import forward
from specdec.ngrams import (NgramReference, build_ngrams, build_ngrams_from_texts, corpus_texts, default_lambdas,
                            load_ngrams, ngram_probs, save_ngrams)
from specdec.superposed import Scoring, Superposed, candidate_logp, superpose, superposed_core, superposed_decode
from specdec.tokenizer import TextTokenizer

PROMPTS = [[5, 17, 3], [42] * 11, [1, 2, 3, 4, 5, 6, 7], [60]]
TAU = 0.06
FEW = settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def split(tiny):
    return nnx.split(tiny)


@pytest.fixture(scope="module")
def corpus():
    """A random corpus over the tiny vocabulary (repeated phrases, uniform noise), its tables and dict reference."""
    rng = np.random.default_rng(1)
    phrases = [rng.integers(0, 97, 6).tolist() for _ in range(12)]
    docs = [sum((phrases[i] for i in rng.integers(0, 12, 8)), []) for _ in range(40)] + PROMPTS
    docs += [rng.integers(0, 97, 300).tolist() for _ in range(30)]  # most bigrams seen: support is common
    ref = NgramReference()
    for d in docs:
        ref.add(d)
    return build_ngrams(docs, vocab_size=97, progress=False, corpus="random"), ref


# ----------------------------------------------------------------------------- decoding


def decode_superposed(split, prompts, *, max_new_tokens=10, eos_ids=(), temperature=None, lambdas=None, **spec):
    """``superposed_decode`` with the paper's names for tau (temperature) and the lambdas."""
    return superposed_decode(*split, prompts, Superposed(tau=temperature, ngram_weights=lambdas, **spec),
                             max_new_tokens=max_new_tokens, eos_ids=eos_ids)


def test_one_draft_without_ngrams_is_greedy(tiny, split):
    out = decode_superposed(split, PROMPTS, num_drafts=1, max_new_tokens=9, n_token_sample=4)
    for prompt, drafts in zip(PROMPTS, out):
        assert len(drafts) == 1 and drafts[0][0] == sampling_reference(tiny, prompt, 9)
    eos = out[2][0][0][4]  # a draft that hits EOS stops there, EOS included
    stopped = decode_superposed(split, PROMPTS, num_drafts=1, max_new_tokens=9, n_token_sample=4, eos_ids=[eos])
    for free, cut in zip(out, stopped):
        toks = free[0][0]
        assert cut[0][0] == (toks[:toks.index(eos) + 1] if eos in toks else toks)


@FEW
@given(scores=st.lists(st.one_of(st.floats(-50, 0), st.just(-np.inf)), min_size=1, max_size=5),
       token=st.integers(0, 96))
def test_superposition_weights(split, scores, token):
    table = nnx.merge(*split).embed.embedding[...]
    s = jnp.asarray([scores], jnp.float32)
    embeds, w = superpose(table, jnp.asarray([[token, 3, 9, 11, 50][:len(scores)]]), s)
    assert abs(float(w.sum()) - 1) < 1e-6 and bool(jnp.all(w >= 0))
    assert bool(jnp.all(jnp.where(jnp.isinf(s), w == 0, True))) or bool(jnp.all(jnp.isinf(s)))
    same, _ = superpose(table, jnp.full((1, len(scores)), token), s)
    np.testing.assert_allclose(same[0], table[token], atol=1e-6)


def test_first_step_drafts_are_top_k(tiny, split):
    out = decode_superposed(split, PROMPTS, num_drafts=3, max_new_tokens=1, temperature=TAU)
    for prompt, drafts in zip(PROMPTS, out):
        top, ids = jax.lax.top_k(last_logits(tiny, prompt)[0], 9)
        assert [d[0] for d in drafts] == [[int(i)] for i in ids[:3]]
        np.testing.assert_allclose([d[1] for d in drafts], jax.nn.log_softmax(top / TAU)[:3], atol=1e-4)


@functools.partial(jax.jit, static_argnames="graphdef")
def _embeds_logits(graphdef, params, embeds):
    """Logits [1, T, V] of a sequence of input embeddings ``[1, T, d]`` from an empty cache (no decoding code)."""
    model = nnx.merge(graphdef, params)
    t = embeds.shape[1]
    return forward(model, init_cache(model.config, 1, t), embeds=embeds, positions=jnp.arange(t)[None]).logits


def reference_decode(split, prompt, *, k, steps, c, alpha=0.0, ngram=None, lambdas=(), penalty=200.0, reset=0,
                     eos=()):
    """Superposed decoding written out in Python: a full forward per step, dict n-grams, sorted lists."""
    table = np.asarray(nnx.merge(*split).embed.embedding[...])
    inputs = [table[t] for t in prompt]
    alive, finished = [([], 0.0)], []
    for t in range(steps):
        seq = np.stack(inputs + [np.zeros_like(table[0])] * (-len(inputs) % 32))
        logits = _embeds_logits(*split, jnp.asarray(seq[None]))[0, len(inputs) - 1]
        top, ids = jax.lax.top_k(logits, c)
        logp = np.asarray(jax.nn.log_softmax(top / TAU), np.float64)
        cands = []
        for toks, score in alive:
            for tok, lp in zip(ids.tolist(), logp):
                step = lp
                if ngram is not None:
                    p, supported = ngram.prob(prompt + toks, tok, lambdas)
                    step = (1 - alpha) * lp + (alpha * np.log(p) if supported else -penalty)
                cands.append((toks + [tok], score + step))
        cands.sort(key=lambda d: -d[1])
        alive = [d for d in cands if d[0][-1] not in eos][:k]
        finished = sorted(finished + [d for d in cands if d[0][-1] in eos], key=lambda d: -d[1])[:k]
        if t == steps - 1:
            break
        if reset and (t + 1) % reset == 0:
            alive = alive[:1]
            inputs[len(inputs) - reset + 1:] = [table[x] for x in alive[0][0][-reset:]]
        else:
            w = np.exp(np.array([s for _, s in alive]) - max(s for _, s in alive))
            inputs.append(sum(wi / w.sum() * table[d[-1]] for wi, (d, _) in zip(w, alive)))
    return sorted(alive + finished, key=lambda d: -d[1])[:k]


@pytest.mark.parametrize("case", [dict(k=3), dict(k=2, reset=3, eos=(36,)), dict(k=3, ngrams=True),
                                  dict(k=3, ngrams=True, reset=2, eos=(55,))])
def test_matches_python_reference_and_scores_are_step_sums(split, corpus, case):
    ng, ref = corpus
    alpha = 0.54 if case.get("ngrams") else 0.0
    lambdas = default_lambdas(ng.ns)
    opts = dict(num_drafts=case["k"], max_new_tokens=6, n_token_sample=3 * case["k"], temperature=TAU,
                reset_every=case.get("reset", 0), eos_ids=case.get("eos", ()))
    out = decode_superposed(split, PROMPTS, ngrams=ng if alpha else None, alpha=alpha, **opts)
    for prompt, drafts in zip(PROMPTS, out):
        want = reference_decode(split, prompt, k=case["k"], steps=6, c=3 * case["k"], alpha=alpha,
                                ngram=ref if alpha else None, lambdas=lambdas, reset=case.get("reset", 0),
                                eos=case.get("eos", ()))
        assert [d[0] for d in drafts] == [d[0] for d in want]
        np.testing.assert_allclose([d[1] for d in drafts], [d[1] for d in want], rtol=1e-4, atol=2e-3)


@pytest.mark.parametrize("k, reset, ngrams", [(3, 0, True), (2, 2, False)])
@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompts=st.lists(st.lists(st.integers(0, 96), min_size=1, max_size=14), min_size=3, max_size=3))
def test_drafts_are_distinct_sorted_and_well_formed(split, corpus, k, reset, ngrams, prompts):
    eos = (36, 90)
    out = decode_superposed(split, prompts, num_drafts=k, max_new_tokens=7, ngrams=corpus[0] if ngrams else None,
                            reset_every=reset, eos_ids=eos)
    for drafts in out:
        toks = [tuple(d[0]) for d in drafts]
        scores = [d[1] for d in drafts]
        assert 1 <= len(drafts) <= k and len(set(toks)) == len(toks) and scores == sorted(scores, reverse=True)
        for t in toks:
            assert all(x not in eos for x in t[:-1])
            assert len(t) == 7 or (len(t) < 7 and t[-1] in eos)


def test_cache_batch_does_not_depend_on_k(tiny, split):
    shapes = plan_shapes(tiny.config, [len(p) for p in PROMPTS], [5] * len(PROMPTS))
    tokens, lens, _, _ = prompt_arrays(PROMPTS, shapes, [5] * len(PROMPTS), [0] * len(PROMPTS))
    caches = []
    for k in (1, 4):
        st_ = jax.eval_shape(functools.partial(superposed_core, capacity=shapes.capacity, num_drafts=k, n_token_sample=8,
                                               steps=5, reset_every=0, eos_ids=()),
                             *split, tokens, lens, Scoring(ngrams=None, alpha=jnp.float32(0.0), lambdas=jnp.zeros(0),
                                                           penalty=jnp.float32(200.0)), TAU)
        caches.append(st_.cache.k[0].shape)
        assert st_.alive.shape == (len(PROMPTS), k, 5)
    assert caches[0] == caches[1] and caches[0][0] == len(PROMPTS)


def test_argument_errors(split, corpus):
    with pytest.raises(ValueError, match="ngrams="):
        decode_superposed(split, PROMPTS, alpha=0.5)
    with pytest.raises(ValueError, match="n_token_sample"):
        decode_superposed(split, PROMPTS, num_drafts=4, n_token_sample=3)
    with pytest.raises(ValueError, match="temperature"):
        decode_superposed(split, PROMPTS, temperature=0.0)
    with pytest.raises(ValueError, match="lambdas"):
        decode_superposed(split, PROMPTS, ngrams=corpus[0], lambdas=[0.5, 0.5])


# ----------------------------------------------------------------------------- n-grams


@settings(max_examples=4, deadline=None)
@given(docs=st.lists(st.lists(st.integers(0, 5), max_size=25), max_size=12),
       seqs=st.lists(st.lists(st.integers(0, 5), max_size=8), min_size=1, max_size=6),
       ns=st.sampled_from([(2, 3, 4, 5, 6), (2, 4), (3,)]))
def test_array_lookup_equals_dict_reference(docs, seqs, ns):
    ng = build_ngrams(docs, vocab_size=6, ns=ns, progress=False)
    ref = NgramReference(ns=ng.ns)
    for d in docs:
        ref.add(d)
    lambdas = [0.1 * (i + 1) for i in range(len(ns))]
    w = ng.context_width
    context = jnp.asarray([([0] * w + s)[len(s):] for s in seqs])
    lens = jnp.asarray([min(len(s), w) for s in seqs])
    cands = jnp.tile(jnp.arange(6), (len(seqs), 1))
    p, supported = jax.jit(ngram_probs)(ng, context, lens, cands, jnp.asarray(lambdas))
    for i, s in enumerate(seqs):
        for tok in range(6):
            want, sup = ref.prob(s, tok, lambdas)
            assert abs(float(p[i, tok]) - want) < 1e-6 and bool(supported[i, tok]) == sup


def test_unsupported_candidates_get_the_penalty():
    ng = build_ngrams([[1, 2, 3], [1, 2, 4], [1, 2, 3]], vocab_size=10, progress=False)
    lambdas = jnp.asarray(default_lambdas(ng.ns))
    logp = jnp.log(jnp.asarray([[0.5, 0.3, 0.2]]))
    ids = jnp.asarray([[3, 4, 7]])
    context = jnp.asarray([[[0, 0, 0, 1, 2], [0, 0, 0, 0, 9]]])  # draft 0 ends "1 2", draft 1 ends "9"
    lp = candidate_logp(logp, ids, context, jnp.asarray([[2, 1]]), ng, 0.5, lambdas, 200.0)
    p3, p4 = 0.01 * 2 / 3 + 0.04 * 2 / 3, 0.01 / 3 + 0.04 / 3  # bigram "2 ->", trigram "1 2 ->"
    want0 = [0.5 * np.log(0.5) + 0.5 * np.log(p3), 0.5 * np.log(0.3) + 0.5 * np.log(p4), 0.5 * np.log(0.2) - 200]
    np.testing.assert_allclose(lp[0, 0], want0, rtol=1e-5)
    np.testing.assert_allclose(lp[0, 1], 0.5 * np.log([0.5, 0.3, 0.2]) - 200, rtol=1e-5)


def test_save_load_roundtrip_and_errors(corpus, tmp_path):
    ng, _ = corpus
    path = save_ngrams(ng, tmp_path / "ng.npz")
    back = load_ngrams(path, vocab_size=97)
    assert back.ns == ng.ns and back.info == ng.info and back.info["documents"] == 74
    for a, b in zip(jax.tree.leaves(ng), jax.tree.leaves(back)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_ngrams(tmp_path / "missing.npz")
    with pytest.raises(ValueError, match="vocabulary of 97"):
        load_ngrams(path, vocab_size=1000)
    (tmp_path / "bad.npz").write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="not a valid"):
        load_ngrams(tmp_path / "bad.npz")
    np.savez(tmp_path / "other.npz", meta=np.array(json.dumps({"format": "x"})))
    with pytest.raises(ValueError, match="not a valid"):
        load_ngrams(tmp_path / "other.npz")


def test_corpus_readers_and_text_builder(tmp_path):
    (tmp_path / "c.txt").write_text("a b c\nd\n\n\nb c a\n")
    rows = [{"text": "a b"}, {"conversations": [{"from": "human", "value": "c a"}]},
            {"messages": [{"role": "user", "content": "b b"}]}]
    (tmp_path / "c.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n")
    assert corpus_texts(tmp_path / "c.txt")[0] == ["a b c\nd", "b c a"]
    assert corpus_texts(tmp_path / "c.jsonl")[0] == ["a b", "c a", "b b"]
    with pytest.raises(FileNotFoundError):
        corpus_texts(tmp_path / "nope.txt")
    tok = Tokenizer(models.WordLevel(vocab={"<unk>": 0, "a": 1, "b": 2, "c": 3, "d": 4}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    text_tok = TextTokenizer(tokenizer=tok, eos_ids=())
    ng = build_ngrams_from_texts(corpus_texts(tmp_path / "c.txt")[0], text_tok, ns=(2,), progress=False)
    assert ng.info["tokens"] == 7 and ng.info["vocab_size"] == 5 and ng.info["tokenizer"].startswith("vocab5-")
    p, _ = ngram_probs(ng, jnp.asarray([[2]]), jnp.asarray([1]), jnp.asarray([[3, 1]]), jnp.asarray([1.0]))
    np.testing.assert_allclose(p, [[1.0, 0.0]])  # "b" is always followed by "c"


# ----------------------------------------------------------------------------- API


def test_generate_superposed(tiny_lm, tiny, corpus, tmp_path):
    """``generate(method="superposed")`` returns the drafts of ``superposed_decode`` (EOS cut), best
    first, reads n-gram files, and k = 1, alpha = 0 is greedy decoding."""
    import specdec

    greedy = specdec.generate(tiny_lm, PROMPTS, max_new_tokens=7)
    one = specdec.generate(tiny_lm, PROMPTS, method="superposed", num_drafts=1, alpha=0, max_new_tokens=7)
    assert [r.tokens for r in one] == [r.tokens for r in greedy]
    path = save_ngrams(corpus[0], tmp_path / "ng.npz")
    out = specdec.generate(tiny_lm, PROMPTS, method="superposed", num_drafts=3, ngrams=str(path),
                           max_new_tokens=6, stop_tokens=[11])
    direct = decode_superposed(nnx.split(tiny), PROMPTS, num_drafts=3, max_new_tokens=6, ngrams=corpus[0],
                               eos_ids=[11])
    for r, d in zip(out, direct):
        assert [(x.tokens, x.score) for x in r.drafts] == [(t[:-1] if t and t[-1] == 11 else t, s) for t, s in d]
        assert r.tokens == r.drafts[0].tokens and len(r.drafts) == 3
        assert [x.score for x in r.drafts] == sorted((x.score for x in r.drafts), reverse=True)
    with pytest.raises(ValueError, match="does not take"):
        specdec.generate(tiny_lm, PROMPTS, method="superposed", temperature=0.7)
    with pytest.raises(ValueError, match="does not take option"):
        specdec.generate(tiny_lm, PROMPTS, method="superposed", k=3)
    with pytest.raises(ValueError, match="no tokenizer"):
        specdec.generate(tiny_lm, PROMPTS, method="superposed")
    with pytest.raises(ValueError, match="one max_new_tokens"):
        specdec.generate(tiny_lm, PROMPTS, method="superposed", alpha=0, max_new_tokens=[4, 5, 6, 7])
    with pytest.raises(ValueError, match="use generate"):
        next(specdec.stream(tiny_lm, "hi", method="superposed"))
