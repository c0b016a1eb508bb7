"""Trees and the pure verification rules, against plain-Python references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from specdec.sampling import Sampling
from specdec.tree import Tree
from specdec.verify import target_choices, verify_exact, verify_rejection, verify_typical


@st.composite
def trees(draw, max_nodes: int = 12) -> Tree:
    n = draw(st.integers(1, max_nodes))
    return Tree((-1,) + tuple(draw(st.integers(0, i - 1)) for i in range(1, n + 1)))


def test_chain_and_paths():
    chain = Tree.chain(3)
    assert chain.parents == (-1, 0, 1, 2) and chain.is_chain and chain.max_depth == 3
    tree = Tree.from_paths([(0, 0), (1,), (0,), (0, 1), (1, 0)])
    # by depth, then ranks: (0,) (1,) (0,0) (0,1) (1,0)
    assert tree.parents == (-1, 0, 0, 1, 1, 2)
    assert not tree.is_chain
    assert tree.children.tolist() == [[1, 2], [3, 4], [5, -1], [-1, -1], [-1, -1], [-1, -1]]
    assert tree.path_to[4].tolist() == [0, 1, 4] and tree.path_to[2].tolist() == [0, 2, 2]


def test_bad_trees_are_refused():
    with pytest.raises(ValueError, match="no parent path"):
        Tree.from_paths([(0, 0)])
    with pytest.raises(ValueError, match="parent must come before"):
        Tree((-1, 2, 0))
    with pytest.raises(ValueError, match="k >= 0 draft tokens"):
        Tree.chain(-1)
    assert Tree.chain(0).size == 1 and Tree.chain(0).is_chain


@given(trees())
def test_tree_buffers_agree(tree: Tree):
    for i in range(tree.size):
        path = tree.path_to[i, :tree.depth[i] + 1]
        assert path[0] == 0 and path[-1] == i
        assert all(tree.parents[path[d]] == path[d - 1] for d in range(1, len(path)))
        assert set(np.flatnonzero(tree.ancestors[i])) == set(path.tolist())


def _reference_exact(tree: Tree, tokens, choices):
    """Deepest node whose every ancestor-to-child step matches the target's choice (lowest index on ties)."""
    best = 0
    for i in range(1, tree.size):
        node, ok = i, True
        while node > 0:
            ok &= tokens[node] == choices[tree.parents[node]]
            node = tree.parents[node]
        if ok and tree.depth[i] > tree.depth[best]:
            best = i
    return best, int(tree.depth[best]), int(choices[best])


@settings(max_examples=15, deadline=None)
@given(trees(), st.integers(0, 2**31 - 1))
def test_exact_matches_reference(tree: Tree, seed: int):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 3, (4, tree.size))  # 3 symbols: matches are common
    choices = rng.integers(0, 3, (4, tree.size))
    v = verify_exact(tree, jnp.asarray(tokens), jnp.asarray(choices))
    for b in range(4):
        best, n, nxt = _reference_exact(tree, tokens[b], choices[b])
        assert int(v.n_accepted[b]) == n and int(v.next_token[b]) == nxt
        assert v.path[b, :n + 1].tolist() == tree.path_to[best, :n + 1].tolist()


def test_coupled_choices_are_autoregressive_draws():
    """target_choices at node positions equal Sampling.sample at the next position."""
    sampling = Sampling(temperature=0.7, top_k=5)
    logits = jax.random.normal(jax.random.key(0), (2, 3, 11))
    positions = jnp.asarray([[4, 5, 5], [9, 10, 11]])
    seeds = jnp.asarray([3, 8])
    got = target_choices(sampling, logits, seeds, positions)
    for i in range(3):
        want = sampling.sample(logits[:, i], seeds, positions[:, i] + 1)
        assert got[:, i].tolist() == want.tolist()


def test_typical_acceptance_is_thresholded():
    """A near-certain target accepts its likely token and refuses an unlikely one (lossy rule)."""
    tree = Tree.chain(2)
    logp = jnp.log(jnp.asarray([[[0.97, 0.01, 0.01, 0.01]] * 3]))
    choices = jnp.zeros((1, 3), jnp.int32)
    assert int(verify_typical(tree, jnp.asarray([[0, 0, 0]]), logp, choices).n_accepted[0]) == 2
    assert int(verify_typical(tree, jnp.asarray([[0, 0, 2]]), logp, choices).n_accepted[0]) == 1
    # a flat target is permissive: every token passes min(eps, delta * exp(-H)) = 0.075 < 0.25
    flat = jnp.log(jnp.full((1, 3, 4), 0.25))
    assert int(verify_typical(tree, jnp.asarray([[0, 3, 1]]), flat, choices).n_accepted[0]) == 2


@given(trees(6), st.integers(0, 1000))
@settings(max_examples=5, deadline=None)
def test_rejection_accepts_draws_from_the_target_and_never_impossible_tokens(tree: Tree, seed: int):
    """q == p accepts every node along the first-child path; tokens with p = 0 are never accepted."""
    rng = np.random.default_rng(seed)
    v = 6
    p = rng.dirichlet(np.ones(v), (2, tree.size)).astype(np.float32)
    tokens = rng.integers(0, v, (2, tree.size))
    logp = jnp.log(jnp.asarray(p))
    got = verify_rejection(tree, jnp.asarray(tokens), logp, jnp.asarray(p)[:, jnp.asarray((0,) + tree.parents[1:])],
                           jnp.asarray([seed, seed + 1]), jnp.asarray([5, 9]))
    first_child_depth = 0
    node = 0
    while tree.children[node, 0] >= 0:
        node = tree.children[node, 0]
        first_child_depth += 1
    assert got.n_accepted.tolist() == [first_child_depth] * 2
    banned = np.where(np.arange(v)[None, None, :] == tokens[:, :, None], 0.0, p)  # each node's own token: p = 0
    logp = jnp.log(jnp.asarray(banned / banned.sum(-1, keepdims=True)))
    shifted = jnp.asarray(tokens)[:, jnp.asarray((0,) + tree.parents[1:])]  # parent's token: impossible for child
    tok = jnp.asarray(tokens).at[:, 1:].set(shifted[:, 1:])
    got = verify_rejection(tree, tok, logp, None, jnp.asarray([seed, 1]), jnp.asarray([0, 0]))
    assert got.n_accepted.tolist() == [0, 0]
