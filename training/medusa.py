"""Medusa-1 training: frozen backbone, loss ``sum_k decay^k * L_k`` over the heads, ``L_k`` head
k's cross-entropy against its label or (``loss="kl"``) its KL divergence from the target's
distribution over that label (top ``teacher_top_k`` tokens).

Pipeline (:func:`train_heads`): ShareGPT conversations -> chat-template examples with
an assistant mask (or, in self-distillation mode, the backbone's own replies to
the first user turn) -> rows packed to ``seq_len`` (cached) -> backbone hidden states at
every position with a target, computed once and cached in the work directory (and for
``loss="kl"`` the target's distributions over the labels) -> AdamW (warm-up + cosine,
clipping) on the heads -> per-head top-1/top-5 accuracy on the held-out split -> heads
saved with their metrics.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from drafts.model import frequent_vocab, token_frequencies
from heads.bundled import TREE_FILE
from heads.medusa import MedusaHeads, checked_vocab, new_heads, read_metadata, save_heads
from specdec.model import head_table
from training.data import Packed, head_labels, pack, split_examples
from training.draft import to_draft_ids, top_k_kl
from training.feature_draft import FeatureRows, target_rows
from training.features import Features, SoftTargets, backbone_features, packed_hidden, soft_targets
from training.loop import cached_arrays, fit_module, load_arrays, work_dir_of

KIND = "train-heads"  # work directories under the cache

DATA_MODES = ("sharegpt", "self-distill")
LOSSES = ("ce", "kl")
# the fields that making training data reads; rows_from (rows made before) replaces them
DATA_FIELDS = ("data", "conversations", "heldout_conversations", "seq_len", "max_prompt_tokens", "max_new_tokens",
               "gen_batch")


@dataclass(frozen=True, kw_only=True)
class HeadsTrainConfig:
    """Everything one Medusa-1 run depends on (``specdec train-heads`` flags mirror it)."""

    model: str = "smollm2-135m"  # registry name or path of the frozen backbone
    out: str = "heads/trained"  # where the trained heads are saved
    work_dir: str | None = None  # cached features, checkpoints, loss log (default: under the cache dir)
    n_heads: int = 4
    n_layers: int = 1  # residual blocks per head
    shared_lm_head: bool = True
    dtype: str = "float32"  # heads' parameters and compute while training: float32 or bfloat16
    save_dtype: str = "bfloat16"  # dtype of the saved heads
    data: str = "self-distill"  # "sharegpt" (the dataset's replies) or "self-distill" (the backbone's own)
    rows_from: str = ""  # a feature-draft work directory: train on its cached rows instead (data fields unused)
    conversations: int = 1000  # training conversations
    heldout_conversations: int = 100  # held-out conversations for evaluation
    seq_len: int = 512  # packed row length
    max_prompt_tokens: int = 256  # self-distill: longer first turns are skipped
    max_new_tokens: int = 192  # self-distill: reply budget
    gen_batch: int = 16  # self-distill: generation batch size
    batch_size: int = 256  # positions per optimiser step
    epochs: float = 2.0
    lr: float = 1e-3
    warmup: float = 0.1  # fraction of steps
    weight_decay: float = 0.0
    clip: float = 1.0
    decay: float = 0.8  # head k's loss weight is decay ** k (k = 0 for the first head)
    loss: str = "ce"  # "ce" (each head's label) or "kl" (the target's distribution over it, its top teacher_top_k)
    teacher_top_k: int = 16
    train_vocab: int = 0  # > 0: the training softmax spans the N tokens most often head 0's label (others skipped)
    checkpoint_every: int = 200
    seed: int = 0

    def __post_init__(self) -> None:
        if self.data not in DATA_MODES:
            raise ValueError(f"data must be one of {DATA_MODES}, got {self.data!r}")
        if self.batch_size < 1 or self.epochs <= 0:
            raise ValueError(f"batch_size must be >= 1 and epochs > 0, got {self.batch_size} and {self.epochs}")
        if self.loss not in LOSSES or self.teacher_top_k < 1:
            raise ValueError(f"loss must be one of {LOSSES} and teacher_top_k >= 1, got {self.loss!r} and "
                             f"{self.teacher_top_k}")
        if self.train_vocab < 0 or (self.train_vocab and not self.shared_lm_head):
            raise ValueError(f"train_vocab must be >= 0 (0: every token) and needs shared_lm_head=True (heads with "
                             f"their own projections train all of them), got {self.train_vocab} and "
                             f"shared_lm_head={self.shared_lm_head}")
        unused = [f.name for f in fields(self) if f.name in DATA_FIELDS and getattr(self, f.name) != f.default]
        if self.rows_from and unused:
            flags = ", ".join("--" + name.replace("_", "-") for name in unused)
            raise ValueError(f"rows_from trains on rows made before, so {flags} would be ignored: drop "
                             f"{'it' if len(unused) == 1 else 'them'} or drop rows_from")

    def data_key(self) -> str:
        """A digest of the fields that decide the training data (names the feature cache)."""
        fields = ("model", "n_heads", "data", "conversations", "heldout_conversations", "seq_len",
                  "max_prompt_tokens", "max_new_tokens", "seed", "rows_from")
        return hashlib.sha256(json.dumps([getattr(self, f) for f in fields]).encode()).hexdigest()[:12]


def _ce_and_hits(logits: jax.Array, labels: jax.Array, ks=(1, 5)):
    """Per-head summed CE, hits at each k and counts. logits [B, n, V]; labels [B, n] (-1 = none)."""
    valid = labels >= 0
    safe = jnp.where(valid, labels, 0)
    logp = jax.nn.log_softmax(logits, axis=-1)
    ce = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
    target = jnp.take_along_axis(logits, safe[..., None], axis=-1)
    rank = jnp.sum(logits > target, axis=-1)  # how many tokens score above the label
    rank = jnp.where(jnp.isneginf(target[..., 0]), logits.shape[-1], rank)  # a label ruled out: never a hit
    hits = [jnp.sum((rank < k) & valid, axis=0) for k in ks]
    return jnp.sum(jnp.where(valid, ce, 0.0), axis=0), hits, jnp.sum(valid, axis=0)


def medusa_loss(graphdef, params, table, hidden, labels, decay: float, soft: SoftTargets | None = None):
    """Weighted loss ``sum_k decay^k * mean L_k`` and per-head top-1 accuracy ``[n]`` of one batch
    (``hidden: [B, d]``, ``labels: [B, n]``); ``L_k``: head k's CE against its label, or with ``soft``
    (``[B, n, K]`` each) its KL divergence from the target's distribution there."""
    logits = nnx.merge(graphdef, params).logits(hidden, table)
    per_head, (hit1,), count = _ce_and_hits(logits, labels, ks=(1,))
    if soft is not None:  # the KL from the target's distribution instead of the CE
        kl = top_k_kl(jax.nn.log_softmax(logits, axis=-1), soft.top_ids, soft.top_probs)[0]
        per_head = jnp.sum(jnp.where(labels >= 0, kl, 0.0), axis=0)
    count = jnp.maximum(count, 1)
    weights = decay ** jnp.arange(per_head.shape[0], dtype=jnp.float32)
    return jnp.sum(weights * per_head / count), hit1 / count


