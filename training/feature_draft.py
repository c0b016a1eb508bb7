"""Feature-draft training (EAGLE style): regress the target's next feature and predict its next token.

Pipeline (:func:`train_feature_draft`): ShareGPT conversations -> chat-template
examples (the dataset's replies, or the target's own) -> rows packed to
``seq_len`` -> one target pass that keeps every position's final-normed hidden
state (float16) and greedy next token (cached in the work directory) -> the
reduced draft vocabulary (the target's most frequent greedy tokens) -> AdamW on
the draft -> held-out accuracy per drafting depth -> the draft saved with its
metrics.

Entry ``j`` reads ``(f_j, x_{j+1})`` and is trained on a token loss plus
``feature_weight * SmoothL1(guess, f_{j+1})`` wherever ``x_{j+1}`` is an
assistant token. The token loss (``loss``) is ``"ce"``, the CE of the target's
greedy token after ``x_{j+1}``, or ``"kl"``, the CE of the target's whole
distribution there, ``softmax(head(f_{j+1}))`` over the draft's vocabulary
(forward KL up to a constant, as EAGLE trains). With ``unroll = u`` the loss also covers
depths 2 .. u: pass ``s`` feeds each entry the guess that pass ``s - 1`` made
for its feature (what drafting deeper sees), weighted ``depth_decay ** s``.
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
from tqdm.auto import tqdm

from drafts.model import DraftSpec, frequent_vocab, token_frequencies, trainable
from heads.feature_draft import FeatureDraft, default_spec, new_feature_draft
from specdec.cache import init_cache
from specdec.sampling import argmax
from training.data import Packed, pack, split_examples
from training.draft import DATA_MODES, to_draft_ids
from training.features import packed_hidden, segment_mask
from training.loop import cached_arrays, fit_module, work_dir_of

KIND = "train-feature-draft"  # work directories under the cache
TOKEN_LOSSES = ("ce", "kl")


@dataclass(frozen=True, kw_only=True)
class FeatureDraftTrainConfig:
    """Everything one feature-draft run depends on (``specdec train-feature-draft`` flags mirror it)."""

    model: str = "smollm2-135m"  # the target: registry name or path
    out: str = "heads/trained-feature-draft"  # where the trained draft is saved
    work_dir: str | None = None  # cached data, checkpoints, loss log (default: under the cache dir)
    n_layers: int = 1
    init: str = "embeddings"  # embeddings (random layers) | layers (copies of the target's last layers)
    vocab_size: int = 8192  # reduced draft vocabulary (0: the target's full vocabulary)
    data: str = "sharegpt"  # "sharegpt" (the dataset's replies) or "self-distill" (the target's own)
    heldout_data: str = "self-distill"  # the held-out split's mode ("": as ``data``)
    conversations: int = 600
    heldout_conversations: int = 50
    seq_len: int = 512
    max_prompt_tokens: int = 256  # self-distill: longer first turns are skipped
    max_new_tokens: int = 192  # self-distill: reply budget
    gen_batch: int = 16  # self-distill: generation batch size
    batch_size: int = 4  # packed rows per optimiser step
    epochs: float = 8.0
    lr: float = 1e-3
    warmup: float = 0.05
    weight_decay: float = 0.0
    clip: float = 1.0
    loss: str = "ce"  # token loss: "ce" (the target's greedy token) or "kl" (its distribution, from f_{j+1})
    feature_weight: float = 1.0  # SmoothL1 weight against the token loss
    unroll: int = 2  # drafting depths trained (1: teacher-forced features only)
    depth_decay: float = 0.8
    save_dtype: str = "bfloat16"
    checkpoint_every: int = 50
    seed: int = 0
    init_from: str = ""  # a saved feature draft to start from (fine-tuning; "": a new one as the fields above say)

    def __post_init__(self) -> None:
        for mode in (self.data, self.heldout_data or self.data):
            if mode not in DATA_MODES:
                raise ValueError(f"data and heldout_data must be one of {DATA_MODES}, got {mode!r}")
        if self.loss not in TOKEN_LOSSES:
            raise ValueError(f"loss must be one of {TOKEN_LOSSES}, got {self.loss!r}")
        if self.batch_size < 1 or self.epochs <= 0 or self.unroll < 1 or self.seq_len < 3:
            raise ValueError("batch_size and unroll must be >= 1, seq_len >= 3 and epochs > 0")

    def spec(self, target) -> DraftSpec:
        base = default_spec(target, self.vocab_size or None)
        layers = tuple(range(target.config.n_layers - self.n_layers, target.config.n_layers))
        return DraftSpec(**{**asdict(base), "n_layers": self.n_layers, "init": self.init,
                            "layers": layers if self.init == "layers" else None})

    def data_key(self) -> str:
        """A digest of the fields that decide the training data (names the data cache)."""
        fields = ("model", "data", "heldout_data", "conversations", "heldout_conversations", "seq_len",
                  "max_prompt_tokens", "max_new_tokens", "seed")
        return hashlib.sha256(json.dumps([getattr(self, f) for f in fields]).encode()).hexdigest()[:12]


class FeatureRows(NamedTuple):
    """Packed rows with the target's feature and greedy next token at every position."""

    tokens: np.ndarray  # [R, L] int32
    segments: np.ndarray  # [R, L] int32
    positions: np.ndarray  # [R, L] int32
    mask: np.ndarray  # [R, L] bool assistant tokens
    features: np.ndarray  # [R, L, d] float16 final-normed target hidden states
    greedy: np.ndarray  # [R, L] int32 the target's argmax next token


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _greedy(graphdef, params, hidden):
    return argmax(nnx.merge(graphdef, params).logits(hidden))


