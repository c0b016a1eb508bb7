"""How many tokens per target forward Medusa trees of any size reach with SmolLM2 heads (default: the bundled).

The heads' ranks of the target's greedy tokens on the held-out replies of their
training run (:func:`training.medusa.heads_reply_ranks`; the heads rank their
default head vocabulary) give, for each tree size N (drafts besides the root):

- frequent: the N rank paths that held most often on those replies
  (:func:`heads.tree_search.frequent_tree`), the best N-node tree for them;
- replay_own: greedy decoding of those replies replayed with it
  (:func:`training.rank_trees.decoded_tokens_per_forward`): optimistic for large
  trees, which keep paths seen once;
- all_roots: 1 + the summed shares of its paths (every token as a root);
- replay_cross: trees chosen on every other reply, replayed on the rest
  (:func:`training.rank_trees.cross_tokens_per_forward`): what the tree does on
  replies it was not chosen on;
- grown_replay: the tree ``bench_medusa.py --trees grown-<N+1>`` decodes with
  (grown from the per-head top-1..10 accuracies in the heads' ``tree.json``,
  heads taken as independent), replayed on all the replies.

With ``--max-rank 4096`` every rank the heads can propose counts, so the
largest sizes keep every path ever seen, and replay_cross there estimates (one
two-fold split) how far trees of any size go with these heads on replies they
were not chosen on. Needs the held-out rows of the heads' training run
(``rows_from`` in their ``medusa_config.json``: ``features-heldout.npz`` of the
bundled feature draft's self-distilled data, made again by
``training.feature_draft.prepare_data(lm, cfg, "heldout")`` with the draft's
recorded config, 110 s on a 2-core Xeon). No timing: the figures do not depend
on the machine.

    .venv/bin/python experiments/medusa_tree_ceiling.py [--max-rank 16 4096] [--heads DIR]
"""

from __future__ import annotations

import argparse

import numpy as np

from record_results import write_results
import specdec
from heads.bundled import TREE_FILE, heads_for
from heads.medusa import read_metadata
from heads.tree_search import saved_accuracies
from heads.tree_search import frequent_tree, rank_accuracy
from specdec.tree import grow_tree
from training.rank_trees import cross_tokens_per_forward, decoded_tokens_per_forward, heads_heldout_ranks, path_shares

SIZES = (1, 3, 7, 15, 31, 63, 127, 255, 511, 1023, 4095, 1_000_000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-rank", type=int, nargs="+", default=[16, 4096],
                        help="ranks counted per head (0 .. max-rank - 1), one table part each")
    parser.add_argument("--heads", help="heads directory (default: the bundled heads)")
    parser.add_argument("--results-name", default="medusa_tree_ceiling",
                        help="study name: the results (.json, .md) go to "
                        "experiments/results/<name>/<machine>-<date>/")
    args = parser.parse_args()
    lm = specdec.load("smollm2-135m")
    _, heads_dir = heads_for(lm, args.heads)
    accuracy, _ = saved_accuracies(heads_dir / TREE_FILE, fix="run `specdec search-tree --save`")
    if min(args.max_rank) < 1:
        raise SystemExit(f"--max-rank must be at least 1, got {min(args.max_rank)}")
    measured, about = heads_heldout_ranks(lm, heads_dir, max(args.max_rank))
    cfg_rows = read_metadata(heads_dir)["training"]["config"].get("rows_from") or "made again from their config"
    rows = []
    for max_rank in args.max_rank:
        replies = [np.minimum(r, max_rank) for r in measured]
        share = path_shares(replies, max_rank)
        for n in SIZES:
            paths = frequent_tree(share, n)
            grown = grow_tree(rank_accuracy(accuracy), len(paths)) if len(paths) < 4096 else None
            cross = cross_tokens_per_forward(replies, n, max_rank)
            rows.append({"max_rank": max_rank, "nodes": len(paths),
                         "replay_own": round(decoded_tokens_per_forward(replies, paths, max_rank), 3),
                         "replay_cross": None if cross is None else round(cross, 3),
                         "all_roots": round(1 + sum(share[p] for p in paths), 3),
                         "grown_replay": None if grown is None else
                         round(decoded_tokens_per_forward(replies, grown, max_rank), 3)})
            print(rows[-1], flush=True)
            if len(paths) < n:
                break
    write_results(args.results_name, {
        "model": "SmolLM2-135M-Instruct Q4_1 GGUF, dequantized to float32; Medusa heads "
                 f"{args.heads or 'bundled'} (bfloat16), head vocabulary {about['head_vocab']}",
        "prompts": f"the heads' held-out replies: {len(measured)} self-distilled greedy replies "
                   f"({sum(len(r) for r in measured)} tokens), the target's own text",
        "rows": rows,
        "notes": ["nodes: drafts besides the root (a tree of N + 1 nodes); the last size of each max_rank keeps "
                  "every rank path seen at least once",
                  "replay_own: the tree replayed on the replies it was chosen on; replay_cross: chosen on every "
                  "other reply, replayed on the rest (both ways); all_roots: 1 + the summed path shares (every "
                  "token as a root); grown_replay: the grown tree of as many nodes (bench_medusa.py --trees "
                  "grown-<nodes + 1>) replayed on all replies",
                  "tokens per target forward of greedy decoding (the target's own token included); grown_replay "
                  "blank: no tree grown past 4095 nodes",
                  f"held-out rows: read from the heads' rows_from ({cfg_rows}); no figure here depends on timing"],
    }, ["max_rank", "nodes", "replay_own", "replay_cross", "all_roots", "grown_replay"])


if __name__ == "__main__":
    specdec.use_compile_cache()  # before the first compile
    main()
