"""Held-out accuracy of several sets of Medusa heads, each ranking the same number of tokens.

For each ``--heads`` directory: per-head top-1 and top-5 accuracy on the held-out
split of that heads' own training run (:func:`training.medusa.heldout_accuracy`; runs
made with the same data settings share it, the ``heldout`` column names it by its
data key), the heads ranking only the ``--head-vocab`` tokens they were most often
trained on (their decoding default; 0: every token). Heads trained with
``--train-vocab N`` rank only those N tokens well, so comparing them with heads
trained over every token is fair over a head vocabulary inside N. No timing.

    .venv/bin/python experiments/heads_heldout_accuracy.py --heads DIR [DIR ...] [--head-vocab 4096]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from record_results import write_results
import specdec
from heads.bundled import heads_for
from heads.medusa import head_vocab_ids, read_metadata
from training.medusa import heldout_accuracy
from heads.tree_search import top1_top5
from training.medusa import HeadsTrainConfig

TRAINING = ("epochs", "n_layers", "train_vocab", "loss", "steps", "train_positions")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--heads", nargs="+", required=True, help="directories of saved heads")
    parser.add_argument("--head-vocab", type=int, default=4096, help="tokens each set ranks (0: every token)")
    parser.add_argument("--results-name", default="heads_heldout_accuracy",
                        help="study name: the results (.json, .md) go to "
                        "experiments/results/<name>/<machine>-<date>/")
    args = parser.parse_args()
    lm = specdec.load("smollm2-135m")
    rows = []
    for path in args.heads:
        heads, heads_dir = heads_for(lm, path)
        training = read_metadata(heads_dir).get("training", {})
        cfg = HeadsTrainConfig(**training.get("config", {}))
        topk = heldout_accuracy(lm, heads, heads_dir, head_vocab_ids(lm, args.head_vocab, heads_dir))
        rows.append({"heads": str(Path(path)), "heldout": cfg.data_key(),
                     **{k: getattr(cfg, k, training.get(k)) for k in TRAINING}, **top1_top5(topk)})
        print(rows[-1], flush=True)
    write_results(args.results_name, {
        "model": "SmolLM2-135M-Instruct Q4_1 GGUF, dequantized to float32; Medusa heads as saved (bfloat16)",
        "prompts": "each heads' training run's held-out split (the heldout column: its data key)",
        "head_vocab": args.head_vocab,
        "rows": rows,
        "notes": [(f"each set ranks only the {args.head_vocab} tokens it was most often trained on (the target's "
                   "EOS kept)" if args.head_vocab else "each set ranks every token")
                  + "; top1 / top5: heads 0 .. 3 (tokens t+2 .. t+5)",
                  "no figure here depends on timing"],
    }, ["heads", "heldout", *TRAINING, "top1", "top5"])


if __name__ == "__main__":
    specdec.use_compile_cache()  # before the first compile
    main()
