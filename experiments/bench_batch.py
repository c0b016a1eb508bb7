"""Throughput vs batch slots on SmolLM2-135M-Instruct: autoregressive and each speculative proposer
through the request pool (continuous batching), in one run.

The same HumanEval + held-out ShareGPT chat prompts go through ``specdec.generate(..., slots=S)``
for every method and S, greedy, up to ``--new-tokens`` tokens per request (EOS ends a request).
Each speculative proposer runs with one k (or Medusa tree) at every S and, at the S where it
differs, with a by-load schedule (``PL_BY_LOAD`` etc.: the k or tree for the rows running,
picked at each chunk's start; k 0 / "chain-0" turns speculation off). Each (method, S) runs
once to compile every shape the pool meets (prefill buckets, batch widths) and once timed. Figures:

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
from heads.bundled import default_tree, heads_for
from specdec.sampling import Sampling

# By-load schedules (k 0 / "chain-0": speculation off), from bench_step_cost on the 2-core AVX2 CPU
# (results/cpu/bench_step_cost.md): there one row decodes with matrix-vector products, which any
# second token per row turns into a slower matrix product, so speculation only pays from 2 rows up;
# at 8 rows prompt lookup gains most with k 1, the draft about breaks even with k 1.
PL_BY_LOAD = {1: 0, 2: 2, 8: 1}
DRAFT_BY_LOAD = {1: 0, 2: 1}
MEDUSA_BY_LOAD = {4: "chain-1", 8: "chain-0"}  # from 1 row: the searched tree
PROPOSERS = ("prompt_lookup", "draft", "medusa")


def schedule_label(value, searched: str) -> str:
    """``{1: 4, 8: 2}`` -> ``"1:4,8:2"`` (the CLI's by-load form), the searched tree's file as "searched"."""
    name = lambda v: "searched" if v == searched else str(v)  # noqa: E731
    return ",".join(f"{r}:{name(v)}" for r, v in sorted(value.items())) if isinstance(value, dict) else name(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--humaneval", type=int, default=16)
    parser.add_argument("--sharegpt", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--slots", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--draft", default=None, help="draft model for the draft proposer (default: the bundled one)")
    parser.add_argument("--results-name", default="bench_batch",
                        help="file name of the results (.json, .md, .png) under experiments/results/<device>/")
    parser.add_argument("--methods", nargs="+", default=list(PROPOSERS), choices=PROPOSERS,
                        help="speculative proposers to run (each with its fixed k or tree and by load); "
                             "autoregressive always runs: it is the reference")
    args = parser.parse_args()

    model = specdec.load("smollm2-135m")
    tok = model.tokenizer
    prompts = humaneval_chat_prompts(args.humaneval) + sharegpt_prompts(args.sharegpt)
    ids = [tok.encode(tok.chat(p)) for p in prompts]
    draft = dict(draft=specdec.load(args.draft)) if args.draft else {}
    searched = default_tree(heads_for(model, None)[1])
    # (label, generate options, slots it runs at): each proposer with one k / tree, and by load
    methods = [("autoregressive", {}, args.slots)]
    for name, fixed, schedule in [("prompt_lookup", dict(k=4), dict(k=PL_BY_LOAD)),
                                  ("draft", dict(k=4, **draft), dict(k=DRAFT_BY_LOAD, **draft)),
                                  ("medusa", dict(tree=searched), dict(tree={**MEDUSA_BY_LOAD, 1: searched}))]:
        if name not in args.methods:
            continue
        varied = min(r for r in next(iter(schedule.values())) if r > 1)
        methods.append((name, dict(method=name, **fixed), args.slots))
        methods.append((f"{name} by load", dict(method=name, **schedule), [s for s in args.slots if s >= varied]))
    rows, alone = [], None
    for label, method, slots_run in methods:
        for slots in slots_run:
            specdec.generate(model, ids, max_new_tokens=args.new_tokens, slots=slots, **method)  # compile
            start = time.perf_counter()
            res = specdec.generate(model, ids, max_new_tokens=args.new_tokens, slots=slots, **method)
            wall = time.perf_counter() - start
            if alone is None:  # autoregressive at the first slot count (1): each prompt alone
                alone = res
            verdicts = [classify(model, ids[i], res[i], alone[i], sampling=Sampling(), seed=0,
                                 eos_ids=tuple(tok.eos_ids)).verdict for i in range(len(ids))]
            s = res[0].stats
            choice = method.get("k", method.get("tree"))
            rows.append({"method": label, "k_or_tree": "" if choice is None else schedule_label(choice, searched),
                         "options": {"slots": slots, "method": method.get("method", "autoregressive"),
                                     **({} if choice is None else {"k" if "k" in method else "tree": choice})},
                         "slots": slots, "tokens_per_s": s.new_tokens / wall,
                         "accepted_per_forward": s.accepted_per_forward, "target_forwards": s.target_forwards,
                         "slot_utilisation": float(np.mean(s.slot_utilisation)), "new_tokens": s.new_tokens,
                         "wall_s": wall, "equivalence": "MISMATCH" if "MISMATCH" in verdicts else
                         "tie" if "tie" in verdicts else "identical",
                         "rows_identical": f"{verdicts.count('identical')}/{len(ids)}"})
            print({k: v for k, v in rows[-1].items() if k != "options"}, flush=True)
    for row in rows:
        base = row["method"].removesuffix(" by load")  # by load at 1 slot is the base method at 1 slot
        one = next((r for r in rows if r["method"] == base and r["slots"] == 1), None)
        ar = next(r for r in rows if r["method"] == "autoregressive" and r["slots"] == row["slots"])
        row["x_vs_1_slot"] = "" if one is None else row["tokens_per_s"] / one["tokens_per_s"]
        row["x_vs_autoregressive"] = row["tokens_per_s"] / ar["tokens_per_s"]
    notes = ["tokens_per_s = all generated tokens / wall time of the pool run, prefills included",
             "k_or_tree: draft tokens per step, or the Medusa tree; ROWS:VALUE,... = by load (picked at each "
             "chunk's start from the rows running then; `k={1: 4, 4: 2}` in the API)",
             "x_vs_1_slot of a by-load row: over its base method at 1 slot (the same proposer there); "
             "blank without a 1-slot run",
             f"equivalence: against autoregressive at {min(args.slots)} slot(s)"
             + (", i.e. each prompt alone" if min(args.slots) == 1 else " through the same pool"),
             "targets: speculative at 8 slots >= 3x the same proposer at 1 slot, and >= autoregressive at 8 slots"]
    write_results(args.results_name, {
        "model": "SmolLM2-135M-Instruct Q4_1 GGUF, dequantized to float32; bundled draft, Medusa heads and "
                 "searched tree" + (f" (draft: {args.draft})" if args.draft else ""),
        "prompts": f"{args.humaneval} HumanEval + {args.sharegpt} held-out ShareGPT chat prompts, greedy, "
                   f"through the request pool", "max_new_tokens": args.new_tokens, "rows": rows, "notes": notes,
    }, ["method", "k_or_tree", "slots", "tokens_per_s", "x_vs_1_slot", "x_vs_autoregressive", "accepted_per_forward",
        "target_forwards", "slot_utilisation", "equivalence", "rows_identical"])
    series = {label: ([r["slots"] for r in rows if r["method"] == label],
                      [r["tokens_per_s"] for r in rows if r["method"] == label]) for label, _, _ in methods}
    save_plot(args.results_name, series, xlabel="batch slots", ylabel="tokens/s (all requests)",
              title="Request pool throughput on SmolLM2-135M-Instruct, greedy", logx=True)
    print(*notes, sep="\n")


if __name__ == "__main__":
    main()