def target_rows(lm, packed: Packed, batch_size: int = 4) -> FeatureRows:
    """The target's features and greedy next tokens at every position of ``packed``."""
    feats, greedy = [], []
    for start in tqdm(range(0, len(packed.tokens), batch_size), desc="target features", unit="batch"):
        rows = slice(start, start + batch_size)
        h = packed_hidden(lm.graphdef, lm.state, jnp.asarray(packed.tokens[rows]),
                          jnp.asarray(packed.segments[rows]), jnp.asarray(packed.positions[rows]))
        feats.append(np.asarray(h, np.float16))
        greedy.append(np.asarray(_greedy(lm.graphdef, lm.state, h)))
    r, length = packed.tokens.shape
    return FeatureRows(packed.tokens, packed.segments, packed.positions, packed.mask,
                       np.concatenate(feats) if feats else np.zeros((0, length, lm.config.d_model), np.float16),
                       np.concatenate(greedy) if greedy else np.zeros((0, length), np.int32))


def batch_arrays(data: FeatureRows, rows, vocab_map: np.ndarray | None, vocab_size: int) -> dict:
    """The device-ready batch of ``rows``: entries ``j = 0 .. L - 2`` (labels as draft indices)."""
    seg = data.segments[rows]
    return {"features": data.features[rows], "tokens": data.tokens[rows][:, 1:], "segments": seg[:, :-1],
            "positions": data.positions[rows][:, :-1],
            "labels": to_draft_ids(data.greedy[rows][:, 1:], vocab_map, vocab_size),
            "valid": (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] > 0) & data.mask[rows][:, 1:]}


def unrolled(draft: FeatureDraft, batch: dict, unroll: int):
    """Yield the draft's ``(guess [B, T, d] float32, logits [B, T, N])`` at drafting depths 1 .. ``unroll``:
    the first pass reads the target's features; pass ``s`` feeds entry j the guess pass ``s - 1`` made
    for f_j (the first entry of a segment: f_j)."""
    given = batch["features"][:, :-1].astype(jnp.float32)
    seg = batch["segments"]
    b, t = seg.shape
    mask = segment_mask(seg)
    continues = jnp.concatenate([jnp.zeros((b, 1), bool), seg[:, 1:] == seg[:, :-1]], axis=1)
    inputs = given
    for _ in range(unroll):
        res = draft.run(init_cache(draft.config, b, t), inputs, batch["tokens"], batch["positions"],
                        block_mask=mask, compute_logits=False)
        guess = res.hidden.astype(jnp.float32)
        yield guess, draft.body.draft_logits(res.hidden)
        inputs = jnp.where(continues[..., None], jnp.concatenate([given[:, :1], guess[:, :-1]], axis=1), given)


