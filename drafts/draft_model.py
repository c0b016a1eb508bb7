"""A small draft model as a proposer: k draft tokens per step, its own KV cache, free rollback.

The draft cache holds every committed token except the newest one: each step
first feeds the ``refeed`` committed tokens before the root and the root
(re-writing the former, so that a draft token the target replaced is
overwritten), then one token per forward. After verification the draft's length
is set to the target's committed length minus one, which drops whatever the
target rejected. ``refeed`` 1 suffices when the draft's own chain is verified;
beside other proposers (``specdec.union``) the accepted path may come from their
branch, and ``refeed`` as deep as the union's tree re-writes all of it.

``k = 0`` turns speculation off (a plain target step) while still feeding the
draft the committed tokens, so a by-load schedule can switch it back on.

``width > 1`` adds, at every depth, the ``width - 1`` next most likely draft
tokens as leaf siblings of the chain's token: the target may accept one of them
when it rejects the chain there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from specdec.cache import KVCache, init_cache
from specdec.config import LlamaConfig
from specdec.engine import Commit, Proposal, View, draft_length, draft_width, no_proposal
from specdec.model import forward
from specdec.sampling import Sampling, position_key
from specdec.tree import Tree

DRAFT_SALT = 0xD4A  # draft draws under rule "rejection": fold_in(position_key(seed, position), salt)


def pick_draft(logits: jax.Array, seeds: jax.Array, position: jax.Array, sampling: Sampling, rule: str,
               width: int = 1) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A draft's choice from ``logits: [B, V]`` for the token at ``position: [B]``.

    Returns the chain token [B], the ``width - 1`` next most likely tokens [B, width - 1] and the
    chain token's distribution [B, V]. Under rule "rejection" (sampling) the token is drawn with
    its own key; otherwise with the Gumbel draw the target makes at that position (coupled).
    """
    logq = sampling.log_probs(logits)
    if rule == "rejection" and not sampling.greedy:
        keys = jax.vmap(lambda s, p: jax.random.fold_in(position_key(s, p), DRAFT_SALT))(
            seeds.astype(jnp.uint32), position)
        token = jax.vmap(lambda key, lq: jax.random.categorical(key, lq))(keys, logq).astype(jnp.int32)
    else:
        token = sampling.sample(logits, seeds, position)
    others = jnp.where(jax.nn.one_hot(token, logq.shape[-1], dtype=bool), -jnp.inf, logq)
    siblings = jax.lax.top_k(others, width - 1)[1].astype(jnp.int32)
    return token, siblings, jnp.exp(logq)


def chain_with_siblings(k: int, width: int) -> Tree:
    """Root, then ``k`` depths of ``width`` nodes: the first continues the chain, the rest are leaves."""
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    parents = [-1]
    for d in range(1, k + 1):
        spine_above = 0 if d == 1 else 1 + (d - 2) * width
        parents += [spine_above] * width
    return Tree(tuple(parents))


