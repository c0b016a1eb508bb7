"""Prompt-lookup speculation on SmolLM2-135M-Instruct vs the library's own autoregressive loop.

One process, one method at a time (never concurrently), on the same HumanEval chat
prompts at batch 1, greedy, up to ``--new-tokens`` tokens per prompt (EOS ends a row).
Each method is compiled for a prompt's shapes before that prompt is timed. Figures per method:

- accepted_per_forward: generated tokens (after the first) per target forward;
- tokens_per_s: the same tokens per second of decode wall time (after the first token);
- speedup_vs_autoregressive: the ratio of tokens_per_s to the autoregressive row of this run;
- equivalence: the checker's worst verdict over the prompts (identical / tie / MISMATCH).

It also measures the target cost curve c(k): one forward over k tokens relative to k = 1
(batch 1, 256 committed tokens before them).

    .venv/bin/python experiments/bench_speculative.py
"""

from __future__ import annotations

import argparse

from record_results import write_results
import specdec
from specdec.bench import cost_curve_record, greedy_summary, timed_generations
from specdec.datasets import humaneval_chat_prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--cost-widths", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    args = parser.parse_args()

    model = specdec.load("smollm2-135m")
    prompts = humaneval_chat_prompts(args.prompts)
    methods = {"autoregressive": {}, **{f"prompt_lookup{k}": dict(method="prompt_lookup", k=k) for k in args.ks}}
    ids = [model.tokenizer.encode_prompt(p) for p in prompts]
    results = timed_generations(model, ids, methods, args.new_tokens)
    rows = [{"method": method.get("method", "autoregressive"),
             "options": {k: v for k, v in method.items() if k != "method"},
             **greedy_summary(model, ids, results[name], results["autoregressive"])}
            for name, method in methods.items()]
    base = rows[0]["tokens_per_s"]
    for row in rows:
        row["speedup_vs_autoregressive"] = row["tokens_per_s"] / base

    curve = cost_curve_record(model, args.cost_widths)
    write_results("bench_speculative", {
        "model": "SmolLM2-135M-Instruct Q4_1 GGUF, dequantized to float32",
        "prompts": f"first {args.prompts} HumanEval prompts as chat requests, batch 1, greedy",
        "max_new_tokens": args.new_tokens, "rows": rows, **curve,
        "notes": ["cost_curve: one target forward over k tokens relative to k = 1 (batch 1, 256-token prefix)"],
    }, ["method", "k", "accepted_per_forward", "tokens_per_s", "speedup_vs_autoregressive", "equivalence",
        "rows_identical"])
    for row in rows:
        print(row)
    print(curve)


if __name__ == "__main__":
    specdec.use_compile_cache()  # before the first compile
    main()
