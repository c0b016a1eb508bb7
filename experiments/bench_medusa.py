"""Medusa heads on SmolLM2-135M-Instruct: every built-in tree and the searched tree vs autoregressive.

One process, one method at a time (never concurrently), batch 1, greedy, up to
``--new-tokens`` tokens per prompt (EOS ends a row), on two prompt sets: the
first ``--humaneval`` HumanEval prompts as chat requests and ``--sharegpt``
held-out ShareGPT first turns. Each method is compiled for a prompt's shapes
before that prompt is timed. Figures per (prompt set, method):

- accepted_per_forward: generated tokens (after the first) per target forward;
- tokens_per_s: the same tokens per second of decode wall time (after the first token);
- speedup_vs_autoregressive: ratio to the autoregressive row of the same set in this run;
- equivalence: the checker's worst verdict over the set (identical / tie / MISMATCH).

Per-head top-1/top-5 accuracies are the held-out figures measured when the heads
were trained (saved with them). The searched tree is the heads' default
(``tree.json``, from ``specdec search-tree --save``). ``--trees grown-N`` is the
N-node tree (root included) of the likeliest paths under the held-out top-k
accuracies in that ``tree.json``, whatever its cost: the most accepted tokens
per forward these heads can expect from N nodes. ``--heads DIR ...`` runs every
tree with each of those heads in turn (default: the bundled heads), to compare
heads trained differently on the same trees.

    .venv/bin/python experiments/bench_medusa.py
"""

from __future__ import annotations

import argparse
import itertools
import os
from pathlib import Path

from record_results import pyplot, save_plot, write_results
import specdec
from heads.bundled import TREE_FILE, default_head_vocab, default_tree, heads_for
from heads.medusa import read_metadata
from heads.tree_search import saved_accuracies
from specdec.tree import grow_tree, load_spec, tree_buffers
from heads.tree_search import rank_accuracy
from specdec.bench import cost_curve_record, greedy_summary, timed_generations
from specdec.datasets import humaneval_chat_prompts, sharegpt_prompts