def depth_terms(draft: FeatureDraft, batch: dict, unroll: int, soft: bool = False) -> dict:
    """Per-depth sums ``[unroll]`` of CE, SmoothL1, greedy hits and the count of scored entries; with
    ``soft`` also ``soft``: the CE of the target's distribution ``softmax(head(f_{j+1}))`` over the
    draft's vocabulary, at the same scored entries (whose greedy token is in that vocabulary)."""
    wanted = batch["features"][:, 1:].astype(jnp.float32)
    valid, labels = batch["valid"], batch["labels"]
    scored = valid & (labels >= 0)
    out = {"ce": [], "feature": [], "hits": []} | ({"soft": []} if soft else {})
    if soft:  # the target's next-token distribution at j + 1, restricted to the draft's vocabulary
        target_p = jax.nn.softmax(draft.body.draft_logits(wanted.astype(draft.config.jnp_dtype)), axis=-1)
    for guess, logits in unrolled(draft, batch, unroll):
        logp = jax.nn.log_softmax(logits, axis=-1)
        ce = -jnp.take_along_axis(logp, jnp.maximum(labels, 0)[..., None], axis=-1)[..., 0]
        l1 = jnp.mean(optax.huber_loss(guess, wanted), axis=-1)
        out["ce"].append(jnp.sum(jnp.where(scored, ce, 0.0)))
        out["feature"].append(jnp.sum(jnp.where(valid, l1, 0.0)))
        out["hits"].append(jnp.sum(scored & (argmax(logits) == labels)))
        if soft:
            out["soft"].append(jnp.sum(jnp.where(scored, -jnp.sum(target_p * logp, axis=-1), 0.0)))
    terms = {k: jnp.stack(v).astype(jnp.float32) for k, v in out.items()}
    terms["count"] = jnp.sum(scored).astype(jnp.float32)
    terms["valid"] = jnp.sum(valid).astype(jnp.float32)
    return terms


def _loss(params, graphdef, frozen, batch: dict, unroll: int, feature_weight: float, depth_decay: float,
          soft: bool):
    terms = depth_terms(nnx.merge(graphdef, params, frozen), batch, unroll, soft)
    token = terms["soft" if soft else "ce"] / jnp.maximum(terms["count"], 1.0)
    per_depth = token + feature_weight * terms["feature"] / jnp.maximum(terms["valid"], 1.0)
    return jnp.sum(depth_decay ** jnp.arange(unroll, dtype=jnp.float32) * per_depth), terms


@functools.partial(jax.jit, static_argnames=("graphdef", "optimizer", "unroll", "feature_weight", "depth_decay",
                                                "soft"),
                   donate_argnames=("params", "opt"))
def train_step(graphdef, params, frozen, opt, batch: dict, *, optimizer, unroll: int, feature_weight: float,
               depth_decay: float, soft: bool = False):
    """One AdamW step on the draft's trainable parameters: ``(params, opt, loss, terms)``."""
    (value, terms), grads = jax.value_and_grad(_loss, has_aux=True)(params, graphdef, frozen, batch, unroll,
                                                                    feature_weight, depth_decay, soft)
    updates, opt = optimizer.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, value, terms


def _vocab_map(draft: FeatureDraft) -> np.ndarray | None:
    return None if draft.body.vocab_map is None else np.asarray(draft.body.vocab_map[...])


