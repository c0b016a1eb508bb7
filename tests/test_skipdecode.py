"""SkipDecode (schedule, cached decoding with skipped layers, fine-tuning) and lossless early-exit
self-speculation, on tiny random models."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import specdec
from specdec.autoregressive import decode_chunk, plan_shapes, prefill, prompt_arrays
from specdec.cache import init_cache
from specdec.config import tiny_config
from specdec.equivalence import check
from specdec.loading import LoadedModel
from specdec.model import forward, init_model
from specdec.sampling import Sampling
from specdec.skipdecode import SkipSchedule, finetuned_for, load_finetuned, save_finetuned
from training.data import Example, pack
from training.skipdecode import SkipTrainConfig, fit, perplexity, schedules_of

N_LAYERS = 6


@pytest.fixture(scope="module")
def deep():
    """A 6-layer tiny model, so that schedules have room to skip."""
    return LoadedModel.from_module(init_model(tiny_config(n_layers=N_LAYERS), seed=3), name="tiny6")


@settings(max_examples=60, deadline=None)
@given(n_layers=st.integers(2, 40), data=st.data())
def test_schedule_properties(n_layers, data):
    """Non-increasing in position, within [min, max], warm-up layers plus a contiguous top block,
    all layers in the prompt, and the same layers for every row at a step."""
    warmup = data.draw(st.integers(0, n_layers - 1))
    low = data.draw(st.integers(max(warmup, 1), n_layers))
    high = data.draw(st.integers(low, n_layers))
    end = data.draw(st.integers(0, 50))
    sched = SkipSchedule(n_layers=n_layers, warmup=warmup, max_active=high, min_active=low, prompt_end=end,
                         max_length=end + data.draw(st.integers(1, 200)))
    positions = np.arange(0, sched.max_length + 30)
    count = sched.active_count(positions)
    assert np.all(np.diff(count) <= 0)
    assert np.all(count[:end] == n_layers)
    gen = count[end:]
    assert gen.min() >= low and gen.max() <= high and gen[0] == high and count[-1] == low
    masks = sched.layer_mask(positions)
    assert np.array_equal(masks.sum(-1), count)
    assert np.all(masks[:, :warmup])
    top = masks[:, warmup:]
    assert np.all(np.diff(top.astype(int), axis=1) >= 0)  # off ... off on ... on: the top layers kept
    assert np.all(masks[1:] <= masks[:-1])  # a later position never runs a layer an earlier one skipped
    steps = sched.step_masks(40)
    assert np.array_equal(steps, sched.layer_mask(end + np.arange(40)))  # one set per step for the batch


@settings(max_examples=40, deadline=None)
@given(n_layers=st.integers(8, 40), speedup=st.floats(1.0, 3.0), horizon=st.integers(64, 512),
       warmup=st.integers(0, 2))
def test_schedule_mean_matches_the_requested_speedup(n_layers, speedup, horizon, warmup):
    assume(warmup + 1 <= n_layers / speedup)  # else a clear error (test_bad_schedules_are_rejected)
    sched = SkipSchedule.for_speedup(n_layers, speedup, prompt_end=10, max_length=10 + horizon, warmup=warmup)
    assert abs(sched.mean_active - n_layers / speedup) <= 0.5 + 0.02 * n_layers / speedup
    assert sched.min_active <= sched.max_active <= n_layers


def test_bad_schedules_are_rejected():
    with pytest.raises(ValueError, match="min_active <= max_active"):
        SkipSchedule(n_layers=4, warmup=0, max_active=2, min_active=3, prompt_end=0, max_length=8)
    with pytest.raises(ValueError, match="warm-up"):
        SkipSchedule(n_layers=4, warmup=3, max_active=4, min_active=2, prompt_end=0, max_length=8)
    with pytest.raises(ValueError, match="target_speedup must be >= 1"):
        SkipSchedule.for_speedup(4, 0.5, prompt_end=0, max_length=8)
    with pytest.raises(ValueError, match="lower the speedup"):
        SkipSchedule.for_speedup(4, 4.0, prompt_end=0, max_length=8, warmup=2)


PROMPTS = [[5, 9, 2], [7] * 11, list(range(20, 37))]


def test_all_layers_equal_the_full_model(deep):
    ar = specdec.generate(deep, PROMPTS, max_new_tokens=[20, 9, 14])
    skip = specdec.generate(deep, PROMPTS, max_new_tokens=[20, 9, 14], method="skipdecode", min_active=N_LAYERS)
    assert [r.tokens for r in skip] == [r.tokens for r in ar]
    assert skip[0].stats.mean_active_layers == N_LAYERS


def _teacher_forced_with_schedule(lm, seqs, prompt_lens, sched: SkipSchedule) -> np.ndarray:
    """Logits [B, T, V] of whole sequences with row b's token at q running the layers of schedule
    position ``prompt_end + (q - prompt_lens[b])`` (the prompt: all), from an empty cache."""
    width = max(len(s) for s in seqs)
    tokens = np.zeros((len(seqs), width), np.int32)
    for i, s in enumerate(seqs):
        tokens[i, :len(s)] = s
    q = np.arange(width)[None, :] - np.asarray(prompt_lens)[:, None]
    masks = sched.layer_mask(np.where(q < 0, 0, sched.prompt_end + q))
    masks[q < 0] = True
    model = lm.module
    res = forward(model, init_cache(model.config, len(seqs), width), tokens=jnp.asarray(tokens),
                  positions=jnp.broadcast_to(jnp.arange(width), tokens.shape), layer_mask=jnp.asarray(masks))
    return np.asarray(res.logits)


def test_cached_skipping_equals_teacher_forcing_with_the_same_layers(deep):
    """Ragged batch: the rows share the step's layer set; cached decoding (skipped layers neither
    computed nor read) gives what a whole-sequence forward with those per-position sets gives."""
    new = 24
    out = specdec.generate(deep, PROMPTS, max_new_tokens=new, ignore_eos=True, method="skipdecode",
                           target_speedup=2.0)
    lens = [len(p) for p in PROMPTS]
    sched = SkipSchedule.for_speedup(N_LAYERS, 2.0, prompt_end=max(lens), max_length=max(lens) + new)
    assert sched.min_active < sched.max_active < N_LAYERS + 1 and out[0].stats.mean_active_layers < N_LAYERS
    logits = _teacher_forced_with_schedule(deep, [p + r.tokens for p, r in zip(PROMPTS, out)], lens, sched)
    for i, (p, r) in enumerate(zip(PROMPTS, out)):
        assert r.tokens == logits[i, len(p) - 1:len(p) + new - 1].argmax(-1).tolist()
    plain = specdec.generate(deep, PROMPTS, max_new_tokens=new, ignore_eos=True)
    assert [r.tokens for r in out] != [r.tokens for r in plain]  # skipping really changed the model


def _decode_poisoned(lm, schedule_masks, poison) -> np.ndarray:
    """Greedy decode step by step; after each step ``poison(step, layer_on)`` picks layers whose K/V
    at the position just written are overwritten with NaN. Returns the tokens [B, n]."""
    prompts = PROMPTS[:2]
    steps = schedule_masks.shape[0]
    shapes = plan_shapes(lm.config, [len(p) for p in prompts], [steps + 1] * 2)
    st = prefill(lm.graphdef, lm.state, *prompt_arrays(prompts, shapes, [steps + 1] * 2, [0, 0]), shapes=shapes,
                 sampling=Sampling(), eos_ids=())
    masks = jnp.asarray(schedule_masks)
    for i in range(steps):
        written = np.asarray(st.cache.lengths)
        st = decode_chunk(lm.graphdef, lm.state, st, jnp.int32(1), masks, sampling=Sampling(), eos_ids=())
        layers = [layer for layer in range(lm.config.n_layers) if poison(i, schedule_masks[i, layer])]
        rows = np.arange(len(prompts))
        k, v = list(st.cache.k), list(st.cache.v)
        for layer in layers:
            k[layer] = k[layer].at[rows, :, written].set(jnp.nan)
            v[layer] = v[layer].at[rows, :, written].set(jnp.nan)
        st = st.replace(cache=st.cache.replace(k=tuple(k), v=tuple(v)))
    return np.asarray(st.out)[:, :steps + 1]


def test_skipped_layers_kv_is_never_read(deep):
    """NaN in every skipped layer's K/V changes nothing; NaN in a run layer's K/V does (the check can fail)."""
    sched = SkipSchedule(n_layers=N_LAYERS, warmup=1, max_active=5, min_active=2, prompt_end=20, max_length=36)
    masks = sched.step_masks(16)
    clean = _decode_poisoned(deep, masks, lambda i, on: False)
    assert np.array_equal(_decode_poisoned(deep, masks, lambda i, on: not on), clean)
    broken = _decode_poisoned(deep, masks, lambda i, on: on and i == 3)
    assert not np.array_equal(broken, clean)


@pytest.mark.parametrize("temperature, exit_layer, k", [(0.0, 1, 3), (0.0, 4, 5), (0.8, 2, 4)])
def test_early_exit_equals_autoregressive(deep, temperature, exit_layer, k):
    """Greedy, and coupled sampling with per-row seeds: every row identical, for several exits and k."""
    report = check(deep, PROMPTS, method="early_exit", exit_layer=exit_layer, k=k, max_new_tokens=[18, 7, 25],
                   temperature=temperature, top_k=20 if temperature else 0, seed=[1, 2, 3])
    assert report.counts["identical"] == len(PROMPTS), report.table()


def test_early_exit_at_the_last_layer_accepts_every_draft(deep):
    out = specdec.generate(deep, PROMPTS, max_new_tokens=41, ignore_eos=True, method="early_exit",
                           exit_layer=N_LAYERS, k=4)
    for r in out:
        assert r.accepted_histogram[:-1] == [0, 0, 0, 0] and r.accepted_histogram[-1] == 8
    shallow = specdec.generate(deep, PROMPTS, max_new_tokens=41, ignore_eos=True, method="early_exit",
                               exit_layer=1, k=4)
    assert sum(r.accepted_histogram[-1] for r in shallow) < 24  # a shallow exit really is a weaker draft


def test_bad_early_exit_and_skipdecode_input(deep):
    with pytest.raises(ValueError, match="exit_layer .* must be an integer in"):
        specdec.generate(deep, PROMPTS, method="early_exit", exit_layer=N_LAYERS + 1)
    with pytest.raises(ValueError, match="exit_layer .* must be an integer in"):
        specdec.generate(deep, PROMPTS, method="early_exit", exit_layer=0)
    with pytest.raises(ValueError, match="drop slots="):
        specdec.generate(deep, PROMPTS, method="skipdecode", slots=2)
    with pytest.raises(ValueError, match="not both"):
        specdec.generate(deep, PROMPTS, method="skipdecode", target_speedup=2, min_active=2)
    with pytest.raises(ValueError, match="does not take option"):
        specdec.generate(deep, PROMPTS, method="skipdecode", k=3)


def _rows(lm, n: int, seed: int):
    """Packed rows of random prompts continued greedily by ``lm``."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, 97, rng.integers(2, 8)).tolist() for _ in range(n)]
    outs = specdec.generate(lm, prompts, max_new_tokens=40, ignore_eos=True)
    return pack([Example(p + o.tokens, [0] * len(p) + [1] * len(o.tokens)) for p, o in zip(prompts, outs)], 48)


