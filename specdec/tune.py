"""By-load schedules measured on this device: the k (or Medusa tree), budget and, if asked, draft
width that decode fastest at each number of running rows.

What a speculative step costs depends on the machine (on a CPU a one-row forward is a matrix-vector
product and any second token per row a slower matrix product; a batched forward turns compute-bound
sooner on one machine than on another), and what a step gains depends on the proposer and the text.
:func:`tune` measures both side by side: for each number of running rows it decodes the given
prompts with every candidate setting and with autoregressive decoding, interleaved chunk by chunk
(so a slow spell of a shared machine hits every setting alike), and keeps the setting with the most
tokens per second. The result is a by-load schedule for :func:`specdec.generate`:

    tuned = tune(model, "prompt_lookup", ids, rows=(1, 2, 4, 8))
    specdec.generate(model, prompts, method="prompt_lookup", slots=8, **tuned.options)
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import jax
import numpy as np

from specdec.autoregressive import StepConfig, decode, plan_shapes
from specdec.bench import target_cost_curve
from specdec.engine import speculative_decode
from specdec.method_spec import REGISTRY, MethodSpec
from specdec.methods import build_proposer
from specdec.pool import dec_of
from specdec.sampling import Sampling
from specdec.tree import load_spec

DEFAULT_BUDGETS = (1, 2, 4)  # tried beside "no cap" (draft tokens verified per step, all rows together)


def tunable() -> dict[str, type[MethodSpec]]:
    """The registered methods whose main option (their spec's ``tuned``: k or a tree) tune picks by
    load, from the spec's ``tune_choices`` unless given; those with a ``draft_width`` option and a
    ``budget`` get those picked too."""
    return {name: cls for name, cls in REGISTRY.items() if cls.tuned}


class Tuned(NamedTuple):
    """``options``: the schedule as generate options (e.g. ``{"k": {1: 0, 2: 2, 8: 1}, "budget": {1:
    None, 8: 2}}``, with the numeric options it was measured with, e.g. ``"draft_width": 3``);
    ``rows``: one dict per (running rows, setting) measured, and one per setting skipped as
    :func:`hopeless` (``"skipped": True``, with its bound and verify cost)."""

    method: str
    options: dict
    rows: list[dict]


def step_rates(model, ids: Sequence[Sequence[int]], settings: dict[str, tuple[str, dict] | None], *,
               steps: int = 8, chunks: int = 6, longest_prompt: int = 0) -> dict[str, dict]:
    """Decode ``ids`` as one batch with each setting (``(method, options)``; None: autoregressive),
    greedily and without EOS, ``chunks`` chunks of ``steps`` steps, interleaved across settings; the
    first chunk is not timed (it compiles). Shapes are planned as if every prompt had at least
    ``longest_prompt`` tokens (so batches of other prompts reuse the compiled programs) and for
    ``4 * steps * chunks`` new tokens.

    Returns, per setting: step_ms (median over the timed chunks), step_ms_range (fastest, slowest),
    tokens_per_step (tokens a row gained per step, mean), tokens_per_s (of the whole batch) and
    x_vs_autoregressive (tokens_per_s over autoregressive's; needs an autoregressive setting).
    """
    if chunks < 2:
        raise ValueError(f"chunks must be >= 2 (the first one compiles and is not timed), got {chunks}")
    built = {name: build_proposer(s[0], model, s[1]) for name, s in settings.items() if s is not None}
    extra = max([p.tree.size for p, _ in built.values()] + [1])
    new_tokens = 4 * steps * chunks
    shapes = plan_shapes(model.config, [max(len(i), longest_prompt) for i in ids], [new_tokens] * len(ids), None,
                         extra)
    common = dict(max_new=[new_tokens] * len(ids), seeds=[0] * len(ids),
                  config=StepConfig(sampling=Sampling(), eos_ids=(), shapes=shapes, chunk_steps=steps))
    gens = {name: decode(model.graphdef, model.state, ids, **common) if name not in built else
            speculative_decode(model.graphdef, model.state, *built[name], ids, rule="exact", **common)
            for name in settings}
    states = {name: next(g) for name, g in gens.items()}
    times = {name: [] for name in gens}
    gained = {name: [] for name in gens}
    for chunk in range(chunks):
        for name, gen in gens.items():
            before = np.asarray(dec_of(states[name]).n_out)
            start = time.perf_counter()
            states[name] = jax.block_until_ready(gen.send(None))
            if chunk:
                times[name].append((time.perf_counter() - start) / steps)
                gained[name].append(float(np.mean(np.asarray(dec_of(states[name]).n_out) - before)) / steps)
    out = {}
    for name in gens:
        per_step, step_s = statistics.mean(gained[name]), statistics.median(times[name])
        out[name] = {"step_ms": 1000 * step_s, "step_ms_range": (1000 * min(times[name]), 1000 * max(times[name])),
                     "tokens_per_step": per_step, "tokens_per_s": per_step * len(ids) / step_s}
    ar = next((out[n]["tokens_per_s"] for n, s in settings.items() if s is None), None)
    for name in out:
        out[name]["x_vs_autoregressive"] = None if ar is None else out[name]["tokens_per_s"] / ar
    return out


def candidates(method: str, rows: int, choices: Sequence | None = None, budgets: Sequence[int] | None = None,
               drafted: Callable[[dict], int] | None = None, widths: Sequence[int] | None = None) -> dict[str, dict]:
    """The settings :func:`tune` tries at ``rows`` running rows: each choice of the method's main
    option (k or tree), with each of ``widths`` (``draft_width``; None: not tuned), alone and with
    each budget that can drop a draft token there (below ``rows`` x the setting's draft tokens per
    row: ``drafted(setting)``, by default k x width or the Medusa tree's nodes); speculation off
    ("k=0", "tree=chain-0") takes no budget and no width."""
    if method not in tunable():
        raise ValueError(f"tune picks k or a Medusa tree by load: method must be one of {', '.join(tunable())}, "
                         f"got {method!r}")
    spec = tunable()[method]
    option = spec.tuned
    choices = spec.tune_choices if choices is None else tuple(choices)
    budgets = DEFAULT_BUDGETS if budgets is None else tuple(budgets)
    if not choices:
        raise ValueError(f"no candidate {option} values to tune over")
    for name, values in (("budgets", budgets), ("widths", widths or ())):
        if any(isinstance(v, bool) or int(v) != v or v < 1 for v in values):
            raise ValueError(f"{name} must be integers >= 1, got {list(values)}")
    if widths is not None and "draft_width" not in spec.option_names():
        wide = [name for name, cls in tunable().items() if "draft_width" in cls.option_names()]
        raise ValueError(f"widths (draft_width) are tuned for methods {', '.join(wide)}, not {method!r}")
    out = {}
    for choice in choices:
        off = choice in (0, "chain-0")
        for width in [None] if widths is None or off else sorted(set(widths)):
            setting = {option: choice} | ({} if width is None else {"draft_width": width})
            name = f"{option}={choice}" + ("" if width is None else f" width={width}")
            per_row = (drafted(setting) if drafted else len(load_spec(choice)) if option == "tree"
                       else int(choice) * (width or 1))
            out[name] = setting
            for b in sorted(set(budgets)):
                if b < rows * per_row:
                    out[f"{name} budget={b}"] = setting | {"budget": b}
    return out


def _collapse(by_rows: dict[int, Any]) -> Any:
    """``{rows: value}`` without entries equal to the one before; a single value when only one is left."""
    out, last = {}, object()
    for r, v in sorted(by_rows.items()):
        if v != last:
            out[r] = last = v
    return out[1] if len(out) == 1 else out


def hopeless(settings: dict[str, dict], tokens_per_step: dict[str, float], verified: Callable[[dict], int],
             curve: dict[int, float]) -> dict[str, float]:
    """The unbudgeted settings that cannot beat autoregressive decoding at this load, each with its
    bound: the tokens a row gained per step at one row (``tokens_per_step``; acceptance depends on the
    text, not on the load) over the cost of the target forward that verifies the setting's tokens
    (``curve``: ``{tokens per row: cost relative to one token per row}`` at this load), as if drafting
    and bookkeeping were free. A setting whose bound is below 1 is slower than autoregressive even then;
    the setting with the highest bound is never hopeless (tune must have one to pick)."""
    bounds = {name: tokens_per_step[name] / curve[verified(s)] for name, s in settings.items()
              if "budget" not in s and name in tokens_per_step}
    keep = max(bounds, key=bounds.get, default=None)
    return {name: bound for name, bound in bounds.items() if bound < 1.0 and name != keep}


def tune(model, method: str, ids: Sequence[Sequence[int]], *, rows: Sequence[int] = (1, 2, 4, 8),
         choices: Sequence | None = None, budgets: Sequence[int] | None = None, widths: Sequence[int] | None = None,
         steps: int = 8, chunks: int = 6, options: dict | None = None, prune: bool = True, progress=None) -> Tuned:
    """Measure every candidate setting (:func:`candidates`) at each count of running rows and keep
    the fastest: a by-load schedule for ``method``.

    Args:
      model: the target (a :class:`specdec.loading.LoadedModel`).
      method: "prompt_lookup", "draft", "medusa" or "eagle" (the feature draft).
      ids: [N] prompts as token ids, N >= max(rows); at r rows they decode in groups of r
        (the first N // r * r of them), each group timed beside autoregressive decoding.
      rows: running-row counts to tune for, from 1 (a larger load uses the largest tuned below it).
      choices, budgets: candidate k values (or trees) and budgets (default: the spec's ``tune_choices``,
        ``DEFAULT_BUDGETS``).
      widths: candidate ``draft_width`` values, picked by load too (methods with that option;
        default: not tuned).
      steps, chunks: as in :func:`step_rates`.
      prune: above one row, measure the target's cost curve at that load first and skip the
        unbudgeted settings that cannot beat autoregressive decoding there (:func:`hopeless`), with
        their budgeted variants still measured; the skipped ones are listed with their bound.
      options: the method's other options, the same in every setting (e.g. ``{"draft": ...}``); the
        numeric ones (``draft_width``, ``lookup``, ...) shape what a step verifies, so the schedule
        keeps them.
      progress: called with a line of text after each row count (e.g. ``print``).

    Every setting compiles its programs once per row count (minutes on a real model), and JAX's
    compiled programs are dropped after each row count (``jax.clear_caches``: on a CPU, XLA's
    programs for some hundred settings exhaust the process's memory maps).
    """
    rows = sorted({int(r) for r in rows})
    if not rows or rows[0] != 1:
        raise ValueError(f"rows (running-row counts to tune for) must include 1, got {rows}")
    if len(ids) < rows[-1]:
        raise ValueError(f"tuning for {rows[-1]} rows needs at least {rows[-1]} prompts, got {len(ids)}")
    fixed = dict(options or {})
    option = tunable()[method].tuned if method in tunable() else None
    picked = [option, "budget"] + ([] if widths is None else ["draft_width"])
    if set(picked) & set(fixed):
        raise ValueError(f"options must not set {' or '.join(map(repr, picked))}: those are what tune picks")

    per_row: dict[str, int] = {}

    def drafted(setting: dict) -> int:  # draft tokens per row, as the proposer builds its tree (branches, lookup)
        key = json.dumps(setting)  # k or a tree (name or paths), width; built once, not once per row count
        if key not in per_row:
            per_row[key] = build_proposer(method, model, {**fixed, **setting})[0].tree.size - 1
        return per_row[key]

    table, best = [], {}
    for r in rows:
        tried = candidates(method, r, choices, budgets, drafted, widths)
        if prune and r > 1:
            at_one = {t["setting"]: t["tokens_per_step"] for t in table if t["rows"] == 1}
            verified = {name: drafted(o) + 1 for name, o in tried.items() if "budget" not in o}  # tokens per row
            curve = target_cost_curve(model, set(verified.values()), batch=r)
            for name, bound in hopeless(tried, at_one, lambda o: drafted(o) + 1, curve).items():
                del tried[name]
                table.append({"rows": r, "setting": name, "skipped": True, "bound_x_vs_autoregressive": bound,
                              "verify_cost": curve[verified[name]]})
        settings = {"autoregressive": None} | {name: (method, {**fixed, **o}) for name, o in tried.items()}
        groups = [ids[i:i + r] for i in range(0, len(ids) // r * r, r)]
        measured = [step_rates(model, group, settings, steps=steps, chunks=chunks,
                               longest_prompt=max(len(i) for i in ids)) for group in groups]
        if progress is not None:
            progress(f"tuned {method} at {r} row(s): {len(settings)} settings x {len(groups)} group(s)")
        for name in settings:
            # tokens/s of the groups together: total tokens over total time, each group's steps alike
            rate = statistics.mean(m[name]["tokens_per_step"] for m in measured) * r / statistics.mean(
                m[name]["step_ms"] / 1000 for m in measured)
            table.append({"rows": r, "setting": name, "tokens_per_s": rate,
                          "step_ms": statistics.mean(m[name]["step_ms"] for m in measured),
                          "tokens_per_step": statistics.mean(m[name]["tokens_per_step"] for m in measured)})
        ar = next(t["tokens_per_s"] for t in table if t["rows"] == r and t["setting"] == "autoregressive")
        mine = [t for t in table if t["rows"] == r and not t.get("skipped")]
        for t in mine:
            t["x_vs_autoregressive"] = t["tokens_per_s"] / ar
        fastest = max((t for t in mine if t["setting"] != "autoregressive"), key=lambda t: t["tokens_per_s"])
        fastest["chosen"] = True
        best[r] = settings[fastest["setting"]][1]
        jax.clear_caches()  # this row count's programs are done; hundreds at once exhaust a CPU process's maps
    # the measured setting's numeric options (draft_width, lookup, ...) go with it; models and paths do not
    schedule = {name: v for name, v in fixed.items() if isinstance(v, int)}
    schedule[option] = _collapse({r: o[option] for r, o in best.items()})
    if widths is not None:
        schedule["draft_width"] = _collapse({r: o.get("draft_width", 1) for r, o in best.items()})
    budget = _collapse({r: o.get("budget") for r, o in best.items()})
    if budget is not None:
        schedule["budget"] = budget
    return Tuned(method=method, options=schedule, rows=table)


def save_schedule(tuned: Tuned, path: str | Path, **record) -> Path:
    """Write ``tuned`` (plus ``record``: device, date, prompts...) as JSON; see :func:`read_schedule`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"method": tuned.method, "options": tuned.options, **record,
                                "measurements": tuned.rows}, indent=1) + "\n")
    return path


def read_schedule(path: str | Path, method: str | None = None) -> dict:
    """The generate options of a schedule saved by ``specdec tune`` (row counts back to integers);
    ``method``: the method it is for, checked against the file's."""
    from specdec.saved import read_config

    path = Path(path)
    saved = read_config(path.parent, path.name, what="schedule", fix="write one with `specdec tune --out FILE`")
    if "options" not in saved or "method" not in saved:
        raise ValueError(f"{path} is not a schedule written by `specdec tune` (no method/options)")
    if method is not None and saved["method"] != method:
        raise ValueError(f"{path} is a schedule for method {saved['method']!r}, not {method!r}: "
                         f"tune one for {method!r} or pass --method {saved['method']}")
    return {name: {int(r): v for r, v in value.items()} if isinstance(value, dict) else value
            for name, value in saved["options"].items()}
