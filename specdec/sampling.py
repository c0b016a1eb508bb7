"""Sampling: greedy, temperature, top-k, top-p, drawn by Gumbel-max.

Every random draw uses a key per (row seed, position):
``fold_in(key(seed), position)``, where ``position`` is the sequence position
of the token being drawn. A row's output therefore does not depend on which
batch it ran in, and a speculative method that draws the same Gumbel noise at
the same position reproduces autoregressive samples exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


@dataclass(frozen=True, kw_only=True)
class Sampling:
    """How to pick the next token. ``temperature == 0`` is greedy.

    top_k: keep the k most likely tokens (0 = off).
    top_p: keep the smallest set whose probability reaches p (1.0 = off).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature must be >= 0 (0 means greedy), got {self.temperature}")
        if int(self.top_k) != self.top_k or self.top_k < 0:
            raise ValueError(f"top_k must be a non-negative integer (0 disables it), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 disables it), got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def log_probs(self, logits: jax.Array) -> jax.Array:
        """Processed log-probabilities ``[..., V]`` (temperature, then top-k, then top-p)."""
        logits = logits.astype(jnp.float32) / (self.temperature if self.temperature > 0 else 1.0)
        if self.top_k:
            kth = jax.lax.top_k(logits, min(self.top_k, logits.shape[-1]))[0][..., -1:]
            logits = jnp.where(logits < kth, NEG_INF, logits)
        logp = jax.nn.log_softmax(logits, axis=-1)
        if self.top_p < 1.0:
            logp = _top_p(logp, self.top_p)
            logp = jax.nn.log_softmax(logp, axis=-1)
        return logp

    def sample(self, logits: jax.Array, seeds: jax.Array, positions: jax.Array) -> jax.Array:
        """Next tokens ``[B]`` from ``logits: [B, V]``, seeds ``[B]``, positions ``[B]``."""
        if self.greedy:
            return argmax(logits)
        noise = gumbel_noise(seeds, positions, logits.shape[-1])
        return argmax(self.log_probs(logits) + noise)


def argmax(x: jax.Array) -> jax.Array:
    """``jnp.argmax(x, axis=-1)`` as int32 ``x.shape[:-1]``: the first index of the largest value (of the
    first NaN if any), as a max and then a min over the indices that reach it. On XLA CPU
    ``jnp.argmax`` is one reduction over (value, index) pairs that does not vectorise: over a
    49152-token vocabulary for 8 rows it took 0.91 ms against 0.21 ms this way (2-core AVX512 CPU)."""
    top = jnp.max(x, axis=-1, keepdims=True)
    index = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    return jnp.min(jnp.where((x == top) | jnp.isnan(x), index, x.shape[-1]), axis=-1)


def _top_p(logp: jax.Array, p: float) -> jax.Array:
    """Mask ``logp: [..., V]`` to the smallest top set whose mass reaches ``p``."""
    order = jnp.argsort(-logp, axis=-1)
    sorted_p = jnp.exp(jnp.take_along_axis(logp, order, axis=-1))
    # keep a token when the mass of the tokens ranked before it is still < p
    keep_sorted = (jnp.cumsum(sorted_p, axis=-1) - sorted_p) < p
    keep = jnp.take_along_axis(keep_sorted, jnp.argsort(order, axis=-1), axis=-1)
    return jnp.where(keep, logp, NEG_INF)


def position_key(seed: jax.Array, position: jax.Array) -> jax.Array:
    """The PRNG key of (row seed, sequence position)."""
    return jax.random.fold_in(jax.random.key(seed), position)


def gumbel_noise(seeds: jax.Array, positions: jax.Array, vocab: int) -> jax.Array:
    """Standard Gumbel noise ``[B, V]`` from per-row seeds ``[B]`` and positions ``[B]``."""
    keys = jax.vmap(position_key)(seeds.astype(jnp.uint32), positions.astype(jnp.int32))
    return jax.vmap(lambda k: jax.random.gumbel(k, (vocab,), jnp.float32))(keys)
