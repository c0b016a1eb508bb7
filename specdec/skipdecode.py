"""SkipDecode (Del Corro et al. 2023): batch-uniform, non-increasing token-level early exit.

A position runs a few bottom warm-up layers and the TOP ``count(p) - warmup``
layers; the middle is bypassed. ``count`` decays linearly from ``max_active``
at the prompt end to ``min_active`` at ``max_length`` and is held there. Since
it never grows, every layer a position runs was run by all earlier positions,
so the K/V it reads exist; skipped layers' K/V are never computed nor read. The
prompt runs every layer. The schedule is indexed by generation step, shared by
all rows of a batch (ragged prompts: ``prompt_end`` is the longest prompt).

LOSSY: the output is not the full model's. Fine-tuning with the schedule active
(:mod:`training.skipdecode`) recovers part of the quality.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from specdec.method_spec import MethodSpec, option, register


@dataclass(frozen=True, kw_only=True)
class SkipSchedule:
    """Active layers per position. ``warmup <= min_active <= max_active <= n_layers``."""

    n_layers: int
    warmup: int
    max_active: int
    min_active: int
    prompt_end: int
    max_length: int

    def __post_init__(self) -> None:
        if not 0 <= self.warmup <= self.min_active:
            raise ValueError(f"warm-up layers must be in [0, min_active={self.min_active}], got {self.warmup}")
        if not 1 <= self.min_active <= self.max_active <= self.n_layers:
            raise ValueError(f"need 1 <= min_active <= max_active <= n_layers={self.n_layers}, "
                             f"got min_active={self.min_active}, max_active={self.max_active}")
        if not 0 <= self.prompt_end < self.max_length:
            raise ValueError(f"need 0 <= prompt_end < max_length, got {self.prompt_end} and {self.max_length}")

    def active_count(self, positions) -> np.ndarray:
        """Layers run at each position (int array shaped like ``positions``); the prompt runs all."""
        p = np.asarray(positions)
        frac = np.clip((p - self.prompt_end) / (self.max_length - self.prompt_end), 0.0, 1.0)
        count = np.floor(self.max_active - frac * (self.max_active - self.min_active) + 0.5).astype(np.int32)
        return np.where(p < self.prompt_end, self.n_layers, count)

    def layer_mask(self, positions) -> np.ndarray:
        """``[..., n_layers]`` bool: the warm-up layers and the top ``count - warmup`` layers."""
        count = self.active_count(positions)[..., None]
        layer = np.arange(self.n_layers)
        return (layer < self.warmup) | (layer >= self.n_layers - (count - self.warmup))

    def step_masks(self, steps: int) -> np.ndarray:
        """``[steps, n_layers]`` bool: decode step ``i`` feeds the token at ``prompt_end + i``."""
        return self.layer_mask(self.prompt_end + np.arange(steps))

    @property
    def mean_active(self) -> float:
        """Mean layers run per generated position, ``prompt_end .. max_length - 1``."""
        return float(self.active_count(np.arange(self.prompt_end, self.max_length)).mean())

    @property
    def speedup(self) -> float:
        """``n_layers / mean_active``: the ideal per-token saving in layer work."""
        return self.n_layers / self.mean_active

    @classmethod
    def for_speedup(cls, n_layers: int, speedup: float, *, prompt_end: int, max_length: int,
                    warmup: int = 1) -> "SkipSchedule":
        """The schedule whose mean active layers is closest to ``n_layers / speedup``.

        ``min_active`` is about half the mean (at least ``warmup + 1``, and high enough for a decay
        from at most ``n_layers`` to reach the mean); ``max_active`` is then chosen so that the
        linear decay has the requested mean.
        """
        if not speedup >= 1.0:
            raise ValueError(f"target_speedup must be >= 1 (n_layers / mean active layers), got {speedup}")
        mean = n_layers / speedup
        low = min(n_layers, max(warmup + 1, int(round(mean / 2)), int(np.floor(2 * mean - n_layers)), 1))
        if warmup + 1 > mean:
            raise ValueError(f"target_speedup {speedup} leaves {mean:.1f} of {n_layers} layers, fewer than "
                             f"warm-up ({warmup}) plus one top layer: lower the speedup or the warm-up layers")
        best = None
        for high in range(low, n_layers + 1):
            cand = cls(n_layers=n_layers, warmup=warmup, max_active=high, min_active=low, prompt_end=prompt_end,
                       max_length=max_length)
            if best is None or abs(cand.mean_active - mean) < abs(best.mean_active - mean):
                best = cand
        return best


def schedule_for(n_layers: int, spec: SkipDecode, *, prompt_end: int, max_length: int) -> SkipSchedule:
    """The schedule a :class:`SkipDecode` spec asks for: ``min_active``/``max_active`` layers given
    directly, else ``target_speedup`` (default 2)."""
    low, high, speedup, warmup = spec.min_active, spec.max_active, spec.target_speedup, int(spec.warmup_layers)
    if low is None and high is None:
        return SkipSchedule.for_speedup(n_layers, 2.0 if speedup is None else float(speedup),
                                        prompt_end=prompt_end, max_length=max_length, warmup=warmup)
    high = n_layers if high is None else int(high)
    return SkipSchedule(n_layers=n_layers, warmup=warmup, max_active=high, min_active=high if low is None else int(low),
                        prompt_end=prompt_end, max_length=max_length)


WEIGHTS_FILE = "skipdecode_config.json"


def tuned_filter(layers):
    """An nnx filter for what SkipDecode fine-tuning trains: blocks ``layers`` and the final norm."""
    wanted = set(int(i) for i in layers)
    return lambda path, _: (path[0] == "layers" and path[1] in wanted) or path[0] == "norm"


def save_finetuned(model, path, *, layers, base_fingerprint: str, meta: dict, dtype: str = "bfloat16"):
    """Write the fine-tuned blocks ``layers`` and final norm of ``model`` (cast to ``dtype``) to ``path``."""
    import jax
    from flax import nnx

    from specdec.saved import save_dir

    pure = nnx.to_pure_dict(nnx.state(model, tuned_filter(layers)))
    pure = jax.tree.map(lambda a: a.astype(dtype), pure)
    info = {"layers": sorted(int(i) for i in layers), "base_fingerprint": base_fingerprint, "saved_dtype": dtype,
            **meta}
    return save_dir(path, pure, WEIGHTS_FILE, info)


_FINETUNED: dict = {}


def finetuned_for(target, path):
    """:func:`load_finetuned`, loaded once per (directory, target) like bundled drafts and heads."""
    from pathlib import Path

    from specdec.model import fingerprint
    from specdec.saved import loaded_once

    key = (str(Path(path).resolve()), fingerprint(target.module))
    return loaded_once(_FINETUNED, key, lambda: load_finetuned(target, path))


def load_finetuned(target, path):
    """``target`` (a ``LoadedModel``) with the parameters fine-tuned for SkipDecode at ``path``."""
    import jax
    from flax import nnx

    from specdec.loading import LoadedModel
    from specdec.model import fingerprint
    from specdec.saved import read_config, restore_params

    meta = read_config(path, WEIGHTS_FILE, what="SkipDecode weights", fix="re-run `specdec train-skipdecode`")
    base = target.copy_module()
    if meta.get("base_fingerprint") != fingerprint(base):
        raise ValueError(f"the SkipDecode weights at {path} were fine-tuned from another model (fingerprint "
                         f"{meta.get('base_fingerprint')}, this one is {fingerprint(base)}): pass the model they "
                         f"were trained from")
    tuned = nnx.state(base, tuned_filter(meta["layers"]))
    like = jax.tree.map(lambda a: a.astype(meta["saved_dtype"]), nnx.to_pure_dict(tuned))
    saved = restore_params(path, like, "SkipDecode")
    nnx.replace_by_pure_dict(tuned, jax.tree.map(lambda a, b: a.astype(b.dtype), saved, nnx.to_pure_dict(tuned)))
    nnx.update(base, tuned)
    return LoadedModel.from_module(base, target.tokenizer, f"{target.name}+skipdecode")


@register
@dataclass(frozen=True, kw_only=True)
class SkipDecode(MethodSpec):
    """SkipDecode (LOSSY): each position runs only the top of a non-increasing layer schedule."""

    name: ClassVar[str] = "skipdecode"
    lossless: ClassVar[bool] = False
    summary: ClassVar[str] = "token-level early exit: later positions skip more bottom layers (LOSSY)"
    target_speedup: float | None = option(None, "layers / mean active layers (default 2)", cli=float)
    warmup_layers: int = option(1, "bottom layers always run")
    min_active: int | None = option(None, "fewest layers run (instead of a speedup)")
    max_active: int | None = option(None, "most layers run (instead of a speedup)")
    weights: Any = option(None, "fine-tuned weights from `specdec train-skipdecode`", cli=str)

    def __post_init__(self):
        super().__post_init__()
        if self.target_speedup is not None and (self.min_active is not None or self.max_active is not None):
            raise ValueError("give either target_speedup or min_active/max_active for skipdecode, not both")
