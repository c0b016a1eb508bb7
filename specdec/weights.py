"""Map model parameters to and from Hugging Face (PyTorch layout) tensor names.

Every loader (GGUF, safetensors) produces tensors under Hugging Face Llama
names in PyTorch layout (``[out, in]``); this module is the one place that
knows how they map onto the NNX parameters (``[in, out]`` kernels).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from specdec.config import LlamaConfig
from specdec.model import Llama

_SUBMODULES = {
    ("attn", "q"): "self_attn.q_proj", ("attn", "k"): "self_attn.k_proj",
    ("attn", "v"): "self_attn.v_proj", ("attn", "o"): "self_attn.o_proj",
    ("mlp", "gate"): "mlp.gate_proj", ("mlp", "up"): "mlp.up_proj", ("mlp", "down"): "mlp.down_proj",
}
_NORMS = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}
# Gemma 2/3 (post_norms): "post_attention_layernorm" norms the attention output, and the MLP input
# norm has its own name
_POST_NORMS = {"attn_norm": "input_layernorm", "mlp_norm": "pre_feedforward_layernorm",
               "post_attn_norm": "post_attention_layernorm", "post_mlp_norm": "post_feedforward_layernorm"}
_HEAD_NORMS = {"q_norm": "self_attn.q_norm", "k_norm": "self_attn.k_norm"}


class CheckpointError(ValueError):
    """A checkpoint does not match the model config (missing tensor, wrong shape)."""


def _keys(path) -> tuple:
    return tuple(p.key for p in path if isinstance(p, jax.tree_util.DictKey))


def hf_name(keys: tuple, cfg: LlamaConfig) -> tuple[str, bool]:
    """(Hugging Face tensor name, whether it is transposed) of an NNX parameter path of a model
    with config ``cfg``."""
    if keys == ("embed", "embedding"):
        return "model.embed_tokens.weight", False
    if keys == ("norm", "weight"):
        return "model.norm.weight", False
    if keys == ("lm_head", "kernel"):
        return "lm_head.weight", True
    _, layer, *rest = keys
    prefix = f"model.layers.{layer}."
    norms = _POST_NORMS if cfg.post_norms else _NORMS
    if rest[0] in norms:
        return prefix + norms[rest[0]] + ".weight", False
    if rest[1] in _HEAD_NORMS:
        return prefix + _HEAD_NORMS[rest[1]] + ".weight", False
    name = prefix + _SUBMODULES[tuple(rest[:2])]
    return (name + ".weight", True) if rest[2] == "kernel" else (name + ".bias", False)


def model_from_hf(cfg: LlamaConfig, get: Callable[[str], np.ndarray]) -> Llama:
    """Build a model whose parameters come from ``get(hf_name) -> np.ndarray`` (PyTorch layout)."""
    abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)

    def fill(path, leaf: jax.ShapeDtypeStruct) -> jax.Array:
        name, transposed = hf_name(_keys(path), cfg)
        try:
            array = np.asarray(get(name))
        except KeyError:
            raise CheckpointError(f"checkpoint has no tensor {name!r} needed by {cfg}") from None
        if transposed:
            array = array.T
        if array.shape != leaf.shape:
            raise CheckpointError(
                f"tensor {name!r} has shape {array.shape} (after layout change), but the config needs "
                f"{leaf.shape}: the checkpoint was made for another model config")
        return jnp.asarray(array, dtype=leaf.dtype)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


def hf_tensors(model: Llama) -> dict[str, np.ndarray]:
    """All parameters of ``model`` as ``{hf_name: array}`` in PyTorch layout."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param)):
        name, transposed = hf_name(_keys(path), model.config)
        array = np.asarray(leaf)
        out[name] = np.ascontiguousarray(array.T if transposed else array)
    return out
