"""What one Medusa-1 training step costs with the full vocabulary and with ``train_vocab=N``.

Times :func:`training.medusa.train_step` (forward, backward and AdamW) of the 4
shared-LM-head heads on SmolLM2-135M's LM head, one batch of 256 positions as
``specdec train-heads`` uses by default, for each training vocabulary: the
full one (0) and the N most frequent tokens (the first N rows of the table here;
which rows does not change the cost). The settings are timed in interleaved
rounds on random features (the cost does not depend on the values), each the
median of ``--steps`` steps per round, and reported as milliseconds per step and
as the full vocabulary's step time over theirs.

    .venv/bin/python experiments/bench_heads_train_step.py [--vocabs 0 16384 8192 4096]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from record_results import write_results
import specdec
from heads.medusa import new_heads
from specdec.model import head_table
from training.loop import make_optimizer
from training.medusa import HeadsTrainConfig, train_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocabs", type=int, nargs="+", default=[0, 16384, 8192, 4096],
                        help="training vocabularies (0: every token)")
    parser.add_argument("--steps", type=int, default=10, help="steps timed per setting and round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--results-name", default="bench_heads_train_step",
                        help="study name: the results (.json, .md) go to "
                        "experiments/results/<name>/<machine>-<date>/")
    args = parser.parse_args()
    if 0 not in args.vocabs:
        raise SystemExit("--vocabs must include 0 (the full vocabulary the others are compared with)")
    lm = specdec.load("smollm2-135m")
    cfg = HeadsTrainConfig()
    table = head_table(lm.module)
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(cfg.batch_size, lm.config.d_model)), jnp.float32)
    optimizer = make_optimizer(lr=cfg.lr, total_steps=1000, warmup=cfg.warmup, weight_decay=cfg.weight_decay,
                               clip=cfg.clip)
    runs = {}
    for size in args.vocabs:
        n = size or lm.config.vocab_size
        labels = jnp.asarray(rng.integers(0, n, (cfg.batch_size, cfg.n_heads)), jnp.int32)
        graphdef, params = nnx.split(new_heads(lm.module, base_name="smollm2-135m", n_heads=cfg.n_heads), nnx.Param)
        runs[size] = {"table": table[:n], "labels": labels, "graphdef": graphdef, "params": params,
                      "opt": optimizer.init(params), "times": []}

    def step(run) -> None:
        run["params"], run["opt"], loss, _ = train_step(run["graphdef"], run["params"], run["opt"], run["table"],
                                                        hidden, run["labels"], optimizer=optimizer, decay=cfg.decay)
        jax.block_until_ready(loss)

    for run in runs.values():  # compile
        step(run)
    for _ in range(args.rounds):
        for run in runs.values():
            for _ in range(args.steps):
                start = time.perf_counter()
                step(run)
                run["times"].append(time.perf_counter() - start)
    full = float(np.median(runs[0]["times"]))
    rows = []
    for size, run in runs.items():
        ms = float(np.median(run["times"]))
        rows.append({"train_vocab": size or f"{lm.config.vocab_size} (every token)", "ms_per_step": round(ms * 1e3),
                     "speedup": round(full / ms, 2)})
        print(rows[-1], flush=True)
    write_results(args.results_name, {
        "model": "SmolLM2-135M-Instruct (float32 LM head); 4 Medusa heads, 1 residual block each, shared LM head, "
                 "float32 training",
        "prompts": "none: random features and labels (the cost does not depend on them)",
        "rows": rows,
        "notes": [f"one train_step (forward, backward, AdamW) on {cfg.batch_size} positions; median of "
                  f"{args.steps * args.rounds} steps per setting, {args.rounds} interleaved rounds of {args.steps}",
                  "speedup: the full vocabulary's median step time over this setting's, measured in the same run"],
    }, ["train_vocab", "ms_per_step", "speedup"])


if __name__ == "__main__":
    specdec.use_compile_cache()  # before the first compile
    main()
