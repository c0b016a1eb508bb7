"""SkipDecode fine-tuning: next-token CE at the final layer with the skip schedule active.

Each packed row draws its own prompt end ``r`` and target speedup (seeded by
row and step): tokens before ``r`` run every layer, tokens from ``r`` on run the
layers :class:`specdec.skipdecode.SkipSchedule` gives their offset ``t - r``, so
over many rows the model sees every part of the schedule (the decay and the
held minimum). Attention stays inside each packed conversation. The loss is
taken on the assistant tokens predicted from positions ``>= r``, as decoding
would produce them. Only the blocks in ``train_layers`` (default: the top third,
which every schedule keeps and whose backward pass is short) and the final norm
are trained (a short CPU run); held-out perplexity is reported for the unmodified
model with and without the schedule and for the fine-tuned one under it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from specdec.cache import init_cache
from specdec.model import fingerprint, forward
from specdec.skipdecode import SkipSchedule, save_finetuned, tuned_filter
from training.data import Packed, next_labels, pack, split_examples
from training.features import segment_mask
from training.loop import cached_arrays, fit_module, work_dir_of

KIND = "train-skipdecode"  # work directories under the cache


@dataclass(frozen=True, kw_only=True)
class SkipTrainConfig:
    """Everything one SkipDecode fine-tuning run depends on (``specdec train-skipdecode`` flags mirror it)."""

    model: str = "smollm2-135m"
    out: str = "runs/skipdecode"  # where the fine-tuned blocks are saved
    work_dir: str | None = None  # cached data, checkpoints, loss log (default: under the cache dir)
    speedups: str = "1.5,2,3"  # target speedups; each row draws one
    warmup_layers: int = 1
    horizon: int = 128  # schedule length (max_length - prompt_end), as in decoding that many tokens
    train_layers: str = ""  # comma-separated blocks to train (default: the top third; "all" for every block)
    data: str = "sharegpt"  # "sharegpt" (the dataset's replies) or "self-distill" (the model's own)
    conversations: int = 400
    heldout_conversations: int = 50
    seq_len: int = 256
    max_prompt_tokens: int = 256  # self-distill: longer first turns are skipped
    max_new_tokens: int = 192  # self-distill: reply budget
    gen_batch: int = 16  # self-distill: generation batch size
    batch_size: int = 8  # packed rows per optimiser step
    epochs: float = 2.5
    lr: float = 2e-4
    warmup: float = 0.1
    weight_decay: float = 0.0
    clip: float = 1.0
    save_dtype: str = "bfloat16"
    checkpoint_every: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.speedup_list() or min(self.speedup_list()) < 1.0:
            raise ValueError(f"speedups must be comma-separated numbers >= 1, got {self.speedups!r}")
        if self.data not in ("sharegpt", "self-distill"):
            raise ValueError(f"data must be 'sharegpt' or 'self-distill', got {self.data!r}")
        if self.batch_size < 1 or self.epochs <= 0 or self.horizon < 1:
            raise ValueError("batch_size and horizon must be >= 1 and epochs > 0")

    def speedup_list(self) -> list[float]:
        return [float(s) for s in self.speedups.split(",") if s.strip()]

    def layers(self, n_layers: int) -> list[int]:
        if self.train_layers.strip() == "all":
            return list(range(n_layers))
        chosen = ([int(x) for x in self.train_layers.split(",") if x.strip()] or
                  list(range(n_layers - -(-n_layers // 3), n_layers)))
        if not all(0 <= i < n_layers for i in chosen):
            raise ValueError(f"train_layers must lie in [0, {n_layers}), got {self.train_layers!r}")
        return chosen

    def data_key(self) -> str:
        fields = ("model", "data", "conversations", "heldout_conversations", "seq_len", "max_prompt_tokens",
                  "max_new_tokens", "seed")
        return hashlib.sha256(json.dumps([getattr(self, f) for f in fields]).encode()).hexdigest()[:12]


def schedule_masks(schedules: list[SkipSchedule], ends: np.ndarray, which: np.ndarray, length: int) -> np.ndarray:
    """``[R, length, n_layers]`` bool: row i runs ``schedules[which[i]]`` from row index ``ends[i]``
    (schedules built with ``prompt_end=0``; earlier tokens run every layer)."""
    offsets = np.arange(length)[None, :] - ends[:, None]  # [R, length]
    return np.stack([schedules[w].layer_mask(offsets[i]) for i, w in enumerate(which)])


def row_draws(n_rows: int, length: int, n_schedules: int, seed) -> tuple[np.ndarray, np.ndarray]:
    """Each row's prompt end (in ``[1, length - 2]``) and schedule index, seeded by ``seed``."""
    rng = np.random.default_rng(seed)
    return rng.integers(1, max(2, length - 1), n_rows), rng.integers(0, n_schedules, n_rows)


