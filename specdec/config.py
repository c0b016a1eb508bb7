"""Frozen configuration of a Llama-family decoder."""

from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclass(frozen=True, kw_only=True)
class LlamaConfig:
    """Shape and numerics of a Llama-family model (Llama, SmolLM, Qwen-2 style).

    ``dtype`` is the parameter and activation dtype: "float32" (the CPU
    default) or "bfloat16" (for GPU/TPU). Norms, softmax and logits are always
    computed in float32.
    """

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    tie_embeddings: bool = True
    qkv_bias: bool = False
    max_seq_len: int = 8192
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")

    @property
    def jnp_dtype(self):
        return DTYPES[self.dtype]

    def replace(self, **changes) -> "LlamaConfig":
        return LlamaConfig(**{**self.__dict__, **changes})


def tiny_config(**overrides) -> LlamaConfig:
    """A few-thousand-parameter config for tests and examples."""
    base = dict(vocab_size=97, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=8,
                ffn_dim=48, rope_theta=10000.0, max_seq_len=512)
    return LlamaConfig(**{**base, **overrides})
