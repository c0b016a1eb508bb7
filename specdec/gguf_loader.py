"""Load GGUF files of the llama, qwen2, qwen3, gemma2 and gemma3 architectures (llama.cpp's
names; Mistral converts as llama), weights dequantized to float32 by ``gguf``.

llama.cpp's converter changes a few tensors, undone here: Llama's Q/K rows are permuted for its
RoPE layout, Gemma's norm weights are stored as ``1 + w``; Llama 3.1's rope scaling becomes a
``rope_freqs`` tensor of per-frequency factors.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from specdec.config import GEMMA_ARCHS, GEMMA_SWITCHES, LlamaConfig, RopeScaling

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
# Gemma 2/3: norms on both sides of attention and MLP (Hugging Face names, see specdec/weights.py)
_GEMMA_NORMS = {
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma2", "gemma3")


class GGUFError(ValueError):
    """The file is not a readable llama-architecture GGUF."""


def open_gguf(path: str | Path):
    """A ``gguf.GGUFReader`` for ``path``, with a clear error for a bad file."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        return gguf.GGUFReader(path)
    except Exception as err:  # the reader raises many kinds of errors on corrupt input
        raise GGUFError(f"{path} is not a readable GGUF file ({type(err).__name__}: {err})") from err


def field(reader, key: str, default=None):
    """The value of one metadata field (scalar, string or list)."""
    if key not in reader.fields:
        if default is not None:
            return default
        raise GGUFError(f"GGUF metadata has no field {key!r}")
    return reader.fields[key].contents()


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (interleaved -> half-split RoPE layout).

    w: [n_heads * head_dim, d_in] in PyTorch layout.
    """
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _shortest(value) -> float:
    """A float32 metadata value as the shortest decimal that round-trips (1e-05, not 9.9999997e-06)."""
    return float(str(np.float32(value)))


def _gemma_query_scale(arch: str, d_model: int, n_heads: int, head_dim: int, n_layers: int) -> float:
    """Gemma's ``query_pre_attn_scalar``, which GGUF does not store: llama.cpp uses d_model / n_heads
    for the 27B models and head_dim for the others."""
    is_27b = (arch, n_layers, d_model) in (("gemma2", 46, 4608), ("gemma3", 62, 5376))
    return float(d_model // n_heads if is_27b else head_dim)


def _rope_scaling(reader, arch: str) -> RopeScaling | None:
    """The rope scaling of a GGUF file: its metadata, or Llama 3.1's ``rope_freqs`` tensor."""
    freqs = [t for t in reader.tensors if t.name == "rope_freqs.weight"]
    kind = field(reader, f"{arch}.rope.scaling.type", "none")
    if freqs:
        return RopeScaling(type="freq_factors", factors=tuple(np.asarray(freqs[0].data, np.float64).ravel()))
    if kind == "none":
        return None
    if kind not in ("linear", "yarn"):
        raise GGUFError(f"{arch}.rope.scaling.type={kind!r} is not implemented; specdec reads none, linear and yarn")
    factor = float(field(reader, f"{arch}.rope.scaling.factor"))
    original = field(reader, f"{arch}.rope.scaling.original_context_length", 0) or None
    return RopeScaling(type=kind, factor=factor, original_max_len=int(original) if original else None)


def gguf_config(reader, dtype: str = "float32", precision: str = "highest") -> LlamaConfig:
    """The model config of a GGUF file (architecture-specific keys under ``{arch}.``)."""
    arch = field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFError(f"GGUF architecture {arch!r} is not supported; specdec reads {', '.join(ARCHITECTURES)}")
    n_heads = int(field(reader, f"{arch}.attention.head_count"))
    d_model = int(field(reader, f"{arch}.embedding_length"))
    n_layers = int(field(reader, f"{arch}.block_count"))
    head_dim = int(field(reader, f"{arch}.attention.key_length", d_model // n_heads))
    max_seq_len = int(field(reader, f"{arch}.context_length", 8192))
    names = {t.name for t in reader.tensors}
    switches = {}
    if arch in GEMMA_ARCHS:
        window = int(field(reader, f"{arch}.attention.sliding_window"))
        pattern = 2 if arch == "gemma2" else 6  # llama.cpp's fixed patterns: every 2nd / 6th layer is global
        switches = dict(
            **GEMMA_SWITCHES, sliding_window=window, activation="gelu_tanh",
            layer_types=tuple("sliding" if (i + 1) % pattern else "full" for i in range(n_layers)),
            query_scale=_gemma_query_scale(arch, d_model, n_heads, head_dim, n_layers),
            attn_softcap=field(reader, f"{arch}.attn_logit_softcapping", 0) or None,
            final_softcap=field(reader, f"{arch}.final_logit_softcapping", 0) or None,
            local_rope_theta=10000.0 if arch == "gemma3" else None)
    return LlamaConfig(
        vocab_size=len(reader.fields["tokenizer.ggml.tokens"].data),
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=int(field(reader, f"{arch}.attention.head_count_kv", n_heads)),
        head_dim=head_dim,
        ffn_dim=int(field(reader, f"{arch}.feed_forward_length")),
        rope_theta=_shortest(field(reader, f"{arch}.rope.freq_base", 10000.0)),
        rms_eps=_shortest(field(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
        tie_embeddings="output.weight" not in names,
        qkv_bias="blk.0.attn_q.bias" in names,
        max_seq_len=max_seq_len,
        dtype=dtype,
        precision=precision,
        arch=arch,
        rope_scaling=_rope_scaling(reader, arch),
        qk_norm="blk.0.attn_q_norm.weight" in names,
        **switches,
    )


def gguf_tensors(reader, cfg: LlamaConfig) -> dict[str, np.ndarray]:
    """All tensors, dequantized to float32, under Hugging Face names in PyTorch layout."""
    from gguf.quants import dequantize

    out = {}
    gemma = cfg.arch in GEMMA_ARCHS
    layer_names = {**_LAYER_NAMES, **_GEMMA_NORMS} if gemma else _LAYER_NAMES
    heads = {"attn_q.weight": cfg.n_heads, "attn_k.weight": cfg.n_kv_heads} if cfg.arch == "llama" else {}
    for tensor in reader.tensors:
        rest = None
        if tensor.name == "rope_freqs.weight":  # read into the config (rope scaling)
            continue
        if tensor.name in _GLOBAL_NAMES:
            name = _GLOBAL_NAMES[tensor.name]
        else:
            _, layer, rest = tensor.name.split(".", 2)
            if rest not in layer_names:
                raise GGUFError(f"unexpected tensor {tensor.name!r} in a {cfg.arch} GGUF file")
            name = f"model.layers.{layer}.{layer_names[rest]}"
        array = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        if rest in heads:
            array = unpermute_rope_rows(array, heads[rest])
        if gemma and tensor.name.endswith("norm.weight"):
            array = array - 1.0  # stored as 1 + w
        out[name] = array
    return out
