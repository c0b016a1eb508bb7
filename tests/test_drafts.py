"""Draft models: construction options, reduced vocabularies, save/load, and the distillation loop
(KL goes down, resume is exact, a sharded step equals the single-device step)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from drafts.model import DraftSpec, frequent_vocab, new_draft, token_frequencies
from drafts.saved import draft_for, load_draft, save_draft
from conftest import greedy_rows
from specdec.config import tiny_config
from specdec.equivalence import check
from specdec.loading import LoadedModel
from specdec.model import init_model
from training.draft import DraftTrainConfig, evaluate, fit, teacher_targets

ROOT = Path(__file__).resolve().parents[1]


def _logits(model, tokens):
    from specdec.model import teacher_forced_logits

    return teacher_forced_logits(model, jnp.asarray(tokens))


def test_draft_from_all_target_layers_is_the_target(tiny):
    """init "layers" copies layers exactly, shares the embedding array, and a reduced head keeps
    the target's logits on its tokens and -inf elsewhere."""
    tokens = [[5, 9, 2, 77, 31, 8]]
    whole = new_draft(tiny, DraftSpec(n_layers=3, layers=(0, 1, 2)))
    assert whole.embed.embedding.get_value() is tiny.embed.embedding.get_value()
    np.testing.assert_allclose(_logits(whole, tokens), _logits(tiny, tokens), atol=1e-6)
    vocab_map = np.asarray([0, 2, 5, 31, 40, 77, 96], np.int32)
    reduced = new_draft(tiny, DraftSpec(n_layers=3, layers=(0, 1, 2), vocab_size=7), vocab_map=vocab_map)
    got, want = _logits(reduced, tokens)[0], _logits(tiny, tokens)[0]
    np.testing.assert_allclose(got[:, vocab_map], want[:, vocab_map], atol=1e-5)
    outside = np.setdiff1d(np.arange(97), vocab_map)
    assert np.all(np.isneginf(np.asarray(got[:, outside])))
    spread = new_draft(init_model(tiny_config(n_layers=6)), DraftSpec(n_layers=3))
    assert DraftSpec(n_layers=3).target_layers(6) == (0, 1, 5) and spread.config.n_layers == 3
    assert DraftSpec(n_layers=1).target_layers(6) == (5,)
    own = new_draft(tiny, DraftSpec(n_layers=1, init="embeddings", share_embeddings=False))
    assert own.embed.embedding.get_value() is not tiny.embed.embedding.get_value()


def test_bad_draft_specs_are_rejected(tiny):
    with pytest.raises(ValueError, match="init must be one of"):
        DraftSpec(init="copy")
    with pytest.raises(ValueError, match="share_embeddings needs init"):
        DraftSpec(init="random")
    with pytest.raises(ValueError, match="distinct indices"):
        new_draft(tiny, DraftSpec(n_layers=2, layers=(0, 7)))
    with pytest.raises(ValueError, match="needs a vocab_map"):
        new_draft(tiny, DraftSpec(vocab_size=10))
    with pytest.raises(ValueError, match="reduced vocabulary size"):
        frequent_vocab(np.ones(97), 0)


def test_frequent_vocab_keeps_the_commonest_and_eos():
    counts = token_frequencies([[3, 3, 3, 7, 7, 1], [7, 9]], 12)
    assert counts[3] == 3 and counts[7] == 3 and counts[9] == 1
    assert frequent_vocab(counts, 3, always=(11,)).tolist() == [3, 7, 11]


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_reduced_vocabulary_draft_is_lossless(tiny_lm, tiny, temperature):
    """The target verifies over its whole vocabulary: output identical to autoregressive."""
    rng = np.random.default_rng(2)
    vocab_map = frequent_vocab(rng.integers(0, 100, 97), 24)
    draft = new_draft(tiny, DraftSpec(n_layers=2, vocab_size=24), vocab_map=vocab_map)
    prompts = [rng.integers(0, 97, n).tolist() for n in (4, 17, 30)]
    report = check(tiny_lm, prompts, "draft", draft=LoadedModel.from_module(draft, name="reduced"), k=3,
                   max_new_tokens=[20, 31, 9], temperature=temperature, seed=[1, 2, 3])
    assert report.counts["identical"] == 3, report.table()


