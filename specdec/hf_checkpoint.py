"""Hugging Face style checkpoints: ``config.json`` + safetensors (single or sharded).

Reads Llama-family checkpoints (``LlamaForCausalLM``, ``Qwen2ForCausalLM``,
SmolLM) in float32, float16 or bfloat16, and writes a model back out.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from specdec.config import LlamaConfig

_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
           "F64": np.float64, "I64": np.int64, "I32": np.int32}
_ARCHS = {"LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM"}


class SafetensorsError(ValueError):
    """A safetensors file is missing, truncated or malformed."""


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of one ``.safetensors`` file as numpy arrays (memory-mapped)."""
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    if raw.size < 8:
        raise SafetensorsError(f"{path} is too short to be a safetensors file")
    (header_len,) = struct.unpack("<Q", raw[:8].tobytes())
    if 8 + header_len > raw.size:
        raise SafetensorsError(f"{path}: header length {header_len} runs past the end of the file (truncated?)")
    try:
        header = json.loads(raw[8:8 + header_len].tobytes())
    except ValueError as err:
        raise SafetensorsError(f"{path}: header is not valid JSON ({err})") from err
    data = raw[8 + header_len:]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _DTYPES:
            raise SafetensorsError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        if end > data.size:
            raise SafetensorsError(f"{path}: tensor {name} runs past the end of the file (truncated?)")
        out[name] = data[start:end].view(_DTYPES[info["dtype"]]).reshape(info["shape"])
    return out


def write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """Write ``tensors`` to one ``.safetensors`` file."""
    names = {np.dtype(v).name: k for k, v in _DTYPES.items()}
    header, offset, blobs = {}, 0, []
    for name, array in tensors.items():
        blob = np.ascontiguousarray(array).tobytes()
        header[name] = {"dtype": names[array.dtype.name], "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(encoded)) + encoded)
        for blob in blobs:
            fh.write(blob)


def hf_config(raw: dict, dtype: str = "float32") -> LlamaConfig:
    """LlamaConfig from a Hugging Face ``config.json`` dict."""
    archs = set(raw.get("architectures") or [])
    if archs and not archs & _ARCHS:
        raise ValueError(f"architecture {sorted(archs)} is not supported; specdec loads {sorted(_ARCHS)}")
    n_heads = raw["num_attention_heads"]
    return LlamaConfig(
        vocab_size=raw["vocab_size"],
        d_model=raw["hidden_size"],
        n_layers=raw["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=raw.get("num_key_value_heads", n_heads),
        head_dim=raw.get("head_dim") or raw["hidden_size"] // n_heads,
        ffn_dim=raw["intermediate_size"],
        rope_theta=float(raw.get("rope_theta", 10000.0)),
        rms_eps=float(raw.get("rms_norm_eps", 1e-5)),
        tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
        qkv_bias=bool(raw.get("attention_bias", "Qwen2ForCausalLM" in archs)),
        max_seq_len=int(raw.get("max_position_embeddings", 8192)),
        dtype=dtype,
    )


def config_to_hf(cfg: LlamaConfig) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim, "intermediate_size": cfg.ffn_dim, "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.rms_eps, "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": cfg.qkv_bias, "max_position_embeddings": cfg.max_seq_len,
        "torch_dtype": cfg.dtype,
    }


def read_hf_dir(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(config.json dict, all tensors) of a Hugging Face style directory."""
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path} has no config.json; expected a Hugging Face style model directory")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} has no .safetensors weights")
    tensors = {}
    for name in files:
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name} is listed in the index but missing")
        tensors.update(read_safetensors(path / name))
    return json.loads(cfg_file.read_text()), tensors
