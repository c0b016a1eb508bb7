"""Draft training: distillation from the target (forward KL, total variation) or plain next-token CE.

Pipeline (:func:`train_draft`): ShareGPT conversations -> chat-template examples (the
dataset's replies, or the target's own in self-distillation mode) -> rows packed
to ``seq_len`` -> one target pass that keeps, at every assistant position, the
target's top-K next-token distribution (cached in the work directory) -> the
reduced draft vocabulary (the most frequent reply tokens) -> AdamW over a
data-parallel ``Mesh`` -> held-out acceptance -> the draft saved with its metrics.

Losses at each supervised position, with p the target's distribution (its top K)
and q the draft's: ``kl`` = sum_k p_k log(p_k / q_k) (forward KL over the kept
support), ``tv`` = total variation 1/2 sum |p - q| (the residual mass outside the
top K counted as one bucket, a lower bound), which is 1 - the acceptance rate of
speculative sampling, ``kl+tv``, or ``ce`` (cross-entropy on the data's next token).
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from drafts.model import DraftLlama, DraftSpec, frequent_vocab, new_draft, token_frequencies, trainable
from specdec.cache import init_cache
from specdec.model import forward
from specdec.sampling import argmax
from training.data import Packed, next_labels, pack, split_examples
from training.features import segment_mask, top_k_probs
from training.loop import cached_arrays, fit_module, work_dir_of

KIND = "train-draft"  # work directories under the cache

LOSSES = ("kl", "tv", "kl+tv", "ce")
DATA_MODES = ("sharegpt", "self-distill")


@dataclass(frozen=True, kw_only=True)
class DraftTrainConfig:
    """Everything one draft training run depends on (``specdec train-draft`` flags mirror it)."""

    model: str = "smollm2-135m"  # the target (teacher): registry name or path
    out: str = "drafts/trained"  # where the trained draft is saved
    work_dir: str | None = None  # cached data, checkpoints, loss log (default: under the cache dir)
    n_layers: int = 2
    init: str = "layers"  # random | embeddings | layers
    layers: str = ""  # init layers: comma-separated target layers to copy (default: first n-1, last)
    share_embeddings: bool = True
    vocab_size: int = 8192  # reduced draft vocabulary (0: the target's full vocabulary)
    loss: str = "kl"  # kl | tv | kl+tv | ce
    teacher_top_k: int = 32  # target probabilities kept per position
    data: str = "self-distill"  # "sharegpt" (the dataset's replies) or "self-distill" (the target's own)
    heldout_data: str = ""  # the held-out split's mode ("": as ``data``); "self-distill" measures acceptance
    # on the target's own replies, which is what decoding sees, whatever the training data
    conversations: int = 600
    heldout_conversations: int = 50
    seq_len: int = 256
    max_prompt_tokens: int = 256  # self-distill: longer first turns are skipped
    max_new_tokens: int = 192  # self-distill: reply budget
    gen_batch: int = 16  # self-distill: generation batch size
    batch_size: int = 16  # packed rows per optimiser step (a multiple of the device count)
    epochs: float = 2.0
    lr: float = 3e-4
    warmup: float = 0.05
    weight_decay: float = 0.0
    clip: float = 1.0
    save_dtype: str = "bfloat16"
    checkpoint_every: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.data not in DATA_MODES:
            raise ValueError(f"data must be one of {DATA_MODES}, got {self.data!r}")
        if self.heldout_data not in ("",) + DATA_MODES:
            raise ValueError(f"heldout_data must be empty (as data) or one of {DATA_MODES}, got {self.heldout_data!r}")
        if self.batch_size < 1 or self.epochs <= 0 or self.teacher_top_k < 1:
            raise ValueError("batch_size and teacher_top_k must be >= 1 and epochs > 0")
        self.spec()  # a bad layers / n_layers / init combination fails here, before any data work

    def spec(self) -> DraftSpec:
        parts = [x.strip() for x in self.layers.split(",")] if self.layers.strip() else []
        if not all(x.isdigit() for x in parts):
            raise ValueError(f"layers takes comma-separated target layer indices such as '0,1,2,29', "
                             f"got {self.layers!r}")
        layers = tuple(int(x) for x in parts) or None
        return DraftSpec(n_layers=self.n_layers, init=self.init, layers=layers,
                         share_embeddings=self.share_embeddings, vocab_size=self.vocab_size or None)

    def data_of(self, split: str) -> str:
        """The data mode of ``split`` ("train" or "heldout")."""
        return self.heldout_data or self.data if split == "heldout" else self.data

    def data_key(self) -> str:
        """A digest of the fields that decide the training data (names the data cache)."""
        fields = ("model", "teacher_top_k", "data", "heldout_data", "conversations", "heldout_conversations",
                  "seq_len", "max_prompt_tokens", "max_new_tokens", "seed")
        return hashlib.sha256(json.dumps([getattr(self, f) for f in fields]).encode()).hexdigest()[:12]


class Teacher(NamedTuple):
    """Packed rows with the target's next-token distribution at every supervised position."""

    tokens: np.ndarray  # [R, L] int32
    segments: np.ndarray  # [R, L] int32
    positions: np.ndarray  # [R, L] int32
    labels: np.ndarray  # [R, L] int32 the data's next token, -1 where there is no target
    top_ids: np.ndarray  # [R, L, K] int32 the target's K most likely next tokens
    top_probs: np.ndarray  # [R, L, K] float32 their probabilities


