"""Decode-step cost of each speculative setting against autoregressive decoding, by batch size.

For each batch size B, the first B of the HumanEval + held-out ShareGPT chat prompts (alternating)
are prefilled once per setting; then every setting runs ``--chunks`` on-device chunks of
``--steps`` steps, interleaved (one chunk of each setting in turn), so slow spells of a shared
machine hit every setting alike. The first chunk of each setting is not timed (it compiles).
Rows decode greedily without stopping at EOS. Figures per (B, setting):

- step_ms: median wall time of one step (the proposer, one target forward, verification);
- tokens_per_step: tokens each row gained per step (1 for autoregressive);
- x_vs_autoregressive: (tokens_per_step / step_ms) over the same for autoregressive at that B.

This is what a by-load schedule (``k={rows: k, ...}``) should follow: at each load, the
setting with the largest x_vs_autoregressive. Prefill is not included (see bench_batch).

    .venv/bin/python experiments/bench_step_cost.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

import specdec
from specdec.api import encode_prompts
from specdec.autoregressive import decode, plan_shapes
from specdec.bench import write_results
from specdec.datasets import humaneval_chat_prompts, sharegpt_prompts
from specdec.engine import speculative_decode
from specdec.methods import build_proposer
from specdec.pool import dec_of
from specdec.sampling import Sampling

SETTINGS = {"autoregressive": None, "prompt_lookup k=1": ("prompt_lookup", dict(k=1)),
            "prompt_lookup k=2": ("prompt_lookup", dict(k=2)), "prompt_lookup k=4": ("prompt_lookup", dict(k=4)),
            "draft k=1": ("draft", dict(k=1)), "draft k=4": ("draft", dict(k=4)),
            "medusa chain-1": ("medusa", dict(tree="chain-1")), "medusa searched": ("medusa", {})}


def decoders(model, ids: list[list[int]], budget: int, steps: int) -> dict:
    """A started decode generator per setting, all with the same shapes (planned for the widest tree)."""
    built = {name: build_proposer(setting[0], model, setting[1]) for name, setting in SETTINGS.items() if setting}
    extra = max(p.tree.size for p, _ in built.values())
    shapes = plan_shapes(model.config, [len(i) for i in ids], [budget] * len(ids), None, extra)
    common = dict(max_new=[budget] * len(ids), seeds=[0] * len(ids), sampling=Sampling(), eos_ids=(),
                  shapes=shapes, chunk_steps=steps)
    gens = {"autoregressive": decode(model.graphdef, model.state, ids, **common)}
    for name, (proposer, pparams) in built.items():
        gens[name] = speculative_decode(model.graphdef, model.state, proposer, pparams, ids, rule="exact", **common)
    return gens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--steps", type=int, default=8, help="steps per on-device chunk")
    parser.add_argument("--chunks", type=int, default=6, help="chunks per setting (the first is not timed)")
    args = parser.parse_args()
    model = specdec.load("smollm2-135m")
    pool = [p for pair in zip(humaneval_chat_prompts(max(args.batch)), sharegpt_prompts(max(args.batch)))
            for p in pair]
    rows = []
    for b in args.batch:
        ids = encode_prompts(model, pool[:b], True, None)
        gens = decoders(model, ids, budget=args.steps * args.chunks * 3, steps=args.steps)
        states = {name: next(g) for name, g in gens.items()}
        times = {name: [] for name in gens}
        gained = {name: [] for name in gens}
        for chunk in range(args.chunks):
            for name, gen in gens.items():
                before = np.asarray(dec_of(states[name]).n_out)
                start = time.perf_counter()
                states[name] = jax.block_until_ready(gen.send(None))
                if chunk:
                    times[name].append((time.perf_counter() - start) / args.steps)
                    gained[name].append(float(np.mean(np.asarray(dec_of(states[name]).n_out) - before)) / args.steps)
        rate = {name: statistics.mean(gained[name]) / statistics.median(times[name]) for name in gens}
        for name in gens:
            rows.append({"batch": b, "setting": name, "step_ms": 1000 * statistics.median(times[name]),
                         "step_ms_range": f"{1000 * min(times[name]):.0f}-{1000 * max(times[name]):.0f}",
                         "tokens_per_step": statistics.mean(gained[name]),
                         "x_vs_autoregressive": rate[name] / rate["autoregressive"]})
            print(rows[-1], flush=True)
    write_results("bench_step_cost", {
        "model": "SmolLM2-135M-Instruct Q4_1 GGUF, dequantized to float32; bundled draft, Medusa heads and "
                 "searched tree",
        "prompts": "HumanEval and held-out ShareGPT chat prompts, alternating; greedy, EOS not applied",
        "rows": rows,
        "notes": [f"{args.chunks - 1} timed chunks of {args.steps} steps per setting, interleaved across settings",
                  "every setting decodes with the same cache slots (planned for the widest tree)",
                  "step_ms: median over the timed chunks; step_ms_range: fastest-slowest chunk"],
    }, ["batch", "setting", "step_ms", "step_ms_range", "tokens_per_step", "x_vs_autoregressive"])


if __name__ == "__main__":
    main()
