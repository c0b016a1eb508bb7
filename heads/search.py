"""Tree search on this device: measured head accuracies x measured step cost -> the best tree.

``search_for_heads`` measures what :func:`heads.trees.search_tree` needs: the
heads' top-k accuracy curve on held-out data (ShareGPT, prepared exactly as in
their training run) and the relative cost of a Medusa step with ``n`` tree
nodes on the current device (one target forward over ``n`` nodes, plus the
cost of the heads a tree that deep runs), then grows the tree; optionally for
several batch sizes, since a batched forward turns compute-bound and smaller
trees pay off there.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from heads.bundled import TREE_FILE, default_head_vocab
from heads.medusa import MedusaHeads, head_vocab_ids, read_metadata
from specdec.model import head_table
from heads.trees import rank_accuracy, search_tree
from specdec.bench import device_label, forward_time, median_time, target_cost_curve
from specdec.saved import read_config

COST_WIDTHS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128)


def heads_cost(lm, heads: MedusaHeads, *, batch: int = 1, repeats: int = 7, vocab=None) -> list[float]:
    """``[n_heads + 1]``: wall time of the first ``d`` heads' logits + top-k for ``batch`` rows, relative
    to a one-token target forward of ``batch`` rows (entry 0: no heads, 0); ``vocab`` ``[N]``: projected
    onto those tokens only (``head_vocab``)."""
    graphdef, state = nnx.split(heads)
    table = head_table(lm.module) if heads.config.shared_lm_head else None
    table = table if vocab is None else table[jnp.asarray(vocab)]
    top = min(10, heads.config.vocab_size if table is None else len(table))
    run = jax.jit(lambda s, h, d: jax.lax.top_k(nnx.merge(graphdef, s).logits(h, table, d), top)[1],
                  static_argnums=2)
    hidden = jnp.ones((batch, lm.config.d_model), jnp.float32)
    step = forward_time(lm, 1, batch=batch, repeats=repeats)
    costs = [0.0]
    for d in range(1, heads.config.n_heads + 1):
        run(state, hidden, d).block_until_ready()
        costs.append(median_time(lambda: run(state, hidden, d).block_until_ready(), repeats) / step)
    return costs


def heldout_accuracy(lm, heads: MedusaHeads, heads_dir: Path | None, vocab=None) -> list[list[float]]:
    """Top-1 .. top-10 accuracy per head on the held-out split their training run used (ranking only
    the tokens of ``vocab`` when given)."""
    from training.medusa import HeadsTrainConfig, evaluate, prepare_features

    meta = read_metadata(heads_dir) if heads_dir is not None else {}
    cfg = HeadsTrainConfig(**meta.get("training", {}).get("config", {"model": lm.name}))
    try:
        data = prepare_features(lm, cfg, "heldout")
    except FileNotFoundError as e:  # rows_from: another run's cache, absent on this machine
        raise FileNotFoundError(f"{e}; or reuse the accuracies saved with the heads: "
                                f"--accuracy-from {Path(heads_dir) / TREE_FILE}") from None
    return evaluate(heads, head_table(lm.module), data, vocab=vocab)["topk"]


def top1_top5(topk: list[list[float]]) -> dict[str, str]:
    """``topk [n_heads, K]`` accuracies (K >= 5) as results columns: ``{"top1": "h0 / h1 / ...", "top5": ...}``."""
    return {f"top{k}": " / ".join(f"{acc[k - 1]:.3f}" for acc in topk) for k in (1, 5)}


def search_for_heads(lm, heads: MedusaHeads, heads_dir: Path | None, *, max_nodes: int = 64,
                     topk: list[list[float]] | None = None, rows: tuple[int, ...] = (1,),
                     head_vocab: int | None = None, save: bool = False) -> dict:
    """Measure accuracies (unless ``topk [n_heads, K]`` is given) and, for each batch of ``rows``
    running rows, the costs; search one tree per batch size; (``save``) write ``tree.json`` beside
    the heads. The top-level ``paths`` are the tree for ``rows[0] = 1`` row; ``by_load`` holds every
    batch size's tree (the default by-load schedule, see :func:`heads.bundled.default_tree`).
    ``head_vocab``: heads that propose only the N tokens they were most often trained on (accuracies and
    costs measured so; recorded, and then the heads' default; None: their default, 0: every token)."""
    rows = tuple(sorted(set(int(r) for r in rows)))
    if not rows or rows[0] != 1:
        raise ValueError(f"rows (batch sizes to search for) must include 1, got {list(rows)}")
    start = time.perf_counter()
    if head_vocab is None:  # as the heads decode by default
        head_vocab = default_head_vocab(heads_dir)
    vocab = head_vocab_ids(lm, head_vocab, heads_dir)
    topk = heldout_accuracy(lm, heads, heads_dir, vocab) if topk is None else topk
    widths = sorted({w for w in COST_WIDTHS if w <= max_nodes + 1} | {max_nodes + 1})
    by_load = []
    for r in rows:
        curve = target_cost_curve(lm, widths, batch=r)
        heads_by_depth = heads_cost(lm, heads, batch=r, vocab=vocab)
        spec, sizes = search_tree(rank_accuracy(topk), curve, max_nodes=max_nodes, depth_cost=heads_by_depth)
        best = max(sizes, key=lambda s: s.score)
        by_load.append({"rows": r, "paths": [list(p) for p in spec], "nodes": len(spec),
                        "expected_tokens_per_step": best.expected_tokens, "estimated_speedup": best.score,
                        "target_cost_curve": {str(w): c for w, c in curve.items()},
                        "heads_relative_cost_by_depth": heads_by_depth, "sizes": [s._asdict() for s in sizes]})
    result = {**{k: v for k, v in by_load[0].items() if k != "rows"}, "device": device_label()[1],
              "heldout_topk_accuracy": topk, "head_vocab": head_vocab, "by_load": by_load,
              "search_s": round(time.perf_counter() - start, 1)}
    if save:
        if heads_dir is None:
            raise ValueError("save=True needs heads loaded from a directory")
        (heads_dir / TREE_FILE).write_text(json.dumps(result, indent=1) + "\n")
    return result


def saved_accuracies(path: str | Path, fix: str) -> tuple[list, int | None]:
    """The held-out top-k head accuracies (``[heads, k]``) and their head vocabulary recorded in a
    ``tree.json`` from ``specdec search-tree --save``; a clear error, ending in ``fix``, without them."""
    path = Path(path)
    saved = read_config(path.parent, path.name, what="tree search",
                        fix="pass a tree.json written by `specdec search-tree --save`")
    if saved.get("heldout_topk_accuracy") is None:
        raise ValueError(f"{path} records no heldout_topk_accuracy; {fix}")
    return saved["heldout_topk_accuracy"], saved.get("head_vocab")


def describe(result: dict) -> str:
    """A short text summary of a search result."""
    acc = np.asarray(result["heldout_topk_accuracy"])
    lines = [f"device: {result['device']}", f"head vocabulary: {result.get('head_vocab') or 'every token'}",
             f"held-out accuracy per head (top-1 / top-{min(5, acc.shape[1])}): "
             + ", ".join(f"{a[0]:.2f}/{a[min(4, len(a) - 1)]:.2f}" for a in acc),
             "heads cost by depth 1.. (x a one-token forward of 1 row): "
             + ", ".join(f"{c:.2f}" for c in result["heads_relative_cost_by_depth"][1:])]
    for load in result["by_load"]:
        lines += [f"{load['rows']} rows: best tree {load['nodes']} nodes (+ root), expected "
                  f"{load['expected_tokens_per_step']:.2f} tokens per step, estimated speedup "
                  f"{load['estimated_speedup']:.2f}x; paths {json.dumps(load['paths'])}"]
    return "\n".join(lines)
