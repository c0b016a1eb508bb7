"""Budgeted speculation: the nodes a budget keeps, the packed target forward, and exact outputs.

Tiny random target, a different 1-layer random draft and random Medusa heads; the reference is
each prompt decoded alone, autoregressively, with the row's own seed.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import specdec
from specdec.budget import Budgeted, select_nodes
from specdec.cache import init_cache
from specdec.equivalence import check
from specdec.methods import build_proposer
from specdec.model import forward
from specdec.tree import Tree

FORK = Tree((-1, 0, 0, 1))  # root -> {1, 2}, 1 -> 3


def test_select_nodes_keeps_the_likeliest_paths_of_the_batch():
    """Path chance = product of confidences along the path; the budget's best nodes over all rows."""
    conf = jnp.asarray([[0.9, 0.2, 0.8], [0.5, 0.6, 0.99]])  # paths: row 0 .9 .2 .72, row 1 .5 .6 .495
    kept, packed = select_nodes(FORK, conf, jnp.asarray([True, True]), 3)
    assert kept.tolist() == [[True, True, False, True], [True, False, True, False]]
    assert packed.tolist() == [0, 4, 1, 3, 6]  # roots, then row 0 node 1, row 0 node 3, row 1 node 2
    kept, packed = select_nodes(FORK, conf, jnp.asarray([True, False]), 3)  # a finished row gets nothing
    assert kept.tolist() == [[True] * 4, [True, False, False, False]]
    assert packed.tolist() == [0, 4, 1, 3, 2]
    kept, packed = select_nodes(FORK, conf, jnp.asarray([True, True]), 50)  # more than there are: all of them
    assert bool(kept.all()) and sorted(packed.tolist()) == list(range(8))


def test_select_nodes_never_keeps_a_node_without_its_parent():
    """Equal chances (a confidence of 1) rank the parent first, so a budget of 1 takes node 1, not 3."""
    kept, _ = select_nodes(FORK, jnp.asarray([[1.0, 0.0, 1.0]]), jnp.asarray([True]), 1)
    assert kept.tolist() == [[True, True, False, False]]


def test_packed_forward_computes_the_packed_tokens_exactly(tiny):
    """Rows' roots plus a few chain nodes: the same logits and K/V as the full forward there, zeros elsewhere."""
    b, t, length = 3, 3, 5
    cache = forward(tiny, init_cache(tiny.config, b, 16), tokens=jnp.arange(b * length).reshape(b, length) % 90,
                    positions=jnp.broadcast_to(jnp.arange(length), (b, length))).cache.with_lengths(
                        jnp.full((b,), length))
    tokens = jnp.asarray([[3, 9, 27], [4, 16, 64], [5, 25, 1]])
    where = dict(tokens=tokens, positions=length + jnp.broadcast_to(jnp.arange(t), (b, t)))
    full = forward(tiny, cache, **where)
    packed = jnp.asarray([0, 3, 6, 1, 2, 7])  # roots; row 0 nodes 1 and 2; row 2 node 1
    got = forward(tiny, cache, packed=packed, **where)
    on = np.zeros(b * t, bool)
    on[np.asarray(packed)] = True
    on = on.reshape(b, t)
    np.testing.assert_allclose(np.asarray(got.logits)[on], np.asarray(full.logits)[on], rtol=1e-5, atol=1e-5)
    assert not np.asarray(got.logits)[~on].any()
    k_got, k_full = (np.moveaxis(np.asarray(c.k), 2, 3)[:, :, length:length + t] for c in (got.cache, full.cache))
    np.testing.assert_allclose(k_got[:, on], k_full[:, on], rtol=1e-5, atol=1e-5)
    assert not k_got[:, ~on].any()


PROPOSERS = ("draft", "prompt_lookup", "medusa", "eagle")


