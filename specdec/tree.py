"""Candidate trees: the static shape of what a proposer puts forward each step.

A tree has ``N`` nodes in topological order. Node 0 is the root: the newest
committed token, not yet in the cache. Node ``i > 0`` is a draft token whose
parent is ``parents[i] < i``. A chain of k drafts is the tree
``parents = (-1, 0, 1, ..., k - 1)``. Children of one node are tried in index
order by the sampling verifier, so proposers put their best guess first.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Sequence

import numpy as np


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
