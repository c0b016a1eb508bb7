"""Several proposers in one step: each puts its own subtree under the shared root.

The target verifies every subtree in the same forward and the verifier keeps the
deepest accepted path, whichever proposer drafted it. Sources that fail in
different places add up: prompt lookup copies long runs where the text repeats
itself, Medusa heads or a feature draft guess where it does not. Each part sees
the step's verdict in the union's node numbering, so a part must roll its state
forward from the target's output at the accepted path alone, never from its own
node ids: prompt lookup (no state), Medusa heads and the feature draft qualify
(``commits_any_path``); a draft model, whose cache holds its own guesses, does
when it re-writes as many committed tokens each step as the union's tree is deep
(its ``refeed``; :func:`drafts.prompt_lookup.with_lookup` sets it).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from specdec.engine import Commit, Proposal, View
from specdec.sampling import Sampling
from specdec.tree import Tree

def union_tree(trees: Sequence[Tree]) -> Tree:
    """One tree holding every tree's non-root nodes under a shared root, in order: tree ``t``'s node
    ``i > 0`` becomes node ``offsets[t] + i`` (see :func:`part_offsets`)."""
    parents = [-1]
    for tree, offset in zip(trees, part_offsets(trees)):
        parents += [0 if p == 0 else offset + p for p in tree.parents[1:]]
    return Tree(tuple(parents))


def part_offsets(trees: Sequence[Tree]) -> list[int]:
    """``offsets[t]``: what tree ``t``'s node ids (past its root) are shifted by in :func:`union_tree`."""
    offsets, start = [], 0
    for tree in trees:
        offsets.append(start)
        start += tree.size - 1
    return offsets


@dataclass(frozen=True)
class UnionProposer:
    """``parts`` proposing side by side (params and state: a tuple with one entry per part)."""

    parts: tuple[Any, ...]

    def __post_init__(self) -> None:
        if len(self.parts) < 2:
            raise ValueError(f"a union needs at least two proposers, got {len(self.parts)}")
        alone = [type(p).__name__ for p in self.parts if not getattr(p, "commits_any_path", False)
                 and getattr(p, "refeed", 0) < self.tree.max_depth]
        if alone:
            raise ValueError(f"{', '.join(alone)} cannot share a step with other proposers: its state follows its "
                             f"own candidates; give a draft model refeed >= {self.tree.max_depth} (the union's "
                             f"depth; with_lookup does), or combine prompt lookup, Medusa heads and feature drafts")

    @cached_property
    def tree(self) -> Tree:
        return union_tree([p.tree for p in self.parts])

    def prefill(self, params, tokens, prompt_lens, capacity, hidden):
        return tuple(p.prefill(pp, tokens, prompt_lens, capacity, hidden) for p, pp in zip(self.parts, params))

    def propose(self, params, state, view: View, sampling: Sampling, rule: str):
        states, props = zip(*(p.propose(pp, s, view, sampling, rule)
                              for p, pp, s in zip(self.parts, params, state)))
        tokens = jnp.concatenate([prop.tokens.astype(jnp.int32) for prop in props], axis=1)
        rates = [jnp.zeros(prop.tokens.shape) if prop.tokens.shape[1] == 0 else prop.confidence for prop in props]
        confidence = None if any(r is None for r in rates) else jnp.concatenate(rates, axis=1)
        return tuple(states), Proposal(tokens=tokens, draft_probs=_union_probs(props, view.lengths.shape[0]),
                                       confidence=confidence)

    def commit(self, params, state, commit: Commit):
        return tuple(p.commit(pp, s, commit) for p, pp, s in zip(self.parts, params, state))


def _union_probs(props: Sequence[Proposal], batch: int) -> jax.Array | None:
    """[B, N, V] the distribution each union node was drawn from (rule "rejection"), or None when every
    part proposes deterministic tokens; a deterministic part's nodes are point masses."""
    drawn = [prop.draft_probs for prop in props if prop.draft_probs is not None]
    if not drawn:
        return None
    vocab, dtype = drawn[0].shape[-1], drawn[0].dtype
    per_part = [prop.draft_probs[:, 1:] if prop.draft_probs is not None
                else jax.nn.one_hot(prop.tokens, vocab, dtype=dtype) for prop in props]
    return jnp.concatenate([jnp.zeros((batch, 1, vocab), dtype)] + per_part, axis=1)

