"""Rotary position embeddings with the frequency scalings of Llama 3.x, YaRN, linear and NTK.

The frequencies follow Hugging Face transformers' definition of each scaling type (see
:class:`specdec.config.RopeScaling`); they are computed once in float64 and rounded to
float32, except NTK ("dynamic") scaling, whose base depends on each token's position.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from specdec.config import RopeScaling


def _yarn(inv_freq: np.ndarray, dim: int, theta: float, s: RopeScaling, max_seq_len: int) -> tuple[np.ndarray, float]:
    """YaRN: blend of interpolated and original frequencies by wavelength, and the cos/sin scale."""
    original = s.original_max_len or max_seq_len

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / ((high - low) or 0.001), 0, 1)
    keep = 1 - ramp  # share of the original (extrapolated) frequency
    blended = inv_freq / s.factor * (1 - keep) + inv_freq * keep

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if s.attention_factor is not None:
        factor = s.attention_factor
    elif s.mscale and s.mscale_all_dim:
        factor = mscale(s.factor, s.mscale) / mscale(s.factor, s.mscale_all_dim)
    else:
        factor = mscale(s.factor)
    return blended, factor


def _llama3(inv_freq: np.ndarray, s: RopeScaling, max_seq_len: int) -> np.ndarray:
    """Llama 3.1: long wavelengths divided by ``factor``, short ones kept, a smooth blend between."""
    original = s.original_max_len or max_seq_len
    wavelen = 2 * math.pi / inv_freq
    low_wavelen, high_wavelen = original / s.low_freq_factor, original / s.high_freq_factor
    smooth = (original / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    scaled = np.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, (1 - smooth) * scaled / s.factor + smooth * scaled, scaled)


def frequencies(head_dim: int, theta: float, scaling: RopeScaling | None,
                max_seq_len: int) -> tuple[np.ndarray, float]:
    """Static inverse frequencies ``[head_dim // 2]`` (float32) and the cos/sin scale. For
    "dynamic" scaling these are the unscaled ones (the scaling applies per position in :func:`rope`)."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    factor = 1.0
    kind = scaling.type if scaling is not None else None
    if kind == "linear":
        inv_freq = inv_freq / scaling.factor
    elif kind == "llama3":
        inv_freq = _llama3(inv_freq, scaling, max_seq_len)
    elif kind == "yarn":
        inv_freq, factor = _yarn(inv_freq, head_dim, theta, scaling, max_seq_len)
    elif kind == "freq_factors":
        inv_freq = inv_freq / np.asarray(scaling.factors, np.float64)
    return np.asarray(inv_freq, np.float32), float(factor)


def _dynamic_inv_freq(positions: jax.Array, head_dim: int, theta: float, factor: float,
                      max_seq_len: int) -> jax.Array:
    """NTK scaling: ``[B, T, head_dim // 2]`` frequencies, the base grown for each token's own
    sequence length (its position + 1) once that passes ``max_seq_len``."""
    length = jnp.maximum(positions.astype(jnp.float32) + 1, max_seq_len)
    base = theta * ((factor * length / max_seq_len) - (factor - 1)) ** (head_dim / (head_dim - 2))
    exponent = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    return jnp.exp(-jnp.log(base)[..., None] * exponent)


def rotary(positions: jax.Array, head_dim: int, theta: float, scaling: RopeScaling | None = None,
           max_seq_len: int = 8192) -> tuple[jax.Array, jax.Array]:
    """``(cos, sin)``, each ``[B, T, 1, head_dim // 2]`` float32, of tokens at ``positions: [B, T]``
    (the cos/sin scale of YaRN included): computed once per forward and RoPE base, used by every
    layer with that base for its queries and keys (:func:`apply_rotary`)."""
    inv_freq, scale = frequencies(head_dim, theta, scaling, max_seq_len)
    if scaling is not None and scaling.type == "dynamic":
        inv_freq = _dynamic_inv_freq(positions, head_dim, theta, scaling.factor, max_seq_len)
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, half]
    return (jnp.cos(angles) * scale)[:, :, None, :], (jnp.sin(angles) * scale)[:, :, None, :]


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotary embedding in the half-split (Hugging Face) layout, computed in float32.

    x: [B, T, heads, head_dim]; cos, sin from :func:`rotary` -> [B, T, heads, head_dim] in x's dtype.
    """
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
