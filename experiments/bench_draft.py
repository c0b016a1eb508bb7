"""The draft model and the feature draft (EAGLE style) for SmolLM2-135M-Instruct by k, next to prompt
lookup and Medusa (the heads' default tree, and each ``--medusa-trees``), vs autoregressive; the
feature draft also with trees of draft ranks (``--eagle-trees``).

One process, one method at a time (never concurrently), batch 1, greedy, up to
``--new-tokens`` tokens per prompt (EOS ends a row), on HumanEval chat prompts and
held-out ShareGPT first turns together. Each method is compiled for a prompt's
shapes before that prompt is timed. Figures per method:

- acceptance_rate: accepted draft tokens / proposed draft tokens (k per target forward);
- accepted_per_forward: generated tokens (after the first) per target forward;
- tokens_per_s and speedup_vs_autoregressive (same run);
- equivalence: the checker's worst verdict over the prompts (identical / tie / MISMATCH).

The draft is the one bundled for the model (``drafts/smollm2-135m``) unless ``--draft`` (several
directories: each gets its rows, named after the directory, side by side in one run); the
feature draft (``method="eagle"``) the one bundled under ``heads/`` unless ``--feature-draft`` (several
directories: rows for each, likewise).

    .venv/bin/python experiments/bench_draft.py

Keep a run to about ten methods (the defaults make nine): every method keeps its compiled
programs for every prompt shape, and with fifteen methods XLA:CPU's compiler ran out of the
process's memory maps (LLVM "Cannot allocate memory", then a crash) half-way through.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

from record_results import pyplot, save_plot, write_results
import specdec
from drafts.saved import draft_for, read_metadata
from heads.feature_draft import CONFIG_FILE as FEATURE_FILE
from heads.feature_draft import feature_draft_dir
from specdec.bench import cost_curve_record, greedy_summary, timed_generations
from specdec.datasets import humaneval_chat_prompts, sharegpt_prompts


def shown_path(where: Path) -> str:
    """``where`` relative to the working directory when it lies under it."""
    return os.path.relpath(where) if where.resolve().is_relative_to(Path.cwd().resolve()) else str(where)


def labelled(parser: argparse.ArgumentParser, flag: str, dirs: list[Path]) -> bool:
    """Whether ``flag``'s rows carry their directory's name (several directories); fails on a shared name."""
    if len(dirs) > 1 and len({where.name for where in dirs}) < len(dirs):
        parser.error(f"{flag} directories {[str(w) for w in dirs]} share a name; rows are labelled by it")
    return len(dirs) > 1


def lookup_label(tokens: int, chains: int) -> str:
    """Row-name suffix for ``chains`` prompt-lookup chains of ``tokens`` tokens beside a tree ("" without)."""
    return (f" + lookup {tokens}" if tokens else "") + (f"x{chains}" if tokens and chains > 1 else "")


def shape_label(width: int, branches: int) -> str:
    """Row-name suffix for a draft tree's width and branches ("" for a chain)."""
    return (f" width {width}" if width > 1 else "") + (f" branches {branches}" if branches > 1 else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--humaneval", type=int, default=8)
    parser.add_argument("--sharegpt", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--draft", nargs="+", default=[None],
                        help="saved draft directories (default: the bundled one); several: rows for each")
    parser.add_argument("--draft-width", type=int, default=1, help="draft model: candidates per depth")
    parser.add_argument("--draft-branches", type=int, default=1,
                        help="draft model: chains below the root's likeliest children (draft_branches=)")
    parser.add_argument("--draft-lookup", type=int, nargs="+", default=[0],
                        help="draft model: prompt-lookup tokens proposed beside its tree (lookup=), rows for each")
    parser.add_argument("--draft-lookup-width", type=int, default=1,
                        help="draft model: prompt-lookup chains beside its tree (lookup_width=)")
    parser.add_argument("--eagle-ks", type=int, nargs="*", default=[1, 2, 4],
                        help="k of the feature-draft rows (none: no such rows)")
    parser.add_argument("--eagle-width", type=int, default=1, help="feature draft: candidates per depth")
    parser.add_argument("--eagle-branches", type=int, nargs="+", default=[1],
                        help="feature draft: chains below the root's likeliest children (draft_branches=); "
                        "rows for each")
    parser.add_argument("--eagle-lookup", type=int, default=0,
                        help="feature draft: prompt-lookup tokens proposed beside its tree (lookup=)")
    parser.add_argument("--eagle-lookup-width", type=int, default=1,
                        help="feature draft: prompt-lookup chains beside its tree (lookup_width=)")
    parser.add_argument("--eagle-trees", nargs="*", default=[],
                        help="feature-draft rows with these trees of draft ranks (JSON files, e.g. from "
                             "`specdec draft-tree`) instead of a chain of k")
    parser.add_argument("--feature-draft", nargs="+", default=[None],
                        help="saved feature-draft directories (several: rows for each, named after it)")
    parser.add_argument("--medusa-trees", nargs="*", default=[],
                        help="Medusa rows with these trees (built-in names such as tree-64, or JSON files) beside "
                             "the row with the heads' default tree")
    parser.add_argument("--results-name", default="bench_draft", help="study name: the results go to "
                        "experiments/results/<name>/<machine>-<date>/")
    args = parser.parse_args()
    pyplot()  # fail now, not after the run, without matplotlib

    model = specdec.load("smollm2-135m")
    drafts = dict(draft_for(model, path)[::-1] for path in args.draft)  # directory -> loaded draft
    feature_dirs = [feature_draft_dir(model, path) for path in args.feature_draft]
    feature_dirs = feature_dirs if args.eagle_ks or args.eagle_trees else []
    named, fd_named = labelled(parser, "--draft", list(drafts)), labelled(parser, "--feature-draft", feature_dirs)
    methods = {"autoregressive": {},
               **{f"draft k={k}" + shape_label(args.draft_width, args.draft_branches)
                  + lookup_label(lookup, args.draft_lookup_width)
                  + (f" [{where.name}]" if named else ""): dict(
                   method="draft", draft=draft, k=k, draft_width=args.draft_width, draft_branches=args.draft_branches,
                   lookup=lookup, lookup_width=args.draft_lookup_width)
                  for where, draft in drafts.items() for lookup in args.draft_lookup for k in args.ks},
               **{f"eagle k={k}" + shape_label(args.eagle_width, branches)
                  + lookup_label(args.eagle_lookup, args.eagle_lookup_width)
                  + (f" [{where.name}]" if fd_named else ""): dict(
                   method="eagle", feature_draft=str(where), k=k, draft_width=args.eagle_width,
                   draft_branches=branches, lookup=args.eagle_lookup, lookup_width=args.eagle_lookup_width)
                  for where in feature_dirs for branches in args.eagle_branches for k in args.eagle_ks},
               **{f"eagle tree={Path(tree).stem}" + lookup_label(args.eagle_lookup, args.eagle_lookup_width)
                  + (f" [{where.name}]" if fd_named else ""): dict(
                   method="eagle", feature_draft=str(where), tree=tree, lookup=args.eagle_lookup,
                   lookup_width=args.eagle_lookup_width)
                  for where in feature_dirs for tree in args.eagle_trees},
               "prompt_lookup k=4": dict(method="prompt_lookup", k=4), "medusa": dict(method="medusa"),
               **{f"medusa tree={tree}": dict(method="medusa", tree=tree) for tree in args.medusa_trees}}
    tok = model.tokenizer
    prompts = humaneval_chat_prompts(args.humaneval) + sharegpt_prompts(args.sharegpt)
    ids = [tok.encode_prompt(p) for p in prompts]
    results = timed_generations(model, ids, methods, args.new_tokens)
    rows = []
    for name, options in methods.items():
        summary = greedy_summary(model, ids, results[name], results["autoregressive"])
        # chain tokens proposed per forward (Medusa, or a lookup branch beside the chain: no rate)
        k = None if options.get("lookup") else options.get("k")
        rate = (summary["accepted_per_forward"] - 1) / k if k else None
        kept = {o: v for o, v in options.items()
                if o in ("method", "k", "tree", "draft_width", "draft_branches", "lookup", "lookup_width")}
        rows.append({"method": name, "options": kept,
                     "acceptance_rate": rate, **summary,
                     "rows_identical": f"{summary['rows_identical']}/{len(ids)}"})
    base = rows[0]["tokens_per_s"]
    for row in rows:
        row["speedup_vs_autoregressive"] = row["tokens_per_s"] / base
    notes = []
    for where in drafts:
        meta = read_metadata(where)
        held = meta.get("training", {}).get("heldout", {})
        notes.append(f"draft: {shown_path(where)} ({meta['spec']}); held-out greedy acceptance from training "
                     f"{held.get('greedy_accept')}, expected tokens per forward {held.get('expected_per_forward')}")
    notes.append("target: accepted_per_forward >= 2.5 at the best k")
    for where in feature_dirs:
        fd_meta = read_metadata(where, FEATURE_FILE)
        notes.insert(-1, f"feature draft: {shown_path(where)} ({fd_meta['spec']}); held-out greedy acceptance by "
                        f"depth from training {fd_meta.get('training', {}).get('heldout', {}).get('greedy_accept')}")
    write_results(args.results_name, {
        "model": "SmolLM2-135M-Instruct Q4_1 GGUF, dequantized to float32; "
                 + ("bundled draft" if args.draft == [None] else "drafts below")
                 + (", feature draft" if feature_dirs else "") + ", Medusa heads",
        "prompts": f"{args.humaneval} HumanEval + {args.sharegpt} held-out ShareGPT chat prompts, batch 1, greedy",
        **cost_curve_record(model),
        "max_new_tokens": args.new_tokens, "rows": rows, "notes": notes,
    }, ["method", "acceptance_rate", "accepted_per_forward", "tokens_per_s", "speedup_vs_autoregressive",
        "equivalence", "rows_identical"])
    series: dict[str, tuple[list, list]] = {}
    for r in rows:  # one line per draft kind (its name without the k), against k
        if r["options"].get("method") in ("draft", "eagle") and "k" in r["options"]:
            for label, key in (("accepted tokens per forward", "accepted_per_forward"),
                               ("speedup vs autoregressive", "speedup_vs_autoregressive")):
                ks, values = series.setdefault(f"{re.sub(r' k=[0-9]+', '', r['method'])}: {label}", ([], []))
                ks.append(r["options"]["k"])
                values.append(r[key])
    save_plot(args.results_name, series, xlabel="draft tokens per step (k)", ylabel="ratio",
              title="Draft model and feature draft on SmolLM2-135M-Instruct")
    for row in rows:
        print(row)
    print(*notes, sep="\n")


if __name__ == "__main__":
    specdec.use_compile_cache()  # before the first compile
    main()
