"""Decode-step cost of each speculative setting against autoregressive decoding, by batch size.

For each batch size B, the first B of the HumanEval + held-out ShareGPT chat prompts (alternating)
are prefilled once per setting; then every setting runs ``--chunks`` on-device chunks of
``--steps`` steps, interleaved (one chunk of each setting in turn), so slow spells of a shared
machine hit every setting alike. The first chunk of each setting is not timed (it compiles).
Rows decode greedily without stopping at EOS (``specdec.tune.step_rates``; ``specdec tune`` picks
a by-load schedule from the same measurement). Figures per (B, setting):

- step_ms: median wall time of one step (the proposer, one target forward, verification);
- tokens_per_step: tokens each row gained per step (1 for autoregressive);
- x_vs_autoregressive: (tokens_per_step / step_ms) over the same for autoregressive at that B.

This is what a by-load schedule (``k={rows: k, ...}``, ``budget={rows: n, ...}``) should follow:
at each load, the setting with the largest x_vs_autoregressive. A setting with ``budget=N``
verifies at most N draft tokens per step across the batch (``specdec.budget``). Prefill is not
included (see bench_batch).

    .venv/bin/python experiments/bench_step_cost.py [--batch 8] [--settings "prompt_lookup k=1" ...]
"""

from __future__ import annotations

import argparse

from record_results import write_results
import specdec
from specdec.api import encode_prompts
from specdec.bench import cost_curve_record
from specdec.datasets import humaneval_chat_prompts, sharegpt_prompts
from specdec.tune import step_rates

SETTINGS = {"autoregressive": None, "prompt_lookup k=1": ("prompt_lookup", dict(k=1)),
            "prompt_lookup k=2": ("prompt_lookup", dict(k=2)), "prompt_lookup k=4": ("prompt_lookup", dict(k=4)),
            "draft k=1": ("draft", dict(k=1)), "draft k=4": ("draft", dict(k=4)),
            "medusa chain-1": ("medusa", dict(tree="chain-1")), "medusa searched": ("medusa", {}),
            "prompt_lookup k=1 budget=2": ("prompt_lookup", dict(k=1, budget=2)),
            "prompt_lookup k=1 budget=4": ("prompt_lookup", dict(k=1, budget=4)),
            "prompt_lookup k=2 budget=4": ("prompt_lookup", dict(k=2, budget=4)),
            "draft k=1 budget=2": ("draft", dict(k=1, budget=2)), "draft k=1 budget=4": ("draft", dict(k=1, budget=4)),
            "medusa searched budget=4": ("medusa", dict(budget=4)),
            "eagle k=1": ("eagle", dict(k=1)), "eagle k=2": ("eagle", dict(k=2)),
            "eagle k=1 budget=2": ("eagle", dict(k=1, budget=2)), "eagle k=1 budget=4": ("eagle", dict(k=1, budget=4)),
            "eagle k=1 budget=6": ("eagle", dict(k=1, budget=6)), "eagle k=2 budget=4": ("eagle", dict(k=2, budget=4)),
            "eagle k=2 budget=8": ("eagle", dict(k=2, budget=8)),
            "eagle k=1 width 2": ("eagle", dict(k=1, draft_width=2)),
            "eagle k=1 width 3": ("eagle", dict(k=1, draft_width=3)),
            "eagle k=2 width 2": ("eagle", dict(k=2, draft_width=2)),
            "eagle k=2 branches 2": ("eagle", dict(k=2, draft_branches=2))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--steps", type=int, default=8, help="steps per on-device chunk")
    parser.add_argument("--chunks", type=int, default=6, help="chunks per setting (the first is not timed)")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS, metavar="SETTING",
                        help="settings to time (autoregressive always runs: it is the reference); "
                             f"default all: {', '.join(SETTINGS)}")
    parser.add_argument("--results-name", default="bench_step_cost",
                        help="study name: the results (.json, .md) go to "
                        "experiments/results/<name>/<machine>-<date>/")
    args = parser.parse_args()
    model = specdec.load("smollm2-135m")
    pool = [p for pair in zip(humaneval_chat_prompts(max(args.batch)), sharegpt_prompts(max(args.batch)))
            for p in pair]
    rows = []
    for b in args.batch:
        ids = encode_prompts(model, pool[:b], True, None)
        names = ["autoregressive"] + [n for n in args.settings if n != "autoregressive"]
        measured = step_rates(model, ids, {name: SETTINGS[name] for name in names}, steps=args.steps,
                              chunks=args.chunks)
        for name, m in measured.items():
            rows.append({"batch": b, "setting": name, "step_ms": m["step_ms"],
                         "step_ms_range": "{:.0f}-{:.0f}".format(*m["step_ms_range"]),
                         "tokens_per_step": m["tokens_per_step"], "x_vs_autoregressive": m["x_vs_autoregressive"]})
            print(rows[-1], flush=True)
    write_results(args.results_name, {
        "model": "SmolLM2-135M-Instruct Q4_1 GGUF, dequantized to float32; bundled draft, feature draft, "
                 "Medusa heads and searched tree",
        "prompts": "HumanEval and held-out ShareGPT chat prompts, alternating; greedy, EOS not applied",
        "rows": rows, **cost_curve_record(model),
        "notes": [f"{args.chunks - 1} timed chunks of {args.steps} steps per setting, interleaved across settings",
                  "every setting decodes with the same cache slots (planned for the widest tree)",
                  "step_ms: median over the timed chunks; step_ms_range: fastest-slowest chunk"],
    }, ["batch", "setting", "step_ms", "step_ms_range", "tokens_per_step", "x_vs_autoregressive"])


if __name__ == "__main__":
    specdec.use_compile_cache()  # before the first compile
    main()
