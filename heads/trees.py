"""Medusa candidate trees: the spec format, its buffers, built-in trees and tree search.

A spec is a list of paths; entry ``d`` of a path is the rank, in head ``d``'s
top-k, of the token taken at depth ``d + 1``. ``[(0,), (1,), (0, 0)]`` puts
head 0's two best tokens under the root and head 1's best token under the
first of them. Every prefix of a path must be a path of the spec.

Tree search assumes a node is accepted when every token on its path is right
and that heads are right independently, each with its measured per-rank
accuracy; the expected number of accepted drafts is then the sum over nodes of
the product of the accuracies on their paths. Trees of each size are grown
greedily by that probability, and the size that maximises expected tokens per
step over the measured cost of a step wins.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from specdec.saved import read_config
from specdec.tree import Tree, canonical_paths

Spec = list[tuple[int, ...]]


class TreeBuffers(NamedTuple):
    """What the engine and the Medusa proposer need for one spec (N nodes, node 0 the root)."""

    tree: Tree  # parents; its ancestors [N, N] mask, depth [N] and path_to [N, D + 1] buffers
    head: np.ndarray  # [N - 1] int32 head whose top-k proposes node i + 1 (its depth - 1)
    rank: np.ndarray  # [N - 1] int32 rank of node i + 1's token in that head's top-k
    top_k: int  # candidates needed per head (1 + the largest rank)


def tree_buffers(spec: Sequence[Sequence[int]]) -> TreeBuffers:
    """Turn a spec into its tree and the per-node (head, rank) gather indices.

    The empty spec is the root alone ("chain-0"): speculation off, a plain target step.
    """
    paths = canonical_paths(spec)
    ranks = np.array([p[-1] for p in paths], np.int32)
    return TreeBuffers(tree=Tree.from_paths(paths), head=np.array([len(p) - 1 for p in paths], np.int32),
                       rank=ranks, top_k=int(ranks.max(initial=-1)) + 1)


def candidate_tokens(top_tokens: jax.Array, buffers: TreeBuffers) -> jax.Array:
    """``top_tokens: [B, n_heads, K]`` (each head's best tokens, best first) -> node tokens ``[B, N - 1]``."""
    return top_tokens[:, jnp.asarray(buffers.head), jnp.asarray(buffers.rank)]


def chain_spec(k: int) -> Spec:
    """A chain of ``k`` nodes: each head's best token."""
    return [(0,) * d for d in range(1, k + 1)]


def expected_accepted(spec: Sequence[Sequence[int]], rank_acc: np.ndarray) -> float:
    """Expected accepted drafts per step: sum over nodes of the product of per-rank accuracies on the path.

    rank_acc: ``[n_heads, K]``, the probability that head h's rank-r token is the right one.
    """
    return float(sum(np.prod([rank_acc[d, r] for d, r in enumerate(p)]) for p in canonical_paths(spec)))


def grow_tree(rank_acc: np.ndarray, nodes: int) -> Spec:
    """The ``nodes``-node spec (root excluded) grown greedily by path probability."""
    n_heads, k = rank_acc.shape
    spec: dict[tuple[int, ...], float] = {}
    frontier = {(r,): float(rank_acc[0, r]) for r in range(k)}
    while len(spec) < nodes and frontier:
        best = max(frontier, key=lambda p: (frontier[p], -len(p), tuple(-r for r in p)))
        spec[best] = frontier.pop(best)
        if len(best) < n_heads:
            frontier.update({best + (r,): spec[best] * float(rank_acc[len(best), r]) for r in range(k)})
    return canonical_paths(spec)


def frequent_tree(path_share: Mapping[tuple[int, ...], float], nodes: int) -> Spec:
    """The ``nodes``-node spec of the most frequent paths (``{path: share of steps whose right tokens
    start with it}``, measured jointly, e.g. :func:`training.rank_trees.path_shares`). A path is never
    more frequent than its prefix, so the spec is prefix-closed and the best tree of its size."""
    ranked = sorted(path_share, key=lambda p: (-path_share[p], len(p), p))
    return canonical_paths(ranked[:nodes])


def rank_accuracy(topk_acc: Sequence[Sequence[float]]) -> np.ndarray:
    """Cumulative top-k accuracies ``[n_heads, K]`` (top-1, top-2, ...) -> per-rank accuracies."""
    cum = np.maximum.accumulate(np.asarray(topk_acc, np.float64), axis=1)
    return np.diff(cum, axis=1, prepend=0.0)


class SearchRow(NamedTuple):
    nodes: int  # draft nodes (the tree has nodes + 1 with the root)
    expected_tokens: float  # 1 + expected accepted drafts per step
    relative_cost: float  # cost of a step relative to one autoregressive step
    score: float  # expected_tokens / relative_cost: the estimated speedup


def search_tree(rank_acc: np.ndarray, cost: Callable[[int], float] | Mapping[int, float],
                max_nodes: int = 64, depth_cost: Sequence[float] | None = None) -> tuple[Spec, list[SearchRow]]:
    """The spec with at most ``max_nodes`` drafts that maximises expected tokens per unit of time.

    cost: relative cost of a step whose target forward covers ``n`` tree nodes (root included),
    as a function or a measured ``{n: cost}`` table (interpolated linearly, extrapolated flat).
    depth_cost: ``[n_heads + 1]`` extra cost of a tree ``d`` deep (the ``d`` heads it runs), if any.
    Returns the best spec and the estimate for every size tried.
    """
    if not callable(cost):
        widths = sorted(cost)
        table = [cost[w] for w in widths]
        cost_fn = lambda n: float(np.interp(n, widths, table))  # noqa: E731
    else:
        cost_fn = cost
    rows, specs = [], []
    for n in range(1, max_nodes + 1):
        spec = grow_tree(rank_acc, n)
        tokens = 1.0 + expected_accepted(spec, rank_acc)
        step = cost_fn(n + 1) + (0.0 if depth_cost is None else depth_cost[max(len(p) for p in spec)])
        rows.append(SearchRow(n, tokens, step, tokens / step))
        specs.append(spec)
    best = max(range(len(rows)), key=lambda i: rows[i].score)
    return specs[best], rows


PRIOR_ACCURACY = np.array([[0.6 * 0.6 ** h * 0.5 ** r for r in range(8)] for h in range(4)])
"""A generic per-rank accuracy prior for built-in trees: 0.6 for head 0's best token, 0.6x less per
head, half as likely per rank down. Searched trees use measured accuracies instead."""

BUILTIN_TREES: dict[str, Spec] = {
    **{f"chain-{k}": chain_spec(k) for k in (0, 1, 2, 3, 4)},
    **{f"tree-{n}": grow_tree(PRIOR_ACCURACY, n - 1) for n in (8, 16, 32, 64)},
}
"""Built-in specs by name; ``tree-N`` has N nodes counting the root; ``chain-0`` is the root alone
(speculation off, e.g. at high load in a by-load schedule)."""


def load_spec(tree: str | Sequence[Sequence[int]]) -> Spec:
    """A spec from a built-in name, a JSON file (a list of paths, or ``{"paths": ...}``) or a list of paths."""
    if not isinstance(tree, str):
        return canonical_paths(tree)
    if tree in BUILTIN_TREES:
        return BUILTIN_TREES[tree]
    path = Path(tree)
    if not path.is_file():
        raise ValueError(f"unknown tree {tree!r}: not a built-in ({', '.join(BUILTIN_TREES)}) and no such file")
    data = read_config(path.parent, path.name, what="tree of paths",
                       fix="give a JSON list of paths, or a tree.json written by `specdec search-tree --save`")
    return canonical_paths(data["paths"] if isinstance(data, dict) else data)