@functools.partial(jax.jit, static_argnames=("graphdef", "optimizer", "decay"), donate_argnames=("params", "opt"))
def train_step(graphdef, params, opt, table, hidden, labels, soft=None, *, optimizer, decay: float):
    """One AdamW step on the heads: ``(params, opt state, loss, per-head top-1 [n])``."""
    (loss, acc), grads = jax.value_and_grad(medusa_loss, argnums=1, has_aux=True)(graphdef, params, table, hidden,
                                                                                   labels, decay, soft)
    updates, opt = optimizer.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, loss, acc


TOP_K_EVAL = 10  # evaluation reports top-1 .. top-10 accuracy per head (tree search uses the curve)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _eval_batch(graphdef, params, table, hidden, labels, allowed):
    logits = nnx.merge(graphdef, params).logits(hidden, table)
    logits = logits if allowed is None else jnp.where(allowed, logits, -jnp.inf)
    return _ce_and_hits(logits, labels, ks=tuple(range(1, TOP_K_EVAL + 1)))


def evaluate(heads: MedusaHeads, table: jax.Array, data: Features, batch_size: int = 512,
             vocab: np.ndarray | None = None) -> dict:
    """Per-head accuracy and mean CE on ``data``: ``top1``, ``top5`` ``[n]``, ``topk`` ``[n, 10]``
    (top-1 .. top-10), ``ce`` and ``positions`` ``[n]``. ``vocab`` (``[N]`` token ids): the heads rank
    only these tokens (``head_vocab``; a label outside them is a miss) and ``ce`` is left out."""
    graphdef, params = nnx.split(heads)
    n = heads.config.n_heads
    allowed = None if vocab is None else jnp.zeros(heads.config.vocab_size, bool).at[jnp.asarray(vocab)].set(True)
    ce, hits, count = np.zeros(n), np.zeros((TOP_K_EVAL, n)), np.zeros(n)
    for start in range(0, len(data.labels), batch_size):
        rows = slice(start, start + batch_size)
        c, h, k = _eval_batch(graphdef, params, table, jnp.asarray(data.hidden[rows]), jnp.asarray(data.labels[rows]),
                              allowed)
        ce, hits, count = ce + np.asarray(c), hits + np.asarray(h), count + np.asarray(k)
    count = np.maximum(count, 1)
    topk = (hits / count).T.round(4)
    return {"top1": topk[:, 0].tolist(), "top5": topk[:, 4].tolist(), "topk": topk.tolist(),
            **({"ce": (ce / count).round(4).tolist()} if vocab is None else {}),
            "positions": count.astype(int).tolist()}


