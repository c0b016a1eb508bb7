"""Throughput vs batch slots on SmolLM2-135M-Instruct: autoregressive and each speculative proposer
through the request pool (continuous batching), in one run.

The same HumanEval + held-out ShareGPT chat prompts go through ``specdec.generate(..., slots=S)``
for every method and S, greedy, up to ``--new-tokens`` tokens per request (EOS ends a request).
Each speculative proposer runs with one k (or Medusa tree; the feature draft, ``eagle``, with each
``--eagle-k``) at every S and, at the S where it differs (not for the feature draft), with a
by-load schedule (the k or tree for the rows running, picked at each chunk's start; k 0 /
"chain-0" turns speculation off: ``PL_BY_LOAD``, ``DRAFT_BY_LOAD``, and for Medusa
the trees searched per batch size in the bundled ``tree.json``, ``method="medusa"``'s default,
when it holds more than one) and, for the proposers in
``BUDGET_BY_LOAD``, with that schedule plus a budget by load (``specdec.budget``), and ("tuned")
with the k / tree and budget by load that ``specdec.tune`` measures fastest on this machine at
the start of the run, on other prompts (the next ``--tune-prompts`` of each set); ``--schedules``
picks which. Every (method, S) first runs once to compile every shape the pool meets (prefill
buckets, batch widths); then ``--repeats`` rounds time each configuration once, in turn, so a
drift in the machine's speed reaches every configuration alike. Figures:

- tokens_per_s: generated tokens of all requests / median wall time of the whole pool run
  (prefills included);
- accepted_per_forward: tokens after each request's first per row-forward;
- target_forwards: forwards of the pool (all slots step together); slot_utilisation: mean share
  of those forwards in which a slot held a running request;
- x_vs_1_slot: tokens/s over the same method at 1 slot; x_vs_autoregressive: over
  autoregressive at the same slots; each the median over the rounds of the ratio within a round;
- prefill_share: the prompts' prefills' share of the wall time (``stats.prefill_s``);
  decode_x_vs_1_slot: x_vs_1_slot with the prefills' time left out of both runs (with admissions
  "alone", the decode loop's scaling; a merged admission's time includes a step of the running rows);
- admissions: at more than 1 slot, "merged" (a prompt admitted while rows run is prefilled in the
  same target forward as one step of those rows; the pool's default) or "alone" (prefilled by itself
  first; ``--admissions`` picks; at 1 slot no row runs at an admission, so there is one run);
- equivalence: the checker's worst verdict over the requests against autoregressive decoding of
  each prompt alone (the autoregressive run at 1 slot decodes each prompt alone); worst_gap: the
  largest logit gap at a divergence (a tie is under the checker's 1e-3, a bug far over it).

    .venv/bin/python experiments/bench_batch.py [--slots 1 8] [--repeats 3] [--draft PATH]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from record_results import pyplot, save_plot, write_results
import specdec
from specdec.bench import cost_curve_record, equivalence_summary
from specdec.config import PRECISION_POLICIES, precision_name
from specdec.datasets import humaneval_chat_prompts, sharegpt_prompts
from heads.bundled import default_tree, default_trees, heads_for
from specdec.tree import BUILTIN_TREES, load_spec
from specdec.tune import tunable, tune

# By-load schedules (k 0 / "chain-0": speculation off), from bench_step_cost on the 2-core AVX2 CPU
# (results/cpu/bench_step_cost.md): there one row decodes with matrix-vector products, which any
# second token per row turns into a slower matrix product, so speculation only pays from 2 rows up;
# at 8 rows prompt lookup gains most with k 1, the draft about breaks even with k 1.
PL_BY_LOAD = {1: 0, 2: 2, 8: 1}
DRAFT_BY_LOAD = {1: 0, 2: 1}
# Budgets by load (draft tokens verified per step, all rows together; specdec.budget), from
# bench_step_cost on the 2-core AVX512 CPU: at 8 rows prompt lookup k 1 gained most with the 2
# likeliest draft tokens of the batch (10 tokens a step instead of 16); below 8 rows, no cap.
BUDGET_BY_LOAD = {"prompt_lookup": {1: 16, 8: 2}}
PROPOSERS = ("prompt_lookup", "draft", "medusa", "eagle")


def tree_label(paths: list) -> str:
    """A Medusa tree's paths by their built-in name if they have one, else ``searched-N`` (N nodes, root included)."""
    spec = load_spec(paths)
    return next((name for name, builtin in BUILTIN_TREES.items() if builtin == spec), f"searched-{len(spec) + 1}")


