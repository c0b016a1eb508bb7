"""The speculative engine with tiny random target/draft pairs: equivalence with autoregressive decoding."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import specdec
from drafts.prompt_lookup import lookup
from specdec.autoregressive import StepConfig, decode, plan_shapes
from specdec.engine import Proposal, speculative_decode
from specdec.sampling import Sampling
from specdec.tree import Tree
from specdec.config import tiny_config
from specdec.equivalence import check
from specdec.loading import LoadedModel
from specdec.model import init_model


@pytest.fixture(scope="module")
def small_draft():
    """A different, 1-layer random model with the target's vocabulary."""
    return LoadedModel.from_module(init_model(tiny_config(n_layers=1), seed=7), name="tiny-draft")


def _method(kind: str, k: int, width: int, tiny_lm, small_draft, branches: int = 1) -> dict:
    if kind == "prompt_lookup":
        return dict(method="prompt_lookup", k=k)
    return dict(method="draft", draft=tiny_lm if kind == "self" else small_draft, k=k, draft_width=width,
                draft_branches=branches)


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["self", "draft", "prompt_lookup"]), k=st.integers(1, 5), width=st.integers(1, 3),
       branches=st.integers(1, 3), lens=st.lists(st.integers(1, 40), min_size=1, max_size=8),
       temperature=st.sampled_from([0.0, 0.9]), data=st.data())
def test_speculative_rows_equal_autoregressive(tiny_lm, small_draft, kind, k, width, branches, lens, temperature,
                                               data):
    """Greedy, and coupled sampling with per-row seeds: every row token-identical to autoregressive."""
    rng = np.random.default_rng(sum(lens) + k)
    prompts = [rng.integers(0, 97, n).tolist() for n in lens]
    max_new = data.draw(st.lists(st.integers(1, 30), min_size=len(lens), max_size=len(lens)))
    seeds = list(range(3, 3 + len(lens)))
    opts = dict(max_new_tokens=max_new, temperature=temperature, top_k=20 if temperature else 0, seed=seeds,
                stop_tokens=[11])
    report = check(tiny_lm, prompts, **_method(kind, k, width, tiny_lm, small_draft, branches), **opts)
    assert report.counts["identical"] == len(prompts), report.table()


@dataclass(frozen=True)
class RepeatTreeProposer:
    """Test proposer over any tree: flagged nodes repeat the root token (tiny random models loop, so
    these are often right at several depths), the others propose fixed unlikely tokens."""

    tree: Tree
    repeat: tuple[bool, ...]

    def prefill(self, params, tokens, prompt_lens, capacity, hidden=None):
        return None

    def propose(self, params, state, view, sampling, rule):
        others = jnp.arange(1, self.tree.size)[None, :] * 7 % 97
        tokens = jnp.where(jnp.asarray(self.repeat[1:])[None, :], view.last[:, None], others)
        return state, Proposal(tokens=tokens.astype(jnp.int32), draft_probs=None)

    def commit(self, params, state, commit):
        return state


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), batch=st.integers(1, 6), temperature=st.sampled_from([0.0, 0.9]))
def test_any_tree_shape_commits_exactly(tiny, data, batch, temperature):
    """Arbitrary trees: accepted paths at any node indices are compacted correctly (output = autoregressive)."""
    from flax import nnx

    size = data.draw(st.integers(2, 12))
    tree = Tree((-1,) + tuple(data.draw(st.integers(0, i - 1)) for i in range(1, size)))
    repeat = tuple(data.draw(st.lists(st.booleans(), min_size=size, max_size=size)))
    graphdef, params = nnx.split(tiny)
    rng = np.random.default_rng(size)
    prompts = [rng.integers(0, 97, rng.integers(1, 30)).tolist() for _ in range(batch)]
    max_new = [int(n) for n in rng.integers(1, 40, batch)]
    lens, sampling = [len(p) for p in prompts], Sampling(temperature=temperature)
    common = dict(max_new=max_new, seeds=list(range(batch)))
    *_, ar = decode(graphdef, params, prompts, **common, config=StepConfig(
        sampling=sampling, eos_ids=(), shapes=plan_shapes(tiny.config, lens, max_new)))
    *_, sp = speculative_decode(graphdef, params, RepeatTreeProposer(tree, repeat), None, prompts, rule="exact",
                                **common, config=StepConfig(sampling=sampling, eos_ids=(),
                                                            shapes=plan_shapes(tiny.config, lens, max_new, extra=size)))
    for r in range(batch):
        assert np.asarray(sp.dec.out[r, :max_new[r]]).tolist() == np.asarray(ar.out[r, :max_new[r]]).tolist()