def fit(heads: MedusaHeads, table: jax.Array, data: Features, cfg: HeadsTrainConfig, work_dir: str | Path,
        max_steps: int | None = None, soft: SoftTargets | None = None, always: tuple[int, ...] = ()) -> list[dict]:
    """Train ``heads`` in place on ``data`` (with ``soft``, the target's distributions at its
    positions: the KL loss), resuming from ``work_dir``'s latest checkpoint.

    Checkpoints every ``cfg.checkpoint_every`` steps and at the end; ``max_steps`` stops early
    (the run can be resumed). ``cfg.train_vocab`` (N > 0): every softmax spans only the N tokens most
    often head 0's label in ``data`` and the ids in ``always`` (EOS: :func:`training_vocab`, the tokens the
    heads then decode with), so the vocabulary projection costs N/V of the full one; labels outside are
    skipped (the loss log's top-1 counts only those inside).
    Returns the loss log (one record per step, from step 0).
    """
    if cfg.train_vocab:
        full = table.shape[0]
        vocab = training_vocab(data, full, cfg.train_vocab, always)
        table, data = table[jnp.asarray(vocab)], Features(data.hidden, to_draft_ids(data.labels, vocab, full))
        if soft is not None:
            soft = SoftTargets(to_draft_ids(soft.top_ids, vocab, full), soft.top_probs)
    def make_step(graphdef, frozen, optimizer):  # the heads have no frozen state
        def step(params, opt, idx):
            targets = None if soft is None else SoftTargets(*(jnp.asarray(a[idx]) for a in soft))
            params, opt, loss, acc = train_step(graphdef, params, opt, table, jnp.asarray(data.hidden[idx]),
                                                jnp.asarray(data.labels[idx]), targets, optimizer=optimizer,
                                                decay=cfg.decay)
            return params, opt, {"loss": float(loss), "top1": np.asarray(acc).round(4).tolist()}

        return step

    return fit_module(heads, nnx.Param, make_step, n=len(data.labels), cfg=cfg, work_dir=work_dir,
                      max_steps=max_steps, desc="train Medusa heads",
                      show=lambda r: f"loss={r['loss']:.3f}, top1=" + "/".join(f"{a:.2f}" for a in r["top1"]))