def schedule_label(value, searched: str) -> str:
    """``{1: 4, 8: 2}`` -> ``"1:4,8:2"`` (the CLI's by-load form), the searched tree's file as "searched",
    a tree's paths by :func:`tree_label`, no budget (None) as "none"."""
    def name(v) -> str:
        return ("searched" if v == searched else "none" if v is None else tree_label(v) if isinstance(v, list)
                else str(v))
    return ",".join(f"{r}:{name(v)}" for r, v in sorted(value.items())) if isinstance(value, dict) else name(value)


def medusa_variant(lookup: int, vocab: int | None) -> str:
    """Label suffix of a Medusa variant: K prompt-lookup tokens beside the tree, a head vocabulary of N tokens
    (0: every token; None: the heads' default)."""
    return (f" + lookup {lookup}" if lookup else "") + ("" if vocab is None else f", head vocab {vocab or 'all'}")


def round_ratios(row: dict, base: dict, kind: str = "") -> np.ndarray:
    """``[rounds]``: ``row``'s tokens/s over ``base``'s within each timing round (``kind="decode_"``:
    with the prefills' time left out)."""
    return np.divide(row[f"per_round_{kind}tokens_per_s"], base[f"per_round_{kind}tokens_per_s"])


def tune_rows(args) -> list[int]:
    """Running-row counts to tune for: powers of two up to the most slots (and tuning prompts)."""
    top = min(max(args.slots), 2 * args.tune_prompts)
    return [r for r in (1, 2, 4, 8, 16, 32) if r <= top]


