"""How Medusa heads for SmolLM2 improve with more training data, and how much data 2.5 tokens per forward would need.

Trains heads exactly as reference heads (default: the bundled) were trained (the
config recorded in their ``medusa_config.json``) on the first 1/2, 1/4, ... of
their training rows (``rows_from``), keeping the same held-out rows; then, for
each set and the reference heads (every row), with every set ranking its
``--head-vocab`` most trained-on tokens:

- top1 / top5: held-out accuracy per head (:func:`training.medusa.heldout_accuracy`);
- cross_N: greedy tokens per target forward of the N-node tree of the rank paths
  that held most often on every other held-out reply, replayed on the rest
  (:func:`training.rank_trees.cross_tokens_per_forward`, as
  ``medusa_tree_ceiling.py``); cross_all keeps every path seen (the ceiling of
  trees of any size with those heads).

A least-squares line of each cross column against log2(training positions)
gives its gain per doubling of the data and, if that trend held, the positions
at which it would reach ``--goal`` tokens per forward; the plot shows the cross
columns against the training positions. No timing: training runs
report their wall time only.

    .venv/bin/python experiments/heads_data_scaling.py [--fractions 0.03125 0.0625 0.125 0.25 0.5] [--heads DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

import numpy as np

from record_results import pyplot, save_plot, write_results
import specdec
from heads.bundled import heads_for
from heads.medusa import head_vocab_ids, read_metadata
from training.medusa import heldout_accuracy
from heads.tree_search import top1_top5
from specdec.fetch import cache_dir
from training.feature_draft import FeatureRows
from training.loop import load_arrays, run_dir_of
from training.medusa import HeadsTrainConfig, train_heads
from training.rank_trees import cross_tokens_per_forward, heads_heldout_ranks

TREES = {"cross_15": 15, "cross_63": 63, "cross_255": 255, "cross_all": 1_000_000}
MAX_RANK = 4096  # every rank the heads can propose: cross_all keeps every path seen


def subset_rows(rows_from: Path, n_rows: int, out: Path) -> Path:
    """A feature-draft work directory at ``out`` with the first ``n_rows`` training rows of ``rows_from``
    and the same held-out rows (linked); kept when already written."""
    train = out / "features-train.npz"
    if not train.exists():
        out.mkdir(parents=True, exist_ok=True)
        rows = load_arrays(rows_from / "features-train.npz", FeatureRows)
        np.savez(out / "partial.npz", **{k: v[:n_rows] for k, v in rows._asdict().items()})
        os.replace(out / "partial.npz", train)
    heldout = out / "features-heldout.npz"
    if not heldout.exists():
        heldout.symlink_to((rows_from / "features-heldout.npz").resolve())
    return out


def measure(lm, heads_dir: Path, head_vocab: int) -> dict:
    """Held-out top-1 / top-5 per head and the cross-replayed tokens per forward of each size in TREES."""
    heads, heads_dir = heads_for(lm, heads_dir)
    topk = heldout_accuracy(lm, heads, heads_dir, head_vocab_ids(lm, head_vocab, heads_dir))
    replies, _ = heads_heldout_ranks(lm, heads_dir, MAX_RANK, head_vocab=head_vocab)
    training = read_metadata(heads_dir)["training"]
    row = {"train_positions": training["train_positions"], "steps": training["steps"], **top1_top5(topk)}
    for name, nodes in TREES.items():
        row[name] = round(cross_tokens_per_forward(replies, nodes, MAX_RANK), 3)
    return row


def trend(rows: list[dict], column: str, goal: float) -> dict:
    """Least-squares ``column = a + b * log2(train_positions)`` over ``rows``: the gain per doubling ``b``
    and the positions at which the line reaches ``goal`` (None when it does not rise)."""
    x = np.log2([r["train_positions"] for r in rows])
    y = np.asarray([r[column] for r in rows])
    b, a = np.polyfit(x, y, 1)
    return {"column": column, "per_doubling": round(float(b), 4),
            "positions_for_goal": None if b <= 0 else float(f"{2 ** ((goal - a) / b):.3g}")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--heads", help="reference heads directory (default: the bundled heads)")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.03125, 0.0625, 0.125, 0.25, 0.5],
                        help="shares of the reference heads' training rows to train on (the first rows)")
    parser.add_argument("--head-vocab", type=int, default=4096, help="tokens each set ranks (0: every token)")
    parser.add_argument("--goal", type=float, default=2.5, help="tokens per target forward to extrapolate to")
    parser.add_argument("--work-dir", type=Path, default=cache_dir() / "heads-data-scaling",
                        help="where the row subsets and the heads trained on them are kept (reruns reuse them)")
    parser.add_argument("--results-name", default="heads_data_scaling",
                        help="study name: the results (.json, .md) go to "
                        "experiments/results/<name>/<machine>-<date>/")
    args = parser.parse_args()
    if not all(0 < f < 1 for f in args.fractions):
        raise SystemExit(f"--fractions must lie strictly between 0 and 1 (the reference is every row), "
                         f"got {args.fractions}")
    pyplot()  # fail now, not after the training, without matplotlib
    lm = specdec.load("smollm2-135m")
    _, ref_dir = heads_for(lm, args.heads)
    cfg = HeadsTrainConfig(**read_metadata(ref_dir).get("training", {}).get("config", {}))
    if not cfg.rows_from:
        raise SystemExit(f"the heads at {ref_dir} record no training on cached rows (rows_from), so there are no "
                         "rows to take shares of: pass --heads with heads trained by `specdec train-heads --rows-from`")
    rows_from = Path(cfg.rows_from)
    work = run_dir_of(cfg, args.work_dir)  # one folder per reference training config: reruns reuse only its sets
    with np.load(rows_from / "features-train.npz") as f:  # one field read, not the features
        n_rows = len(f["tokens"])
    rows = []
    for fraction in sorted(args.fractions):
        n = max(1, round(fraction * n_rows))
        sub = subset_rows(rows_from, n, work / f"rows-{n}")
        out = work / f"heads-{n}"
        if not (out / "medusa_config.json").exists():  # an interrupted run resumes from its checkpoint
            train_heads(dataclasses.replace(cfg, rows_from=str(sub), out=str(out), work_dir=str(work)))
        rows.append({"heads": f"first {n} of {n_rows} rows", **measure(lm, out, args.head_vocab)})
        print(rows[-1], flush=True)
    rows.append({"heads": f"reference: all {n_rows} rows", **measure(lm, ref_dir, args.head_vocab)})
    print(rows[-1], flush=True)
    trends = [trend(rows, column, args.goal) for column in TREES]
    write_results(args.results_name, {
        "model": f"SmolLM2-135M-Instruct Q4_1 GGUF, dequantized to float32; Medusa heads trained as {ref_dir} "
                 f"({cfg.n_layers} blocks, train_vocab {cfg.train_vocab}, {cfg.epochs:g} epochs, loss {cfg.loss})",
        "prompts": f"training rows: shares of {rows_from}; held-out: its held-out replies (the same for every row)",
        "head_vocab": args.head_vocab, "goal": args.goal, "rows": rows, "trends": trends,
        "notes": [f"every set ranks the {args.head_vocab} tokens it was most often trained on; top1 / top5: heads "
                  "0 .. 3 (tokens t+2 .. t+5)",
                  "cross_N: greedy tokens per target forward (the target's own token included) of the N-node tree "
                  "of the rank paths held most often on every other held-out reply, replayed on the rest (both "
                  "ways); cross_all: every path seen",
                  *(f"{t['column']}: {t['per_doubling']:+.3f} per doubling of the training positions; the line "
                    f"reaches {args.goal} at "
                    + (f"{t['positions_for_goal']:.3g} positions" if t["positions_for_goal"] else "no size")
                    for t in trends),
                  "an extrapolation of a straight line in log(data) over this range, not a measurement; no figure "
                  "here depends on timing"],
    }, ["heads", "train_positions", "steps", "top1", "top5", *TREES])
    positions = [r["train_positions"] for r in rows]
    save_plot(args.results_name, {name: (positions, [r[name] for r in rows]) for name in TREES},
              xlabel="training positions", ylabel="tokens per target forward (cross-replayed)",
              title="Medusa heads: held-out tree acceptance vs training data", logx=True)


if __name__ == "__main__":
    specdec.use_compile_cache()  # before the first compile
    main()