@pytest.mark.parametrize("proposer", PROPOSERS)
@pytest.mark.parametrize("batch, budget", [(1, 2), (3, 5), (8, 1), (8, 64)])
def test_budgeted_rows_equal_each_prompt_alone(tiny_lm, methods, proposer, batch, budget):
    """Greedy at batch 8, coupled sampling with each row's seed at 1 and 3; mixed lengths; every budget
    from one node per step to more than the whole batch drafts (each case its own random prompts)."""
    rng = np.random.default_rng([batch, budget, PROPOSERS.index(proposer)])
    prompts = [rng.integers(0, 97, rng.integers(1, 40)).tolist() for _ in range(batch)]
    temperature = 0.0 if batch == 8 else 0.9
    opts = dict(max_new_tokens=[int(n) for n in rng.integers(1, 28, batch)], temperature=temperature,
                top_k=20 if temperature else 0, seed=[int(s) for s in rng.integers(0, 2**31, batch)], stop_tokens=[11])
    report = check(tiny_lm, prompts, **methods[proposer], budget=budget, **opts)
    assert report.counts["identical"] == batch, report.table()


def test_budget_by_load_combines_with_k_by_load(tiny_lm):
    sched, _ = build_proposer("prompt_lookup", tiny_lm, {"k": {1: 4, 2: 2}, "budget": {1: 6, 3: 1}})
    assert [r for r, _ in sched.steps] == [1, 2, 3]
    assert [(sched.pick(r).proposer.k, sched.pick(r).budget) for r in (1, 2, 3, 8)] == [(4, 6), (2, 6), (2, 1), (2, 1)]
    with pytest.raises(ValueError, match="starting at 1"):
        build_proposer("prompt_lookup", tiny_lm, {"k": 4, "budget": {4: 2}})


def test_pool_with_a_budget_by_load_equals_each_prompt_alone(tiny_lm, methods):
    prompts = [[1, 2, 3], [4, 5, 6, 7], [8, 9], [10, 11, 12, 13, 14], [5, 9, 14, 2, 7]]
    alone = [specdec.generate(tiny_lm, p, max_new_tokens=24).tokens for p in prompts]
    pooled = specdec.generate(tiny_lm, prompts, max_new_tokens=24, slots=3, chunk_steps=4,
                              **{**methods["prompt_lookup"], "k": {1: 4, 2: 2}}, budget={1: 4, 3: 2})
    assert [r.tokens for r in pooled] == alone


def test_a_budget_caps_the_draft_tokens_a_step_accepts(tiny_lm):
    """Prompt lookup k 6 on a looping random model accepts runs of two; with budget 1, at most one per step."""
    prompt = [38, 83, 53, 3, 74, 70]
    free = specdec.generate(tiny_lm, prompt, method="prompt_lookup", k=6, max_new_tokens=60)
    capped = specdec.generate(tiny_lm, prompt, method="prompt_lookup", k=6, budget=1, max_new_tokens=60)
    assert capped.tokens == free.tokens
    assert sum(free.accepted_histogram[2:]) > 0, free.accepted_histogram
    assert capped.accepted_histogram[1] > 0 and sum(capped.accepted_histogram[2:]) == 0, capped.accepted_histogram


def test_bad_budgets_are_clear_errors(tiny_lm, methods):
    with pytest.raises(ValueError, match="budget .* must be an integer >= 1"):
        specdec.generate(tiny_lm, [1, 2], budget=0, **methods["prompt_lookup"])
    with pytest.raises(ValueError, match="a budget needs verification 'exact'"):
        specdec.generate(tiny_lm, [1, 2], budget=2, temperature=1.0, verification="rejection", **methods["draft"])
    with pytest.raises(ValueError, match="does not take option"):
        specdec.generate(tiny_lm, [1, 2], method="early_exit", exit_layer=1, budget=2)
    with pytest.raises(ValueError, match="a budget packs"):
        check(tiny_lm, [[1, 2]], budget=2, strict=True, max_new_tokens=4, **methods["prompt_lookup"])
    with pytest.raises(ValueError, match="a budget needs a proposer whose drafts"):
        from drafts.early_exit import early_exit_proposer

        Budgeted(early_exit_proposer(tiny_lm.config, tiny_lm.graphdef, exit_layer=1, k=2), 2)