def skip_logits(model, tokens, segments, positions, masks) -> jax.Array:
    """Logits ``[B, L, V]`` of packed rows with per-token layer masks ``[B, L, n_layers]``."""
    b, length = tokens.shape
    return forward(model, init_cache(model.config, b, length), tokens=tokens, positions=positions,
                   block_mask=segment_mask(segments), layer_mask=masks).logits


def _ce(logits: jax.Array, labels: jax.Array, weight: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Summed CE over positions where ``weight`` (labels -1 elsewhere) and the count."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.maximum(labels, 0)[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * weight), jnp.sum(weight)


def _loss(params, graphdef, frozen, batch: dict):
    model = nnx.merge(graphdef, params, frozen)
    logits = skip_logits(model, batch["tokens"], batch["segments"], batch["positions"], batch["masks"])
    total, count = _ce(logits, batch["labels"], batch["weight"])
    return total / jnp.maximum(count, 1.0)


@functools.partial(jax.jit, static_argnames=("graphdef", "optimizer"), donate_argnames=("params", "opt"))
def train_step(graphdef, params, frozen, opt, batch: dict, *, optimizer):
    """One AdamW step on the trained blocks: ``(params, opt, loss)``."""
    value, grads = jax.value_and_grad(_loss)(params, graphdef, frozen, batch)
    updates, opt = optimizer.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, value


def batch_arrays(packed: Packed, labels: np.ndarray, rows, masks: np.ndarray, ends: np.ndarray) -> dict:
    """The device-ready batch: tokens, segments, positions, labels, loss weights (assistant targets
    predicted from positions ``>= ends``) and layer masks."""
    tokens = packed.tokens[rows]
    after = np.arange(tokens.shape[1])[None, :] >= ends[:, None]
    lab = labels[rows]
    return {"tokens": tokens, "segments": packed.segments[rows], "positions": packed.positions[rows],
            "labels": lab, "weight": ((lab >= 0) & after).astype(np.float32), "masks": masks}


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _eval_batch(graphdef, state, batch: dict):
    model = nnx.merge(graphdef, state)
    logits = skip_logits(model, batch["tokens"], batch["segments"], batch["positions"], batch["masks"])
    return _ce(logits, batch["labels"], batch["weight"])


def perplexity(graphdef, state, packed: Packed, schedule: SkipSchedule | None, *, n_layers: int, seed: int,
               batch_size: int = 8) -> float:
    """Held-out perplexity of the assistant tokens predicted from each row's drawn prompt end on,
    under ``schedule`` (None: every layer). Rows' prompt ends depend only on ``seed``."""
    labels = next_labels(packed)
    n, length = packed.tokens.shape
    ends, _ = row_draws(n, length, 1, seed)
    total = count = 0.0
    for start in range(0, n, batch_size):
        rows = np.arange(start, min(n, start + batch_size))
        masks = (np.ones((len(rows), length, n_layers), bool) if schedule is None else
                 schedule_masks([schedule], ends[rows], np.zeros(len(rows), int), length))
        t, c = _eval_batch(graphdef, state, batch_arrays(packed, labels, rows, masks, ends[rows]))
        total, count = total + float(t), count + float(c)
    return float(np.exp(total / max(count, 1.0)))


def schedules_of(cfg: SkipTrainConfig, n_layers: int) -> list[SkipSchedule]:
    return [SkipSchedule.for_speedup(n_layers, s, prompt_end=0, max_length=cfg.horizon, warmup=cfg.warmup_layers)
            for s in cfg.speedup_list()]


def fit(model, packed: Packed, cfg: SkipTrainConfig, work_dir: str | Path, *, max_steps: int | None = None) -> list:
    """Fine-tune ``model`` in place on ``packed`` under ``cfg``'s schedules, resuming from
    ``work_dir``'s latest checkpoint. Returns the loss log."""
    n_layers = model.config.n_layers
    schedules = schedules_of(cfg, n_layers)
    labels = next_labels(packed)
    rows_n, length = packed.tokens.shape

    def make_step(graphdef, frozen, optimizer):
        def step(params, opt, idx):  # the draws depend only on the batch's rows (exact resume)
            ends, which = row_draws(len(idx), length, len(schedules), [cfg.seed, *idx.tolist()])
            batch = batch_arrays(packed, labels, idx, schedule_masks(schedules, ends, which, length), ends)
            params, opt, value = train_step(graphdef, params, frozen, opt, batch, optimizer=optimizer)
            return params, opt, {"loss": round(float(value), 4)}

        return step

    return fit_module(model, tuned_filter(cfg.layers(n_layers)), make_step, n=rows_n, cfg=cfg, work_dir=work_dir,
                      max_steps=max_steps, desc="train skipdecode", show=lambda r: f"loss {r['loss']:.3f}")


def prepare_rows(lm, cfg: SkipTrainConfig, split: str) -> Packed:
    """Packed chat rows of ``split`` ("train"/"heldout"), cached in the work directory."""
    return cached_arrays(work_dir_of(cfg, KIND) / f"rows-{split}.npz", Packed,
                         lambda: pack(split_examples(lm, cfg, split), cfg.seq_len))


def quality_table(graphdef, base_state, tuned_state, heldout: Packed, schedules: list[SkipSchedule],
                  speedups: list[float], seed: int) -> dict:
    """Held-out perplexity: the unmodified model without skipping, and per speedup the unmodified
    and fine-tuned models under the schedule, with the share of the skipping loss recovered."""
    full = perplexity(graphdef, base_state, heldout, None, n_layers=schedules[0].n_layers, seed=seed)
    rows = []
    for s, sched in zip(speedups, schedules):
        skipped = perplexity(graphdef, base_state, heldout, sched, n_layers=sched.n_layers, seed=seed)
        tuned = perplexity(graphdef, tuned_state, heldout, sched, n_layers=sched.n_layers, seed=seed)
        rows.append({"target_speedup": s, "mean_active_layers": round(sched.mean_active, 2),
                     "ppl_unmodified_skip": round(skipped, 3), "ppl_finetuned_skip": round(tuned, 3),
                     "recovered": round((skipped - tuned) / (skipped - full), 3) if skipped > full else None})
    return {"ppl_full_model": round(full, 3), "by_speedup": rows}


def train_skipdecode(cfg: SkipTrainConfig, max_steps: int | None = None) -> dict:
    """Fine-tune ``cfg.model`` under the skip schedules, evaluate, save to ``cfg.out``; returns metrics."""
    from specdec.loading import load

    start = time.perf_counter()
    lm = load(cfg.model)
    train, heldout = prepare_rows(lm, cfg, "train"), prepare_rows(lm, cfg, "heldout")
    model = lm.copy_module()
    log = fit(model, train, cfg, work_dir_of(cfg, KIND), max_steps=max_steps)
    n_layers = lm.config.n_layers
    graphdef, tuned_state = nnx.split(model)
    metrics = {"heldout": quality_table(graphdef, lm.state, tuned_state, heldout, schedules_of(cfg, n_layers),
                                        cfg.speedup_list(), cfg.seed + 1),
               "trained_parameters": int(sum(x.size for x in jax.tree.leaves(
                   nnx.state(model, tuned_filter(cfg.layers(n_layers)))))),
               "train_rows": int(len(train.tokens)), "heldout_rows": int(len(heldout.tokens)), "steps": len(log),
               "final_loss": log[-1]["loss"] if log else None, "wall_s": round(time.perf_counter() - start, 1),
               "command": " ".join(shlex.quote(a) for a in ["specdec", *sys.argv[1:]]), "config": asdict(cfg)}
    save_finetuned(model, cfg.out, layers=cfg.layers(n_layers), base_fingerprint=fingerprint(lm.module),
                   meta={"base": cfg.model, "training": metrics}, dtype=cfg.save_dtype)
    return metrics
