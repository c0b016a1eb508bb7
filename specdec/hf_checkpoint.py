"""Hugging Face style checkpoints: ``config.json`` + safetensors (single or sharded).

Reads checkpoints of every architecture in :data:`ARCHITECTURES` (Llama 2/3.x, Mistral,
Qwen2/2.5, Qwen3, Gemma 2, Gemma 3 text) in float32, float16 or bfloat16, and writes a model
back out.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from specdec.config import GEMMA_ARCHS, GEMMA_SWITCHES, LlamaConfig, RopeScaling


class SafetensorsError(ValueError):
    """A safetensors file is missing, truncated or malformed."""


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of one ``.safetensors`` file as numpy arrays (bfloat16 as ``ml_dtypes.bfloat16``)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as fh:
            return {name: fh.get_tensor(name) for name in fh.keys()}
    except (SafetensorError, OSError, ValueError, TypeError) as err:
        raise SafetensorsError(f"{path} is not a readable safetensors file (truncated or corrupt?): {err}") from err


def write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """Write ``tensors`` to one ``.safetensors`` file (a temporary name first, renamed into place)."""
    from safetensors.numpy import save_file

    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(partial))
    os.replace(partial, path)


# Hugging Face ``architectures`` entry -> (specdec arch, ``model_type``)
ARCHITECTURES = {
    "LlamaForCausalLM": ("llama", "llama"),
    "MistralForCausalLM": ("mistral", "mistral"),
    "Qwen2ForCausalLM": ("qwen2", "qwen2"),
    "Qwen3ForCausalLM": ("qwen3", "qwen3"),
    "Gemma2ForCausalLM": ("gemma2", "gemma2"),
    "Gemma3ForCausalLM": ("gemma3", "gemma3_text"),
}
_BY_MODEL_TYPE = {model_type: arch for arch, model_type in ARCHITECTURES.values()}
_ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}
_LAYER_TYPES = {"full_attention": "full", "sliding_attention": "sliding"}
_ROPE_KEYS = {"rope_type", "type", "rope_theta", "factor", "original_max_position_embeddings", "low_freq_factor",
              "high_freq_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor",
              "truncate", "partial_rotary_factor"}


class ConfigError(ValueError):
    """A model config asks for something specdec does not implement, or lacks a required key."""


def _arch(raw: dict) -> str:
    """specdec's architecture name for a config.json (from ``architectures``, else ``model_type``)."""
    for name in raw.get("architectures") or []:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name][0]
    if raw.get("architectures"):
        hint = " (a multimodal checkpoint: load its text model)" if "text_config" in raw else ""
        raise ConfigError(f"architectures {raw['architectures']} is not supported{hint}; specdec loads "
                          f"{', '.join(ARCHITECTURES)}")
    if raw.get("model_type") in _BY_MODEL_TYPE:
        return _BY_MODEL_TYPE[raw["model_type"]]
    raise ConfigError(f"config.json has neither a supported 'architectures' entry nor a supported 'model_type' "
                      f"(got {raw.get('model_type')!r}); specdec loads {', '.join(ARCHITECTURES)}")


def _rope_scaling(spec: dict, where: str, max_seq_len: int) -> RopeScaling | None:
    """A :class:`RopeScaling` from a config's rope dict (legacy ``rope_scaling`` or ``rope_parameters``)."""
    if unknown := sorted(set(spec) - _ROPE_KEYS):
        raise ConfigError(f"{where} has keys specdec does not implement: {unknown}")
    if spec.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError(f"{where}.partial_rotary_factor={spec['partial_rotary_factor']} is not implemented "
                          f"(specdec rotates the whole head)")
    kind = spec.get("rope_type", spec.get("type", "default"))
    if kind == "default":
        return None
    if kind not in ("linear", "dynamic", "yarn", "llama3"):
        raise ConfigError(f"{where}.rope_type={kind!r} is not implemented; specdec implements default, linear, "
                          f"dynamic, yarn and llama3")
    original = spec.get("original_max_position_embeddings")
    factor = spec.get("factor")
    if kind == "yarn" and factor is None and original:
        factor = max_seq_len / original
    try:
        extra = ({"low_freq_factor": spec["low_freq_factor"], "high_freq_factor": spec["high_freq_factor"]}
                 if kind == "llama3" else {})
        if kind == "llama3" and original is None:
            raise KeyError("original_max_position_embeddings")
    except KeyError as err:
        raise ConfigError(f"{where} of type {kind!r} lacks the key {err.args[0]!r}") from None
    if kind == "yarn":
        extra = {k: spec[k] for k in ("mscale", "mscale_all_dim", "attention_factor", "truncate")
                 if spec.get(k) is not None}
        extra.update({k: float(spec.get(k) or d) for k, d in (("beta_fast", 32.0), ("beta_slow", 1.0))})
    try:
        return RopeScaling(type=kind, factor=factor, original_max_len=original, **extra)
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from None


