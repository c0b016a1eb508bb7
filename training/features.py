"""Backbone hidden states of packed rows, computed once and reused by every training epoch.

The backbone is frozen in Medusa-1 training, so its final hidden state at each
position is a fixed input to the heads. Only positions with at least one
valid head target are kept.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from specdec.cache import init_cache
from specdec.model import forward
from training.data import Packed


class Features(NamedTuple):
    hidden: np.ndarray  # [M, d] final-normed backbone hidden state at each kept position
    labels: np.ndarray  # [M, n_heads] int32 head targets, -1 = none


class SoftTargets(NamedTuple):
    """The target's distribution over each head's label, position for position with a :class:`Features`."""

    top_ids: np.ndarray  # [M, n_heads, K] int32 the target's K likeliest tokens there (-1: the head has no label)
    top_probs: np.ndarray  # [M, n_heads, K] float32 their probabilities (0: no label)


def segment_mask(segments: jax.Array) -> jax.Array:
    """``segments: [B, L]`` -> ``[B, L, L]`` causal mask that stays inside each packed example."""
    length = segments.shape[1]
    causal = jnp.tril(jnp.ones((length, length), bool))
    return causal[None] & (segments[:, :, None] == segments[:, None, :])


@functools.partial(jax.jit, static_argnames=("graphdef",))
def packed_hidden(graphdef, params, tokens: jax.Array, segments: jax.Array, positions: jax.Array) -> jax.Array:
    """Final-normed hidden states ``[B, L, d]`` of packed rows ``tokens: [B, L]``."""
    model = nnx.merge(graphdef, params)
    b, length = tokens.shape
    res = forward(model, init_cache(model.config, b, length), tokens=tokens, positions=positions,
                  block_mask=segment_mask(segments), compute_logits=False)
    return res.hidden


def backbone_features(lm, packed: Packed, labels: np.ndarray, batch_size: int = 8) -> Features:
    """Hidden states of ``lm`` for every position of ``packed`` that has a target in ``labels``."""
    hidden, kept = [], []
    for start in tqdm(range(0, len(packed.tokens), batch_size), desc="backbone hidden states", unit="batch"):
        rows = slice(start, start + batch_size)
        h = packed_hidden(lm.graphdef, lm.state, jnp.asarray(packed.tokens[rows]),
                          jnp.asarray(packed.segments[rows]), jnp.asarray(packed.positions[rows]))
        keep = (labels[rows] >= 0).any(axis=-1)
        hidden.append(np.asarray(h)[keep])
        kept.append(labels[rows][keep])
    d = lm.config.d_model
    return Features(hidden=np.concatenate(hidden) if hidden else np.zeros((0, d), np.float32),
                    labels=np.concatenate(kept) if kept else np.zeros((0, labels.shape[-1]), np.int32))


def top_k_probs(logits: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """``logits: [..., V]`` -> the ``k`` largest next-token probabilities and their ids, ``[..., k]`` each.

    The barrier keeps XLA (CPU) from fusing the top-k into each of its consumers, which recomputed it
    once per consumer: 11 s instead of 0.55 s for the head labels of two 512-token rows of SmolLM2."""
    return jax.lax.optimization_barrier(jax.lax.top_k(jax.nn.softmax(logits, axis=-1), k))


@functools.partial(jax.jit, static_argnames=("graphdef", "k"))
def _soft_rows(graphdef, params, hidden: jax.Array, labels: jax.Array, *, k: int):
    """``hidden: [B, L, d]`` final-normed states at every position of packed rows, ``labels: [B, L, n]``
    their head labels -> top ids, probs ``[B, L, n, K]``: head j's label at position t is token
    t + 2 + j, which the target chose from its next-token distribution at position t + 1 + j."""
    probs, ids = top_k_probs(nnx.merge(graphdef, params).logits(hidden), k)
    length = hidden.shape[1]

    def ahead(x, j, fill):  # position t gets position t + 1 + j's entry
        pad = jnp.full((x.shape[0], 1 + j) + x.shape[2:], fill, x.dtype)
        return jnp.concatenate([x[:, 1 + j:], pad], axis=1)[:, :length]

    n, has = labels.shape[-1], (labels >= 0)[..., None]
    ids = jnp.where(has, jnp.stack([ahead(ids, j, -1) for j in range(n)], axis=2), -1)
    return ids, jnp.where(has, jnp.stack([ahead(probs, j, 0.0) for j in range(n)], axis=2), 0.0)


def soft_targets(lm, rows_hidden: Callable[[slice], np.ndarray], labels: np.ndarray, k: int,
                 batch_size: int = 2) -> SoftTargets:
    """The target's top-``k`` distribution over each head label of packed rows, kept where
    :func:`backbone_features` keeps positions (those with a label), in its order.

    ``rows_hidden(rows)``: the final-normed hidden states ``[b, L, d]`` of those packed rows;
    ``labels``: ``[R, L, n_heads]`` their head labels.
    """
    ids, probs = [], []
    for start in tqdm(range(0, len(labels), batch_size), desc="target distributions", unit="batch"):
        rows = slice(start, start + batch_size)
        i, p = _soft_rows(lm.graphdef, lm.state, jnp.asarray(rows_hidden(rows), jnp.float32),
                          jnp.asarray(labels[rows]), k=k)
        keep = (labels[rows] >= 0).any(axis=-1)
        ids.append(np.asarray(i)[keep])
        probs.append(np.asarray(p)[keep])
    shape = (0, labels.shape[-1], k)
    return SoftTargets(np.concatenate(ids) if ids else np.zeros(shape, np.int32),
                       np.concatenate(probs) if probs else np.zeros(shape, np.float32))
