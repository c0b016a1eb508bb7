"""Ragged batches and the request pool: every row equals its prompt decoded alone, for every proposer.

Tiny random target, a different 1-layer random draft and random Medusa heads. The
reference is each prompt decoded alone, autoregressively, with the row's own seed.
A deliberately wrong batch engine (the classic bugs) must be flagged by the checker.
"""

from __future__ import annotations

import argparse
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import specdec
from specdec.api import Generation
from specdec.autoregressive import plan_shapes, prompt_arrays
from specdec.engine import propose_jit, verify_jit, spec_prefill
from specdec.equivalence import DEFAULT_TOLERANCE, Report, check, classify
from specdec.methods import build_proposer
from specdec.pool import SlotUse, next_power_of_two, put_rows, take_rows
from specdec.sampling import Sampling

PROPOSERS = ("draft", "prompt_lookup", "medusa", "eagle")


def _case(seed: int, batch: int, temperature: float):
    """Prompts of mixed lengths, mixed budgets, per-row seeds."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, 97, rng.integers(1, 40)).tolist() for _ in range(batch)]
    opts = dict(max_new_tokens=[int(n) for n in rng.integers(1, 28, batch)], temperature=temperature,
                top_k=20 if temperature else 0, seed=[int(s) for s in rng.integers(0, 2**31, batch)], stop_tokens=[11])
    return prompts, opts


@pytest.mark.parametrize("batch", [1, 2, 3, 8, 16])
@pytest.mark.parametrize("proposer", PROPOSERS)
def test_ragged_batch_rows_equal_each_prompt_alone(tiny_lm, methods, batch, proposer):
    """One batch, every row its own length and budget: coupled sampling with the row's seed at odd batch
    sizes, greedy at even ones (so each proposer runs both); each case its own random prompts."""
    prompts, opts = _case(100 * batch + PROPOSERS.index(proposer), batch, 0.9 if batch % 2 else 0.0)
    report = check(tiny_lm, prompts, **methods[proposer], **opts)
    assert report.counts["identical"] == batch, report.table()


@settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10**6), proposer=st.sampled_from(PROPOSERS + ("autoregressive",)),
       slots=st.sampled_from([3, 1, 2, 5, 8]), temperature=st.sampled_from([0.9, 0.0]), data=st.data())
def test_pool_equals_each_prompt_alone_in_any_order(tiny_lm, methods, seed, proposer, slots, temperature, data):
    """Through a pool of any slot count, in any arrival order, each request's output is its output alone.
    (Hypothesis tries its simplest example first: the first value of each list, a pool that is not trivial.)"""
    prompts, opts = _case(seed, 9, temperature)
    alone = [specdec.generate(tiny_lm, p, **{k: v[i] if isinstance(v, list) and k != "stop_tokens" else v
                                            for k, v in opts.items()}) for i, p in enumerate(prompts)]
    order = data.draw(st.permutations(range(len(prompts))))
    arrived = {k: [v[i] for i in order] if isinstance(v, list) and k != "stop_tokens" else v for k, v in opts.items()}
    method = methods.get(proposer, {})
    pooled = specdec.generate(tiny_lm, [prompts[i] for i in order], slots=slots, chunk_steps=3, **arrived, **method)
    for got, i in zip(pooled, order):
        assert (got.tokens, got.finish_reason) == (alone[i].tokens, alone[i].finish_reason), (i, slots)
    stats = pooled[0].stats
    assert len(stats.slot_utilisation) == min(slots, len(prompts))
    # a slot whose every request ended at its prefill (budget 1) held no running row in any forward
    use = stats.slot_utilisation
    assert all(0 <= u <= 1 for u in use) and (max(use) > 0) == (stats.row_forwards > 0)
    assert stats.row_forwards == sum(g.target_forwards for g in pooled)


@pytest.mark.parametrize("proposer", PROPOSERS + ("autoregressive", "early_exit", "budget"))
def test_merged_admissions_equal_each_prompt_alone(tiny_lm, methods, proposer, monkeypatch):
    """Requests admitted while rows run are prefilled in the target forward of one of those rows'
    steps (sampled, each request with its own seed): every output equals the prompt's alone and the
    pool's without merging. Early exit verifies from its exit layer, so its admissions stay alone."""
    import specdec.api

    merged = []
    monkeypatch.setattr(specdec.api, "admit_speculative", _counted(specdec.api.admit_speculative, merged))
    monkeypatch.setattr(specdec.api, "admit_autoregressive", _counted(specdec.api.admit_autoregressive, merged))
    prompts, opts = _case(5, 7, 0.9)
    method = {"early_exit": dict(method="early_exit", exit_layer=1, k=2),
              "budget": dict(methods["prompt_lookup"], budget=3)}.get(proposer, methods.get(proposer, {}))
    alone = [specdec.generate(tiny_lm, p, **method, **{k: v[i] if k in ("max_new_tokens", "seed") else v
                                                       for k, v in opts.items()}) for i, p in enumerate(prompts)]
    for merge in (True, False):
        pooled = specdec.generate(tiny_lm, prompts, slots=3, chunk_steps=3, merge_admissions=merge, **opts, **method)
        assert [(r.tokens, r.finish_reason) for r in pooled] == [(r.tokens, r.finish_reason) for r in alone], merge
        assert pooled[0].stats.row_forwards == sum(g.target_forwards for g in pooled)
    assert (len(merged) == 0) if proposer == "early_exit" else (0 < len(merged) <= len(prompts) - 3)


