"""Candidate trees: the static shape of what a proposer puts forward each step.

A tree has ``N`` nodes in topological order. Node 0 is the root: the newest
committed token, not yet in the cache. Node ``i > 0`` is a draft token whose
parent is ``parents[i] < i``. A chain of k drafts is the tree
``parents = (-1, 0, 1, ..., k - 1)``. Children of one node are tried in index
order by the sampling verifier, so proposers put their best guess first.

A spec (Medusa heads, the feature draft's ranked trees) is a list of paths; entry ``d`` of a path is
the rank, among depth ``d + 1``'s candidates, of the token taken there: ``[(0,), (1,), (0, 0)]``
puts the two best candidates under the root and the best one below the first of them. Every prefix
of a path is a path of the spec. :func:`tree_buffers` turns a spec into its tree and gather
indices; the built-in specs are grown greedily by a generic per-rank accuracy prior
(:func:`grow_tree`); tree search over measured accuracies and costs lives in
:mod:`heads.tree_search`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from specdec.saved import read_config


@dataclass(frozen=True)
class Tree:
    parents: tuple[int, ...]

    def __post_init__(self) -> None:
        p = self.parents
        if not p or p[0] != -1:
            raise ValueError(f"node 0 must be the root (parent -1), got parents {p[:4]}...")
        bad = [i for i in range(1, len(p)) if not 0 <= p[i] < i]
        if bad:
            raise ValueError(f"every node's parent must come before it; nodes {bad[:5]} do not")

    @classmethod
    def chain(cls, k: int) -> "Tree":
        """Root plus a chain of ``k`` drafts (``k = 0``: the root alone, a plain target step)."""
        if k < 0:
            raise ValueError(f"a chain needs k >= 0 draft tokens, got k={k}")
        return cls((-1,) + tuple(range(k)))

    @classmethod
    def from_paths(cls, paths: Sequence[Sequence[int]]) -> "Tree":
        """Medusa-style spec: each path lists, per depth, the rank of the candidate taken.

        ``[(0,), (1,), (0, 0)]`` is root -> {rank-0, rank-1}, rank-0 -> rank-0. Every prefix of
        a path must itself be a path. Node ``i`` is path ``canonical_paths(paths)[i - 1]``.
        """
        index = {(): 0}
        parents = [-1]
        for p in canonical_paths(paths):
            index[p] = len(parents)
            parents.append(index[p[:-1]])
        return cls(tuple(parents))

    @property
    def size(self) -> int:
        return len(self.parents)

    @cached_property
    def depth(self) -> np.ndarray:
        """[N] int32 depth of each node (root 0)."""
        d = np.zeros(self.size, np.int32)
        for i in range(1, self.size):
            d[i] = d[self.parents[i]] + 1
        return d

    @property
    def max_depth(self) -> int:
        return int(self.depth.max())

    @property
    def is_chain(self) -> bool:
        return self.parents == (-1,) + tuple(range(self.size - 1))

    @cached_property
    def ancestors(self) -> np.ndarray:
        """[N, N] bool: ``ancestors[i, j]`` when j is i or an ancestor of i (the attention mask)."""
        a = np.eye(self.size, dtype=bool)
        for i in range(1, self.size):
            a[i] |= a[self.parents[i]]
        return a

    @cached_property
    def children(self) -> np.ndarray:
        """[N, C] int32 children of each node in index order, padded with -1."""
        kids = [[] for _ in range(self.size)]
        for i in range(1, self.size):
            kids[self.parents[i]].append(i)
        width = max(1, max(len(k) for k in kids))
        out = np.full((self.size, width), -1, np.int32)
        for i, k in enumerate(kids):
            out[i, :len(k)] = k
        return out

    @cached_property
    def path_to(self) -> np.ndarray:
        """[N, D + 1] int32: ``path_to[i, d]`` is i's ancestor at depth d (i itself past its depth)."""
        out = np.zeros((self.size, self.max_depth + 1), np.int32)
        for i in range(self.size):
            node = i
            out[i, :] = i
            out[i, 0] = 0
            while node > 0:
                out[i, self.depth[node]] = node
                node = self.parents[node]
        return out


def canonical_paths(paths: Sequence[Sequence[int]]) -> list[tuple[int, ...]]:
    """Validated, de-duplicated paths in node order: by depth, then by ranks."""
    out = sorted({tuple(int(r) for r in p) for p in paths}, key=lambda p: (len(p), p))
    known = {()}
    for p in out:
        if not p or min(p) < 0:
            raise ValueError(f"a path is a non-empty list of ranks >= 0, got {list(p)}")
        if p[:-1] not in known:
            raise ValueError(f"path {list(p)} has no parent path {list(p[:-1])} in the spec")
        known.add(p)
    return out


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