@functools.partial(jax.jit, static_argnames=("graphdef", "k"))
def _teacher_rows(graphdef, params, tokens, segments, positions, *, k: int):
    model = nnx.merge(graphdef, params)
    b, length = tokens.shape
    res = forward(model, init_cache(model.config, b, length), tokens=tokens, positions=positions,
                  block_mask=segment_mask(segments))
    probs, ids = top_k_probs(res.logits, k)
    return ids.astype(jnp.int32), probs


def teacher_targets(lm, packed: Packed, k: int, batch_size: int = 4) -> Teacher:
    """The target's top-``k`` next-token distribution at every position of ``packed``."""
    ids, probs = [], []
    for start in tqdm(range(0, len(packed.tokens), batch_size), desc="target distributions", unit="batch"):
        rows = slice(start, start + batch_size)
        i, p = _teacher_rows(lm.graphdef, lm.state, jnp.asarray(packed.tokens[rows]),
                             jnp.asarray(packed.segments[rows]), jnp.asarray(packed.positions[rows]), k=k)
        ids.append(np.asarray(i))
        probs.append(np.asarray(p))
    shape = (0, packed.tokens.shape[1], k)
    return Teacher(packed.tokens, packed.segments, packed.positions, next_labels(packed),
                   np.concatenate(ids) if ids else np.zeros(shape, np.int32),
                   np.concatenate(probs) if probs else np.zeros(shape, np.float32))


def to_draft_ids(ids: np.ndarray, vocab_map: np.ndarray | None, vocab_size: int) -> np.ndarray:
    """Target ids -> indices of the draft's outputs (-1 where the reduced vocabulary lacks the token)."""
    if vocab_map is None:
        return ids
    inverse = np.full(vocab_size, -1, np.int32)
    inverse[vocab_map] = np.arange(len(vocab_map), dtype=np.int32)
    return np.where(ids >= 0, inverse[np.maximum(ids, 0)], -1)


def top_k_kl(logq: jax.Array, top_ids: jax.Array, top_probs: jax.Array):
    """KL from the target's top-K to the student over those K tokens: ``logq [..., N]`` the
    student's log-probabilities, ``top_ids, top_probs [..., K]`` the target's (ids -1: left out).
    Returns ``(kl [...], p_k, q_k [..., K])`` (the two distributions on the K tokens, 0 where left out)."""
    here = top_ids >= 0
    logq_k = jnp.take_along_axis(logq, jnp.maximum(top_ids, 0), axis=-1)
    q_k = jnp.where(here, jnp.exp(logq_k), 0.0)
    p_k = jnp.where(here, top_probs, 0.0)
    kl = jnp.sum(jnp.where(p_k > 0, p_k * (jnp.log(jnp.maximum(p_k, 1e-30)) - logq_k), 0.0), axis=-1)
    return kl, p_k, q_k


def distill_terms(q_logits: jax.Array, top_ids: jax.Array, top_probs: jax.Array, labels: jax.Array,
                  valid: jax.Array) -> dict:
    """Per-batch sums of every loss and acceptance figure.

    Args:
      q_logits: [B, L, N] the draft's logits over its outputs.
      top_ids, top_probs: [B, L, K] the target's top-K next tokens (as draft indices, -1 = not in
        the draft's vocabulary) and their probabilities.
      labels: [B, L] the data's next token as a draft index (-1 = none or not in the vocabulary).
      valid: [B, L] positions with a target.
    """
    logq = jax.nn.log_softmax(q_logits, axis=-1)
    kl, p_k, q_k = top_k_kl(logq, top_ids, top_probs)
    rest_p, rest_q = 1.0 - jnp.sum(p_k, axis=-1), 1.0 - jnp.sum(q_k, axis=-1)
    tv = 0.5 * (jnp.sum(jnp.abs(p_k - q_k), axis=-1) + jnp.abs(rest_p - rest_q))
    ce = -jnp.take_along_axis(logq, jnp.maximum(labels, 0)[..., None], axis=-1)[..., 0]
    greedy = (argmax(q_logits) == top_ids[..., 0]) & (top_ids[..., 0] >= 0)
    accept = jnp.sum(jnp.minimum(p_k, q_k), axis=-1)

    def total(x, where=valid):
        return jnp.sum(jnp.where(where, x, 0.0))

    return {"kl": total(kl), "tv": total(tv), "ce": total(ce, valid & (labels >= 0)),
            "ce_count": total(1.0, valid & (labels >= 0)), "greedy_accept": total(greedy.astype(jnp.float32)),
            "sample_accept": total(accept), "count": total(1.0)}