def draft_chain(step, state, logits: jax.Array, view: View, k: int, width: int, sampling: Sampling,
                rule: str) -> tuple[Any, Proposal]:
    """Draft ``k`` tokens one by one, each with ``width - 1`` leaf siblings (tree
    :func:`chain_with_siblings`), from ``logits: [B, V]`` for the token after the root.

    ``step(state, token [B], position [B]) -> (state, logits [B, V])`` feeds a draft token at its
    position and returns the draft's logits for the next one. Returns the last state and the proposal.
    """
    length = view.lengths

    def body(carry, depth):
        state, logits = carry
        token, siblings, q = pick_draft(logits, view.seeds, length + depth, sampling, rule, width)
        return step(state, token, length + depth), (token, siblings, q)

    (state, logits), (tokens, siblings, qs) = jax.lax.scan(body, (state, logits), jnp.arange(1, k))
    last = pick_draft(logits, view.seeds, length + k, sampling, rule, width)
    tokens = jnp.concatenate([tokens, last[0][None]], axis=0).T  # [B, k]
    siblings = jnp.concatenate([siblings, last[1][None]], axis=0).transpose(1, 0, 2)  # [B, k, w-1]
    nodes = jnp.concatenate([tokens[:, :, None], siblings], axis=2).reshape(tokens.shape[0], -1)
    qs = jnp.concatenate([qs, last[2][None]], axis=0).transpose(1, 0, 2)  # [B, k, V]
    confidence = jnp.take_along_axis(qs, nodes.reshape(qs.shape[0], k, width), axis=2)  # the draft's q
    probs = None
    if rule == "rejection" and not sampling.greedy:
        point = jax.nn.one_hot(siblings, qs.shape[-1], dtype=qs.dtype)  # siblings: point masses
        per_node = jnp.concatenate([qs[:, :, None], point], axis=2).reshape(tokens.shape[0], -1, qs.shape[-1])
        probs = jnp.concatenate([jnp.zeros_like(per_node[:, :1]), per_node], axis=1)  # node 0: unused
    return state, Proposal(tokens=nodes, draft_probs=probs, confidence=confidence.reshape(nodes.shape))


@dataclass(frozen=True)
class DraftModelProposer:
    """Propose with a draft model (``graphdef`` + params passed to the engine as ``pparams``)."""

    graphdef: nnx.GraphDef
    k: int
    width: int = 1
    refeed: int = 1  # committed tokens before the root re-written each step (see the module docstring)

    @property
    def tree(self) -> Tree:
        return chain_with_siblings(self.k, self.width)

    def prefill(self, params, tokens: jax.Array, prompt_lens: jax.Array, slots: int, hidden=None) -> KVCache:
        model = nnx.merge(self.graphdef, params)
        b, p = tokens.shape
        cache = init_cache(model.config, b, slots)
        res = forward(model, cache, tokens=tokens, positions=jnp.broadcast_to(jnp.arange(p), (b, p)),
                      compute_logits=False)
        return res.cache.with_lengths(prompt_lens - 1)  # the last prompt token is re-fed next step

    def propose(self, params, cache: KVCache, view: View, sampling: Sampling, rule: str):
        model = nnx.merge(self.graphdef, params)
        length = view.lengths
        # [start, start + refeed]: the tokens before the root and the root (a short row's block runs
        # past its root; the draft's next writes overwrite those slots)
        start = jnp.maximum(length - self.refeed, 0)
        at = start[:, None] + jnp.arange(self.refeed + 1)
        block = jnp.take_along_axis(view.history, jnp.minimum(at, view.history.shape[1] - 1), axis=1)
        res = forward(model, cache.with_lengths(start), tokens=block, positions=at,
                      logits_at=(length - start)[:, None], compute_logits=self.k > 0)
        cache = res.cache.with_lengths(length + 1)
        if self.k == 0:  # speculation off: only keep the draft cache in step with the target
            return cache, no_proposal(length.shape[0])

        def step(cache, token, position):
            out = forward(model, cache, tokens=token[:, None], positions=position[:, None])
            return out.cache.advance(jnp.ones_like(length)), out.logits[:, 0]

        return draft_chain(step, cache, res.logits[:, 0], view, self.k, self.width, sampling, rule)

    def commit(self, params, cache: KVCache, commit: Commit) -> KVCache:
        return cache.with_lengths(commit.lengths - 1)


def draft_proposer(target: LlamaConfig, draft_config: LlamaConfig, graphdef: nnx.GraphDef, *, k: int,
                   width: int = 1) -> DraftModelProposer:
    """Check that the draft fits the target and build its proposer."""
    if draft_config.vocab_size != target.vocab_size:
        raise ValueError(f"draft/target vocabulary mismatch: the draft has {draft_config.vocab_size} tokens, "
                         f"the target {target.vocab_size}; the draft must use the target's tokenizer")
    k = draft_length(k)
    return DraftModelProposer(graphdef=graphdef, k=k, width=draft_width(width, target.vocab_size))
