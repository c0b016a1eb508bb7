"""Model configs specdec does not implement, and bad precision policies: each a clear error that names
the offending key or value."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import gguf
import pytest

import specdec
from specdec.cli import main as cli_main
from specdec.gguf_loader import GGUFError
from specdec.hf_checkpoint import ConfigError, hf_config

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
from archs import CASES, ROOT  # noqa: E402


def raw(case: str, **changes) -> dict:
    """A fixture case's config.json dict with ``changes`` (a value None removes the key)."""
    out = json.loads((ROOT / case / "config.json").read_text()) | changes
    return {k: v for k, v in out.items() if v is not None}


def test_fixture_configs_are_accepted():
    assert hf_config(raw("llama3")) == CASES["llama3"] and hf_config(raw("gemma3")) == CASES["gemma3"]


def test_rope_parameters_format_reads_as_the_legacy_one():
    """transformers 5 writes ``rope_parameters`` (per layer type for Gemma 3) where older configs have
    ``rope_theta`` / ``rope_scaling`` / ``rope_local_base_freq``: both read to the same config."""
    llama = raw("llama3", rope_scaling=None, rope_theta=None)
    llama["rope_parameters"] = {"rope_theta": 10000.0, **raw("llama3")["rope_scaling"]}
    assert hf_config(llama) == CASES["llama3"]
    gemma = raw("gemma3", rope_theta=None, rope_local_base_freq=None)
    gemma["rope_parameters"] = {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
    assert hf_config(gemma) == CASES["gemma3"]
    gemma["rope_parameters"]["sliding_attention"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}
    with pytest.raises(ConfigError, match="sliding-window layers is not implemented"):
        hf_config(gemma)


@pytest.mark.parametrize("config, message", [
    (raw("llama3", rope_scaling={"rope_type": "longrope", "factor": 2.0}), r"rope_type='longrope' is not implemented"),
    (raw("llama3", rope_scaling={"rope_type": "linear", "factor": 2.0, "short_factor": [1.0]}),
     r"rope_scaling has keys specdec does not implement: \['short_factor'\]"),
    (raw("llama3", rope_scaling={"rope_type": "default", "partial_rotary_factor": 0.5}),
     r"partial_rotary_factor=0.5 is not implemented"),
    (raw("llama3", rope_scaling={"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 16}),
     r"rope_scaling of type 'llama3' lacks the key 'low_freq_factor'"),
    (raw("llama3", rope_scaling={"rope_type": "linear", "factor": -2.0}), r"rope_scaling: .*positive 'factor'.*-2.0"),
], ids=["unknown-type", "unknown-key", "partial-rotary", "llama3-incomplete", "negative-factor"])
def test_rope_dicts_specdec_does_not_implement(config, message):
    with pytest.raises(ConfigError, match=message):
        hf_config(config)


def test_unknown_architecture():
    with pytest.raises(ConfigError, match=r"\['FalconForCausalLM'\] is not supported") as err:
        hf_config(raw("llama3", architectures=["FalconForCausalLM"], model_type="falcon"))
    assert "multimodal" not in str(err.value)


def test_multimodal_config_points_at_its_text_model():
    config = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
              "text_config": raw("gemma3", architectures=None)}
    with pytest.raises(ConfigError, match=r"\['Gemma3ForConditionalGeneration'\] is not supported "
                                          r"\(a multimodal checkpoint: load its text model\)"):
        hf_config(config)


def test_missing_required_key():
    with pytest.raises(ConfigError, match="lacks the required key 'hidden_size'"):
        hf_config(raw("qwen2", hidden_size=None))


@pytest.mark.parametrize("case, changes, message", [
    ("llama3", {"hidden_act": "relu"}, r"hidden_act='relu' is not implemented"),
    ("gemma2", {"hidden_activation": "gelu"}, r"hidden_activation='gelu' is not implemented"),
    ("llama3", {"mlp_bias": True}, r"mlp_bias=True is not implemented"),
    ("gemma3", {"use_bidirectional_attention": True}, r"use_bidirectional_attention=True is not implemented"),
    ("gemma3", {"layer_types": ["sliding_attention", "chunked_attention", "full_attention", "sliding_attention"]},
     r"layer_types \['chunked_attention'\] are not implemented"),
    ("llama3", {"sliding_window": 4096}, r"sliding_window=4096 on a Llama config is not implemented"),
])
def test_switches_specdec_does_not_implement(case, changes, message):
    with pytest.raises(ConfigError, match=message):
        hf_config(raw(case, **changes))


def _metadata_only_gguf(path: Path, arch: str, **strings) -> Path:
    """A GGUF file with the metadata a config is read from (no tensors), ``strings`` added as
    ``{arch}.<key>`` string fields (dots written as ``__``)."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(2)
    w.add_embedding_length(32)
    w.add_feed_forward_length(48)
    w.add_head_count(4)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_token_list([f"t{i}" for i in range(16)])
    for key, value in strings.items():
        w.add_string(f"{arch}.{key.replace('__', '.')}", value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_unknown_gguf_architecture(tmp_path):
    with pytest.raises(GGUFError, match=r"GGUF architecture 'falcon' is not supported; specdec reads llama"):
        specdec.load(_metadata_only_gguf(tmp_path / "m.gguf", "falcon"))


def test_unknown_gguf_rope_scaling(tmp_path):
    path = _metadata_only_gguf(tmp_path / "m.gguf", "llama", rope__scaling__type="longrope")
    with pytest.raises(GGUFError, match=r"llama.rope.scaling.type='longrope' is not implemented"):
        specdec.load(path)


@pytest.mark.parametrize("changes, message", [
    (dict(layer_types=("sliding", "full", "sliding")), r"layer_types must give one of .* each of the 4 layers"),
    (dict(layer_types=("sliding", "full", "global", "full")), r"layer_types must give one of .*'global'"),
    (dict(sliding_window=None), r"layer_types has sliding layers but sliding_window is not set"),
    (dict(sliding_window=0), r"sliding_window must be a positive number of tokens, got 0"),
])
def test_llama_config_validation(changes, message):
    with pytest.raises(ValueError, match=message):
        CASES["gemma2"].replace(**changes)


def test_unknown_precision_policy(capsys):
    with pytest.raises(ValueError, match=r"precision must be one of highest, default, bf16 .* got 'fp8'"):
        specdec.load(ROOT / "llama3", precision="fp8")
    with pytest.raises(SystemExit) as exit_:
        cli_main(["generate", "--model", str(ROOT / "llama3"), "--prompt", "hi", "--precision", "fp8"])
    assert exit_.value.code == 2
    assert "argument --precision: invalid choice: 'fp8'" in capsys.readouterr().err