def test_deep_path_through_later_siblings(tiny):
    """The accepted path runs through nodes 2 -> 4 -> 5 (not the first children): compaction must move it."""
    from flax import nnx

    graphdef, params = nnx.split(tiny)
    tree = Tree((-1, 0, 0, 1, 2, 4))
    proposer = RepeatTreeProposer(tree, (False, False, True, False, True, True))
    prompts, max_new = [[1, 2, 3, 4, 5]], [30]  # the tiny model falls into a one-token loop here
    *_, ar = decode(graphdef, params, prompts, max_new=max_new, seeds=[0], config=StepConfig(
        sampling=Sampling(), eos_ids=(), shapes=plan_shapes(tiny.config, [5], max_new)))
    *_, sp = speculative_decode(graphdef, params, proposer, None, prompts, rule="exact", max_new=max_new, seeds=[0],
                                config=StepConfig(sampling=Sampling(), eos_ids=(),
                                                  shapes=plan_shapes(tiny.config, [5], max_new, extra=tree.size)))
    assert np.asarray(sp.dec.out[0, :30]).tolist() == np.asarray(ar.out[0, :30]).tolist()
    assert int(sp.accepted_hist[0, 3]) > 0, sp.accepted_hist


@pytest.mark.parametrize("method, temperature", [("prompt_lookup", 0.0), ("draft", 0.8)])
def test_strict_check_is_bitwise(tiny_lm, small_draft, method, temperature):
    """With the reference as wide as the tree and in the same batches, outputs match with no tolerance
    (greedy prompt lookup; a sampled draft tree)."""
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, 97, n).tolist() for n in (4, 19, 33)]
    options = dict(k=5) if method == "prompt_lookup" else dict(draft=small_draft, k=3, draft_width=2)
    report = check(tiny_lm, prompts, method, strict=True, max_new_tokens=40, temperature=temperature,
                   seed=[1, 2, 3], **options)
    assert report.counts["identical"] == 3, report.table()


def test_block_width_reference_equals_plain_decoding(tiny_lm):
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6]]
    plain = specdec.generate(tiny_lm, prompts, max_new_tokens=30)
    wide = specdec.generate(tiny_lm, prompts, max_new_tokens=30, block_width=7)
    assert [r.tokens for r in wide] == [r.tokens for r in plain]
    with pytest.raises(ValueError, match="block_width must be an integer >= 1"):
        specdec.generate(tiny_lm, prompts, block_width=0)


@pytest.mark.parametrize("width, temperature", [(1, 0.0), (3, 1.0)])  # a greedy chain, a sampled tree
def test_target_as_draft_accepts_every_draft(tiny_lm, width, temperature):
    prompts = [[1, 2, 3], list(range(20, 45))]
    res = specdec.generate(tiny_lm, prompts, method="draft", draft=tiny_lm, k=4, draft_width=width,
                           max_new_tokens=[40, 23], temperature=temperature, seed=[5, 6])
    for r in res:
        hist = r.accepted_histogram
        assert sum(hist[:-1]) == 0 and hist[-1] == r.target_forwards, hist
        assert r.accepted_per_forward > 4.0 - 1e-9 or r.finish_reason != "length"


def test_draft_switched_off_by_load_stays_in_step(tiny_lm):
    """k 0 at 2 rows still feeds the draft: once one row runs, the target as its own draft accepts
    every draft again (a draft cache left behind would reject some)."""
    res = specdec.generate(tiny_lm, [[1, 2, 3], list(range(20, 45))], method="draft", draft=tiny_lm,
                           k={1: 3, 2: 0}, max_new_tokens=[6, 40], slots=2, chunk_steps=2, ignore_eos=True)
    hist = res[1].accepted_histogram
    assert hist[0] > 0 and hist[3] > 0 and hist[1] == hist[2] == 0, hist


def test_prompt_lookup_accepts_repetitions(tiny_lm):
    """Random tiny models fall into loops; prompt lookup must catch them without changing the output."""
    prompt = [5, 9, 14, 2, 7]
    want = specdec.generate(tiny_lm, prompt, max_new_tokens=40)
    res = specdec.generate(tiny_lm, prompt, method="prompt_lookup", k=6, max_new_tokens=40)
    assert res.tokens == want.tokens
    assert sum(res.accepted_histogram[1:]) > 0 and res.target_forwards < want.target_forwards, res