def test_save_load_round_trip_and_wrong_target(tiny_lm, tiny, tmp_path):
    vocab_map = np.arange(0, 97, 2, dtype=np.int32)
    spec = DraftSpec(n_layers=2, vocab_size=len(vocab_map))
    draft = new_draft(tiny, spec, vocab_map=vocab_map)
    nnx.update(draft.layers[0], jax.tree.map(lambda a: a + 0.01, nnx.state(draft.layers[0])))
    save_draft(draft, spec, tiny, tmp_path / "d", target_name="tiny", dtype="float32", extra={"note": 1})
    meta = json.loads((tmp_path / "d" / "draft_config.json").read_text())
    assert meta["note"] == 1 and meta["spec"]["vocab_size"] == len(vocab_map)
    loaded = load_draft(tmp_path / "d", tiny_lm).module
    assert loaded.embed.embedding.get_value() is tiny_lm.state["embed"]["embedding"].get_value()
    np.testing.assert_allclose(_logits(loaded, [[1, 2, 3]]), _logits(draft, [[1, 2, 3]]), atol=1e-6)
    other = LoadedModel.from_module(init_model(tiny_config(), seed=5), name="other")
    with pytest.raises(ValueError, match="was trained for target 'tiny'"):
        load_draft(tmp_path / "d", other)
    with pytest.raises(ValueError, match="ships no draft"):
        draft_for(other, None)
    (tmp_path / "d" / "draft_config.json").write_text("{oops")
    with pytest.raises(ValueError, match="corrupt"):
        load_draft(tmp_path / "d", tiny_lm)
    with pytest.raises(FileNotFoundError, match="draft_config.json is missing"):
        load_draft(tmp_path / "nothing", tiny_lm)


def _toy_data(lm, rows: int, seed: int):
    return teacher_targets(lm, greedy_rows(lm, rows, seed), k=lm.config.vocab_size)


@pytest.fixture(scope="module")
def toy(tiny_lm):
    return _toy_data(tiny_lm, 48, 0), _toy_data(tiny_lm, 16, 1)


def _cfg(**kw):
    return DraftTrainConfig(**{"batch_size": 8, "epochs": 2.0, "lr": 3e-3, "warmup": 0.1, "checkpoint_every": 4,
                               "vocab_size": 0, **kw})


@pytest.mark.parametrize("loss", ["kl", "tv", "ce"])
def test_distillation_lowers_its_loss_and_raises_acceptance(tiny, toy, tmp_path, loss):
    """Forward KL (and TV, and the CE baseline) fall on held-out data; acceptance rises."""
    train, heldout = toy
    spec = DraftSpec(n_layers=1, init="embeddings")
    draft = new_draft(tiny, spec)
    before = evaluate(draft, heldout)
    fit(draft, spec, train, _cfg(loss=loss, epochs=6.0), tmp_path)
    after = evaluate(draft, heldout)
    assert after[loss] < 0.85 * before[loss], (before, after)
    assert after["greedy_accept"] > before["greedy_accept"] + 0.1, (before, after)
    assert after["expected_per_forward"][4] > before["expected_per_forward"][4]


def test_bad_layer_choices_fail_when_the_config_is_built():
    """``layers`` is parsed and checked against ``n_layers`` as the config is made, with a message
    naming the expected format, so a bad ``--layers`` fails before any data or training work."""
    assert DraftTrainConfig(n_layers=4, layers=" 0, 1,2 ,29").spec().layers == (0, 1, 2, 29)
    assert DraftTrainConfig(n_layers=3).spec().layers is None
    for bad in ("0;1", "a,b", "0,,1", "-1,2"):
        with pytest.raises(ValueError, match="comma-separated target layer indices"):
            DraftTrainConfig(n_layers=2, layers=bad)
    with pytest.raises(ValueError, match="not n_layers=4"):
        DraftTrainConfig(n_layers=4, layers="0,1,29")