def _counted(fn, calls: list):
    """``fn``, appending to ``calls`` at each call."""
    return lambda *a, **k: calls.append(1) or fn(*a, **k)


@pytest.mark.parametrize("slots", [1, 2])
def test_pool_admits_requests_that_end_at_prefill(tiny_lm, slots):
    """Requests with a budget of one token finish at their prefill: the pool harvests them and goes on
    (once the only running rows were such requests and the decode loop had nothing left to run)."""
    prompts, budgets = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [3]], [5, 1, 1, 4]
    alone = [specdec.generate(tiny_lm, p, max_new_tokens=n).tokens for p, n in zip(prompts, budgets)]
    pooled = specdec.generate(tiny_lm, prompts, max_new_tokens=budgets, slots=slots, chunk_steps=2)
    assert [r.tokens for r in pooled] == alone


@pytest.mark.parametrize("merge", [True, False])
@pytest.mark.parametrize("proposer", ["autoregressive", "prompt_lookup"])
def test_pool_refills_a_slot_as_soon_as_its_request_finishes(tiny_lm, methods, proposer, merge):
    """A chunk ends at the step a row finishes: the waiting request starts in the freed slot at once,
    not when the chunk's 16 steps are up (requests 1 and 2 are the same, so each takes F forwards).
    A merged admission prefills request 2 in the forward of request 1's second step."""
    prompts = [[1, 2, 3], [4, 5, 6, 7], [4, 5, 6, 7]]
    res = specdec.generate(tiny_lm, prompts, max_new_tokens=[2, 30, 30], slots=2, chunk_steps=16, ignore_eos=True,
                           merge_admissions=merge, **methods.get(proposer, {}))
    f = res[1].target_forwards
    assert res[0].target_forwards == 1 and res[2].target_forwards == f
    if merge:  # slot 0: request 0's one step, request 2's prefill beside request 1's second step, request 2's F
        assert res[0].stats.target_forwards == 2 + f
        assert res[0].stats.slot_utilisation == [(1 + f) / (2 + f), f / (2 + f)]
    else:  # slot 0: request 0's one step, then request 2's F; its prefill is a forward of its own
        assert res[0].stats.target_forwards == 1 + f
        assert res[0].stats.slot_utilisation == [1.0, f / (1 + f)]


def test_pool_reports_work_and_rejects_bad_slots(tiny_lm, methods):
    prompts = [[1, 2, 3], [4, 5, 6, 7], [8, 9], [10, 11, 12, 13, 14]]
    res = specdec.generate(tiny_lm, prompts, max_new_tokens=[20, 5, 12, 30], slots=2, chunk_steps=4,
                           ignore_eos=True, **methods["prompt_lookup"])
    s = res[0].stats
    assert s.new_tokens == 20 + 5 + 12 + 30 and s.rows == 4
    assert s.accepted_per_forward == pytest.approx((s.new_tokens - 4) / s.row_forwards)
    assert s.target_forwards < s.row_forwards  # two rows shared most forwards
    with pytest.raises(ValueError, match="slots .* must be an integer >= 1"):
        specdec.generate(tiny_lm, prompts, slots=0)


def test_pool_times_each_prefill(tiny_lm, monkeypatch):
    """The first rows are prefilled together, then each admitted request alone; stats.prefill_s is
    their wall time, a part of the run's (and without slots=, the one prefill of the whole batch)."""
    import specdec.api

    uses = []
    monkeypatch.setattr(specdec.api, "SlotUse", lambda: uses.append(SlotUse()) or uses[-1])
    prompts = [[1, 2, 3], [4, 5, 6, 7], [8, 9], [10, 11, 12, 13, 14], [2, 4]]
    for slots, prefills in ((2, 4), (1, 5), (None, 1)):
        s = specdec.generate(tiny_lm, prompts, max_new_tokens=6, slots=slots, ignore_eos=True)[0].stats
        assert uses[-1].prefills == prefills, slots
        assert 0 < s.prefill_s == uses[-1].prefill_s < s.wall_s