def _same_hidden(lm, rows) -> bool:
    """Whether ``lm``'s hidden states on the first of ``rows`` (a FeatureRows) match the cached ones."""
    if rows.features.shape[-1] != lm.config.d_model or rows.tokens.max(initial=0) >= lm.config.vocab_size:
        return False
    first = (jnp.asarray(a[:1]) for a in (rows.tokens, rows.segments, rows.positions))
    own = np.asarray(packed_hidden(lm.graphdef, lm.state, *first))
    return bool(np.allclose(own, rows.features[:1].astype(np.float32), rtol=0.02, atol=0.05))


def cached_rows(lm, rows_dir: str | Path, split: str) -> FeatureRows:
    """The packed rows of ``split`` a feature-draft run cached in ``rows_dir`` (``features-<split>.npz``:
    the same final-normed hidden states, kept in float16); its first row is recomputed to check that
    the rows were made with ``lm``."""
    path = Path(rows_dir) / f"features-{split}.npz"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: rows_from must be a feature-draft work directory "
                                "(<cache>/train-feature-draft/<data key>, written by specdec train-feature-draft)")
    rows = load_arrays(path, FeatureRows)
    if len(rows.tokens) and not _same_hidden(lm, rows):
        raise ValueError(f"the rows in {path} were not made with this model (their hidden states differ from "
                         "its own on the first row): give the work directory of a run on this model")
    return rows


def rows_features(lm, rows_dir: str | Path, split: str, n_heads: int) -> Features:
    """Features for ``split`` from the packed rows a feature-draft run cached in ``rows_dir`` (see
    :func:`cached_rows`)."""
    rows = cached_rows(lm, rows_dir, split)
    labels = head_labels(Packed(rows.tokens, rows.segments, rows.positions, rows.mask), n_heads)
    keep = (labels >= 0).any(axis=-1)
    return Features(hidden=rows.features[keep].astype(np.float32), labels=labels[keep])


def packed_rows(lm, cfg: HeadsTrainConfig, split: str) -> Packed:
    """The packed rows of ``split`` (for ``data="self-distill"`` the replies are generated), cached in
    the work directory."""
    return cached_arrays(work_dir_of(cfg, KIND) / f"packed-{split}.npz", Packed,
                         lambda: pack(split_examples(lm, cfg, split), cfg.seq_len))


def prepare_features(lm, cfg: HeadsTrainConfig, split: str) -> Features:
    """Features for ``split`` ("train" or "heldout"), cached in the work directory (or read from
    ``cfg.rows_from``, see :func:`rows_features`)."""
    if cfg.rows_from:
        return rows_features(lm, cfg.rows_from, split, cfg.n_heads)

    def build() -> Features:
        packed = packed_rows(lm, cfg, split)
        return backbone_features(lm, packed, head_labels(packed, cfg.n_heads))

    return cached_arrays(work_dir_of(cfg, KIND) / f"features-{split}.npz", Features, build)


def prepare_soft(lm, cfg: HeadsTrainConfig, split: str) -> SoftTargets:
    """The target's top-``cfg.teacher_top_k`` distributions over ``split``'s head labels, position for
    position with :func:`prepare_features`'s, cached in the work directory (the rows are read only
    to make them)."""

    def build() -> SoftTargets:
        if cfg.rows_from:
            rows = cached_rows(lm, cfg.rows_from, split)
            packed = Packed(rows.tokens, rows.segments, rows.positions, rows.mask)

            def hidden(r: slice) -> np.ndarray:
                return rows.features[r]
        else:
            packed = packed_rows(lm, cfg, split)

            def hidden(r: slice) -> np.ndarray:
                return packed_hidden(lm.graphdef, lm.state, *(jnp.asarray(a[r]) for a in packed[:3]))

        return soft_targets(lm, hidden, head_labels(packed, cfg.n_heads), cfg.teacher_top_k)

    return cached_arrays(work_dir_of(cfg, KIND) / f"soft-{split}-top{cfg.teacher_top_k}.npz", SoftTargets, build)