def tree_named(name: str, heads_dir: Path) -> str | list:
    """``grown-N``: the N-node spec grown from the held-out accuracies in the heads' ``tree.json``;
    any other name (built-in or file) as given."""
    if not name.startswith("grown-"):
        return name
    size = int(name.removeprefix("grown-"))
    if size < 2:
        raise SystemExit(f"{name}: a grown tree needs at least 2 nodes (the root and one draft)")
    accuracy, _ = saved_accuracies(heads_dir / TREE_FILE, fix=f"run `specdec search-tree --save` to grow {name}")
    return grow_tree(rank_accuracy(accuracy), size - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--humaneval", type=int, default=20)
    parser.add_argument("--sharegpt", type=int, default=50)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--trees", nargs="+", default=["chain-2", "chain-4", "tree-8", "tree-16", "tree-32",
                                                       "tree-64"])
    parser.add_argument("--lookup", type=int, nargs="*", default=[],
                        help="also run every tree with a prompt-lookup chain of this many tokens beside it")
    parser.add_argument("--lookup-width", type=int, nargs="+", default=[1],
                        help="prompt-lookup chains (from distinct matches) beside the tree, one run per value")
    parser.add_argument("--head-vocab", type=int, nargs="*", default=[],
                        help="also run every tree with heads that propose only the N tokens they were most often "
                             "trained on (the projection onto N rows instead of the whole vocabulary; 0: every "
                             "token); without: the heads' default")
    parser.add_argument("--heads", nargs="+", default=[None],
                        help="heads directories, every tree run with each (default: the bundled heads)")
    parser.add_argument("--results-name", default="bench_medusa")
    args = parser.parse_args()
    if args.humaneval < 1 and args.sharegpt < 1:
        parser.error("no prompts: give --humaneval N or --sharegpt N (or both) with N >= 1")
    pyplot()  # fail now, not after the run, without matplotlib

    model = specdec.load("smollm2-135m")
    heads_dirs = [heads_for(model, h)[1] for h in args.heads]
    heads_dir = heads_dirs[0]
    searched = default_tree(heads_dir)
    trees = [(t, tree_named(t, heads_dir)) for t in args.trees] + [("searched", searched)]
    if len({d.name for d in heads_dirs}) < len(heads_dirs):
        parser.error("--heads: give directories with distinct names (the rows are labelled by them)")
    named = len(heads_dirs) > 1  # row labels name the heads
    # variants: (lookup tokens, lookup chains, head vocabulary; 0: every token, None: the heads' default);
    # (0, 1, None) is the plain tree
    variants = [(k, w, v) for k, w in [(0, 1)] + [(k, w) for k in args.lookup for w in args.lookup_width]
                for v in [None] + args.head_vocab]
    methods = [("autoregressive", {})] + [
        (_prefix(d, named) + name + _variant(k, w, v),
         dict(method="medusa", heads=str(d), tree=t, lookup=k, lookup_width=w, head_vocab=v))
        for d in heads_dirs for k, w, v in variants for name, t in trees]
    sets = {name: prompts for name, prompts in [("humaneval", humaneval_chat_prompts(args.humaneval)),
                                                ("sharegpt", sharegpt_prompts(args.sharegpt))] if prompts}
    tok = model.tokenizer
    rows = []
    for set_name, prompts in sets.items():
        ids = [tok.encode_prompt(p) for p in prompts]
        results = timed_generations(model, ids, dict(methods), args.new_tokens, progress=f"{set_name}: ")
        for name, method in methods:
            summary = greedy_summary(model, ids, results[name], results["autoregressive"])
            summary["rows_identical"] = f"{summary['rows_identical']}/{len(ids)}"
            branch = (method.get("lookup", 0), method.get("lookup_width", 1))
            nodes = tree_buffers(load_spec(method["tree"])).tree.size + branch[0] * branch[1] if method else 1
            rows.append({"prompts": set_name, "method": "autoregressive" if not method else "medusa",
                         "heads": Path(method["heads"]).name if method else None, "tree": name,
                         "lookup": branch[0], "lookup_width": branch[1],
                         "head_vocab": method.get("head_vocab"), "tree_nodes": nodes, **summary})
        base = next(r for r in rows if r["prompts"] == set_name and r["tree"] == "autoregressive")
        for row in rows:
            if row["prompts"] == set_name:
                row["speedup_vs_autoregressive"] = row["tokens_per_s"] / base["tokens_per_s"]

    training = {d.name: read_metadata(d).get("training", {}) for d in heads_dirs}
    # heads trained over N tokens: their accuracy ranking those (as they decode), else over every token
    accuracy = {name: t.get("heldout_saved_dtype_train_vocab") or t.get("heldout", {}) for name, t in training.items()}
    shown = os.path.relpath(searched) if os.path.isfile(searched) else searched
    notes = [f"searched tree: {shown} ({tree_buffers(load_spec(searched)).tree.size} nodes with the root)"]
    notes += [f"heads {d.name} ({d}), per-head held-out accuracy (from training; ranking their --train-vocab "
              "tokens if trained so, else every token) top-1: "
              + ", ".join(f"{a:.3f}" for a in accuracy[d.name].get("top1", []))
              + "; top-5: " + ", ".join(f"{a:.3f}" for a in accuracy[d.name].get("top5", [])) for d in heads_dirs]
    if named:
        notes.append(f"every heads directory ran the same trees: grown-N and searched are those of {heads_dir.name}")
    if args.lookup:
        notes.append("TREE + lookup K: the tree and a K-token prompt-lookup chain beside it, verified in one forward "
                     "(tree_nodes counts both); lookup KxW: W such chains, copied from the best matches whose "
                     "continuations start with distinct tokens")
    notes.append("head vocabulary of rows without one in their name: the heads' default (tree.json, else their "
                 "training vocabulary), " + ", ".join(f"{d.name} {default_head_vocab(d) or 'every token'}"
                                                      for d in heads_dirs))
    if args.head_vocab:
        notes.append("TREE, head vocab N: the heads propose only the N tokens they were most often trained on "
                     "(head_vocab=N; their projection covers N rows of the LM head, not the whole vocabulary); "
                     "head vocab all: every token")
    write_results(args.results_name, {
        "model": "SmolLM2-135M-Instruct Q4_1 GGUF, dequantized to float32; Medusa heads "
                 + ", ".join(str(d) for d in heads_dirs),
        "prompts": f"{args.humaneval} HumanEval + {args.sharegpt} held-out ShareGPT chat prompts, batch 1, greedy",
        "max_new_tokens": args.new_tokens, "heads_accuracy": accuracy, "rows": rows, "notes": notes,
        **cost_curve_record(model),
    }, ["prompts", "tree", "tree_nodes", "accepted_per_forward", "tokens_per_s", "speedup_vs_autoregressive",
        "equivalence", "rows_identical"])
    series = {}
    for set_name, d, (k, w, v) in itertools.product(sets, heads_dirs, variants):
        label = _prefix(d, named) + set_name + _variant(k, w, v)
        mine = [r for r in rows if r["prompts"] == set_name and r["heads"] == d.name
                and (r["lookup"], r["lookup_width"], r["head_vocab"]) == (k, w, v)]
        searched_row = [r["tree"].removeprefix(_prefix(d, named)).startswith("searched") for r in mine]
        pts = sorted((r["tree_nodes"], r["accepted_per_forward"]) for r, s in zip(mine, searched_row) if not s)
        series[label] = ([p[0] for p in pts], [p[1] for p in pts])
        found = next(r for r, s in zip(mine, searched_row) if s)
        series[f"{label}: searched tree"] = ([found["tree_nodes"]], [found["accepted_per_forward"]])
    save_plot(args.results_name, series, xlabel="tree nodes (with the root)",
              ylabel="accepted tokens per target forward",
              title="Medusa heads on SmolLM2-135M-Instruct, greedy", logx=True)
    for row in rows:
        print(row)
    print(*notes, sep="\n")


def _prefix(heads_dir: Path, named: bool) -> str:
    """Row label prefix naming the heads, when several are compared."""
    return f"{heads_dir.name}: " if named else ""


def _variant(k: int, width: int, vocab: int | None) -> str:
    """Row label suffix: a prompt-lookup branch of K tokens in W chains, and a head vocabulary of N tokens
    (0: every token; None: the heads' default)."""
    return ((f" + lookup {k}" + (f"x{width}" if width > 1 else "") if k else "")
            + ("" if vocab is None else f", head vocab {vocab or 'all'}"))


if __name__ == "__main__":
    specdec.use_compile_cache()  # before the first compile
    main()
