"""Proposers side by side in one tree (specdec.union): the tree layout, every row identical to its
prompt decoded alone, the prompt-lookup branch really accepted, and clear errors.

Lossless sampling with a drawn feature-draft or draft-model chain beside prompt-lookup
tokens is checked in distribution in test_lossless_sampling ("eagle-lookup", "draft-lookup").
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

import specdec
from drafts.draft_model import draft_proposer
from drafts.prompt_lookup import PromptLookupProposer, with_lookup
from specdec.engine import View
from specdec.equivalence import check
from specdec.methods import build_proposer
from specdec.sampling import Sampling
from specdec.tree import Tree
from specdec.union import UnionProposer, part_offsets, union_tree


def test_union_tree_places_each_tree_under_the_shared_root():
    chain, tree = Tree.chain(2), Tree.from_paths([(0,), (1,), (0, 0)])  # (-1, 0, 1) and (-1, 0, 0, 1)
    union = union_tree([chain, tree])
    assert part_offsets([chain, tree]) == [0, 2]
    assert union.parents == (-1, 0, 1, 0, 0, 3)
    assert union.depth.tolist() == [0, 1, 2, 1, 1, 2]
    assert union_tree([Tree.chain(0), chain]).parents == chain.parents  # an empty part adds nothing


def _prompts(seed: int) -> tuple[list[list[int]], dict]:
    """Prompts that repeat themselves (prompt lookup finds matches) and random ones, mixed budgets."""
    rng = np.random.default_rng(seed)
    loop = rng.integers(0, 97, 6).tolist()
    prompts = [loop * 4, rng.integers(0, 97, 23).tolist(), loop[:3] * 5 + [7], rng.integers(0, 97, 2).tolist()]
    return prompts, dict(max_new_tokens=[30, 9, 24, 17], seed=[5, 6, 7, 8], stop_tokens=[11])


@pytest.mark.parametrize("method", ["medusa", "eagle", "draft"])
@pytest.mark.parametrize("temperature, extra", [(0.0, {}), (0.9, {}), (0.0, {"budget": 3}), (0.9, {"slots": 2}),
                                                (0.0, {"lookup_width": 3})])
def test_with_lookup_rows_equal_each_prompt_alone(tiny_lm, methods, method, temperature, extra):
    """Greedy and coupled sampling, one batch, a budget, a pool: every row is its prompt decoded alone."""
    prompts, opts = _prompts(3)
    report = check(tiny_lm, prompts, **methods[method], lookup=5, temperature=temperature,
                   top_k=20 if temperature else 0, **opts, **extra)
    assert report.counts["identical"] == len(prompts), report.table()


@pytest.mark.parametrize("method, by_load", [("medusa", {"tree": {1: "tree-8", 2: "chain-0"}}),
                                             ("eagle", {"k": {1: 3, 3: 0}}), ("draft", {"k": {1: 2, 3: 0}})])
def test_with_lookup_by_load_through_a_pool(tiny_lm, methods, method, by_load):
    """A schedule whose own tree goes empty at some load keeps the lookup branch, with one state layout."""
    options = {k: v for k, v in methods[method].items() if k != "method"}
    schedule, _ = build_proposer(method, tiny_lm, {**options, **by_load, "lookup": 3})
    assert all(step.tree.size > 1 for _, step in schedule.steps)  # drafts at every load: the lookup chain
    prompts, opts = _prompts(5)
    report = check(tiny_lm, prompts, **{**methods[method], **by_load}, lookup=3, temperature=0.9, top_k=20,
                   slots=3, chunk_steps=2, **opts)
    assert report.counts["identical"] == len(prompts), report.table()


def test_lookup_branch_is_accepted(tiny_lm, methods):
    """Medusa's chain-1 accepts at most one draft token a step; beside a 6-token lookup chain, steps
    accept more (only the lookup branch reaches that deep), and fewer target forwards are needed."""
    prompts, opts = _prompts(4)
    medusa = {**methods["medusa"], "tree": "chain-1"}
    alone = specdec.generate(tiny_lm, prompts, ignore_eos=True, **medusa, **opts)
    both = specdec.generate(tiny_lm, prompts, ignore_eos=True, lookup=6, **medusa, **opts)
    assert [g.tokens for g in both] == [g.tokens for g in alone]
    assert all(len(g.accepted_histogram) == 2 for g in alone)
    assert sum(sum(g.accepted_histogram[2:]) for g in both) > 0
    assert sum(g.target_forwards for g in both) < sum(g.target_forwards for g in alone)


def test_lookup_chains_from_distinct_matches(tiny_lm):
    """Prompt lookup with several chains: rows equal their prompts alone, the proposer's tree holds
    every chain under the root, and no fewer tokens are accepted than with one chain."""
    prompts, opts = _prompts(6)
    report = check(tiny_lm, prompts, method="prompt_lookup", k=4, draft_width=3, **opts)
    assert report.counts["identical"] == len(prompts), report.table()
    assert PromptLookupProposer(k=2, width=3).tree.parents == (-1, 0, 1, 0, 3, 0, 5)
    one, three = (specdec.generate(tiny_lm, prompts, method="prompt_lookup", k=4, draft_width=w, ignore_eos=True,
                                   **opts) for w in (1, 3))
    assert sum(g.target_forwards for g in three) <= sum(g.target_forwards for g in one)
    with pytest.raises(ValueError, match="draft_width .* must be an integer in"):
        specdec.generate(tiny_lm, [1, 2], method="prompt_lookup", draft_width=0)


def test_draft_refeed_rewrites_tokens_it_did_not_draft(tiny_lm, methods):
    """A draft model whose cache holds wrong tokens just before the root (its own guesses where the
    union accepted another branch's path) proposes as if fed the true history once its refeed
    reaches back over them; refeed 1 does not."""
    draft = methods["draft"]["draft"]
    rng = np.random.default_rng(0)
    history = jnp.asarray(rng.integers(0, 97, (2, 32)), jnp.int32)
    lengths = jnp.asarray([20, 25])
    guessed = history.at[:, 17:25].set((history[:, 17:25] + 1) % 97)  # positions 17..24 hold other tokens
    view = View(history=history, lengths=lengths, last=history[jnp.arange(2), lengths],
                seeds=jnp.zeros(2, jnp.uint32), cache=None, active=jnp.ones(2, bool))

    def proposal(refeed, seen):
        own = dataclasses.replace(draft_proposer(tiny_lm.config, draft.config, draft.graphdef, k=4), refeed=refeed)
        cache = own.prefill(draft.state, seen, lengths, 40)  # the draft cache as a commit leaves it
        return own.propose(draft.state, cache, view, Sampling(), "exact")[1].tokens.tolist()

    truth = proposal(1, history)
    assert proposal(8, guessed) == truth
    assert proposal(1, guessed) != truth


def test_union_rejects_bad_parts_and_options(tiny_lm, methods):
    draft = methods["draft"]["draft"]
    own = draft_proposer(tiny_lm.config, draft.config, draft.graphdef, k=2)
    with pytest.raises(ValueError, match="DraftModelProposer cannot share a step.*refeed >= 5"):
        UnionProposer((own, PromptLookupProposer(k=5)))
    assert with_lookup(own, None, 5)[0].parts[0].refeed == 5  # re-writes any path the union accepts
    with pytest.raises(ValueError, match="at least two proposers"):
        UnionProposer((PromptLookupProposer(k=2),))
    for bad in (-1, 1.5, "4", True):
        with pytest.raises(ValueError, match="lookup .* must be an integer >= 0"):
            with_lookup(PromptLookupProposer(k=2), None, bad)
    with pytest.raises(ValueError, match="takes one value, not one by load"):
        build_proposer("medusa", tiny_lm, {"heads": methods["medusa"]["heads"], "lookup": {1: 4, 4: 2}})
    with pytest.raises(ValueError, match="lookup_width .* must be an integer >= 1"):
        specdec.generate(tiny_lm, [1, 2], lookup=2, lookup_width=0, **methods["medusa"])
    with pytest.raises(ValueError, match=r"does not take option\(s\) \['lookup'\]"):
        specdec.generate(tiny_lm, [1, 2], lookup=2, method="prompt_lookup")
    assert with_lookup(own, "params", 0) == (own, "params")