def train_heads(cfg: HeadsTrainConfig, max_steps: int | None = None) -> dict:
    """Run the whole pipeline for ``cfg`` and save the heads to ``cfg.out``; returns the metrics saved."""
    from specdec.loading import load

    start = time.perf_counter()
    lm = load(cfg.model)
    if cfg.train_vocab > lm.config.vocab_size:
        raise ValueError(f"train_vocab must be at most the model's vocabulary ({lm.config.vocab_size} tokens), got "
                         f"{cfg.train_vocab}: pass a smaller --train-vocab, or 0 for every token")
    base = lm.module
    table = head_table(base)
    train = prepare_features(lm, cfg, "train")
    heldout = prepare_features(lm, cfg, "heldout")
    heads = new_heads(base, base_name=cfg.model, n_heads=cfg.n_heads, n_layers=cfg.n_layers,
                      shared_lm_head=cfg.shared_lm_head, dtype=cfg.dtype)
    soft = prepare_soft(lm, cfg, "train") if cfg.loss == "kl" else None
    eos = tuple(lm.tokenizer.eos_ids) if lm.tokenizer is not None else ()
    log = fit(heads, table, train, cfg, work_dir_of(cfg, KIND), max_steps=max_steps, soft=soft, always=eos)
    metrics = {"heldout": evaluate(heads, table, heldout), "train_positions": int(len(train.labels)),
               "heldout_positions": int(len(heldout.labels)), "steps": len(log),
               "final_loss": log[-1]["loss"] if log else None, "wall_s": round(time.perf_counter() - start, 1),
               "config": asdict(cfg)}
    saved = new_heads(base, base_name=cfg.model, n_heads=cfg.n_heads, n_layers=cfg.n_layers,
                      shared_lm_head=cfg.shared_lm_head, dtype=cfg.save_dtype)
    nnx.update(saved, jax.tree.map(lambda a: a.astype(saved.config.jnp_dtype), nnx.state(heads, nnx.Param)))
    metrics["heldout_saved_dtype"] = evaluate(saved, table, heldout)
    if cfg.train_vocab:  # over the tokens they were trained over and rank by default (heads.bundled.default_head_vocab)
        vocab = training_vocab(train, base.config.vocab_size, cfg.train_vocab, always=eos)
        metrics["heldout_saved_dtype_train_vocab"] = evaluate(saved, table, heldout, vocab=vocab)
    save_heads(saved, cfg.out, {"training": metrics}, token_counts=label_counts(train, base.config.vocab_size))
    return metrics


def training_vocab(data: Features, vocab_size: int, size: int, always: tuple[int, ...] = ()) -> np.ndarray:
    """``[size]`` int32, sorted: the ids in ``always`` (e.g. EOS) and the tokens most often head 0's label
    in ``data``: the heads' training vocabulary with ``train_vocab=size``, and the head vocabulary they
    decode with by default."""
    return frequent_vocab(label_counts(data, vocab_size), size, always)


def label_counts(data: Features, vocab_size: int) -> np.ndarray:
    """``[vocab_size]``: how often each token is head 0's label in ``data`` (the reply tokens; what
    ``head_vocab=N`` ranks, see :func:`heads.medusa.head_vocabulary`)."""
    first = data.labels[:, 0]
    return token_frequencies([first[first >= 0]], vocab_size)


def heldout_rows(lm, cfg: HeadsTrainConfig) -> FeatureRows:
    """The held-out split of the heads' training run as packed rows with the target's features and greedy
    tokens: read from ``cfg.rows_from``, else made as the run made them (for ``data="self-distill"`` the
    replies are generated again) and cached in its work directory."""
    if cfg.rows_from:
        return cached_rows(lm, cfg.rows_from, "heldout")
    return cached_arrays(work_dir_of(cfg, KIND) / "rows-heldout.npz", FeatureRows,
                         lambda: target_rows(lm, packed_rows(lm, cfg, "heldout")))


@functools.partial(jax.jit, static_argnames=("graphdef", "max_rank"))
def _label_ranks(graphdef, params, table, hidden, labels, max_rank: int):
    """``hidden: [L, d]``, ``labels: [L, n]`` (indices into the heads' logits) -> ``[L, n]``: how many tokens
    head k scores above its label, ``max_rank`` where that is more or there is no label (-1)."""
    logits = nnx.merge(graphdef, params).logits(hidden, table)
    at = jnp.take_along_axis(logits, jnp.maximum(labels, 0)[..., None], axis=-1)
    return jnp.where(labels >= 0, jnp.minimum(jnp.sum(logits > at, axis=-1), max_rank), max_rank)