def draft_logits(model: DraftLlama, tokens, segments, positions) -> jax.Array:
    """The draft's logits over its own outputs ``[B, L, N]`` for packed rows ``[B, L]``."""
    b, length = tokens.shape
    res = forward(model, init_cache(model.config, b, length), tokens=tokens, positions=positions,
                  block_mask=segment_mask(segments), compute_logits=False)
    return model.draft_logits(res.hidden)


def _loss(params, graphdef, frozen, batch: dict, loss: str):
    model = nnx.merge(graphdef, params, frozen)
    terms = distill_terms(draft_logits(model, batch["tokens"], batch["segments"], batch["positions"]),
                          batch["top_ids"], batch["top_probs"], batch["labels"], batch["valid"])
    mean = {"kl": terms["kl"], "tv": terms["tv"], "kl+tv": terms["kl"] + terms["tv"]}
    value = terms["ce"] / jnp.maximum(terms["ce_count"], 1.0) if loss == "ce" else (
        mean[loss] / jnp.maximum(terms["count"], 1.0))
    return value, terms


@functools.partial(jax.jit, static_argnames=("graphdef", "optimizer", "loss"), donate_argnames=("params", "opt"))
def train_step(graphdef, params, frozen, opt, batch: dict, *, optimizer, loss: str):
    """One AdamW step on the draft's trainable parameters: ``(params, opt, loss, terms)``."""
    (value, terms), grads = jax.value_and_grad(_loss, has_aux=True)(params, graphdef, frozen, batch, loss)
    updates, opt = optimizer.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, value, terms


def batch_arrays(data: Teacher, rows, vocab_map: np.ndarray | None, vocab_size: int) -> dict:
    """The device-ready batch of ``rows`` (labels and teacher ids as draft indices)."""
    return {"tokens": data.tokens[rows], "segments": data.segments[rows], "positions": data.positions[rows],
            "labels": to_draft_ids(data.labels[rows], vocab_map, vocab_size),
            "top_ids": to_draft_ids(data.top_ids[rows], vocab_map, vocab_size), "top_probs": data.top_probs[rows],
            "valid": data.labels[rows] >= 0}


def data_mesh(devices=None) -> Mesh:
    """A 1-D ``("data",)`` mesh over ``devices`` (default: all); batches are split along it."""
    return Mesh(np.asarray(devices if devices is not None else jax.devices()), ("data",))


def shard_batch(mesh: Mesh, batch: dict) -> dict:
    """Place each batch array split by rows across the mesh."""
    rows = len(batch["tokens"])
    if rows % mesh.size:
        raise ValueError(f"batch of {rows} rows does not split over {mesh.size} devices: "
                         f"use a batch_size that is a multiple of {mesh.size}")
    return jax.device_put(batch, NamedSharding(mesh, PartitionSpec("data")))


def replicate(mesh: Mesh, tree):
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def fit(draft: DraftLlama, spec: DraftSpec, data: Teacher, cfg: DraftTrainConfig, work_dir: str | Path, *,
        mesh: Mesh | None = None, max_steps: int | None = None) -> list[dict]:
    """Train ``draft`` in place on ``data`` over ``mesh`` (default: every device), resuming from
    ``work_dir``'s latest checkpoint. Returns the loss log (one record per step)."""
    mesh = mesh or data_mesh()
    vocab_map = None if draft.vocab_map is None else np.asarray(draft.vocab_map[...])
    vocab = draft.config.vocab_size

    def make_step(graphdef, frozen, optimizer):
        def step(params, opt, idx):
            batch = shard_batch(mesh, batch_arrays(data, idx, vocab_map, vocab))
            params, opt, value, terms = train_step(graphdef, params, frozen, opt, batch, optimizer=optimizer,
                                                   loss=cfg.loss)
            n = max(float(terms["count"]), 1.0)
            return params, opt, {"loss": float(value), "greedy_accept": round(float(terms["greedy_accept"]) / n, 4)}

        return step

    return fit_module(draft, trainable(spec), make_step, n=len(data.tokens), cfg=cfg, work_dir=work_dir,
                      max_steps=max_steps, desc="train draft", place=functools.partial(replicate, mesh),
                      show=lambda r: f"loss {r['loss']:.3f} acc {r['greedy_accept']:.2f}")


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _eval_batch(graphdef, state, batch: dict):
    model = nnx.merge(graphdef, state)
    return distill_terms(draft_logits(model, batch["tokens"], batch["segments"], batch["positions"]),
                         batch["top_ids"], batch["top_probs"], batch["labels"], batch["valid"])


