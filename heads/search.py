"""Tree search on this device: measured head accuracies x measured step cost -> the best tree.

``search_for_heads`` measures what :func:`heads.trees.search_tree` needs: the
heads' top-k accuracy curve on held-out data (ShareGPT, prepared exactly as in
their training run) and the relative cost of a Medusa step with ``n`` tree
nodes on the current device (one target forward over ``n`` nodes, plus the
heads' own cost), then grows the tree.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from heads.bundled import TREE_FILE
from heads.medusa import MedusaHeads, read_metadata
from specdec.model import head_table
from heads.trees import rank_accuracy, search_tree
from specdec.bench import device_label, forward_time, median_time, target_cost_curve

COST_WIDTHS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128)


def heads_cost(lm, heads: MedusaHeads, repeats: int = 7) -> float:
    """Wall time of the heads' logits + top-k for one row, relative to a one-token target forward."""
    graphdef, state = nnx.split(heads)
    table = head_table(lm.module) if heads.config.shared_lm_head else None
    run = jax.jit(lambda s, h: jax.lax.top_k(nnx.merge(graphdef, s).logits(h, table), 10)[1])
    hidden = jnp.ones((1, lm.config.d_model), jnp.float32)
    run(state, hidden).block_until_ready()
    t_heads = median_time(lambda: run(state, hidden).block_until_ready(), repeats)
    return t_heads / forward_time(lm, 1, repeats=repeats)


def heldout_accuracy(lm, heads: MedusaHeads, heads_dir: Path | None) -> list[list[float]]:
    """Top-1 .. top-10 accuracy per head on the held-out split their training run used."""
    from training.medusa import HeadsTrainConfig, evaluate, prepare_features

    meta = read_metadata(heads_dir) if heads_dir is not None else {}
    cfg = HeadsTrainConfig(**meta.get("training", {}).get("config", {"model": lm.name}))
    return evaluate(heads, head_table(lm.module), prepare_features(lm, cfg, "heldout"))["topk"]


def search_for_heads(lm, heads: MedusaHeads, heads_dir: Path | None, *, max_nodes: int = 64,
                     topk: list[list[float]] | None = None, save: bool = False) -> dict:
    """Measure accuracies (unless ``topk [n_heads, K]`` is given) and costs, search, and (``save``)
    write ``tree.json`` beside the heads."""
    start = time.perf_counter()
    topk = heldout_accuracy(lm, heads, heads_dir) if topk is None else topk
    widths = sorted({w for w in COST_WIDTHS if w <= max_nodes + 1} | {max_nodes + 1})
    curve = target_cost_curve(lm, widths)
    overhead = heads_cost(lm, heads)
    cost = {w: c + overhead for w, c in curve.items()}
    spec, rows = search_tree(rank_accuracy(topk), cost, max_nodes=max_nodes)
    best = max(rows, key=lambda r: r.score)
    result = {"paths": [list(p) for p in spec], "nodes": len(spec), "expected_tokens_per_step": best.expected_tokens,
              "estimated_speedup": best.score, "device": device_label()[1], "heldout_topk_accuracy": topk,
              "target_cost_curve": {str(w): c for w, c in curve.items()}, "heads_relative_cost": overhead,
              "sizes": [r._asdict() for r in rows], "search_s": round(time.perf_counter() - start, 1)}
    if save:
        if heads_dir is None:
            raise ValueError("save=True needs heads loaded from a directory")
        (heads_dir / TREE_FILE).write_text(json.dumps(result, indent=1) + "\n")
    return result


def describe(result: dict) -> str:
    """A short text summary of a search result."""
    acc = np.asarray(result["heldout_topk_accuracy"])
    lines = [f"device: {result['device']}",
             f"held-out accuracy per head (top-1 / top-{min(5, acc.shape[1])}): "
             + ", ".join(f"{a[0]:.2f}/{a[min(4, len(a) - 1)]:.2f}" for a in acc),
             f"heads cost {result['heads_relative_cost']:.2f} x a one-token forward",
             f"best tree: {result['nodes']} nodes (+ root), expected {result['expected_tokens_per_step']:.2f} "
             f"tokens per step, estimated speedup {result['estimated_speedup']:.2f}x",
             f"paths: {json.dumps(result['paths'])}"]
    return "\n".join(lines)