def reply_runs(mask: np.ndarray, segments: np.ndarray) -> list[tuple[int, int]]:
    """``[a, b)`` runs of reply tokens in one packed row (``mask, segments: [L]``), each inside one example
    (segment > 0) and after at least one of its tokens: the root of the first reply token's step."""
    inside = np.zeros(len(mask) + 1, bool)
    inside[1:-1] = mask[1:] & (segments[1:] > 0) & (segments[1:] == segments[:-1])
    edges = np.flatnonzero(np.diff(np.concatenate([[0], inside.astype(np.int8)])))
    return list(zip(edges[::2], edges[1::2]))


def heads_reply_ranks(heads: MedusaHeads, table: jax.Array, rows: FeatureRows, max_rank: int = 16,
                      vocab: np.ndarray | None = None) -> list[np.ndarray]:
    """Where the target's greedy tokens rank among the heads' candidates, reply by reply of ``rows``.

    One ``[n, n_heads]`` int array per reply of ``n`` tokens (:func:`reply_runs`), as
    :mod:`training.rank_trees` reads it: row ``j``, column ``d`` is the rank, in head ``d``'s scores at the
    root entry ``j - d``, of the target's greedy token ``d + 1`` past the root's own token. Entry ``j`` is
    the step whose root token (the target's, from the step before) is the reply's ``j``-th; the heads read
    the hidden state of the position before it, as decoding does. ``max_rank`` where it ranks lower, falls
    outside ``vocab`` (``head_vocab`` ids: the heads project onto those rows of ``table`` only, as decoding
    does) or past the reply. A tie counts as the better rank. On self-distilled rows (the target's own
    greedy text) this is what greedy decoding meets, up to the float16 rounding of the cached hidden
    states; on other text the path follows that text.
    """
    n = heads.config.n_heads
    index = np.arange(heads.config.vocab_size, dtype=np.int32)
    if vocab is not None:
        vocab = checked_vocab(vocab, heads.config)
        index = np.full(heads.config.vocab_size, -1, np.int32)
        index[np.asarray(vocab)] = np.arange(len(vocab))
        table = table[vocab]
    graphdef, params = nnx.split(heads)
    replies = []
    for r in range(len(rows.tokens)):
        runs = reply_runs(rows.mask[r], rows.segments[r])
        labels = np.full((rows.tokens.shape[1], n), -1, np.int32)
        for a, b in runs:  # reply tokens a .. b - 1: roots a - 1 .. b - 2; greedy[q] is the token at q + 1
            ahead = np.arange(a - 1, b - 1)[:, None] + 1 + np.arange(n)[None]
            labels[a - 1:b - 1] = np.where(ahead + 1 < b, index[rows.greedy[r][np.minimum(ahead, b - 1)]], -1)
        ranks = np.asarray(_label_ranks(graphdef, params, table, jnp.asarray(rows.features[r], jnp.float32),
                                        jnp.asarray(labels), max_rank))
        for a, b in runs:
            reply = np.full((b - a, n), max_rank, ranks.dtype)
            for d in range(min(n, b - a)):
                reply[d:, d] = ranks[a - 1:b - 1 - d, d]
            replies.append(reply)
    return replies


def heldout_accuracy(lm, heads: MedusaHeads, heads_dir: Path | None, vocab=None) -> list[list[float]]:
    """Top-1 .. top-10 accuracy per head on the held-out split their training run used (ranking only
    the tokens of ``vocab`` when given)."""
    meta = read_metadata(heads_dir) if heads_dir is not None else {}
    cfg = HeadsTrainConfig(**meta.get("training", {}).get("config", {"model": lm.name}))
    try:
        data = prepare_features(lm, cfg, "heldout")
    except FileNotFoundError as e:  # rows_from: another run's cache, absent on this machine
        raise FileNotFoundError(f"{e}; or reuse the accuracies saved with the heads: "
                                f"--accuracy-from {Path(heads_dir) / TREE_FILE}") from None
    return evaluate(heads, head_table(lm.module), data, vocab=vocab)["topk"]
