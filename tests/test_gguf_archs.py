"""GGUF files of every architecture, written the way llama.cpp's converter writes them (its tensor
names from the ``gguf`` package, Llama's Q/K row permutation, Gemma's ``1 + w`` norms, Llama 3.1's
``rope_freqs`` factors), load to the model of the Hugging Face checkpoint they came from."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

import specdec
from conftest import full_logits
from specdec.hf_checkpoint import config_to_hf, hf_config, read_hf_dir, write_safetensors
from specdec.model import init_model
from specdec.weights import hf_tensors
from test_loading import TINY_TOKENS, llama_cpp_permute, add_tiny_tokenizer

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
from archs import CASES, ROOT, TOKENS  # noqa: E402

# GGUF keeps no query_pre_attn_scalar (llama.cpp uses head_dim below the 27B models) and llama.cpp fixes
# the window pattern: every 2nd layer of Gemma 2 is global, every 6th of Gemma 3
GGUF_CASES = {
    "llama3": CASES["llama3"],
    "qwen2": CASES["qwen2"],
    "qwen3": CASES["qwen3"],
    "gemma2": CASES["gemma2"].replace(query_scale=16.0),
    "gemma3": CASES["gemma3"].replace(n_layers=6, layer_types=("sliding",) * 5 + ("full",), query_scale=16.0),
}
MODEL_ARCHS = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2, "qwen3": gguf.MODEL_ARCH.QWEN3,
               "gemma2": gguf.MODEL_ARCH.GEMMA2, "gemma3": gguf.MODEL_ARCH.GEMMA3}
VOCAB = TINY_TOKENS + [f"y{i}" for i in range(128 - len(TINY_TOKENS))]  # the fixtures' 128 tokens


def hf_dir(name: str, tmp_path: Path) -> Path:
    """The case's committed checkpoint, or (a variant for llama.cpp's fixed patterns) a random one with
    random norm weights written to ``tmp_path``."""
    cfg = GGUF_CASES[name]
    if cfg == CASES[name]:
        return ROOT / name
    rng = np.random.default_rng(0)
    tensors = {k: v + rng.normal(0, 0.2, v.shape).astype(v.dtype) if k.endswith("norm.weight") else v
               for k, v in hf_tensors(init_model(cfg, seed=1)).items()}
    path = tmp_path / name
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config_to_hf(cfg)))
    write_safetensors(path / "model.safetensors", tensors)
    return path


def llama3_rope_factors(raw: dict) -> np.ndarray:
    """llama.cpp's ``rope_freqs`` for Llama 3.1 rope scaling: the divisor of each frequency."""
    s, dim = raw["rope_scaling"], raw["head_dim"]
    old = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old / s["low_freq_factor"], old / s["high_freq_factor"]
    factors = []
    for freq in 1.0 / raw["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / dim):
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(s["factor"])
        else:
            smooth = (old / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
            factors.append(1 / ((1 - smooth) / s["factor"] + smooth))
    return np.asarray(factors, np.float32)


def write_gguf(path: Path, source: Path) -> Path:
    """Convert the Hugging Face directory ``source`` to a float32 GGUF file at ``path``."""
    raw, tensors = read_hf_dir(source)
    arch = hf_config(raw).arch
    gemma = arch.startswith("gemma")
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(raw["max_position_embeddings"])
    w.add_embedding_length(raw["hidden_size"])
    w.add_block_count(raw["num_hidden_layers"])
    w.add_feed_forward_length(raw["intermediate_size"])
    w.add_head_count(raw["num_attention_heads"])
    w.add_head_count_kv(raw["num_key_value_heads"])
    w.add_key_length(raw["head_dim"])
    w.add_value_length(raw["head_dim"])
    w.add_rope_freq_base(raw["rope_theta"])
    w.add_layer_norm_rms_eps(raw["rms_norm_eps"])
    if gemma:
        w.add_sliding_window(raw["sliding_window"])
    if raw.get("attn_logit_softcapping"):
        w.add_attn_logit_softcapping(raw["attn_logit_softcapping"])
        w.add_final_logit_softcapping(raw["final_logit_softcapping"])
    add_tiny_tokenizer(w, VOCAB)
    if (raw.get("rope_scaling") or {}).get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", llama3_rope_factors(raw))
    names = gguf.get_tensor_name_map(MODEL_ARCHS[arch], raw["num_hidden_layers"])
    for name, array in tensors.items():
        array = np.asarray(array, np.float32)
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = raw["num_attention_heads"] if "q_proj" in name else raw["num_key_value_heads"]
            array = llama_cpp_permute(array, heads)
        if gemma and name.endswith("norm.weight"):
            array = array + 1.0
        w.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("name", list(GGUF_CASES))
def test_gguf_loads_the_models_of_its_hf_checkpoint(name, tmp_path):
    source = hf_dir(name, tmp_path)
    hf = specdec.load(source, precision="highest")
    ours = specdec.load(write_gguf(tmp_path / f"{name}.gguf", source), precision="highest")
    assert hf.config == GGUF_CASES[name]
    if name == "llama3":  # the scaling comes back as llama.cpp's per-frequency factors
        assert ours.config.rope_scaling.type == "freq_factors"
        assert ours.config.replace(rope_scaling=None) == hf.config.replace(rope_scaling=None)
    else:
        assert ours.config == hf.config
    np.testing.assert_allclose(full_logits(ours.module, [TOKENS]), full_logits(hf.module, [TOKENS]), atol=1e-5, rtol=0)
    assert ours.tokenizer.decode([VOCAB.index("ab")]) == "ab"
