"""Load llama-architecture GGUF files (weights dequantized to float32 by ``gguf``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from specdec.config import LlamaConfig

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


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


def gguf_config(reader, dtype: str = "float32") -> LlamaConfig:
    arch = field(reader, "general.architecture")
    if arch != "llama":
        raise GGUFError(f"GGUF architecture {arch!r} is not supported; specdec reads 'llama' GGUF files")
    n_heads = int(field(reader, "llama.attention.head_count"))
    d_model = int(field(reader, "llama.embedding_length"))
    names = {t.name for t in reader.tensors}
    return LlamaConfig(
        vocab_size=len(reader.fields["tokenizer.ggml.tokens"].data),
        d_model=d_model,
        n_layers=int(field(reader, "llama.block_count")),
        n_heads=n_heads,
        n_kv_heads=int(field(reader, "llama.attention.head_count_kv", n_heads)),
        head_dim=int(field(reader, "llama.attention.key_length", d_model // n_heads)),
        ffn_dim=int(field(reader, "llama.feed_forward_length")),
        rope_theta=_shortest(field(reader, "llama.rope.freq_base", 10000.0)),
        rms_eps=_shortest(field(reader, "llama.attention.layer_norm_rms_epsilon")),
        tie_embeddings="output.weight" not in names,
        max_seq_len=int(field(reader, "llama.context_length", 8192)),
        dtype=dtype,
    )


def gguf_tensors(reader, cfg: LlamaConfig) -> dict[str, np.ndarray]:
    """All tensors, dequantized to float32, under Hugging Face names in PyTorch layout."""
    from gguf.quants import dequantize

    out = {}
    heads = {"attn_q.weight": cfg.n_heads, "attn_k.weight": cfg.n_kv_heads}
    for tensor in reader.tensors:
        rest = None
        if tensor.name in _GLOBAL_NAMES:
            name = _GLOBAL_NAMES[tensor.name]
        else:
            _, layer, rest = tensor.name.split(".", 2)
            if rest not in _LAYER_NAMES:
                raise GGUFError(f"unexpected tensor {tensor.name!r} in a llama GGUF file")
            name = f"model.layers.{layer}.{_LAYER_NAMES[rest]}"
        array = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        if rest in heads:
            array = unpermute_rope_rows(array, heads[rest])
        out[name] = array
    return out
