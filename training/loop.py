"""Pieces every training loop shares: the optimiser, resumable checkpoints and the loss log.

Resuming is exact: a checkpoint holds the parameters, the optimiser state and
the step, batches are a pure function of (seed, step), and the loss log is cut
back to the checkpoint's step, so a killed and resumed run writes the same
loss curve as an uninterrupted one. A work directory holds one subdirectory per
data key (the cached data, shared by runs that differ in anything else), and in
it one ``run-<key>`` per training config (checkpoints and loss log): a run with
another learning rate or initialisation starts afresh instead of resuming
someone else's checkpoint.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, NamedTuple, TypeVar

import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm


Arrays = TypeVar("Arrays", bound=NamedTuple)


# Config fields that change neither the data nor the training trajectory.
NOT_TRAINING = ("out", "work_dir", "checkpoint_every", "save_dtype")


def work_dir_of(cfg, kind: str) -> Path:
    """Where a run caches its data: ``<cfg.work_dir, else <specdec cache>/<kind>>/<cfg.data_key()>``."""
    from specdec.fetch import cache_dir

    return (Path(cfg.work_dir) if cfg.work_dir else cache_dir() / kind) / cfg.data_key()


def run_dir_of(cfg, work_dir: str | Path) -> Path:
    """Where the run of training config ``cfg`` (a dataclass) keeps its checkpoints and loss log."""
    fields = {k: v for k, v in asdict(cfg).items() if k not in NOT_TRAINING}
    return Path(work_dir) / f"run-{hashlib.sha256(json.dumps(fields, default=str).encode()).hexdigest()[:12]}"


def load_arrays(path: Path, kind: type[Arrays]) -> Arrays:
    """The NamedTuple of arrays ``kind`` saved at ``path`` (.npz, one array per field)."""
    with np.load(path) as f:
        return kind(*(f[name] for name in kind._fields))


def cached_arrays(path: Path, kind: type[Arrays], build: Callable[[], Arrays]) -> Arrays:
    """The NamedTuple of arrays ``kind`` saved at ``path`` (.npz), or ``build()`` saved there first."""
    if path.exists():
        return load_arrays(path, kind)
    data = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **data._asdict())
    return data


@functools.cache  # one object per setting: fits with the same setting share the compiled train step
def make_optimizer(*, lr: float, total_steps: int, warmup: float, weight_decay: float,
                   clip: float) -> optax.GradientTransformation:
    """AdamW with linear warm-up over the first ``warmup`` fraction of steps, then cosine decay to 0,
    after clipping the global gradient norm to ``clip``."""
    warm = max(1, int(round(warmup * total_steps)))
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warm, max(total_steps, warm + 1), end_value=0.0)
    return optax.chain(optax.clip_by_global_norm(clip), optax.adamw(schedule, weight_decay=weight_decay))


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """Example indices of batch ``step``: epochs of a fresh seeded permutation, cut into batches."""
    per_epoch = max(1, n // batch_size)
    epoch, i = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return order[i * batch_size:(i + 1) * batch_size]


class Checkpoints:
    """Orbax checkpoints of ``{"params", "opt"}`` pytrees under ``directory``, by step."""

    def __init__(self, directory: str | Path, keep: int = 2):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.manager = ocp.CheckpointManager(Path(directory).resolve(),
                                             options=ocp.CheckpointManagerOptions(max_to_keep=keep))

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any) -> None:
        self.manager.save(step, args=self._ocp.args.StandardSave(state), force=True)
        self.manager.wait_until_finished()

    def restore(self, step: int, like: Any) -> Any:
        """The state saved at ``step``, with the structure and dtypes of ``like``."""
        try:
            return self.manager.restore(step, args=self._ocp.args.StandardRestore(like))
        except Exception as err:  # orbax raises several types for mismatched trees and corrupt files
            raise ValueError(f"checkpoint {step} in {self.manager.directory} does not match this training "
                             f"config or is corrupt ({err}); use another --work-dir or delete it") from err


class LossLog:
    """One JSON line per step in ``path``; opening it at ``resume_step`` drops later lines."""

    def __init__(self, path: str | Path, resume_step: int = 0):
        self.path = Path(path)
        lines = self.path.read_text().splitlines() if self.path.exists() and resume_step else []
        kept = [ln for ln in lines if json.loads(ln)["step"] < resume_step]
        self.path.write_text("".join(ln + "\n" for ln in kept))

    def write(self, record: dict) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")

    def read(self) -> list[dict]:
        return [json.loads(ln) for ln in self.path.read_text().splitlines()]


def train_loop(*, params, opt, step_fn: Callable, n: int, total: int, cfg, work_dir: str | Path,
               max_steps: int | None, desc: str, show: Callable[[dict], str]):
    """Run optimiser steps ``step, ..., total - 1`` from the latest checkpoint of the training config
    ``cfg`` (a dataclass with ``batch_size``, ``seed`` and ``checkpoint_every``) under ``work_dir`` (or from 0).

    ``step_fn(params, opt, example_indices) -> (params, opt, record)``; each record (plus its step)
    goes to ``loss.jsonl`` in :func:`run_dir_of` and the progress bar (``show(record)``).
    Checkpoints every ``cfg.checkpoint_every`` steps and at the end; ``max_steps`` stops early
    (resume later). Returns ``(params, opt, the loss log from step 0)``.
    """
    run_dir = run_dir_of(cfg, work_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpts = Checkpoints(run_dir / "checkpoints")
    step = ckpts.latest() or 0
    if step:
        restored = ckpts.restore(step, {"params": params, "opt": opt})
        params, opt = restored["params"], restored["opt"]
    log = LossLog(run_dir / "loss.jsonl", step)
    stop = total if max_steps is None else min(total, max_steps)
    bar = tqdm(range(step, stop), initial=step, total=total, desc=desc, unit="step")
    for step in bar:
        params, opt, record = step_fn(params, opt, batch_indices(n, cfg.batch_size, step, cfg.seed))
        record = {"step": step, **record}
        log.write(record)
        bar.set_postfix_str(show(record))
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == stop:
            ckpts.save(step + 1, {"params": params, "opt": opt})
    return params, opt, log.read()


def fit_module(module: nnx.Module, wrt, make_step: Callable, *, n: int, cfg, work_dir: str | Path,
               max_steps: int | None, desc: str, show: Callable[[dict], str], place: Callable | None = None) -> list[dict]:
    """Train ``module``'s parameters ``wrt`` (an nnx filter) in place: the set-up every trainer
    shares. ``cfg.epochs`` over ``n`` examples in batches of ``cfg.batch_size`` set the steps, the
    optimiser comes from ``cfg`` (:func:`make_optimizer`), the rest of the module is frozen, and
    :func:`train_loop` runs the steps, resuming from ``work_dir``.

    ``make_step(graphdef, frozen, optimizer) -> step_fn(params, opt, example_indices) -> (params,
    opt, record)``; ``place``: puts the parameters, the frozen state and the optimiser state on
    devices (e.g. replicated over a mesh). Returns the loss log (one record per step, from step 0).
    """
    total = max(1, int(np.ceil(cfg.epochs * n / cfg.batch_size)))
    optimizer = make_optimizer(lr=cfg.lr, total_steps=total, warmup=cfg.warmup, weight_decay=cfg.weight_decay,
                               clip=cfg.clip)
    place = place or (lambda tree: tree)
    graphdef, params, frozen = nnx.split(module, wrt, ...)
    params, frozen = place(params), place(frozen)
    params, _, log = train_loop(params=params, opt=place(optimizer.init(params)),
                                step_fn=make_step(graphdef, frozen, optimizer), n=n, total=total, cfg=cfg,
                                work_dir=work_dir, max_steps=max_steps, desc=desc, show=show)
    nnx.update(module, params)
    return log
