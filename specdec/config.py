"""Frozen configuration of a decoder: one model definition, per-architecture switches.

Llama 2/3.x, Mistral, Qwen2/2.5, Qwen3, Gemma 2 and Gemma 3 are all :class:`LlamaConfig`
with different switches (see ``specdec/hf_checkpoint.py`` and ``specdec/gguf_loader.py`` for
how each family's own config maps onto them).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import jax
import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# matrix-product precision of the forward: "highest" runs float32 products in full float32 on every
# backend; "default" lets GPUs use TF32 and TPUs bfloat16 passes (faster, coarser)
MATMUL_PRECISIONS = {"highest": jax.lax.Precision.HIGHEST, "default": jax.lax.Precision.DEFAULT}
ROPE_TYPES = ("linear", "dynamic", "yarn", "llama3", "freq_factors")
ACTIVATIONS = ("silu", "gelu_tanh")
LAYER_TYPES = ("full", "sliding")
GEMMA_ARCHS = ("gemma2", "gemma3")
# the switches every Gemma 2/3 checkpoint has, whatever its config says (the loaders add the rest)
GEMMA_SWITCHES = {"norm_plus_one": True, "post_norms": True, "embed_scale": True}


@dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """Rotary-embedding frequency scaling, as Hugging Face transformers defines each type.

    - ``linear``: every frequency divided by ``factor``.
    - ``dynamic`` (NTK): past ``max_seq_len`` the base grows with the sequence length; specdec
      rotates each token with the base for its own position (``position + 1`` as the length), so a
      token's rotation never depends on how many tokens a forward holds.
    - ``yarn``: frequencies blended between interpolated and original by wavelength
      (``beta_fast``/``beta_slow`` over ``original_max_len``), cos/sin scaled by ``attention_factor``.
    - ``llama3``: low frequencies divided by ``factor``, high ones kept, smooth in between.
    - ``freq_factors``: each frequency divided by its own factor (a GGUF ``rope_freqs`` tensor).
    """

    type: str
    factor: float = 1.0
    original_max_len: int | None = None  # llama3, yarn: the pretraining context (default: max_seq_len)
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    mscale: float | None = None  # yarn
    mscale_all_dim: float | None = None  # yarn
    attention_factor: float | None = None  # yarn; default from factor (and mscale / mscale_all_dim)
    truncate: bool = True  # yarn: round the correction range to whole dimensions
    factors: tuple[float, ...] | None = None  # freq_factors: [head_dim // 2]

    def __post_init__(self) -> None:
        if self.type not in ROPE_TYPES:
            raise ValueError(f"rope scaling type {self.type!r} is not implemented; specdec implements "
                             f"{', '.join(ROPE_TYPES)}")
        if self.type == "freq_factors":
            if not self.factors:
                raise ValueError("rope scaling 'freq_factors' needs factors (one per frequency)")
            object.__setattr__(self, "factors", tuple(float(f) for f in self.factors))
        elif not self.factor or self.factor <= 0:
            raise ValueError(f"rope scaling {self.type!r} needs a positive 'factor', got {self.factor!r}")


@dataclass(frozen=True, kw_only=True)
class LlamaConfig:
    """Shape and numerics of a decoder of the Llama family and its relatives.

    ``dtype`` is the parameter and activation dtype: "float32" (the CPU default) or "bfloat16"
    (GPU/TPU); ``precision`` the product precision (:data:`MATMUL_PRECISIONS`). Norms, softmax,
    RoPE and logits are always computed in float32, and products accumulate in float32.

    Architecture switches (defaults are Llama's): ``sliding_window`` with ``layer_types`` (per
    layer "full" or "sliding"; None with a window: every layer slides, as Mistral), ``local_rope_theta``
    (RoPE base of sliding layers, unscaled; Gemma 3), ``qk_norm`` (RMSNorm of each query and key
    head; Qwen3, Gemma 3), ``norm_plus_one`` (RMSNorm scales by ``1 + w``; Gemma), ``post_norms``
    (norms on the attention and MLP outputs too; Gemma 2/3), ``activation`` of the gated MLP,
    ``embed_scale`` (embeddings times sqrt(d_model); Gemma), ``query_scale`` (attention scores
    scaled by ``query_scale ** -0.5``; default head_dim), ``attn_softcap`` / ``final_softcap``
    (``cap * tanh(x / cap)`` of attention scores / logits; Gemma 2).
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
    arch: str = "llama"
    precision: str = "highest"
    rope_scaling: RopeScaling | None = None
    local_rope_theta: float | None = None
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    qk_norm: bool = False
    norm_plus_one: bool = False
    post_norms: bool = False
    activation: str = "silu"
    embed_scale: bool = False
    query_scale: float | None = None
    attn_softcap: float | None = None
    final_softcap: float | None = None

    def __post_init__(self) -> None:
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.precision not in MATMUL_PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(MATMUL_PRECISIONS)}, got {self.precision!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if isinstance(self.rope_scaling, dict):  # e.g. read back from JSON
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be a positive number of tokens, got {self.sliding_window}")
        if self.layer_types is not None:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
            if len(self.layer_types) != self.n_layers or set(self.layer_types) - set(LAYER_TYPES):
                raise ValueError(f"layer_types must give one of {LAYER_TYPES} for each of the {self.n_layers} "
                                 f"layers, got {self.layer_types}")
            if "sliding" in self.layer_types and self.sliding_window is None:
                raise ValueError("layer_types has sliding layers but sliding_window is not set")
        scaling = self.rope_scaling
        if scaling is not None and scaling.type == "freq_factors" and len(scaling.factors) != self.head_dim // 2:
            raise ValueError(f"rope freq_factors has {len(scaling.factors)} entries, head_dim // 2 is "
                             f"{self.head_dim // 2}")

    @property
    def jnp_dtype(self):
        return DTYPES[self.dtype]

    @property
    def matmul_precision(self) -> jax.lax.Precision:
        return MATMUL_PRECISIONS[self.precision]

    def window(self, layer: int) -> int | None:
        """The sliding-window length of ``layer`` (a query sees keys less than this many positions
        back), or None for full attention."""
        if self.sliding_window is None or (self.layer_types is not None and self.layer_types[layer] == "full"):
            return None
        return self.sliding_window

    def rope_of(self, layer: int) -> tuple[float, RopeScaling | None]:
        """(RoPE base, scaling) of ``layer``: sliding layers use ``local_rope_theta`` unscaled where set."""
        if self.local_rope_theta is not None and self.window(layer) is not None:
            return self.local_rope_theta, None
        return self.rope_theta, self.rope_scaling

    def replace(self, **changes) -> "LlamaConfig":
        return LlamaConfig(**{**self.__dict__, **changes})

    def identity(self) -> dict:
        """What makes two configs the same model whatever their precision: the fields before
        ``dtype`` (the shape) always, the architecture switches after it where they differ from
        Llama's defaults (so a plain Llama config reads as it did before the switches existed)."""
        names = [f.name for f in fields(self)]
        start = names.index("dtype")
        return {f.name: getattr(self, f.name) for i, f in enumerate(fields(self))
                if i < start or (f.name not in ("dtype", "precision") and getattr(self, f.name) != f.default)}


# precision policies (``specdec.load(..., precision=...)``): dtype of parameters and activations,
# and product precision
PRECISION_POLICIES = {
    "highest": {"dtype": "float32", "precision": "highest"},
    "default": {"dtype": "float32", "precision": "default"},
    "bf16": {"dtype": "bfloat16", "precision": "default"},
}


def precision_policy(name: str | None) -> dict:
    """The config fields of precision policy ``name`` (:data:`PRECISION_POLICIES`); None picks
    the backend's default: "highest" on CPU, "bf16" on GPU and TPU."""
    if name is None:
        name = "highest" if jax.default_backend() == "cpu" else "bf16"
    if name not in PRECISION_POLICIES:
        raise ValueError(f"precision must be one of {', '.join(PRECISION_POLICIES)} (or None for the "
                         f"backend's default), got {name!r}")
    return PRECISION_POLICIES[name]


def precision_name(fields_: dict | LlamaConfig) -> str:
    """The policy name of a config's (or a policy's) dtype and product precision."""
    if isinstance(fields_, LlamaConfig):
        fields_ = {"dtype": fields_.dtype, "precision": fields_.precision}
    for name, policy in PRECISION_POLICIES.items():
        if policy == fields_:
            return name
    raise ValueError(f"dtype {fields_['dtype']} with {fields_['precision']} products is no precision policy "
                     f"({', '.join(PRECISION_POLICIES)})")


def tiny_config(**overrides) -> LlamaConfig:
    """A few-thousand-parameter config for tests and examples."""
    base = dict(vocab_size=97, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=8,
                ffn_dim=48, rope_theta=10000.0, max_seq_len=512)
    return LlamaConfig(**{**base, **overrides})