BY_LOAD = {"draft": {"k": {1: 3, 2: 1, 3: 0}, "draft_width": {1: 2, 2: 1}},
           "prompt_lookup": {"k": {1: 4, 2: 0, 4: 2}, "draft_width": {1: 1, 4: 2}},
           "medusa": {"tree": {1: "tree-8", 2: "chain-0", 3: "chain-2"}},
           "eagle": {"k": {1: 3, 2: 0, 3: 1}, "draft_width": {1: 2, 3: 3}}}
"""Each schedule turns speculation off (k 0, tree "chain-0") at some load and back on below it; the
draft width varies by load as well."""


@pytest.mark.parametrize("proposer", PROPOSERS)
def test_pool_with_proposers_by_load_equals_each_prompt_alone(tiny_lm, methods, proposer, monkeypatch):
    """k (or the tree) picked by running rows at each chunk: several proposers run, outputs unchanged."""
    from specdec.engine import ByLoad

    picked = []
    pick = ByLoad.pick
    monkeypatch.setattr(ByLoad, "pick", lambda self, running: picked.append(pick(self, running)) or picked[-1])
    prompts, opts = _case(11, 7, 0.9)
    alone = [specdec.generate(tiny_lm, p, **{k: v[i] if isinstance(v, list) and k != "stop_tokens" else v
                                            for k, v in opts.items()}) for i, p in enumerate(prompts)]
    method = {**methods[proposer], **BY_LOAD[proposer]}
    pooled = specdec.generate(tiny_lm, prompts, slots=4, chunk_steps=2, **opts, **method)
    assert [(g.tokens, g.finish_reason) for g in pooled] == [(g.tokens, g.finish_reason) for g in alone]
    assert len({p.tree for p in picked}) > 1  # the schedule switched proposers
    sizes = [p.tree.size for p in picked]
    assert 1 in sizes and max(sizes[sizes.index(1):]) > 1  # speculation went off, then on again


def test_by_load_schedule_picks_by_running_rows_and_rejects_bad_schedules(tiny_lm):
    from specdec.cli_methods import by_load_type
    from specdec.engine import ByLoad

    sched, _ = build_proposer("prompt_lookup", tiny_lm, {"k": {8: 2, 1: 4, 3: 3}})
    assert [sched.pick(r).k for r in (0, 1, 2, 3, 7, 8, 30)] == [4, 4, 4, 3, 3, 2, 2]
    assert sched.tree.size == 5 and sched.max_depth == 4
    with pytest.raises(ValueError, match="starting at 1"):
        build_proposer("prompt_lookup", tiny_lm, {"k": {2: 4, 8: 2}})
    with pytest.raises(ValueError, match="running-row counts"):
        build_proposer("prompt_lookup", tiny_lm, {"k": {"1": 4}})
    with pytest.raises(ValueError, match="strict=True"):
        check(tiny_lm, [[1, 2, 3]], method="prompt_lookup", k={1: 4, 2: 1}, strict=True, max_new_tokens=4)
    assert by_load_type(int)("1:4,8:2") == {1: 4, 8: 2} and by_load_type(int)("3") == 3
    with pytest.raises(argparse.ArgumentTypeError, match="ROWS:VALUE"):
        by_load_type(int)("1:4,8")
    with pytest.raises(ValueError, match="distinct ascending"):
        ByLoad(((1, sched.pick(1)), (1, sched.pick(8))))


def test_draft_width_by_load_combines_with_k_by_load(tiny_lm, methods):
    sched, _ = build_proposer("prompt_lookup", tiny_lm, {"k": {1: 4, 4: 1}, "draft_width": {1: 2, 2: 1}})
    assert [r for r, _ in sched.steps] == [1, 2, 4]
    assert [(sched.pick(r).k, sched.pick(r).width) for r in (1, 2, 4, 8)] == [(4, 2), (4, 1), (1, 1), (1, 1)]
    eagle = {o: v for o, v in methods["eagle"].items() if o != "method"} | {"k": 2, "draft_width": {1: 3, 8: 1}}
    sched, _ = build_proposer("eagle", tiny_lm, eagle)
    assert [sched.pick(r).tree.size for r in (1, 7, 8)] == [7, 7, 3]  # root + 3 + 3, then a chain of 2
    with pytest.raises(ValueError, match="draft_branches takes one value"):
        build_proposer("eagle", tiny_lm, eagle | {"draft_branches": {1: 2, 8: 1}})