def tune_all(model, args, draft: dict) -> dict:
    """``specdec.tune`` for each proposer of the run, on the HumanEval and ShareGPT prompts that
    follow the benchmark's."""
    n = args.tune_prompts
    prompts = (humaneval_chat_prompts(args.humaneval + n)[args.humaneval:]
               + sharegpt_prompts(args.sharegpt + n)[args.sharegpt:])
    ids = [model.tokenizer.encode_prompt(p, chat=model.tokenizer.chat_template is not None) for p in prompts]
    ids = [i for pair in zip(ids[:n], ids[n:]) for i in pair]  # alternate the sets: every group mixes them
    out = {}
    for name in args.methods:
        start = time.perf_counter()
        spec = tunable()[name]
        widths = args.tune_widths if args.tune_widths and "draft_width" in spec.option_names() else None
        choices = args.tune_choices if spec.tuned == "k" else None
        out[name] = tune(model, name, ids, rows=tune_rows(args), choices=choices, widths=widths,
                         options=draft if name == "draft" else None, progress=print)
        print(f"{name} tuned in {time.perf_counter() - start:.0f} s: {out[name].options}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="registry name, GGUF file or HF directory")
    parser.add_argument("--precision", default=None, choices=list(PRECISION_POLICIES),
                        help="precision policy (default: highest on CPU, bf16 on GPU/TPU)")
    parser.add_argument("--humaneval", type=int, default=16)
    parser.add_argument("--sharegpt", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--slots", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--draft", default=None, help="draft model for the draft proposer (default: the bundled one)")
    parser.add_argument("--results-name", default="bench_batch",
                        help="study name: the results (.json, .md, .png) go to "
                        "experiments/results/<name>/<machine>-<date>/")
    parser.add_argument("--methods", nargs="+", default=list(PROPOSERS), choices=PROPOSERS,
                        help="speculative proposers to run; autoregressive always runs: it is the reference")
    parser.add_argument("--schedules", nargs="+", default=["fixed", "by-load", "budget", "tuned"],
                        choices=["fixed", "by-load", "budget", "tuned"],
                        help="each proposer with its one k or tree (fixed), with its by-load schedule, with "
                             "that schedule plus its budget by load (proposers in BUDGET_BY_LOAD), and with the "
                             "schedule specdec.tune measures on this machine at the start (tuned)")
    parser.add_argument("--tune-prompts", type=int, default=4,
                        help="tuned: HumanEval and as many ShareGPT prompts to tune on (after the benchmark's)")
    parser.add_argument("--tune-choices", type=int, nargs="+",
                        help="tuned: k values to try (proposers with a k; default: specdec.tune's)")
    parser.add_argument("--tune-widths", type=int, nargs="+",
                        help="tuned: draft widths to try with each k and pick by load (draft, eagle, prompt_lookup; "
                             "default: not tuned)")
    parser.add_argument("--medusa-lookup", type=int, nargs="+", default=[0],
                        help="Medusa with this many prompt-lookup tokens beside its tree (0: none), one variant each")
    parser.add_argument("--head-vocab", type=int, nargs="+", default=[None],
                        help="Medusa heads proposing only the N tokens they were most often trained on (0: every "
                             "token; default: the heads' own default), one variant each (crossed with --medusa-lookup)")
    parser.add_argument("--eagle-k", type=int, nargs="+", default=[1],
                        help="the feature draft (method eagle, the bundled one) with k draft tokens per step, one "
                             "variant each; no by-load schedule")
    parser.add_argument("--admissions", nargs="+", default=["merged"], choices=["merged", "alone"],
                        help="at more than 1 slot, admit requests merged into a step of the running rows "
                             "(generate's merge_admissions=True, the default) and/or prefilled alone, a run each")
    parser.add_argument("--repeats", type=int, default=1,
                        help="timed rounds; each round times every configuration once, in turn")
    args = parser.parse_args()
    pyplot()  # fail now, not after the run, without matplotlib

    model = specdec.load(args.model, precision=args.precision)
    tok = model.tokenizer
    prompts = humaneval_chat_prompts(args.humaneval) + sharegpt_prompts(args.sharegpt)
    ids = [tok.encode_prompt(p, chat=tok.chat_template is not None) for p in prompts]  # a base model: raw text
    draft = dict(draft=specdec.load(args.draft)) if args.draft else {}
    searched = searched_by_load = None  # Medusa's trees (its heads exist for the bundled model only)
    if "medusa" in args.methods:
        heads_dir = heads_for(model, None)[1]
        searched, searched_by_load = default_tree(heads_dir), default_trees(heads_dir)
        if not isinstance(searched_by_load, dict):  # one tree for every load: Medusa by load is Medusa fixed
            searched_by_load = None
            print(f"{heads_dir}/tree.json holds one tree for every load: no Medusa by-load rows", flush=True)
    tuned = tune_all(model, args, draft) if "tuned" in args.schedules else {}
    # (label, generate options, slots it runs at): each proposer with one k / tree, and by load
    methods = [("autoregressive", {}, args.slots)]
    proposers = [("prompt_lookup", "", dict(k=4), dict(k=PL_BY_LOAD)),
                 ("draft", "", dict(k=4, **draft), dict(k=DRAFT_BY_LOAD, **draft))]
    proposers += [("medusa", medusa_variant(k, v), dict(tree=searched, **extra), dict(tree=searched_by_load, **extra))
                  for k in args.medusa_lookup for v in args.head_vocab
                  for extra in [dict(lookup=k, head_vocab=v)]]
    proposers += [("eagle", f" k={k}" if len(args.eagle_k) > 1 else "", dict(k=k), dict(k=None)) for k in args.eagle_k]
    for name, variant, fixed, schedule in proposers:
        if name not in args.methods:
            continue
        label = name + variant
        if "fixed" in args.schedules:
            methods.append((label, dict(method=name, **fixed), args.slots))
        by_load = next(iter(schedule.values()))  # the k or tree by running rows (None: one for every load)
        varied = [] if by_load is None else [s for s in args.slots if s >= min(r for r in by_load if r > 1)]
        if "by-load" in args.schedules and varied:
            methods.append((f"{label} by load", dict(method=name, **schedule), varied))
        if "budget" in args.schedules and name in BUDGET_BY_LOAD:
            methods.append((f"{label} by load + budget", dict(method=name, **schedule, budget=BUDGET_BY_LOAD[name]),
                            varied))
    methods += [(f"{name} tuned", dict(method=name, **t.options, **(draft if name == "draft" else {})), args.slots)
                for name, t in tuned.items()]
    configs = [(label, dict(method, merge_admissions=mode == "merged"), slots, mode if slots > 1 else "")
               for label, method, slots_run in methods for slots in slots_run
               for mode in (args.admissions if slots > 1 else args.admissions[:1])]
    for label, method, slots, _ in configs:  # compile every shape each configuration meets, before any timing
        out = specdec.generate(model, ids, max_new_tokens=args.new_tokens, slots=slots, **method)
        if label == "autoregressive" and slots == min(args.slots):  # at 1 slot: each prompt alone
            alone = out
    walls, prefills, outputs = [[] for _ in configs], [[] for _ in configs], [None] * len(configs)
    for round_ in range(args.repeats):  # configurations in turn, from a rotating start: drift hits all alike
        for i in np.roll(np.arange(len(configs)), -round_):
            label, method, slots, _ = configs[i]
            start = time.perf_counter()
            res = specdec.generate(model, ids, max_new_tokens=args.new_tokens, slots=slots, **method)
            walls[i].append(time.perf_counter() - start)
            prefills[i].append(res[0].stats.prefill_s)
            outputs[i] = res
            print(f"round {round_ + 1}/{args.repeats}: {label} at {slots} slots, {walls[i][-1]:.1f} s", flush=True)
    rows = []
    for (label, method, slots, admissions), res, wall, prefill in zip(configs, outputs, walls, prefills):
        same = equivalence_summary(model, ids, res, alone)
        s = res[0].stats
        choice = method.get("k", method.get("tree"))
        budget, width = method.get("budget"), method.get("draft_width")
        rows.append({"method": label, "k_or_tree": "" if choice is None else schedule_label(choice, searched),
                     "width": "" if width is None else schedule_label(width, searched),
                     "budget": "" if budget is None else schedule_label(budget, searched),
                     "options": {"slots": slots, "method": method.get("method", "autoregressive"),
                                 **({} if choice is None else {"k" if "k" in method else "tree": choice}),
                                 **({} if budget is None else {"budget": budget}),
                                 **{o: method[o] for o in ("draft_width", "lookup", "head_vocab")
                                    if method.get(o) is not None}},
                     "slots": slots, "admissions": admissions,
                     "tokens_per_s": s.new_tokens / float(np.median(wall)),
                     "per_round_tokens_per_s": [s.new_tokens / w for w in wall],
                     "prefill_s": prefill, "prefill_share": float(np.median(np.divide(prefill, wall))),
                     "per_round_decode_tokens_per_s": [s.new_tokens / (w - p) for w, p in zip(wall, prefill)],
                     "accepted_per_forward": s.accepted_per_forward, "target_forwards": s.target_forwards,
                     "slot_utilisation": float(np.mean(s.slot_utilisation)), "new_tokens": s.new_tokens,
                     "wall_s": wall, "equivalence": same["equivalence"], "worst_gap": same["worst_gap"],
                     "rows_identical": f"{same['rows_identical']}/{len(ids)}"})
    for row in rows:
        base = row["method"].split(" by load")[0].removesuffix(" tuned")  # over the base method at 1 slot
        one = next((r for r in rows if r["method"] == base and r["slots"] == 1), None)
        ar = next(r for r in rows if r["method"] == "autoregressive" and r["slots"] == row["slots"]
                  and r["admissions"] == row["admissions"])
        row["x_vs_1_slot"] = "" if one is None else float(np.median(round_ratios(row, one)))
        row["decode_x_vs_1_slot"] = "" if one is None else float(np.median(round_ratios(row, one, "decode_")))
        vs_ar = round_ratios(row, ar)
        row["x_vs_autoregressive"] = float(np.median(vs_ar))
        row["x_vs_ar_range"] = f"{vs_ar.min():.3g}-{vs_ar.max():.3g}"
        print({k: v for k, v in row.items() if k != "options"}, flush=True)
    notes = ["tokens_per_s = all generated tokens / median wall time of the pool run over "
             f"{args.repeats} timed round(s), prefills included",
             "x_vs_1_slot, x_vs_autoregressive: median over the rounds of the ratio within a round (configurations "
             "are timed in turn within each round); x_vs_ar_range: its lowest and highest round",
             "prefill_share: the prompts' prefills' share of the wall time (stats.prefill_s: the first rows, then "
             "one prefill per admitted request, each waited for; a merged admission's time includes the step of "
             "the running rows it rides in); decode_x_vs_1_slot: as x_vs_1_slot with the prefills' time left out "
             "of both runs",
             "admissions (more than 1 slot): merged = a request admitted while rows run is prefilled in the same "
             "target forward as one step of those rows (the pool's default); alone = prefilled by itself first; "
             "x_vs_autoregressive compares rows of the same admissions",
             "k_or_tree: draft tokens per step, or the Medusa tree; ROWS:VALUE,... = by load (picked at each "
             "chunk's start from the rows running then; `k={1: 4, 4: 2}` in the API)",
             "budget: draft tokens verified per step, all rows together (the proposer's likeliest; "
             "specdec.budget), by load like k; blank: no cap",
             "width: draft_width (candidates per depth), by load like k; blank: 1",
             "x_vs_1_slot of a by-load or tuned row: over its base method at 1 slot (the same proposer there); "
             "blank without a 1-slot run",
             *(["tuned: k / tree, width and budget by load measured fastest on this machine at the start of the run "
                f"(specdec.tune, rows {tune_rows(args)}, on {args.tune_prompts} + {args.tune_prompts} other "
                "prompts); the measurements are under 'tuning' in the JSON"] if tuned else []),
             f"equivalence: against autoregressive at {min(args.slots)} slot(s)"
             + (", i.e. each prompt alone" if min(args.slots) == 1 else " through the same pool"),
             "worst_gap: largest |logit gap| between the two choices where a row first diverges (blank: none "
             "diverged at a token); under 1e-3 the checker calls it a numerical tie",
             "targets: speculative at 8 slots >= 3x the same proposer at 1 slot, and >= autoregressive at 8 slots"]
    write_results(args.results_name, {
        "model": f"{args.model} (precision {precision_name(model.config)}); bundled draft, feature draft, "
                 "Medusa heads and searched tree" + (f" (draft: {args.draft})" if args.draft else ""),
        **cost_curve_record(model),
        "prompts": f"{args.humaneval} HumanEval + {args.sharegpt} held-out ShareGPT chat prompts, greedy, "
                   f"through the request pool", "max_new_tokens": args.new_tokens, "rows": rows, "notes": notes,
        "tuning": {name: {"options": t.options, "measurements": t.rows} for name, t in tuned.items()},
    }, ["method", "k_or_tree", "width", "budget", "slots", "admissions", "tokens_per_s", "x_vs_1_slot",
        "x_vs_autoregressive", "x_vs_ar_range", "prefill_share", "decode_x_vs_1_slot", "accepted_per_forward",
        "target_forwards", "slot_utilisation", "equivalence", "worst_gap", "rows_identical"])
    series = {}
    for label, _, _ in methods:
        for mode in args.admissions:
            mine = [r for r in rows if r["method"] == label and r["admissions"] in ("", mode)]
            name = label if len(args.admissions) == 1 else f"{label}, admissions {mode}"
            series[name] = ([r["slots"] for r in mine], [r["tokens_per_s"] for r in mine])
    save_plot(args.results_name, series, xlabel="batch slots", ylabel="tokens/s (all requests)",
              title="Request pool throughput on SmolLM2-135M-Instruct, greedy", logx=True)
    print(*notes, sep="\n")


if __name__ == "__main__":
    specdec.use_compile_cache()  # before the first compile
    main()
