"""The draft tree (``drafts.draft_model.draft_tree``) and the chains drafted into it (``draft_chain``)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import specdec
from drafts.draft_model import draft_chain, draft_tree
from specdec.engine import View
from specdec.sampling import Sampling

V = 12


def test_tree_shapes():
    assert draft_tree(3, 2).parents == (-1, 0, 0, 1, 1, 3, 3)  # a chain with one leaf sibling per depth
    assert draft_tree(3, 1, 2).parents == (-1, 0, 0, 1, 3, 2, 5)  # two chains under the root's top two
    assert draft_tree(2, 2, 3).parents == (-1, 0, 0, 0, 1, 1, 2, 2, 3, 3)
    assert draft_tree(1, 1, 3).parents == (-1, 0, 0, 0)  # k 1: only the root's children
    assert draft_tree(0, 2, 2).parents == (-1,)
    with pytest.raises(ValueError, match="branches must be >= 1"):
        draft_tree(2, 1, 0)


def _ranked(row: np.ndarray) -> list[int]:
    return np.argsort(-row, kind="stable").tolist()


@pytest.mark.parametrize("k, width, branches", [(3, 1, 1), (3, 2, 3), (4, 1, 2), (1, 2, 3)])
def test_chains_follow_the_roots_likeliest_children(k, width, branches):
    """Greedy: chain j starts at the root's rank-j token and each next token is the draft's best after
    the previous one; the state returned is chain 0's, as a single chain leaves it."""
    rng = np.random.default_rng(k + width + branches)
    table = rng.normal(size=(V, V)).astype(np.float32)  # a toy draft: logits after token t are table[t]
    first = rng.normal(size=(2, V)).astype(np.float32)

    def step(state, token, position):  # state: the sum of tokens fed and of positions, per row
        return state + token + 100 * position, jnp.asarray(table)[token]

    view = View(history=None, lengths=jnp.asarray([5, 9]), last=None, seeds=jnp.asarray([1, 2], jnp.uint32),
                cache=None, active=None)
    state, prop = draft_chain(step, jnp.asarray([1000, 2000]), jnp.asarray(first), view, k, width, Sampling(),
                              "exact", branches)
    tree = draft_tree(k, width, branches)
    tokens = np.asarray(prop.tokens)
    assert tokens.shape == prop.confidence.shape == (2, tree.size - 1)
    for row in range(2):
        want, fed = _ranked(first[row])[:max(width, branches)], 1000 * (row + 1)  # each row's own state
        for j in range(branches if k > 1 else 0):
            token = _ranked(first[row])[j]
            for depth in range(2, k + 1):
                fed += token + 100 * (view.lengths[row] + depth - 1) if j == 0 else 0
                want += _ranked(table[token])[:width]
                token = want[-width]
        assert tokens[row].tolist() == want, (row, tokens[row], want)
        assert int(state[row]) == fed  # k 1: untouched
        nodes = [0] + tokens[row].tolist()  # every non-root node's parent drafted it or a sibling of it
        for i in range(1, tree.size):
            parent = tree.parents[i]
            ranked = _ranked(first[row]) if parent == 0 else _ranked(table[nodes[parent]])
            assert nodes[i] in ranked[:max(width, branches)]


def test_target_as_its_own_branching_draft_accepts_every_first_chain(tiny_lm):
    """The target as its own draft: every branch-0 chain is accepted, whatever the other branches."""
    prompts = [[1, 2, 3], list(range(20, 45))]
    plain = specdec.generate(tiny_lm, prompts, max_new_tokens=[30, 17], ignore_eos=True)
    res = specdec.generate(tiny_lm, prompts, method="draft", draft=tiny_lm, k=3, draft_branches=3,
                           max_new_tokens=[30, 17], ignore_eos=True)
    assert [r.tokens for r in res] == [r.tokens for r in plain]
    assert all(sum(r.accepted_histogram[:-1]) == 0 for r in res)
    with pytest.raises(ValueError, match="draft_branches .* must be an integer"):
        specdec.generate(tiny_lm, [1, 2], method="draft", draft=tiny_lm, draft_branches=0)