def test_row_scatter_and_gather_move_whole_rows(tiny_lm):
    from specdec.autoregressive import prefill

    shapes = plan_shapes(tiny_lm.config, [5, 9, 3], [8, 8, 8])
    prompts = [[1, 2, 3, 4, 5], list(range(9)), [7, 7, 7]]
    common = dict(shapes=shapes, sampling=Sampling(), eos_ids=())
    full = prefill(tiny_lm.graphdef, tiny_lm.state, *prompt_arrays(prompts, shapes, [8] * 3, [0, 1, 2]), **common)
    two = take_rows(full, jnp.asarray([2, 0]))
    assert two.cache.k[0].shape[0] == 2 and np.asarray(two.cache.lengths).tolist() == [3, 5]
    np.testing.assert_array_equal(np.asarray(two.cache.k)[:, 0], np.asarray(full.cache.k)[:, 2])
    blank = prefill(tiny_lm.graphdef, tiny_lm.state, *prompt_arrays([[0]] * 3, shapes, [8] * 3, [0, 1, 2]), **common)
    merged = put_rows(blank, jnp.asarray([1, 3]), two)  # index 3 is past the batch: dropped
    np.testing.assert_array_equal(np.asarray(merged.cache.k)[:, 1], np.asarray(full.cache.k)[:, 2])
    assert np.asarray(merged.cache.lengths).tolist() == [1, 3, 1]
    assert [next_power_of_two(n) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, 16]


def _buggy_batch_decode(lm, method: dict, prompts, max_new: int, bug: str | None) -> list[Generation]:
    """A host-driven batch loop built from the engine's halves, with a classic batching bug added:
    ``min_advance`` advances every row's cache by the batch's smallest accepted count while each
    row emits its own tokens; ``shared_position`` writes every row's candidates at one shared
    position (the batch's longest row). ``bug=None`` is the correct loop."""
    proposer, pparams = build_proposer(method["method"], lm, {k: v for k, v in method.items() if k != "method"})
    sampling, eos = Sampling(), ()
    shapes = plan_shapes(lm.config, [len(p) for p in prompts], [max_new] * len(prompts), extra=proposer.tree.size)
    st = spec_prefill(lm.graphdef, lm.state, proposer, pparams,
                      *prompt_arrays(prompts, shapes, [max_new] * len(prompts), [0] * len(prompts)), shapes=shapes,
                      sampling=sampling, eos_ids=eos, max_depth=proposer.tree.max_depth)
    while not bool(jnp.all(st.dec.done)):
        lengths = st.dec.cache.lengths
        if bug == "shared_position":
            shared = st.dec.cache.with_lengths(jnp.full_like(lengths, lengths.max()))
            st = st.replace(dec=st.dec.replace(cache=shared))
        pstate, prop = propose_jit(lm.graphdef, lm.state, proposer, pparams, st, sampling=sampling, rule="exact")
        new = verify_jit(lm.graphdef, lm.state, proposer, pparams, st, pstate, prop, sampling=sampling, rule="exact",
                          eos_ids=eos)
        if bug == "min_advance":
            step = new.dec.cache.lengths - lengths
            active = ~st.dec.done
            shared = jnp.min(jnp.where(active, step, step.max()))
            cache = new.dec.cache.with_lengths(lengths + jnp.where(active, shared, 0))
            new = new.replace(dec=new.dec.replace(cache=cache))
        st = new
    out, n_out = np.asarray(st.dec.out), np.asarray(st.dec.n_out)
    return [Generation(tokens=out[i, :n_out[i]].tolist(), text=None, finish_reason="length", prompt_tokens=len(p),
                       stats=None) for i, p in enumerate(prompts)]


@pytest.mark.parametrize("bug", [None, "min_advance", "shared_position"])
def test_checker_flags_the_classic_batch_bugs(tiny_lm, bug):
    """The suite can tell a wrong batch implementation: the same loop with a classic bug is a MISMATCH."""
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, 97, n).tolist() for n in (3, 21, 9, 34)]
    method = dict(method="prompt_lookup", k=4)  # rows accept different numbers of tokens per step
    ours = _buggy_batch_decode(tiny_lm, method, prompts, 24, bug)
    ref = [specdec.generate(tiny_lm, p, max_new_tokens=24, ignore_eos=True) for p in prompts]
    report = Report("prompt_lookup", [classify(tiny_lm, p, a, b, sampling=Sampling(), seed=0, eos_ids=())
                                      for p, a, b in zip(prompts, ours, ref)])
    verdicts = [r.verdict for r in report.rows]
    if bug is None:
        assert verdicts == ["identical"] * 4 and report.worst_gap is None
    else:  # every row runs its whole budget: a wrong row diverges at a token choice, far past a tie
        assert "MISMATCH" in verdicts and report.worst_gap > DEFAULT_TOLERANCE, report.table()
