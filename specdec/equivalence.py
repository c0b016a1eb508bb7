"""The equivalence checker: does a method return what autoregressive decoding returns?

Runs the method and the autoregressive reference on the same prompts with the
same options and classifies every row:

- ``identical``: the same tokens and the same ending;
- ``tie``: at the first difference the reference's score for its own choice beats
  the method's choice by less than ``tolerance`` (a numerical tie: a 1-token and a
  k-token forward differ by ~1e-4 in float32). The score is the logit for greedy
  decoding and ``log p / T + Gumbel noise`` (in units of logits) when sampling;
- ``MISMATCH``: anything else: a bug.

Strict mode (``check(strict=True)``) removes ties altogether: the reference runs
in the method's batch layout with every step a forward as wide as the method's
candidate tree (``block_width``), so both compute each kept token's logits with
the same shapes and arithmetic; then any difference at all is a MISMATCH. On
XLA CPU a row's logits do not depend on its index within the block, the batch
size or the cache size, so the greedy outputs are bitwise the same. The price is
the reference's speed: each step costs a forward over the whole tree width.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from specdec.api import Generation, encode_prompts, generate
from specdec.config import precision_name
from specdec.engine import ByLoad
from specdec.loading import as_model
from specdec.method_spec import MethodSpec, all_options, method_spec
from specdec.model import teacher_forced_logits
from specdec.sampling import Sampling, gumbel_noise

DEFAULT_TOLERANCE = 1e-3
# the tie tolerance of each precision policy (specdec.config.PRECISION_POLICIES): logits of one token
# differ between a 1-token and an 8-token forward by up to 4e-5 (SmolLM2-135M) / 1.1e-4 (Gemma-3-270M)
# in float32 on CPU, and by up to 0.38 / 0.56 in bfloat16 (experiments/precision_agreement.py); TF32
# products ("default" on NVIDIA GPUs) keep 3 more mantissa bits than bfloat16
TIE_TOLERANCES = {"highest": DEFAULT_TOLERANCE, "default": 0.125, "bf16": 1.0}


def tie_tolerance(config) -> float:
    """The checker's default tie tolerance for a model config (by its precision policy)."""
    return TIE_TOLERANCES[precision_name(config)]


@dataclass
class RowReport:
    verdict: str  # "identical" | "tie" | "MISMATCH"
    divergence: int | None = None  # index of the first differing generated token
    gap: float | None = None  # reference score of its choice minus that of the method's choice


