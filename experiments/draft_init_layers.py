"""Which target layers should a draft start from? Train the same draft recipe from several layer choices.

Every choice is a full ``specdec train-draft`` run with the same data, loss, schedule and steps
(``DraftTrainConfig`` with only ``layers`` changed, one after another in one process); the
target's distributions are computed once and cached in ``--work-dir``. Figures per choice, on the
held-out split (the target's own greedy replies):

- greedy acceptance at initialisation and after training (the draft's top token is the target's);
- sampling acceptance (sum min(p, q)) and forward KL after training;
- expected tokens per target forward at k = 4 from the greedy acceptance;
- final training loss and wall time of the run.

    .venv/bin/python experiments/draft_init_layers.py --choices 0,1,2,3 0,10,19,29 0,1,2,29 --epochs 1
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from record_results import write_results
import specdec
from training.draft import DraftTrainConfig, train_draft


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--choices", nargs="+", default=["0,1,2,3", "0,10,19,29", "0,1,2,29"],
                        help="comma-separated target layers, one draft per choice (all of one length)")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--conversations", type=int, default=4000)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--loss", default="kl")
    parser.add_argument("--work-dir", default=None, help="cached target distributions and checkpoints")
    parser.add_argument("--results-name", default="draft_init_layers", help="results file name")
    args = parser.parse_args()
    lengths = {len(c.split(",")) for c in args.choices}
    if len(lengths) != 1:
        parser.error(f"every --choices entry must name the same number of layers, got {sorted(lengths)}")
    n_layers = lengths.pop()

    rows = []
    with tempfile.TemporaryDirectory() as out:
        try:  # every choice is checked before the first run starts
            configs = [DraftTrainConfig(out=str(Path(out) / c.replace(",", "-")), work_dir=args.work_dir,
                                        n_layers=n_layers, layers=c, vocab_size=args.vocab_size, data="sharegpt",
                                        heldout_data="self-distill", conversations=args.conversations,
                                        epochs=args.epochs, lr=args.lr, loss=args.loss) for c in args.choices]
        except ValueError as err:
            parser.error(str(err))
        for choice, cfg in zip(args.choices, configs):
            m = train_draft(cfg)
            trained = m["heldout_saved_dtype"]
            rows.append({"layers": choice, "greedy_at_init": m["heldout_at_init"]["greedy_accept"],
                         "greedy_accept": trained["greedy_accept"], "sample_accept": trained["sample_accept"],
                         "kl": trained["kl"], "per_forward_k4": trained["expected_per_forward"][4],
                         "final_loss": round(m["final_loss"], 3), "steps": m["steps"],
                         "wall_s": int(round(m["wall_s"])), "train_positions": m["train_positions"],
                         "heldout_positions": m["heldout_positions"]})
            print(rows[-1], flush=True)
    write_results(args.results_name, {
        "model": "SmolLM2-135M-Instruct (target and teacher)",
        "prompts": f"{args.conversations} ShareGPT training conversations; held out: the target's greedy replies",
        "rows": rows,
        "notes": [f"every row: train-draft --n-layers {n_layers} --layers <layers> "
                  f"--vocab-size {args.vocab_size} --data sharegpt --heldout-data self-distill "
                  f"--conversations {args.conversations} --epochs {args.epochs:g} --lr {args.lr:g} --loss {args.loss}",
                  "greedy / sample acceptance, kl: per held-out position, the draft as saved (bfloat16)",
                  "per_forward_k4: 1 + a + ... + a^4 from the greedy acceptance a (positions taken as independent)",
                  "wall_s: the whole run, including the cached target pass where the first run built it"],
    }, ["layers", "greedy_at_init", "greedy_accept", "sample_accept", "kl", "per_forward_k4", "final_loss",
        "steps", "wall_s"])


if __name__ == "__main__":
    specdec.use_compile_cache()  # before the first compile
    main()
