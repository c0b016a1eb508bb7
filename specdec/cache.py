"""Ragged KV cache: fixed slots, per-row lengths, per-row writes.

``k, v: [layers, batch, slots, kv_heads, head_dim]`` and ``lengths: [batch]``.
Slot ``s`` of row ``b`` holds committed context when ``s < lengths[b]``. A
forward writes its T new tokens of row ``b`` at slots ``lengths[b] ..
lengths[b] + T - 1`` but does not advance ``lengths``: the caller commits
(``advance``) what it accepts, so rejected entries are simply never read.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from specdec.config import LlamaConfig


@struct.dataclass
class KVCache:
    k: jax.Array  # [layers, batch, slots, kv_heads, head_dim]
    v: jax.Array  # [layers, batch, slots, kv_heads, head_dim]
    lengths: jax.Array  # [batch] int32

    @property
    def slots(self) -> int:
        return self.k.shape[2]

    def advance(self, n: jax.Array) -> "KVCache":
        """Commit ``n: [batch]`` more tokens per row (the ones written last)."""
        return self.replace(lengths=self.lengths + n.astype(jnp.int32))

    def with_lengths(self, lengths: jax.Array) -> "KVCache":
        return self.replace(lengths=lengths.astype(jnp.int32))


def init_cache(config: LlamaConfig, batch: int, slots: int) -> KVCache:
    """An empty cache of ``slots`` positions per row for ``batch`` rows."""
    shape = (config.n_layers, batch, slots, config.n_kv_heads, config.head_dim)
    zeros = jnp.zeros(shape, config.jnp_dtype)
    return KVCache(k=zeros, v=zeros, lengths=jnp.zeros((batch,), jnp.int32))


def write_layer(cache: KVCache, layer: int, k_new: jax.Array, v_new: jax.Array) -> KVCache:
    """Write ``k_new, v_new: [batch, T, kv_heads, head_dim]`` of one layer at each row's length.

    Writes past the last slot are dropped (they can only be padding).
    """
    batch, t = k_new.shape[:2]
    rows = jnp.arange(batch)[:, None]
    slots = cache.lengths[:, None] + jnp.arange(t)[None, :]
    k = cache.k.at[layer, rows, slots].set(k_new.astype(cache.k.dtype), mode="drop")
    v = cache.v.at[layer, rows, slots].set(v_new.astype(cache.v.dtype), mode="drop")
    return cache.replace(k=k, v=v)


def visibility(lengths: jax.Array, block_mask: jax.Array, slots: int) -> jax.Array:
    """Which cache slots each new token may attend to.

    Args:
      lengths: [batch] committed length per row.
      block_mask: [batch, T, T] bool, ``block_mask[b, i, j]``: new token i sees new token j.
      slots: number of cache slots.
    Returns:
      [batch, T, slots] bool: the committed prefix plus the allowed new tokens.
    """
    s = jnp.arange(slots)[None, None, :]
    rel = s - lengths[:, None, None]  # [B, 1, S]
    t = block_mask.shape[-1]
    in_block = (rel >= 0) & (rel < t)
    idx = jnp.broadcast_to(jnp.clip(rel, 0, t - 1), block_mask.shape[:2] + (slots,))
    allowed = jnp.take_along_axis(block_mask, idx, axis=-1)
    return (rel < 0) | (in_block & allowed)


def causal_mask(batch: int, t: int) -> jax.Array:
    """[batch, T, T] lower-triangular block mask for a chain of T new tokens."""
    return jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (batch, t, t))