@dataclass
class Report:
    method: str
    rows: list[RowReport]
    results: list[Generation] = field(repr=False, default_factory=list)
    reference: list[Generation] = field(repr=False, default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        return {v: sum(r.verdict == v for r in self.rows) for v in ("identical", "tie", "MISMATCH")}

    @property
    def verdict(self) -> str:
        """The worst row verdict: MISMATCH > tie > identical."""
        c = self.counts
        return "MISMATCH" if c["MISMATCH"] else "tie" if c["tie"] else "identical"

    @property
    def worst_gap(self) -> float | None:
        """The largest ``|gap|`` at a divergence (None where no row diverged at a token choice)."""
        return max((abs(r.gap) for r in self.rows if r.gap is not None), default=None)

    def table(self) -> str:
        lines = [f"{'row':>4}  {'verdict':<10} {'divergence':>10} {'gap':>10}"]
        for i, r in enumerate(self.rows):
            div = "" if r.divergence is None else str(r.divergence)
            gap = "" if r.gap is None else f"{r.gap:.2e}"
            lines.append(f"{i:>4}  {r.verdict:<10} {div:>10} {gap:>10}")
        c = self.counts
        lines.append(f"{self.method}: {c['identical']} identical, {c['tie']} tie, {c['MISMATCH']} MISMATCH")
        return "\n".join(lines)


@functools.partial(jax.jit, static_argnames="graphdef")
def _last_scores(graphdef, state, tokens, at):
    logits = teacher_forced_logits(nnx.merge(graphdef, state), tokens)
    return logits[0, at]


def choice_gap(model, prompt: list[int], prefix: list[int], ref_next: int | None, ours_next: int | None, *,
               sampling: Sampling, seed: int, eos_ids: tuple[int, ...]) -> float:
    """Score of the reference's choice minus the method's at position ``len(prompt) + len(prefix)``.

    A ``None`` choice means "ended there" (an EOS token): its score is the best EOS score.
    """
    seq = list(prompt) + list(prefix)
    padded = seq + [0] * (-len(seq) % 64)  # few distinct shapes to compile
    logits = _last_scores(model.graphdef, model.state, jnp.asarray([padded]), len(seq) - 1)
    if sampling.greedy:
        score = logits
    else:  # the perturbed score autoregressive sampling maximises, in logit units
        noise = gumbel_noise(jnp.asarray([seed]), jnp.asarray([len(seq)]), logits.shape[-1])[0]
        score = (sampling.log_probs(logits) + noise) * sampling.temperature
    score = np.asarray(score, np.float64)

    def of(tok):
        if tok is None:
            return score[list(eos_ids)].max() if eos_ids else -np.inf
        return score[tok]

    return float(of(ref_next) - of(ours_next))


def classify(model, prompt: list[int], ours: Generation, ref: Generation, *, sampling: Sampling, seed: int,
             eos_ids: tuple[int, ...], tolerance: float = DEFAULT_TOLERANCE) -> RowReport:
    """Compare one row of a method against the autoregressive reference."""
    a, b = ours.tokens, ref.tokens
    if a == b and ours.finish_reason == ref.finish_reason:
        return RowReport("identical")
    i = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    if i == len(a) == len(b) or (ours.finish_reason == "length" and i == len(a)) or (
            ref.finish_reason == "length" and i == len(b)):
        # one side ran out of budget or a stop string cut it where the other went on: not a token choice
        return RowReport("MISMATCH", divergence=i)
    ours_next = a[i] if i < len(a) else None
    ref_next = b[i] if i < len(b) else None
    gap = choice_gap(model, prompt, b[:i], ref_next, ours_next, sampling=sampling, seed=seed, eos_ids=eos_ids)
    return RowReport("tie" if abs(gap) < tolerance else "MISMATCH", divergence=i, gap=gap)


def check(model, prompts, method: str | MethodSpec, *, batch_size: int | None = None,
          reference_batch_size: int | None = None, tolerance: float | None = None,
          reference: list[Generation] | None = None, strict: bool = False, **options) -> Report:
    """Run ``method`` and autoregressive decoding on ``prompts`` and classify every row.

    Args:
      model: a ``LoadedModel`` (or a name for ``specdec.load``).
      prompts: list of prompts (text or token id lists).
      batch_size: rows per ``generate`` call for the method (default: all at once);
      reference_batch_size: the same for the reference (default 1: each prompt alone).
      reference: autoregressive results of an earlier report with the same prompts and options
        (``report.reference``), to skip running the reference again.
      tolerance: the largest score gap that is a tie (default: :func:`tie_tolerance` of the
        model's precision, 1e-3 in float32).
      strict: run the reference as wide as the method's tree, in the method's batches, and
        allow no tie (tolerance 0): bitwise in any precision.
      method: a method spec or a registered name (its options then among ``options``).
      options: ``generate`` options; method-only options (k, draft, ...) go to the method.
    """
    lm = as_model(model)
    tolerance = tie_tolerance(lm.config) if tolerance is None else tolerance
    prompts = list(prompts)
    names = all_options()
    spec = method_spec(method, {k: options.pop(k) for k in list(options) if k in names})
    ours = _batched(lm, prompts, batch_size or len(prompts), method=spec, **options)
    ref_options = dict(options)
    if strict:
        built = spec.build(lm)
        if built is not None and isinstance(built[0], ByLoad):
            raise ValueError("strict=True compares forwards of one width: give k (or tree) one value, not a "
                             "by-load dict")
        if getattr(spec, "budget", None) is not None:
            raise ValueError("strict=True compares forwards of one width: a budget packs each step's tokens "
                             "into a narrower forward; leave budget out")
        ref_options["block_width"] = built[0].tree.size if built is not None else None
        reference_batch_size, tolerance = batch_size or len(prompts), 0.0
    ref = reference or _batched(lm, prompts, reference_batch_size or 1, method="autoregressive", **ref_options)
    sampling = Sampling(temperature=options.get("temperature", 0.0), top_k=options.get("top_k", 0),
                        top_p=options.get("top_p", 1.0))
    seeds = options.get("seed", 0)
    seeds = list(seeds) if isinstance(seeds, (list, tuple)) else [seeds] * len(prompts)
    eos = tuple(lm.tokenizer.eos_ids) if lm.tokenizer is not None else ()
    eos = tuple(sorted(set(eos) | set(options.get("stop_tokens") or ())))
    encoded = [_prompt_ids(lm, p, options) for p in prompts]
    rows = [classify(lm, encoded[i], ours[i], ref[i], sampling=sampling, seed=seeds[i], eos_ids=eos,
                     tolerance=tolerance) for i in range(len(prompts))]
    return Report(method=spec.name, rows=rows, results=ours, reference=ref)


def _prompt_ids(lm, prompt, options) -> list[int]:
    return encode_prompts(lm, [prompt], options.get("chat", True), options.get("system"))[0]


def _batched(lm, prompts, size: int, **options) -> list[Generation]:
    """``generate`` in batches of ``size``; per-prompt options (seed, max_new_tokens lists) are sliced."""
    out = []
    for start in range(0, len(prompts), size):
        part = {k: v[start:start + size] if isinstance(v, (list, tuple)) and k in ("seed", "max_new_tokens") else v
                for k, v in options.items()}
        out.extend(generate(lm, prompts[start:start + size], **part))
    return out