def _lookup_reference(context: list[int], max_ngram: int, k: int, width: int) -> list[tuple[list[int], int]]:
    """Prompt lookup by brute force: each earlier continuation start ranked by its longest matching
    n-gram, then by recency; the first ``width`` whose first tokens differ, padded with empty chains."""
    length = len(context) - 1
    matched = {}
    for c in range(1, length + 1):
        n = next((n for n in range(max_ngram, 0, -1) if n <= c and context[c - n:c] == context[len(context) - n:]), 0)
        if n:
            matched[c] = n
    chains, firsts = [], set()
    for c in sorted(matched, key=lambda c: (matched[c], c), reverse=True):
        if context[c] not in firsts and len(chains) < width:
            firsts.add(context[c])
            follow = context[c:c + k]
            chains.append((follow + [0] * (k - len(follow)), matched[c]))
    return chains + [([0] * k, 0)] * (width - len(chains))


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=1, max_size=30), st.integers(1, 3), st.integers(1, 4), st.integers(1, 3))
def test_lookup_matches_reference(context, max_ngram, k, width):
    hist = np.zeros((1, 40), np.int32)
    hist[0, :len(context)] = context
    got, n = lookup(jax.numpy.asarray(hist), jax.numpy.asarray([len(context) - 1]), k=k, max_ngram=max_ngram,
                    min_ngram=1, width=width)
    assert [(g.tolist(), int(m)) for g, m in zip(got[0], n[0])] == _lookup_reference(context, max_ngram, k, width)


def test_rejection_rule_and_profiled_steps_run(tiny_lm, small_draft):
    """Lossless sampling through the API; host-timed (profiled) steps give the same tokens as the device loop."""
    res = specdec.generate(tiny_lm, [[1, 2], [3, 4, 5]], method="draft", draft=small_draft, k=3,
                           temperature=1.0, verification="rejection", max_new_tokens=25)
    assert all(len(r.tokens) == 25 for r in res)
    off = specdec.generate(tiny_lm, [[1, 2], [3, 4, 5]], method="draft", draft=small_draft, k=0,
                           temperature=1.0, verification="rejection", max_new_tokens=25)
    assert all(len(r.tokens) == 25 and r.accepted_per_forward == 1 for r in off)  # k 0: one token per forward
    prof = specdec.generate(tiny_lm, [1, 2, 3], method="draft", draft=small_draft, k=3, max_new_tokens=30,
                            profile=True)
    assert prof.stats.proposer_s > 0 and prof.stats.target_s > 0
    assert prof.tokens == specdec.generate(tiny_lm, [1, 2, 3], max_new_tokens=30).tokens


def test_bad_speculative_input(tiny_lm):
    other_vocab = LoadedModel.from_module(init_model(tiny_config(vocab_size=50), seed=1), name="v50")
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        specdec.generate(tiny_lm, [1, 2], method="draft", draft=other_vocab)
    with pytest.raises(ValueError, match="k .* must be an integer >= 0"):
        specdec.generate(tiny_lm, [1, 2], method="prompt_lookup", k=-1)
    with pytest.raises(ValueError, match="k .* must be an integer >= 0"):
        specdec.generate(tiny_lm, [1, 2], method="draft", draft=tiny_lm, k=1.5)
    with pytest.raises(ValueError, match="draft_width .* must be an integer"):
        specdec.generate(tiny_lm, [1, 2], method="draft", draft=tiny_lm, draft_width=0)
    with pytest.raises(ValueError, match="unknown method 'medusa-9'"):
        specdec.generate(tiny_lm, [1, 2], method="medusa-9")
    with pytest.raises(ValueError, match="does not take option"):
        specdec.generate(tiny_lm, [1, 2], method="prompt_lookup", draft=tiny_lm)
    with pytest.raises(ValueError, match="ships no draft for .tiny.: pass draft="):
        specdec.generate(tiny_lm, [1, 2], method="draft")
    with pytest.raises(ValueError, match="unknown verification 'maybe'; known: exact, rejection, typical"):
        specdec.generate(tiny_lm, [1, 2], method="prompt_lookup", verification="maybe")
    with pytest.raises(ValueError, match="plus 9 for the candidate tree"):
        specdec.generate(tiny_lm, [1] * 500, method="prompt_lookup", k=8, max_new_tokens=4)
