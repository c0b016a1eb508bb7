"""Measuring on this device: its label, timing, the bandwidth probe, timed generations and the
target's cost curve (the experiment scripts write what they measure with experiments/record_results.py)."""

from __future__ import annotations

import os
import platform
import re
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


def device_label() -> str:
    """This device in words, e.g. "cpu: 2-core AVX2, AMD EPYC" or "gpu: NVIDIA H100"."""
    dev = jax.devices()[0]
    if dev.platform == "cpu":
        info = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
        simd = "AVX512" if "avx512f" in info else "AVX2" if "avx2" in info else platform.machine()
        model = re.search(r"^model name\s*:\s*(.+)$", info, re.MULTILINE)
        return f"cpu: {os.cpu_count()}-core {simd}" + (f", {model.group(1).strip()}" if model else "")
    return f"{dev.platform}: {dev.device_kind}"


def median_time(fn: Callable[[], object], repeats: int = 5) -> float:
    """Median wall time of ``fn()`` (which must block until its work is done)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def read_bandwidth(gigabytes: float = 1.0) -> float:
    """Measured read bandwidth in bytes/s: a jitted float32 matrix-vector product over ``gigabytes``."""
    n = int((gigabytes * 2**30 / 4) ** 0.5)
    w = jnp.ones((n, n), jnp.float32)
    x = jnp.ones((n,), jnp.float32)
    matvec = jax.jit(lambda w, x: w @ x)
    matvec(w, x).block_until_ready()
    return w.nbytes / median_time(lambda: matvec(w, x).block_until_ready(), repeats=7)


def timed_generations(model, ids: list[list[int]], methods: dict[str, dict], new_tokens: int,
                      progress: str = "", common: dict | None = None) -> dict[str, list]:
    """Each method's batch-1 ``Generation`` per prompt of ``ids``, prompt by prompt (methods
    interleaved), each method compiled for a prompt's shapes before that prompt is timed. Prompts
    run shortest first, so each shape bucket compiles once (programs are dropped whenever a prompt
    needs other shapes than the one before); the lists keep the order of ``ids``.
    ``methods``: name -> ``generate`` options (``{}`` is autoregressive); ``common``: options
    every call shares (e.g. ``ignore_eos``)."""
    common = common or {}
    import specdec
    from specdec.autoregressive import plan_shapes
    from specdec.methods import build_proposer

    extra = {}
    for name, options in methods.items():
        built = build_proposer(options.get("method", "autoregressive"), model,
                               {k: v for k, v in options.items() if k != "method"})
        extra[name] = built[0].tree.size if built is not None else 0
    results: dict[str, list] = {name: [None] * len(ids) for name in methods}
    compiled, bucket = set(), None
    for done, i in enumerate(sorted(range(len(ids)), key=lambda j: len(ids[j]))):
        prompt = ids[i]
        shapes = {name: plan_shapes(model.config, [len(prompt)], [new_tokens], None, extra[name]) for name in methods}
        if shapes != bucket:  # keep one prompt bucket's programs: ten methods' for every bucket exhaust
            jax.clear_caches()  # XLA:CPU's memory maps (LLVM "Cannot allocate memory", then a crash)
            compiled, bucket = set(), shapes
        for name, options in methods.items():
            key = (name, shapes[name])
            if key not in compiled:
                specdec.generate(model, prompt, max_new_tokens=new_tokens, **common, **options)
                compiled.add(key)
            results[name][i] = specdec.generate(model, prompt, max_new_tokens=new_tokens, **common, **options)
        print(f"{progress}prompt {done + 1}/{len(ids)} done", flush=True)
    return results


def equivalence_summary(model, ids: list[list[int]], results: list, reference: list) -> dict:
    """The checker's verdicts on greedy ``results`` (``Generation`` per prompt ``ids``) against the
    autoregressive ``reference``: the worst verdict, the identical rows, and the largest score gap at a
    divergence (None where no row diverged at a token choice; a tie is under the checker's tolerance)."""
    from specdec.equivalence import Report, classify
    from specdec.sampling import Sampling

    report = Report("", [classify(model, ids[i], results[i], reference[i], sampling=Sampling(), seed=0,
                                  eos_ids=tuple(model.tokenizer.eos_ids)) for i in range(len(ids))])
    return {"equivalence": report.verdict, "rows_identical": report.counts["identical"],
            "worst_gap": report.worst_gap}


def greedy_summary(model, ids: list[list[int]], results: list, reference: list) -> dict:
    """Work, speed and equivalence (:func:`equivalence_summary`) of one method's batch-1 greedy ``results``
    against the autoregressive ``reference`` results of the same prompts."""
    tokens = sum(len(r.tokens) + (r.finish_reason == "eos") - 1 for r in results)
    forwards = sum(r.target_forwards for r in results)
    decode_s = sum(r.stats.wall_s - r.stats.ttft_s for r in results)
    return {"accepted_per_forward": tokens / forwards, "tokens_per_s": tokens / decode_s,
            **equivalence_summary(model, ids, results, reference), "new_tokens": tokens, "target_forwards": forwards}


def _forward_call(lm, width: int, prefix: int, batch: int) -> Callable[[], object]:
    """A warmed-up call of one jitted target forward over ``width`` causal tokens per row after a
    committed prefix of ``prefix`` tokens (batch ``batch``), blocking until done."""
    from flax import nnx

    from specdec.cache import init_cache
    from specdec.model import forward

    @jax.jit
    def run(state, cache, tokens, positions):
        model = nnx.merge(lm.graphdef, state)
        return forward(model, cache, tokens=tokens, positions=positions).logits

    cache = init_cache(lm.config, batch, prefix + width).with_lengths(jnp.full((batch,), prefix))
    tokens = jnp.ones((batch, width), jnp.int32)
    positions = prefix + jnp.broadcast_to(jnp.arange(width), (batch, width))
    call = lambda: run(lm.state, cache, tokens, positions).block_until_ready()  # noqa: E731
    call()
    return call


def forward_time(lm, width: int, *, prefix: int = 256, batch: int = 1, repeats: int = 7) -> float:
    """Median wall time of one jitted target forward over ``width`` causal tokens per row after a
    committed prefix of ``prefix`` tokens (batch ``batch``), after a warm-up."""
    return median_time(_forward_call(lm, width, prefix, batch), repeats)


def forward_rounds(lm, widths, *, prefix: int = 256, batch: int = 1, repeats: int = 7) -> dict[int, np.ndarray]:
    """Wall times ``{width: [repeats]}`` of one target forward per width (as :func:`forward_time`),
    the widths timed in turn, one forward each, ``repeats`` rounds: a slow spell of a shared
    machine falls on every width alike."""
    calls = {w: _forward_call(lm, w, prefix, batch) for w in sorted(set(widths))}
    rounds = [{w: median_time(call, 1) for w, call in calls.items()} for _ in range(repeats)]
    return {w: np.asarray([r[w] for r in rounds]) for w in calls}


def relative_costs(rounds: dict[int, np.ndarray]) -> dict[int, float]:
    """c(w) from :func:`forward_rounds` (which must include width 1): the median over rounds of
    each round's time at ``w`` over its time at 1."""
    return {w: float(np.median(t / rounds[1])) for w, t in rounds.items()}


def target_cost_curve(lm, widths, *, prefix: int = 256, batch: int = 1, repeats: int = 7) -> dict[int, float]:
    """Measured cost of one target forward over ``w`` new tokens relative to ``w = 1``, per width
    (:func:`relative_costs` of :func:`forward_rounds`)."""
    costs = relative_costs(forward_rounds(lm, set(widths) | {1}, prefix=prefix, batch=batch, repeats=repeats))
    return {w: costs[w] for w in sorted(widths)}


COST_WIDTHS = (1, 2, 4, 8, 16)


def curve_rows(curve: dict[int, float]) -> list[dict]:
    """``[{"k", "relative_cost"}, ...]``: a cost curve ``{k: c(k)}`` as results files record it."""
    return [{"k": k, "relative_cost": round(c, 4)} for k, c in curve.items()]


def cost_curve_record(lm, widths=COST_WIDTHS) -> dict:
    """``{"cost_curve": curve_rows(...)}``: the target's c(k) measured on this machine (batch 1, a
    256-token prefix), which every speculative benchmark result records beside its rows."""
    return {"cost_curve": curve_rows(target_cost_curve(lm, widths))}
