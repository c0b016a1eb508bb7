"""Throughput vs batch slots on SmolLM2-135M-Instruct: autoregressive and each speculative proposer
through the request pool (continuous batching), in one run.

The same HumanEval + held-out ShareGPT chat prompts go through ``specdec.generate(..., slots=S)``
for every method and S, greedy, up to ``--new-tokens`` tokens per request (EOS ends a request).
Each (method, S) runs once to compile every shape the pool meets (prefill groups, batch widths)
and once timed. Figures:

- tokens_per_s: generated tokens of all requests / wall time of the whole pool run (prefills included);
- accepted_per_forward: tokens after each request's first per row-forward;
- target_forwards: forwards of the pool (all slots step together); slot_utilisation: mean share
  of those forwards in which a slot held a running request;
- x_vs_1_slot: tokens_per_s over the same method at 1 slot; x_vs_autoregressive: over
  autoregressive at the same slots;
- equivalence: the checker's worst verdict over the requests against autoregressive decoding of
  each prompt alone (the autoregressive run at 1 slot decodes each prompt alone).

    .venv/bin/python experiments/bench_batch.py [--draft PATH]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import specdec
from specdec.bench import save_plot, write_results
from specdec.datasets import humaneval_chat_prompts, sharegpt_prompts
from specdec.equivalence import classify
from specdec.sampling import Sampling


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--humaneval", type=int, default=16)
    parser.add_argument("--sharegpt", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--slots", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--draft", default=None, help="draft model for the draft proposer (skipped without one)")
    args = parser.parse_args()

    model = specdec.load("smollm2-135m")
    tok = model.tokenizer
    prompts = humaneval_chat_prompts(args.humaneval) + sharegpt_prompts(args.sharegpt)
    ids = [tok.encode(tok.chat(p)) for p in prompts]
    methods = {"autoregressive": {}, "prompt_lookup": dict(method="prompt_lookup", k=4),
               "medusa": dict(method="medusa")}
    if args.draft:
        methods["draft"] = dict(method="draft", draft=specdec.load(args.draft), k=4)
    rows, alone = [], None
    for name, method in methods.items():
        for slots in args.slots:
            specdec.generate(model, ids, max_new_tokens=args.new_tokens, slots=slots, **method)  # compile
            start = time.perf_counter()
            res = specdec.generate(model, ids, max_new_tokens=args.new_tokens, slots=slots, **method)
            wall = time.perf_counter() - start
            if alone is None:  # autoregressive at the first slot count (1): each prompt alone
                alone = res
            verdicts = [classify(model, ids[i], res[i], alone[i], sampling=Sampling(), seed=0,
                                 eos_ids=tuple(tok.eos_ids)).verdict for i in range(len(ids))]
            s = res[0].stats
            rows.append({"method": name, "options": {"slots": slots, **{k: v for k, v in method.items()
                                                                          if k in ("k", "method")}},
                         "slots": slots, "tokens_per_s": s.new_tokens / wall,
                         "accepted_per_forward": s.accepted_per_forward, "target_forwards": s.target_forwards,
                         "slot_utilisation": float(np.mean(s.slot_utilisation)), "new_tokens": s.new_tokens,
                         "wall_s": wall, "equivalence": "MISMATCH" if "MISMATCH" in verdicts else
                         "tie" if "tie" in verdicts else "identical",
                         "rows_identical": f"{verdicts.count('identical')}/{len(ids)}"})
            print({k: v for k, v in rows[-1].items() if k != "options"}, flush=True)
    for row in rows:
        one = next(r for r in rows if r["method"] == row["method"] and r["slots"] == min(args.slots))
        ar = next(r for r in rows if r["method"] == "autoregressive" and r["slots"] == row["slots"])
        row["x_vs_1_slot"] = row["tokens_per_s"] / one["tokens_per_s"]
        row["x_vs_autoregressive"] = row["tokens_per_s"] / ar["tokens_per_s"]
    notes = ["tokens_per_s = all generated tokens / wall time of the pool run, prefills included",
             "targets: speculative at 8 slots >= 3x the same proposer at 1 slot, and >= autoregressive at 8 slots"]
    if not args.draft:
        notes.append("draft proposer: not run (no trained draft for SmolLM2 yet; pass --draft)")
    write_results("bench_batch", {
        "model": "SmolLM2-135M-Instruct Q4_1 GGUF, dequantized to float32; bundled Medusa heads and searched tree",
        "prompts": f"{args.humaneval} HumanEval + {args.sharegpt} held-out ShareGPT chat prompts, greedy, "
                   f"through the request pool", "max_new_tokens": args.new_tokens, "rows": rows, "notes": notes,
    }, ["method", "slots", "tokens_per_s", "x_vs_1_slot", "x_vs_autoregressive", "accepted_per_forward",
        "target_forwards", "slot_utilisation", "equivalence", "rows_identical"])
    series = {name: ([r["slots"] for r in rows if r["method"] == name],
                     [r["tokens_per_s"] for r in rows if r["method"] == name]) for name in methods}
    save_plot("bench_batch", series, xlabel="batch slots", ylabel="tokens/s (all requests)",
              title="Request pool throughput on SmolLM2-135M-Instruct, greedy", logx=True)
    print(*notes, sep="\n")


if __name__ == "__main__":
    main()