def _cfg(**kw):
    return SkipTrainConfig(**{"speedups": "2", "horizon": 32, "batch_size": 8, "epochs": 3.0, "lr": 3e-3,
                              "warmup": 0.1, "checkpoint_every": 4, **kw})


def test_finetuning_lowers_skip_perplexity_resumes_exactly_and_saves(deep, tmp_path):
    train, heldout = _rows(deep, 24, 0), _rows(deep, 16, 1)
    cfg = _cfg(train_layers="4,5")
    sched = schedules_of(cfg, N_LAYERS)[0]
    before = perplexity(deep.graphdef, deep.state, heldout, sched, n_layers=N_LAYERS, seed=1)
    model = deep.copy_module()
    log = fit(model, train, cfg, tmp_path / "a")
    after = perplexity(*nnx.split(model), heldout, sched, n_layers=N_LAYERS, seed=1)
    assert after < 0.9 * before, (before, after)
    changed = [not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
               zip(jax.tree.leaves(nnx.state(model.layers[3])), jax.tree.leaves(nnx.state(deep.module.layers[3])))]
    assert not any(changed)  # only the chosen blocks train

    fit(deep.copy_module(), train, cfg, tmp_path / "b", max_steps=5)
    resumed = deep.copy_module()
    log_b = fit(resumed, train, cfg, tmp_path / "b")
    assert [r["loss"] for r in log_b] == [r["loss"] for r in log]
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(resumed))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    save_finetuned(model, tmp_path / "w", layers=[4, 5], base_fingerprint=specdec.model.fingerprint(deep.module),
                   meta={}, dtype="float32")
    loaded = load_finetuned(deep, tmp_path / "w")
    for a, b in zip(jax.tree.leaves(loaded.state), jax.tree.leaves(nnx.state(model))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    out = specdec.generate(deep, PROMPTS[:1], method="skipdecode", weights=str(tmp_path / "w"), max_new_tokens=5)
    assert len(out[0].tokens) <= 5
    assert finetuned_for(deep, tmp_path / "w") is finetuned_for(deep, str(tmp_path / "w"))  # loaded once
    other = LoadedModel.from_module(init_model(tiny_config(n_layers=N_LAYERS), seed=9), name="other")
    with pytest.raises(ValueError, match="fine-tuned from another model"):
        load_finetuned(other, tmp_path / "w")
    with pytest.raises(FileNotFoundError, match="SkipDecode weights"):
        load_finetuned(deep, tmp_path)
