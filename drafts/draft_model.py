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
when it rejects the chain there. ``branches > 1`` drafts a chain below each of
the root's ``branches`` likeliest children (the tree :func:`draft_tree`); its
cache then keeps only the first chain's guesses, so ``refeed`` must reach back
``k`` tokens (:func:`draft_proposer` sets it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from drafts.prompt_lookup import lookup_beside
from drafts.saved import CONFIG_FILE, draft_for
from specdec.cache import KVCache, init_cache
from specdec.config import LlamaConfig, precision_name
from specdec.engine import Commit, Proposal, View, draft_branches, draft_length, draft_width, no_proposal
from specdec.loading import LoadedModel, load
from specdec.method_spec import DraftTree, build_by_load, option, register, schedule
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


def draft_tree(k: int, width: int, branches: int = 1) -> Tree:
    """Root; its ``max(width, branches)`` likeliest children; below each of the first ``branches`` of
    them, ``k - 1`` more depths of ``width`` nodes: the first continues that chain, the rest are leaves."""
    if width < 1 or branches < 1:
        raise ValueError(f"width and branches must be >= 1, got width={width}, branches={branches}")
    if k == 0:
        return Tree.chain(0)
    parents = [-1] + [0] * max(width, branches)
    for spine in range(1, branches + 1):
        for _ in range(k - 1):
            parents += [spine] * width
            spine = len(parents) - width
    return Tree(tuple(parents))


def draft_chain(step, state, logits: jax.Array, view: View, k: int, width: int, sampling: Sampling,
                rule: str, branches: int = 1) -> tuple[Any, Proposal]:
    """Draft the tree :func:`draft_tree` from ``logits: [B, V]`` for the token after the root: the
    ``branches`` likeliest first tokens each start a chain of ``k`` tokens drafted one by one, each
    token with ``width - 1`` leaf siblings.

    ``step(state, token [B'], position [B']) -> (state, logits [B', V])`` feeds a draft token at its
    position and returns the draft's logits for the next one; every leaf of ``state`` is indexed by row
    first, and with ``branches > 1`` the chains run as ``B * branches`` rows (row ``b * branches + j``:
    row b's chain j). Returns the first chain's last state (``B`` rows) and the proposal.
    """
    length, seeds, rows = view.lengths, view.seeds, view.lengths.shape[0]
    first, others, q1 = pick_draft(logits, seeds, length + 1, sampling, rule, max(width, branches))
    tops = jnp.concatenate([first[:, None], others], axis=1)  # [B, max(width, branches)]: depth 1, best first
    picks = [(tops, q1[:, None])]  # node groups [B, G * m], each a chain token then m - 1 others; q [B, G, V]
    if k > 1:
        def spread(x):  # row b -> rows b * branches .. b * branches + branches - 1
            return jnp.repeat(x, branches, axis=0) if branches > 1 else x

        length, seeds = spread(length), spread(seeds)

        def body(carry, depth):
            state, logits = carry
            token, siblings, q = pick_draft(logits, seeds, length + depth, sampling, rule, width)
            return step(state, token, length + depth), (token, siblings, q)

        carry = step(jax.tree.map(spread, state), tops[:, :branches].reshape(-1), length + 1)
        (state, logits), (tokens, siblings, qs) = jax.lax.scan(body, carry, jnp.arange(2, k))
        last = pick_draft(logits, seeds, length + k, sampling, rule, width)
        tokens = jnp.concatenate([tokens, last[0][None]], axis=0).T  # [B', k - 1]
        siblings = jnp.concatenate([siblings, last[1][None]], axis=0).transpose(1, 0, 2)  # [B', k - 1, w - 1]
        qs = jnp.concatenate([qs, last[2][None]], axis=0).transpose(1, 0, 2)  # [B', k - 1, V]
        chains = jnp.concatenate([tokens[:, :, None], siblings], axis=2)  # [B', k - 1, w]
        picks.append((chains.reshape(rows, -1), qs.reshape(rows, branches * (k - 1), -1)))
        state = jax.tree.map(lambda x: x[::branches], state)
    nodes = jnp.concatenate([n for n, _ in picks], axis=1)  # [B, N - 1] in draft_tree's order
    groups = [(n.reshape(q.shape[0], q.shape[1], -1), q) for n, q in picks]  # [B, G, m], [B, G, V]
    confidence = jnp.concatenate([jnp.take_along_axis(q, n, axis=2).reshape(rows, -1) for n, q in groups],
                                 axis=1)  # the draft's q of each node
    probs = None
    if rule == "rejection" and not sampling.greedy:  # a group's chain token: its q; the others: point masses
        per_node = [jnp.concatenate([q[:, :, None], jax.nn.one_hot(n[:, :, 1:], q.shape[-1], dtype=q.dtype)],
                                    axis=2).reshape(rows, -1, q.shape[-1]) for n, q in groups]
        probs = jnp.concatenate([jnp.zeros_like(per_node[0][:, :1])] + per_node, axis=1)  # node 0: unused
    return state, Proposal(tokens=nodes, draft_probs=probs, confidence=confidence)


@dataclass(frozen=True)
class DraftModelProposer:
    """Propose with a draft model (``graphdef`` + params passed to the engine as ``pparams``)."""

    graphdef: nnx.GraphDef
    k: int
    width: int = 1
    refeed: int = 1  # committed tokens before the root re-written each step (see the module docstring)
    branches: int = 1

    @property
    def tree(self) -> Tree:
        return draft_tree(self.k, self.width, self.branches)

    def prefill(self, params, tokens: jax.Array, prompt_lens: jax.Array, capacity: int, hidden=None) -> KVCache:
        model = nnx.merge(self.graphdef, params)
        b, p = tokens.shape
        cache = init_cache(model.config, b, capacity)
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
            return out.cache.advance(jnp.ones_like(position)), out.logits[:, 0]

        return draft_chain(step, cache, res.logits[:, 0], view, self.k, self.width, sampling, rule, self.branches)

    def commit(self, params, cache: KVCache, commit: Commit) -> KVCache:
        return cache.with_lengths(commit.lengths - 1)


def draft_proposer(target: LlamaConfig, draft_config: LlamaConfig, graphdef: nnx.GraphDef, *, k: int,
                   width: int = 1, branches: int = 1, deepest: int | None = None) -> DraftModelProposer:
    """Check that the draft fits the target and build its proposer (``branches`` chains, see
    :func:`draft_tree`); ``deepest``: the largest k of a by-load schedule sharing its cache (default k),
    which a branched draft's refeed must reach."""
    if draft_config.vocab_size != target.vocab_size:
        raise ValueError(f"draft/target vocabulary mismatch: the draft has {draft_config.vocab_size} tokens, "
                         f"the target {target.vocab_size}; the draft must use the target's tokenizer")
    k = draft_length(k)
    branches = draft_branches(branches, target.vocab_size)
    return DraftModelProposer(graphdef=graphdef, k=k, width=draft_width(width, target.vocab_size),
                              refeed=max(k, deepest or 0, 1) if branches > 1 else 1, branches=branches)


@register
@dataclass(frozen=True, kw_only=True)
class Draft(DraftTree):
    """Draft-model speculation: a small model of the target's vocabulary drafts, the target verifies."""

    name: ClassVar[str] = "draft"
    summary: ClassVar[str] = "a small draft model proposes k tokens (or a tree), the target verifies them"
    tuned: ClassVar[str] = "k"
    tune_choices: ClassVar[tuple] = (0, 1, 2, 4)
    draft: Any = option(None, "draft model: registry name, .gguf, HF directory or one saved by `specdec "
                        "train-draft` (default: the bundled one)", cli=str)

    def build(self, target) -> tuple[Any, Any]:
        draft = self.draft
        if draft is None or (not isinstance(draft, LoadedModel) and (Path(draft) / CONFIG_FILE).is_file()):
            draft = draft_for(target, draft)[0]  # the bundled draft, or one saved by `specdec train-draft`
        elif not isinstance(draft, LoadedModel):
            draft = load(draft, precision=precision_name(target.config))
        deepest = max(schedule(self.k).values())  # every proposer of a by-load schedule shares the draft's cache

        def one(k, width):
            proposer = draft_proposer(target.config, draft.config, draft.graphdef, k=k, width=width,
                                      branches=self.draft_branches, deepest=deepest)
            return lookup_beside(self, proposer, draft.state)

        return build_by_load(one, self.budget, k=self.k, width=self.draft_width)
