"""Backbone hidden states of packed rows, computed once and reused by every training epoch.

The backbone is frozen in Medusa-1 training, so its final hidden state at each
position is a fixed input to the heads. Only positions with at least one
valid head target are kept.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

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
