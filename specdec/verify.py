"""The shared verification module: which proposed tokens the target accepts.

Pure maths on logits, probabilities and token ids, batched over rows; it knows
no model and no cache. Every rule takes a candidate :class:`~specdec.tree.Tree`
(a chain is a tree) whose node 0 is the root, node tokens ``[B, N]`` and the
target's scores at every node (the target's distribution for the node's child),
and returns a :class:`Verdict`: the accepted path, its length and the target's
own next token after it.

- :func:`verify_exact` — greedy, and *coupled* sampling: the target's token after
  each node is ``argmax(log p / T + Gumbel(seed, position))`` (see
  :func:`target_choices`), the very draw autoregressive sampling makes at that
  position, and a draft token is accepted iff it equals it. Output is token-identical
  to autoregressive decoding with the same seeds.
- :func:`verify_rejection` — lossless speculative sampling (accept with
  ``min(1, p/q)``, else move to ``norm(max(0, p - q))``) with recursive rejection over
  siblings: exact in distribution for chains and trees, not seed-identical.
- :func:`verify_typical` — Medusa's typical acceptance. LOSSY: it changes the output
  distribution.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from specdec.sampling import Sampling, argmax, position_key
from specdec.tree import Tree

REJECTION_SALT = 0x5EC  # keys of the rejection verifier: fold_in(position_key(seed, length), salt)


class Verdict(NamedTuple):
    path: jax.Array  # [B, D + 1] node ids root first; entries past n_accepted repeat the last one
    n_accepted: jax.Array  # [B] int32 draft tokens accepted (0 .. D)
    next_token: jax.Array  # [B] int32 the target's token after the accepted path


def node_positions(tree: Tree, lengths: jax.Array) -> jax.Array:
    """[B, N] sequence position of every node: ``lengths + depth`` (the root sits at ``lengths``)."""
    return lengths[:, None] + jnp.asarray(tree.depth)[None, :]


def target_choices(sampling: Sampling, logits: jax.Array, seeds: jax.Array, positions: jax.Array) -> jax.Array:
    """The target's own token after each node: ``[B, N]`` from ``logits: [B, N, V]``.

    ``positions: [B, N]`` are the nodes' positions; the drawn token sits one further.
    Greedy is argmax; otherwise the Gumbel draw keyed by (seed, position) exactly as
    autoregressive sampling makes it.
    """
    b, n, v = logits.shape
    flat = sampling.sample(logits.reshape(b * n, v), jnp.repeat(seeds, n), (positions + 1).reshape(-1))
    return flat.reshape(b, n)


def _accepted_nodes(tree: Tree, ok: jax.Array) -> jax.Array:
    """[B, N] bool: node and all its ancestors pass ``ok: [B, N]`` (root always passes)."""
    parents = jnp.asarray(tree.parents[1:])
    acc = ok.at[:, 0].set(True)
    for _ in range(tree.max_depth):
        acc = acc.at[:, 1:].set(ok[:, 1:] & acc[:, parents])
    return acc


def _deepest(tree: Tree, accepted: jax.Array, tiebreak: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """The deepest accepted node per row (ties: highest ``tiebreak``, then lowest index) -> (node, depth)."""
    depth = jnp.asarray(tree.depth)
    key = jnp.where(accepted, depth, -1).astype(jnp.float32)
    if tiebreak is not None:
        # depth dominates; tiebreak only orders nodes of equal depth
        rank = jnp.argsort(jnp.argsort(jnp.where(accepted, tiebreak, -jnp.inf), axis=-1), axis=-1)
        key = key + rank / (2.0 * tree.size)
    best = jnp.argmax(key, axis=-1).astype(jnp.int32)
    return best, depth[best]


def _verdict(tree: Tree, best: jax.Array, n: jax.Array, next_token: jax.Array) -> Verdict:
    path = jnp.asarray(tree.path_to)[best]
    return Verdict(path=path, n_accepted=n.astype(jnp.int32), next_token=next_token.astype(jnp.int32))


def verify_exact(tree: Tree, tokens: jax.Array, choices: jax.Array) -> Verdict:
    """Greedy / coupled verification: accept a node iff its token equals the target's choice at its parent.

    Args:
      tokens: [B, N] node tokens (node 0 is the root).
      choices: [B, N] the target's token after each node (:func:`target_choices`).
    """
    ok = tokens == choices[:, jnp.asarray((0,) + tree.parents[1:])]
    best, n = _deepest(tree, _accepted_nodes(tree, ok))
    return _verdict(tree, best, n, jnp.take_along_axis(choices, best[:, None], axis=1)[:, 0])


def verify_typical(tree: Tree, tokens: jax.Array, logp: jax.Array, choices: jax.Array, *,
                   epsilon: float = 0.09, delta: float = 0.3) -> Verdict:
    """Medusa typical acceptance (LOSSY): accept x after parent u if ``p_u(x) > min(eps, delta * exp(-H(p_u)))``.

    Among accepted paths of equal length the most likely one (sum of log p) wins.

    Args:
      tokens: [B, N]; logp: [B, N, V] the target's processed log-probs at each node;
      choices: [B, N] the target's token after each node (used after the path).
    """
    parents = jnp.asarray((0,) + tree.parents[1:])
    parent_logp = logp[:, parents]  # [B, N, V]
    tok_logp = jnp.take_along_axis(parent_logp, tokens[:, :, None], axis=-1)[:, :, 0]
    entropy = -jnp.sum(jnp.exp(parent_logp) * jnp.where(parent_logp > -jnp.inf, parent_logp, 0.0), axis=-1)
    ok = jnp.exp(tok_logp) > jnp.minimum(epsilon, delta * jnp.exp(-entropy))
    path_logp = jnp.einsum("nm,bm->bn", jnp.asarray(tree.ancestors, jnp.float32),
                           jnp.where(jnp.arange(tree.size) == 0, 0.0, tok_logp))
    best, n = _deepest(tree, _accepted_nodes(tree, ok), tiebreak=path_logp)
    return _verdict(tree, best, n, jnp.take_along_axis(choices, best[:, None], axis=1)[:, 0])


def residual_distribution(r: jax.Array, q: jax.Array) -> jax.Array:
    """``norm(max(0, r - q))`` over the last axis; ``r`` itself where that is all zero (q == r)."""
    residual = jnp.maximum(r - q, 0.0)
    total = residual.sum(axis=-1, keepdims=True)
    return jnp.where(total > 0, residual / jnp.where(total > 0, total, 1.0), r)


def verify_rejection(tree: Tree, tokens: jax.Array, logp: jax.Array, draft_probs: jax.Array | None,
                     seeds: jax.Array, lengths: jax.Array) -> Verdict:
    """Lossless speculative sampling over a chain or tree (recursive rejection over siblings).

    Walks down from the root. At node u with target distribution ``r = p_u``, children
    are tried in index order: child c with token x is accepted with probability
    ``min(1, r(x) / q_c(x))``; on rejection ``r <- norm(max(0, r - q_c))`` and the next
    sibling is tried. If every child is rejected (or u is a leaf) the next token is drawn
    from ``r``. Exact whenever each child's token was drawn from ``q_c`` given the
    earlier siblings (i.i.d. drafts, or deterministic ones with ``q_c`` a point mass).

    Args:
      tokens: [B, N] node tokens.
      logp: [B, N, V] the target's processed log-probs at each node.
      draft_probs: [B, N, V] the distribution each node's token was drawn from, or None when
        every draft token is deterministic (point masses).
      seeds, lengths: [B] row seeds and committed lengths (the root's position): the random
        draws use keys ``fold_in(position_key(seed, length), REJECTION_SALT)``.
    """
    children = jnp.asarray(tree.children)
    vocab = logp.shape[-1]

    def row(tok, lp, q, key):
        p = jnp.exp(lp)

        def step(i, s):
            node, slot, r, n, best, done, nxt = s
            child = children[node, jnp.minimum(slot, children.shape[1] - 1)]
            has_child = (slot < children.shape[1]) & (child >= 0)
            k = jax.random.fold_in(key, i)
            x = tok[jnp.maximum(child, 0)]
            qc = jax.nn.one_hot(x, vocab) if q is None else q[jnp.maximum(child, 0)]
            accept = jax.random.uniform(k) * qc[x] < r[x]  # u < r(x) / q(x), no division
            residual = residual_distribution(r, qc)
            draw = argmax(jnp.log(r) + jax.random.gumbel(jax.random.fold_in(k, 1), (vocab,)))
            go_down = ~done & has_child & accept
            reject = ~done & has_child & ~accept
            stop = ~done & ~has_child
            return (jnp.where(go_down, child, node), jnp.where(go_down, 0, slot + reject),
                    jnp.where(go_down, p[jnp.maximum(child, 0)], jnp.where(reject, residual, r)),
                    n + go_down, jnp.where(go_down, child, best), done | stop, jnp.where(stop, draw, nxt))

        init = (jnp.int32(0), jnp.int32(0), p[0], jnp.int32(0), jnp.int32(0), False, jnp.int32(0))
        # each iteration tests one child or stops: N iterations always suffice
        _, _, _, n, best, _, nxt = jax.lax.fori_loop(0, tree.size, step, init)
        return best, n, nxt

    keys = jax.vmap(lambda s, l: jax.random.fold_in(position_key(s, l), REJECTION_SALT))(
        seeds.astype(jnp.uint32), lengths.astype(jnp.int32))
    q_axis = None if draft_probs is None else 0
    best, n, nxt = jax.vmap(row, in_axes=(0, 0, q_axis, 0))(tokens, logp, draft_probs, keys)
    return _verdict(tree, best, n, nxt)