def fit(draft: FeatureDraft, spec: DraftSpec, data: FeatureRows, cfg: FeatureDraftTrainConfig, work_dir: str | Path,
        max_steps: int | None = None) -> list[dict]:
    """Train ``draft`` in place on ``data``, resuming from ``work_dir``'s latest checkpoint.
    Returns the loss log (one record per step, from step 0)."""
    vocab_map, vocab = _vocab_map(draft), draft.config.vocab_size

    def make_step(graphdef, frozen, optimizer):
        static = dict(optimizer=optimizer, unroll=cfg.unroll, feature_weight=cfg.feature_weight,
                      depth_decay=cfg.depth_decay, soft=cfg.loss == "kl")

        def step(params, opt, idx):
            params, opt, value, terms = train_step(graphdef, params, frozen, opt,
                                                   batch_arrays(data, idx, vocab_map, vocab), **static)
            acc = np.asarray(terms["hits"]) / max(float(terms["count"]), 1.0)
            return params, opt, {"loss": float(value), "acc": acc.round(4).tolist()}

        return step

    return fit_module(draft, trainable(spec), make_step, n=len(data.tokens), cfg=cfg, work_dir=work_dir,
                      max_steps=max_steps, desc="train feature draft",
                      show=lambda r: f"loss {r['loss']:.3f} acc " + "/".join(f"{a:.2f}" for a in r["acc"]))


@functools.partial(jax.jit, static_argnames=("graphdef", "unroll"))
def _eval_batch(graphdef, state, batch: dict, unroll: int):
    return depth_terms(nnx.merge(graphdef, state), batch, unroll)


def evaluate(draft: FeatureDraft, data: FeatureRows, unroll: int = 4, batch_size: int = 8) -> dict:
    """Held-out figures per drafting depth 1 .. ``unroll``: ``greedy_accept`` (the draft's top token
    is the target's, given the target's features before the depth's own guesses), ``ce`` and
    ``feature`` (SmoothL1 per entry), over ``positions`` scored entries."""
    graphdef, state = nnx.split(draft)
    vocab_map, vocab = _vocab_map(draft), draft.config.vocab_size
    sums: dict[str, np.ndarray] = {}
    for start in range(0, len(data.tokens), batch_size):
        terms = _eval_batch(graphdef, state, batch_arrays(data, slice(start, start + batch_size), vocab_map, vocab),
                            unroll)
        for key, value in terms.items():
            sums[key] = sums.get(key, 0.0) + np.asarray(value, np.float64)
    n, valid = max(float(sums.get("count", 0.0)), 1.0), max(float(sums.get("valid", 0.0)), 1.0)
    return {"greedy_accept": (sums["hits"] / n).round(4).tolist(), "ce": (sums["ce"] / n).round(4).tolist(),
            "feature": (sums["feature"] / valid).round(4).tolist(), "positions": int(n)}


@functools.partial(jax.jit, static_argnames=("graphdef", "depth", "max_rank"))
def _label_ranks(graphdef, state, batch: dict, depth: int, max_rank: int) -> jax.Array:
    """[B, T, depth] rank of each entry's label among the draft's logits at each drafting depth
    (``max_rank`` where it ranks lower or is outside the draft's vocabulary)."""
    labels, out = batch["labels"], []
    for _, logits in unrolled(nnx.merge(graphdef, state), batch, depth):
        label = jnp.take_along_axis(logits, jnp.maximum(labels, 0)[..., None], axis=-1)
        out.append(jnp.where(labels >= 0, jnp.minimum(jnp.sum(logits > label, axis=-1), max_rank), max_rank))
    return jnp.stack(out, axis=-1)


def reply_ranks(draft: FeatureDraft, data: FeatureRows, depth: int = 8, max_rank: int = 8,
                batch_size: int = 8) -> list[np.ndarray]:
    """Where the target's next tokens rank among the draft's candidates, reply by reply of ``data``.

    One ``[n, depth]`` int array per run of ``n`` consecutive scored entries (a reply): row ``j``,
    column ``d`` is the rank of the target's greedy token at depth ``d + 1`` from entry ``j - d`` as the
    root, after the target's tokens of the depths before it (entered with the draft's own guessed
    features, as drafting does); ``max_rank`` where it ranks lower or is outside the draft's vocabulary.
    """
    graphdef, state = nnx.split(draft)
    vocab_map, vocab = _vocab_map(draft), draft.config.vocab_size
    replies = []
    for start in tqdm(range(0, len(data.tokens), batch_size), desc="draft ranks", leave=False):
        batch = batch_arrays(data, slice(start, start + batch_size), vocab_map, vocab)
        ranks, valid = np.asarray(_label_ranks(graphdef, state, batch, depth, max_rank)), batch["valid"]
        for row in range(len(valid)):
            edges = np.flatnonzero(np.diff(np.concatenate([[0], valid[row].astype(np.int8), [0]])))
            replies += [ranks[row, a:b] for a, b in zip(edges[::2], edges[1::2])]
    return replies


