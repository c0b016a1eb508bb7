"""Lossless early-exit self-speculation (LayerSkip-style): the target's first E layers are the draft.

Each step feeds the root and then each draft token through layers ``0 .. E-1``
(+ final norm + LM head) of the target itself, one token per forward, writing
those layers' K/V straight into the target cache. One more bottom pass over the
last draft token completes the tree's layer-E inputs without computing logits.
Verification then runs only layers ``E ..`` over the ``k + 1`` nodes, starting
from the residual stream the drafts left, so the bottom layers' work (and K/V)
is reused rather than recomputed. Accepted nodes' bottom K/V are already in
place; rejected ones lie past the committed length and are overwritten later.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from drafts.draft_model import draft_tree, pick_draft
from specdec.config import LlamaConfig
from specdec.engine import Commit, Proposal, View, draft_length, whole_number
from specdec.method_spec import DEFAULT_K, Speculative, build_by_load, option, register
from specdec.model import forward
from specdec.sampling import Sampling
from specdec.tree import Tree


@dataclass(frozen=True)
class EarlyExitProposer:
    """Draft ``k`` tokens with the target's layers ``0 .. exit_layer - 1`` (params: the target's)."""

    graphdef: nnx.GraphDef
    exit_layer: int
    k: int

    @property
    def tree(self) -> Tree:
        return draft_tree(self.k, 1)

    @property
    def verify_from(self) -> int:
        return self.exit_layer

    def prefill(self, params, tokens, prompt_lens, capacity: int, hidden=None) -> None:
        return None  # no state of its own: the bottom layers' K/V are the target's

    def _bottom(self, model, cache, token: jax.Array, position: jax.Array, logits: bool):
        """Layers below the exit for one token per row: (cache, residual [B, d], logits [B, V] | None)."""
        top = self.exit_layer - 1
        out = forward(model, cache.with_lengths(position), tokens=token[:, None], positions=position[:, None],
                      layers=range(self.exit_layer), hidden_layers=(top,), compute_logits=logits)
        return out.cache, out.hiddens[top][:, 0], None if out.logits is None else out.logits[:, 0]

    def propose(self, params, state: None, view: View, sampling: Sampling, rule: str):
        model = nnx.merge(self.graphdef, params)
        length = view.lengths

        def step(carry, depth):
            cache, token = carry
            cache, resid, logits = self._bottom(model, cache, token, length + depth, True)
            nxt, _, q = pick_draft(logits, view.seeds, length + depth + 1, sampling, rule)
            return (cache, nxt), (resid, nxt, q)

        (cache, last), (resid, tokens, qs) = jax.lax.scan(step, (view.cache, view.last), jnp.arange(self.k))
        cache, final, _ = self._bottom(model, cache, last, length + self.k, False)
        hidden = jnp.concatenate([resid, final[None]], axis=0).transpose(1, 0, 2)  # [B, k + 1, d]
        probs = None
        if rule == "rejection" and not sampling.greedy:
            qs = qs.transpose(1, 0, 2)  # [B, k, V]
            probs = jnp.concatenate([jnp.zeros_like(qs[:, :1]), qs], axis=1)  # node 0: unused
        return None, Proposal(tokens=tokens.T, draft_probs=probs, cache=cache.with_lengths(length), hidden=hidden)

    def commit(self, params, state: None, commit: Commit) -> None:
        return None


def early_exit_proposer(target: LlamaConfig, graphdef: nnx.GraphDef, *, exit_layer: int, k: int) -> EarlyExitProposer:
    """Check the exit layer and draft length and build the proposer."""
    exit_layer = whole_number(exit_layer, "exit_layer (a layer of the model)", 1, target.n_layers)
    return EarlyExitProposer(graphdef=graphdef, exit_layer=exit_layer, k=draft_length(k, minimum=1))


@register
@dataclass(frozen=True, kw_only=True)
class EarlyExit(Speculative):
    """Lossless self-speculation: the target's bottom layers draft, the whole target verifies."""

    name: ClassVar[str] = "early_exit"
    summary: ClassVar[str] = "the target's bottom layers draft k tokens, the whole target verifies them"
    exit_layer: int | None = option(None, "draft with this many bottom layers (default: half)")
    k: int | dict = option(DEFAULT_K, "draft tokens per step", by_load=True)

    def build(self, target) -> tuple[Any, Any]:
        exit_layer = target.config.n_layers // 2 if self.exit_layer is None else self.exit_layer
        return build_by_load(lambda k: (early_exit_proposer(target.config, target.graphdef, exit_layer=exit_layer,
                                                            k=k), target.state), k=self.k)