def _ropes(raw: dict, arch: str, max_seq_len: int) -> dict:
    """rope_theta, rope_scaling and (Gemma 3) local_rope_theta of a config, legacy or new format."""
    params = raw.get("rope_parameters")
    default_theta = 1_000_000.0 if arch == "gemma3" else 10000.0
    if arch == "gemma3":
        per_type = params if params and "full_attention" in params else {
            "full_attention": {"rope_theta": raw.get("rope_theta", default_theta), **(raw.get("rope_scaling") or {})},
            "sliding_attention": {"rope_theta": raw.get("rope_local_base_freq", 10000.0)}}
        local = per_type.get("sliding_attention") or {}
        if _rope_scaling(local, "rope_parameters.sliding_attention", max_seq_len) is not None:
            raise ConfigError("rope scaling of Gemma 3's sliding-window layers is not implemented")
        spec, where = per_type.get("full_attention") or {}, "rope_parameters.full_attention"
        out = {"local_rope_theta": float(local.get("rope_theta", 10000.0))}
    else:
        spec = params or {"rope_theta": raw.get("rope_theta", default_theta), **(raw.get("rope_scaling") or {})}
        where, out = ("rope_parameters" if params else "rope_scaling"), {}
    return {"rope_theta": float(spec.get("rope_theta", raw.get("rope_theta", default_theta))),
            "rope_scaling": _rope_scaling(spec, where, max_seq_len), **out}


def _windows(raw: dict, arch: str, n_layers: int) -> dict:
    """sliding_window and layer_types of a config."""
    window = raw.get("sliding_window")
    types = raw.get("layer_types")
    if arch in ("qwen2", "qwen3"):
        window = window if raw.get("use_sliding_window") else None
        if window is not None and types is None:
            types = ["sliding_attention" if i >= raw.get("max_window_layers", n_layers) else "full_attention"
                     for i in range(n_layers)]
    elif arch in GEMMA_ARCHS:
        window = window or 4096
        pattern = 2 if arch == "gemma2" else raw.get("sliding_window_pattern", 6)
        types = types or ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layers)]
    elif arch == "llama" and window is not None:
        raise ConfigError(f"sliding_window={window} on a Llama config is not implemented (Llama attends in full)")
    if window is None:
        return {}
    if types is None:
        return {"sliding_window": int(window)}
    if unknown := sorted(set(types) - set(_LAYER_TYPES)):
        raise ConfigError(f"layer_types {unknown} are not implemented; specdec implements {sorted(_LAYER_TYPES)}")
    return {"sliding_window": int(window), "layer_types": tuple(_LAYER_TYPES[t] for t in types)}