def prepare_data(lm, cfg: FeatureDraftTrainConfig, split: str) -> FeatureRows:
    """Packed rows with the target's features for ``split`` ("train"/"heldout"), cached."""
    mode = cfg.heldout_data or cfg.data if split == "heldout" else cfg.data
    return cached_arrays(work_dir_of(cfg, KIND) / f"features-{split}.npz", FeatureRows,
                         lambda: target_rows(lm, pack(split_examples(lm, cfg, split, data=mode), cfg.seq_len)))


def draft_vocab(lm, data: FeatureRows, size: int) -> np.ndarray:
    """The ``size`` most frequent greedy target tokens at assistant positions (EOS ids always kept)."""
    counts = token_frequencies([data.greedy[data.mask]], lm.config.vocab_size)
    return frequent_vocab(counts, size, always=tuple(lm.tokenizer.eos_ids) if lm.tokenizer else ())


def initial_draft(lm, cfg: FeatureDraftTrainConfig, train: FeatureRows) -> tuple[FeatureDraft, DraftSpec]:
    """The draft to train and its spec: a new one as ``cfg`` says (vocabulary from ``train``), or the
    one saved at ``cfg.init_from`` (its layers, ``fc`` and vocabulary), which must have ``cfg``'s shape."""
    from drafts.saved import read_metadata, saved_spec
    from heads.feature_draft import CONFIG_FILE, load_feature_draft

    spec = cfg.spec(lm.module)
    if not cfg.init_from:
        vocab_map = draft_vocab(lm, train, spec.vocab_size) if spec.vocab_size else None
        return new_feature_draft(lm.module, spec, vocab_map=vocab_map, seed=cfg.seed), spec
    saved = saved_spec(read_metadata(cfg.init_from, CONFIG_FILE))
    if (saved.n_layers, saved.vocab_size or 0) != (spec.n_layers, spec.vocab_size or 0):
        raise ValueError(f"the feature draft at {cfg.init_from} has {saved.n_layers} layer(s) and a "
                         f"{saved.vocab_size or 'full'}-token vocabulary, but this run asks for {spec.n_layers} and "
                         f"{spec.vocab_size or 'full'}: pass --n-layers {saved.n_layers} --vocab-size "
                         f"{saved.vocab_size or 0} to fine-tune it, or drop --init-from")
    return load_feature_draft(cfg.init_from, lm), saved


def train_feature_draft(cfg: FeatureDraftTrainConfig, max_steps: int | None = None) -> dict:
    """Run the whole pipeline for ``cfg`` and save the draft to ``cfg.out``; returns its metrics."""
    from heads.feature_draft import load_feature_draft, save_feature_draft
    from specdec.loading import load

    start = time.perf_counter()
    lm = load(cfg.model)
    train, heldout = prepare_data(lm, cfg, "train"), prepare_data(lm, cfg, "heldout")
    draft, spec = initial_draft(lm, cfg, train)
    log = fit(draft, spec, train, cfg, work_dir_of(cfg, KIND), max_steps=max_steps)
    metrics = {"heldout": evaluate(draft, heldout), "train_rows": int(len(train.tokens)),
               "train_positions": int(train.mask.sum()), "steps": len(log),
               "final_loss": log[-1]["loss"] if log else None, "wall_s": round(time.perf_counter() - start, 1),
               "config": asdict(cfg)}
    save_feature_draft(draft, spec, lm.module, cfg.out, target_name=cfg.model, dtype=cfg.save_dtype,
                       extra={"training": metrics})
    metrics["heldout_saved_dtype"] = evaluate(load_feature_draft(cfg.out, lm), heldout)
    save_feature_draft(draft, spec, lm.module, cfg.out, target_name=cfg.model, dtype=cfg.save_dtype,
                       extra={"training": metrics})
    return metrics
