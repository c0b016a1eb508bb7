"""Budgeted speculation: a fixed number of draft tokens verified per step across the whole batch.

With many rows running, every token the target verifies costs about as much as any other (on a
2-core CPU at 8 rows, a second token per row makes the forward about a quarter slower), yet most
draft tokens are rejected. A :class:`Budgeted` proposer lets its proposer draft as usual, then keeps
only the ``budget`` draft tokens of the whole batch that are most likely to be accepted (the
product of the proposer's per-node confidences along the node's path) and the target computes the
rows' roots plus those tokens only (``forward(packed=...)``). A dropped node is rejected outright,
so every row still returns exactly what autoregressive decoding returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from specdec.engine import Commit, Proposal, View, whole_number
from specdec.sampling import Sampling
from specdec.tree import Tree


def select_nodes(tree: Tree, confidence: jax.Array, active: jax.Array, budget: int) -> tuple[jax.Array, jax.Array]:
    """The ``budget`` non-root nodes of the batch with the most likely paths.

    Args:
      tree: the proposer's tree (N nodes).
      confidence: [B, N - 1] the chance each node's token is accepted if its parent is.
      active: [B] rows still decoding (finished rows get no nodes).
      budget: draft tokens to verify per step, all rows together.
    Returns:
      kept: [B, N] bool, the root and the kept nodes (each with all its ancestors);
      packed: [B + min(budget, B * (N - 1))] int32 flat indices ``row * N + node`` of the tokens
        the target computes: every root, then the chosen nodes best first.
    """
    b, n1 = confidence.shape
    anc = jnp.asarray(tree.ancestors[1:, 1:])  # [N - 1, N - 1] node i's non-root ancestors, itself included
    log_conf = jnp.log(jnp.clip(confidence.astype(jnp.float32), 1e-30, 1.0))
    score = jnp.where(active[:, None], log_conf @ anc.T.astype(jnp.float32), -jnp.inf)  # [B, N - 1] log path chance
    best, flat = jax.lax.top_k(score.reshape(-1), min(budget, b * n1))
    chosen = jnp.zeros((b * n1,), bool).at[flat].set(best > -jnp.inf).reshape(b, n1)
    closed = jnp.all(chosen[:, None, :] | ~anc[None], axis=2)  # every ancestor chosen too
    kept = jnp.concatenate([jnp.ones((b, 1), bool), chosen & closed], axis=1)
    n = n1 + 1
    packed = jnp.concatenate([jnp.arange(b) * n, flat // n1 * n + flat % n1 + 1]).astype(jnp.int32)
    return kept, packed


def verifies_exactly(rule: str, sampling: Sampling) -> bool:
    """Whether ``rule`` verifies by matching the target's own choices (what dropping a node needs)."""
    return rule == "exact" or (rule == "rejection" and sampling.greedy)


@dataclass(frozen=True)
class Budgeted:
    """``proposer`` with at most ``budget`` draft tokens verified per step across the batch.

    The proposer must rate its candidates (``Proposal.confidence``); params and state are its own.
    """

    proposer: Any
    budget: int

    def __post_init__(self) -> None:
        whole_number(self.budget, "budget (draft tokens verified per step, all rows together)", 1)
        if hasattr(self.proposer, "verify_from"):
            raise ValueError("a budget needs a proposer whose drafts the target verifies from its first layer; "
                             "early exit verifies from its exit layer")

    @property
    def tree(self) -> Tree:
        return self.proposer.tree

    def prefill(self, params, tokens, prompt_lens, capacity, hidden):
        return self.proposer.prefill(params, tokens, prompt_lens, capacity, hidden)

    def propose(self, params, state, view: View, sampling: Sampling, rule: str) -> tuple[Any, Proposal]:
        if not verifies_exactly(rule, sampling):
            raise ValueError(f"a budget needs verification 'exact' (greedy, or sampling coupled to "
                             f"autoregressive); got {rule!r} with sampling")
        state, prop = self.proposer.propose(params, state, view, sampling, rule)
        if prop.tokens.size <= self.budget:  # every candidate fits (or speculation is off): nothing to drop
            return state, prop
        if prop.confidence is None:
            raise ValueError(f"{type(self.proposer).__name__} does not rate its drafts (Proposal.confidence), "
                             f"so it cannot run with a budget")
        kept, packed = select_nodes(self.tree, prop.confidence, view.active, int(self.budget))
        return state, prop._replace(kept=kept, packed=packed)

    def commit(self, params, state, commit: Commit):
        return self.proposer.commit(params, state, commit)


def with_budget(built: tuple[Any, Any], budget: int | None) -> tuple[Any, Any]:
    """``(proposer, params)`` with the proposer budgeted when ``budget`` is given."""
    proposer, params = built
    return (proposer if budget is None else Budgeted(proposer, budget)), params