def hf_config(raw: dict, dtype: str = "float32", precision: str = "highest") -> LlamaConfig:
    """LlamaConfig from a Hugging Face ``config.json`` dict; a key or value specdec does not
    implement is a :class:`ConfigError` naming it."""
    arch = _arch(raw)
    try:
        n_heads, d_model, n_layers = raw["num_attention_heads"], raw["hidden_size"], raw["num_hidden_layers"]
        shape = dict(vocab_size=raw["vocab_size"], d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                     ffn_dim=raw["intermediate_size"])
    except KeyError as err:
        raise ConfigError(f"config.json lacks the required key {err.args[0]!r}") from None
    gemma = arch in GEMMA_ARCHS
    act_key = "hidden_activation" if gemma and raw.get("hidden_activation") else "hidden_act"
    activation = raw.get(act_key, "gelu_pytorch_tanh" if gemma else "silu")
    if activation not in _ACTIVATIONS:
        raise ConfigError(f"{act_key}={activation!r} is not implemented; specdec implements {sorted(_ACTIVATIONS)}")
    for key, ok in (("mlp_bias", False), ("use_bidirectional_attention", False)):
        if raw.get(key, ok) != ok:
            raise ConfigError(f"{key}={raw[key]!r} is not implemented")
    max_seq_len = int(raw.get("max_position_embeddings", 8192))
    return LlamaConfig(
        **shape,
        n_kv_heads=raw.get("num_key_value_heads") or n_heads,
        head_dim=raw.get("head_dim") or d_model // n_heads,
        rms_eps=float(raw.get("rms_norm_eps", 1e-6 if gemma else 1e-5)),
        tie_embeddings=bool(raw.get("tie_word_embeddings", gemma)),
        qkv_bias=bool(raw.get("attention_bias", arch == "qwen2")),
        max_seq_len=max_seq_len,
        dtype=dtype,
        precision=precision,
        arch=arch,
        **_ropes(raw, arch, max_seq_len),
        **_windows(raw, arch, n_layers),
        qk_norm=arch in ("qwen3", "gemma3"),
        activation=_ACTIVATIONS[activation],
        **(GEMMA_SWITCHES if gemma else {}),
        query_scale=float(raw.get("query_pre_attn_scalar", 256)) if gemma else None,
        attn_softcap=raw.get("attn_logit_softcapping") if gemma else None,
        final_softcap=raw.get("final_logit_softcapping") if gemma else None,
    )


def config_to_hf(cfg: LlamaConfig) -> dict:
    """A Hugging Face ``config.json`` dict for ``cfg`` (its architecture's own keys)."""
    name = next(k for k, (arch, _) in ARCHITECTURES.items() if arch == cfg.arch)
    out = {
        "architectures": [name], "model_type": ARCHITECTURES[name][1],
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim, "intermediate_size": cfg.ffn_dim, "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.rms_eps, "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": cfg.qkv_bias, "max_position_embeddings": cfg.max_seq_len,
        "torch_dtype": cfg.dtype,
        "hidden_act": {v: k for k, v in _ACTIVATIONS.items()}[cfg.activation],
    }
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        out["rope_scaling"] = {"rope_type": s.type, "factor": s.factor, **{k: v for k, v in {
            "original_max_position_embeddings": s.original_max_len,
            **({"low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor}
               if s.type == "llama3" else {}),
            **({"beta_fast": s.beta_fast, "beta_slow": s.beta_slow, "mscale": s.mscale,
                "mscale_all_dim": s.mscale_all_dim, "attention_factor": s.attention_factor, "truncate": s.truncate}
               if s.type == "yarn" else {})}.items() if v is not None}}
    if cfg.sliding_window is not None:
        out["sliding_window"] = cfg.sliding_window
        if cfg.arch in ("qwen2", "qwen3"):
            out["use_sliding_window"] = True
        if cfg.layer_types is not None:
            out["layer_types"] = [{v: k for k, v in _LAYER_TYPES.items()}[t] for t in cfg.layer_types]
    if cfg.arch in GEMMA_ARCHS:
        scale = cfg.query_scale or cfg.head_dim
        out.update(hidden_activation=out.pop("hidden_act"), query_pre_attn_scalar=int(scale) if scale == int(scale) else scale,
                   attn_logit_softcapping=cfg.attn_softcap, final_logit_softcapping=cfg.final_softcap)
    if cfg.local_rope_theta is not None:
        out["rope_local_base_freq"] = cfg.local_rope_theta
    return out


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