def evaluate(draft: DraftLlama, data: Teacher, batch_size: int = 8) -> dict:
    """Held-out figures per supervised position: ``greedy_accept`` (the draft's top token is the
    target's), ``sample_accept`` (sum min(p, q): speculative sampling's acceptance at temperature
    1), ``kl``, ``tv``, ``ce``, and the mean accepted tokens per target forward for k = 1..8 drafts
    at temperature 0 (positions taken as independent: (1 - a^(k+1)) / (1 - a))."""
    graphdef, state = nnx.split(draft)
    vocab_map = None if draft.vocab_map is None else np.asarray(draft.vocab_map[...])
    sums: dict[str, float] = {}
    for start in range(0, len(data.tokens), batch_size):
        rows = slice(start, start + batch_size)
        terms = _eval_batch(graphdef, state, batch_arrays(data, rows, vocab_map, draft.config.vocab_size))
        for key, value in terms.items():
            sums[key] = sums.get(key, 0.0) + float(value)
    n = max(sums.get("count", 0.0), 1.0)
    a = sums.get("greedy_accept", 0.0) / n
    out = {key: round(sums.get(key, 0.0) / n, 4) for key in ("greedy_accept", "sample_accept", "kl", "tv")}
    out["ce"] = round(sums.get("ce", 0.0) / max(sums.get("ce_count", 0.0), 1.0), 4)
    out["positions"] = int(n)
    out["expected_per_forward"] = {k: round(float(sum(a ** i for i in range(k + 1))), 3) for k in range(1, 9)}
    return out


def prepare_data(lm, cfg: DraftTrainConfig, split: str) -> Teacher:
    """Packed rows and the target's distributions for ``split`` ("train"/"heldout"), cached."""
    return cached_arrays(work_dir_of(cfg, KIND) / f"teacher-{split}.npz", Teacher,
                         lambda: teacher_targets(lm, pack(split_examples(lm, cfg, split, data=cfg.data_of(split)),
                                                          cfg.seq_len),
                                                 cfg.teacher_top_k))


def draft_vocab(lm, data: Teacher, size: int) -> np.ndarray:
    """The ``size`` most frequent next tokens of the training data (EOS ids always kept)."""
    counts = token_frequencies([data.labels[data.labels >= 0]], lm.config.vocab_size)
    return frequent_vocab(counts, size, always=tuple(lm.tokenizer.eos_ids) if lm.tokenizer else ())


def train_draft(cfg: DraftTrainConfig, max_steps: int | None = None) -> dict:
    """Run the whole pipeline for ``cfg`` and save the draft to ``cfg.out``; returns its metrics."""
    from drafts.saved import load_draft, save_draft
    from specdec.loading import load

    start = time.perf_counter()
    lm = load(cfg.model)
    train, heldout = prepare_data(lm, cfg, "train"), prepare_data(lm, cfg, "heldout")
    spec = cfg.spec()
    vocab_map = draft_vocab(lm, train, spec.vocab_size) if spec.vocab_size else None
    draft = new_draft(lm.module, spec, vocab_map=vocab_map, seed=cfg.seed)
    before = evaluate(draft, heldout)
    log = fit(draft, spec, train, cfg, work_dir_of(cfg, KIND), max_steps=max_steps)
    metrics = {"heldout": evaluate(draft, heldout), "heldout_at_init": before,
               "train_rows": int(len(train.tokens)), "train_positions": int(np.sum(train.labels >= 0)),
               "heldout_positions": int(np.sum(heldout.labels >= 0)), "steps": len(log),
               "final_loss": log[-1]["loss"] if log else None, "wall_s": round(time.perf_counter() - start, 1),
               "config": asdict(cfg)}
    save_draft(draft, spec, lm.module, cfg.out, target_name=cfg.model, dtype=cfg.save_dtype,
               extra={"training": metrics})
    metrics["heldout_saved_dtype"] = evaluate(load_draft(cfg.out, lm).module, heldout)
    save_draft(draft, spec, lm.module, cfg.out, target_name=cfg.model, dtype=cfg.save_dtype,
               extra={"training": metrics})
    return metrics