def test_heldout_split_can_be_self_distilled_whatever_the_training_data(monkeypatch):
    """``heldout_data`` picks the held-out split's mode (default: as ``data``), names its own data
    cache, rejects unknown modes, and reaches :func:`split_examples`."""
    import training.data as data

    cfg = DraftTrainConfig(data="sharegpt", heldout_data="self-distill", conversations=60)
    assert (cfg.data_of("train"), cfg.data_of("heldout")) == ("sharegpt", "self-distill")
    assert DraftTrainConfig(data="sharegpt").data_of("heldout") == "sharegpt"
    assert cfg.data_key() != DraftTrainConfig(data="sharegpt", conversations=60).data_key()
    with pytest.raises(ValueError, match="heldout_data must be empty"):
        DraftTrainConfig(heldout_data="real")
    convs = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]] * 60
    calls = []
    monkeypatch.setattr("specdec.datasets.sharegpt", lambda split: convs)
    monkeypatch.setattr(data, "self_distill", lambda lm, c, **kw: calls.append(("self-distill", len(c))) or [])
    monkeypatch.setattr(data, "render_chat", lambda tok, c: calls.append("sharegpt"))
    lm = SimpleNamespace(tokenizer=None)
    data.split_examples(lm, cfg, "heldout", data=cfg.data_of("heldout"))
    data.split_examples(lm, cfg, "train", data=cfg.data_of("train"))
    assert calls == [("self-distill", 50)] + ["sharegpt"] * 60


def test_resume_is_exact(tiny, toy, tmp_path):
    train, _ = toy
    spec = DraftSpec(n_layers=1, layers=(2,))
    whole = new_draft(tiny, spec)
    log = fit(whole, spec, train, _cfg(), tmp_path / "a")
    killed = new_draft(tiny, spec)
    fit(killed, spec, train, _cfg(), tmp_path / "b", max_steps=6)
    resumed = new_draft(tiny, spec)
    log_b = fit(resumed, spec, train, _cfg(), tmp_path / "b")
    assert [r["loss"] for r in log_b] == [r["loss"] for r in log]
    for a, b in zip(jax.tree.leaves(nnx.state(whole)), jax.tree.leaves(nnx.state(resumed))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    _logits(tiny, [[1, 2, 3]])  # training (which donates its buffers) left the target's arrays intact


SHARDED = textwrap.dedent("""
    import numpy as np, jax
    from flax import nnx
    from drafts.model import DraftSpec, new_draft, trainable
    from specdec.config import tiny_config
    from specdec.model import init_model
    from training.draft import Teacher, batch_arrays, data_mesh, replicate, shard_batch, train_step
    from training.loop import make_optimizer
    assert len(jax.devices()) == 8, jax.devices()
    rng = np.random.default_rng(0)
    rows, length, k = 16, 12, 5
    tokens = rng.integers(0, 97, (rows, length)).astype(np.int32)
    probs = rng.dirichlet(np.ones(k), (rows, length)).astype(np.float32)
    data = Teacher(tokens, np.ones_like(tokens), np.tile(np.arange(length, dtype=np.int32), (rows, 1)),
                   np.where(rng.random((rows, length)) < 0.8, np.roll(tokens, -1, 1), -1).astype(np.int32),
                   rng.integers(0, 97, (rows, length, k)).astype(np.int32), -np.sort(-probs, axis=-1))
    spec = DraftSpec(n_layers=1, init="embeddings")
    optimizer = make_optimizer(lr=1e-2, total_steps=10, warmup=0.1, weight_decay=0.0, clip=1.0)
    out = []
    for devices in (jax.devices()[:1], jax.devices()):
        mesh = data_mesh(devices)
        graphdef, params, frozen = nnx.split(new_draft(init_model(tiny_config()), spec), trainable(spec), ...)
        params, frozen = replicate(mesh, params), replicate(mesh, frozen)
        opt = replicate(mesh, optimizer.init(params))
        for step in range(3):
            batch = shard_batch(mesh, batch_arrays(data, np.arange(rows), None, 97))
            params, opt, loss, _ = train_step(graphdef, params, frozen, opt, batch, optimizer=optimizer, loss="kl+tv")
        out.append((float(loss), [np.asarray(x) for x in jax.tree.leaves(params)]))
    assert abs(out[0][0] - out[1][0]) < 1e-5, (out[0][0], out[1][0])
    for a, b in zip(out[0][1], out[1][1]):
        np.testing.assert_allclose(a, b, atol=2e-5)
    try:
        shard_batch(data_mesh(), batch_arrays(data, np.arange(3), None, 97))
        raise AssertionError("a 3-row batch was split over 8 devices")
    except ValueError as err:
        assert "multiple of 8" in str(err)
    print("sharded == single", out[0][0], out[1][0])
""")


def test_sharded_step_equals_single_device_step():
    """Data parallel over an 8-device CPU mesh: three steps agree with the same steps on one device."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
           "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}  # compile-bound, as the other tiny-model tests (conftest)
    run = subprocess.run([sys.executable, "-c", SHARDED], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "sharded == single" in run.stdout
