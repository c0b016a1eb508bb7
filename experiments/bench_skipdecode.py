"""SkipDecode (LOSSY) at target speedups 1.5x, 2x, 3x, and lossless early-exit self-speculation,
vs autoregressive decoding of SmolLM2-135M-Instruct, in one run.

Speed (one process, one method at a time, greedy, held-out ShareGPT first turns):

- SkipDecode rows: ``--new-tokens`` tokens per prompt with EOS ignored (every row decodes the
  whole schedule), batch 1 prompt by prompt and batch ``--batch`` all at once; tokens/s after
  the first token and the speedup over autoregressive decoding timed the same way;
  ``mean_active_layers`` is the schedule's.
- Early-exit rows (exit layer E, k draft tokens): batch 1, EOS ends a row, accepted tokens per
  target forward, speedup and the equivalence checker's worst verdict against autoregressive.

Quality (no timing): held-out ShareGPT perplexity of the assistant tokens predicted from a
drawn prompt end on (``training.skipdecode.perplexity``) for the unmodified model with every
layer, and per speedup the unmodified and the fine-tuned model (``--weights``, written by
``specdec train-skipdecode``) under the schedule; ``recovered`` = the share of the perplexity
increase that skipping causes which fine-tuning wins back.

    .venv/bin/python experiments/bench_skipdecode.py --weights runs/skipdecode
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from record_results import pyplot, save_plot, write_results
import specdec
from specdec.bench import cost_curve_record, greedy_summary, timed_generations
from specdec.datasets import sharegpt_prompts
from specdec.skipdecode import WEIGHTS_FILE, SkipSchedule, load_finetuned
from training.skipdecode import SkipTrainConfig, prepare_rows, quality_table


def skip_speed(model, ids, speedups, new_tokens: int, batch: int) -> list[dict]:
    """Autoregressive and SkipDecode tokens/s, batch 1 (per prompt) and batch ``batch``."""
    methods = {"autoregressive": {}, **{f"skipdecode {s}x": dict(method="skipdecode", target_speedup=s)
                                        for s in speedups}}
    single = timed_generations(model, ids, methods, new_tokens, progress="skipdecode batch 1: ",
                               common=dict(ignore_eos=True))
    rows = []
    for name, options in methods.items():
        res = single[name]
        decode_s = sum(r.stats.wall_s - r.stats.ttft_s for r in res)
        rows.append({"method": name, "batch": 1, "options": options, "target_speedup": options.get("target_speedup"),
                     "mean_active_layers": res[0].stats.mean_active_layers or model.config.n_layers,
                     "tokens_per_s": sum(len(r.tokens) - 1 for r in res) / decode_s, "wall_s": decode_s,
                     "equivalence": "reference" if not options else "lossy (not checked)"})
    group = ids[:batch]
    for name, options in methods.items():
        specdec.generate(model, group, max_new_tokens=new_tokens, ignore_eos=True, **options)  # compile
        res = specdec.generate(model, group, max_new_tokens=new_tokens, ignore_eos=True, **options)
        s = res[0].stats
        rows.append({"method": name, "batch": len(group), "options": options,
                     "target_speedup": options.get("target_speedup"),
                     "mean_active_layers": s.mean_active_layers or model.config.n_layers,
                     "tokens_per_s": s.tokens_per_s, "wall_s": s.wall_s - s.ttft_s,
                     "equivalence": "reference" if not options else "lossy (not checked)"})
    for row in rows:
        base = next(r for r in rows if r["batch"] == row["batch"] and r["method"] == "autoregressive")
        row["speedup_vs_autoregressive"] = row["tokens_per_s"] / base["tokens_per_s"]
    return rows


def early_exit_speed(model, ids, exits, k: int, new_tokens: int) -> list[dict]:
    methods = {"autoregressive": {}, **{f"early_exit E={e}": dict(method="early_exit", exit_layer=e, k=k)
                                        for e in exits}}
    results = timed_generations(model, ids, methods, new_tokens, progress="early exit: ")
    rows = []
    for name, options in methods.items():
        summary = greedy_summary(model, ids, results[name], results["autoregressive"])
        rows.append({"method": name, "batch": 1, "options": options, **summary,
                     "rows_identical": f"{summary['rows_identical']}/{len(ids)}"})
    base = rows[0]["tokens_per_s"]
    for row in rows:
        row["speedup_vs_autoregressive"] = row["tokens_per_s"] / base
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", required=True, help="fine-tuned weights from `specdec train-skipdecode`")
    parser.add_argument("--prompts", type=int, default=8, help="held-out ShareGPT prompts")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--speedups", type=float, nargs="+", default=[1.5, 2.0, 3.0])
    parser.add_argument("--exits", type=int, nargs="+", default=[6, 12, 18, 24])
    parser.add_argument("--k", type=int, default=3, help="early-exit draft tokens per step")
    args = parser.parse_args()
    pyplot()  # fail now, not after the run, without matplotlib

    model = specdec.load("smollm2-135m")
    tuned = load_finetuned(model, args.weights)
    meta = json.loads((Path(args.weights) / WEIGHTS_FILE).read_text())
    tok = model.tokenizer
    ids = [tok.encode_prompt(p) for p in sharegpt_prompts(args.prompts)]
    rows = skip_speed(tuned, ids, args.speedups, args.new_tokens, args.batch)
    rows += early_exit_speed(model, ids, args.exits, args.k, args.new_tokens)

    cfg = SkipTrainConfig(**meta["training"]["config"])
    heldout = prepare_rows(model, cfg, "heldout")
    n = model.config.n_layers
    schedules = [SkipSchedule.for_speedup(n, s, prompt_end=0, max_length=cfg.horizon, warmup=cfg.warmup_layers)
                 for s in args.speedups]
    quality = quality_table(model.graphdef, model.state, tuned.state, heldout, schedules, args.speedups, cfg.seed + 1)
    for q in quality["by_speedup"]:
        for row in rows:
            if row.get("target_speedup") == q["target_speedup"]:
                row.update({k: v for k, v in q.items() if k != "target_speedup"})
    for row in rows:
        if row["method"] == "autoregressive":
            row["ppl_full_model"] = quality["ppl_full_model"]
    training = meta["training"]
    notes = [f"fine-tuned weights: {args.weights}: blocks {meta['layers']} + final norm "
             f"({training['trained_parameters']:,} parameters) trained for {training['steps']} steps on "
             f"{training['train_rows']} packed ShareGPT rows of {cfg.seq_len} tokens, {training['wall_s']} s wall "
             f"(training, evaluation and saving), by `{training.get('command', 'specdec train-skipdecode')}`",
             f"perplexity: {len(heldout.tokens)} held-out packed rows; full model without skipping "
             f"{quality['ppl_full_model']}",
             "SkipDecode is lossy: its rows are not checked for equivalence; early exit is lossless"]
    write_results("bench_skipdecode", {"model": "smollm2-135m", "prompts": f"{len(ids)} held-out ShareGPT",
                                       "new_tokens": args.new_tokens, "quality": quality, "rows": rows,
                                       "notes": notes, **cost_curve_record(model)},
                  ["method", "batch", "mean_active_layers", "tokens_per_s", "speedup_vs_autoregressive",
                   "ppl_unmodified_skip", "ppl_finetuned_skip", "recovered", "accepted_per_forward", "equivalence",
                   "rows_identical", "wall_s"])
    single = [r for r in rows if r["batch"] == 1 and "mean_active_layers" in r]  # the SkipDecode rows, AR first
    xs = [r["speedup_vs_autoregressive"] for r in single]
    full = quality["ppl_full_model"]
    save_plot("bench_skipdecode", {
        "unmodified model": (xs, [r.get("ppl_unmodified_skip", full) for r in single]),
        "fine-tuned under the schedule": (xs, [r.get("ppl_finetuned_skip", full) for r in single])},
        xlabel="measured speedup vs autoregressive (batch 1)", ylabel="held-out perplexity (log scale)",
        title="SkipDecode on SmolLM2-135M: quality vs speed", logy=True)


if __name__ == "__main__":
    specdec.use_compile_cache()  # before the first compile
    main()
