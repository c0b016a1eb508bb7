"""Tree search: measured head accuracies x measured step cost -> the best tree.

:func:`search_tree` assumes a node is accepted when every token on its path is right and that
heads are right independently, each with its measured per-rank accuracy; the expected number of
accepted drafts is then the sum over nodes of the product of the accuracies on their paths. Trees
of each size are grown greedily by that probability (:func:`specdec.tree.grow_tree`), and the size
that maximises expected tokens per step over the measured cost of a step wins.
:func:`frequent_tree` takes the most frequent paths of replayed replies instead
(:mod:`training.rank_trees`).

:func:`search_for_heads` measures the costs on the current device (one target forward over ``n``
nodes, plus the heads a tree that deep runs) for the heads' held-out top-k accuracies (measured by
:func:`training.medusa.heldout_accuracy`, or saved with the heads), optionally for several batch
sizes, since a batched forward turns compute-bound and smaller trees pay off there.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from heads.bundled import TREE_FILE, default_head_vocab
from heads.medusa import MedusaHeads, head_vocab_ids
from specdec import atomic
from specdec.bench import device_label, forward_time, median_time, target_cost_curve
from specdec.model import head_table
from specdec.saved import read_config
from specdec.tree import Spec, canonical_paths, expected_accepted, grow_tree

COST_WIDTHS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128)


def frequent_tree(path_share: Mapping[tuple[int, ...], float], nodes: int) -> Spec:
    """The ``nodes``-node spec of the most frequent paths (``{path: share of steps whose right tokens
    start with it}``, measured jointly, e.g. :func:`training.rank_trees.path_shares`). A path is never
    more frequent than its prefix, so the spec is prefix-closed and the best tree of its size."""
    ranked = sorted(path_share, key=lambda p: (-path_share[p], len(p), p))
    return canonical_paths(ranked[:nodes])


def rank_accuracy(topk_acc: Sequence[Sequence[float]]) -> np.ndarray:
    """Cumulative top-k accuracies ``[n_heads, K]`` (top-1, top-2, ...) -> per-rank accuracies."""
    cum = np.maximum.accumulate(np.asarray(topk_acc, np.float64), axis=1)
    return np.diff(cum, axis=1, prepend=0.0)


class SearchRow(NamedTuple):
    nodes: int  # draft nodes (the tree has nodes + 1 with the root)
    expected_tokens: float  # 1 + expected accepted drafts per step
    relative_cost: float  # cost of a step relative to one autoregressive step
    score: float  # expected_tokens / relative_cost: the estimated speedup


def search_tree(rank_acc: np.ndarray, cost: Callable[[int], float] | Mapping[int, float],
                max_nodes: int = 64, depth_cost: Sequence[float] | None = None) -> tuple[Spec, list[SearchRow]]:
    """The spec with at most ``max_nodes`` drafts that maximises expected tokens per unit of time.

    cost: relative cost of a step whose target forward covers ``n`` tree nodes (root included),
    as a function or a measured ``{n: cost}`` table (interpolated linearly, extrapolated flat).
    depth_cost: ``[n_heads + 1]`` extra cost of a tree ``d`` deep (the ``d`` heads it runs), if any.
    Returns the best spec and the estimate for every size tried.
    """
    if not callable(cost):
        widths = sorted(cost)
        table = [cost[w] for w in widths]
        cost_fn = lambda n: float(np.interp(n, widths, table))  # noqa: E731
    else:
        cost_fn = cost
    rows, specs = [], []
    for n in range(1, max_nodes + 1):
        spec = grow_tree(rank_acc, n)
        tokens = 1.0 + expected_accepted(spec, rank_acc)
        step = cost_fn(n + 1) + (0.0 if depth_cost is None else depth_cost[max(len(p) for p in spec)])
        rows.append(SearchRow(n, tokens, step, tokens / step))
        specs.append(spec)
    best = max(range(len(rows)), key=lambda i: rows[i].score)
    return specs[best], rows


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


def top1_top5(topk: list[list[float]]) -> dict[str, str]:
    """``topk [n_heads, K]`` accuracies (K >= 5) as results columns: ``{"top1": "h0 / h1 / ...", "top5": ...}``."""
    return {f"top{k}": " / ".join(f"{acc[k - 1]:.3f}" for acc in topk) for k in (1, 5)}


def search_vocab(lm, heads_dir: Path | None, head_vocab: int | None) -> tuple[int | None, np.ndarray | None]:
    """``(head_vocab, its token ids [N] or None)`` a search measures with: ``head_vocab``, else the one
    the heads decode with by default (:func:`heads.bundled.default_head_vocab`)."""
    head_vocab = default_head_vocab(heads_dir) if head_vocab is None else head_vocab
    return head_vocab, head_vocab_ids(lm, head_vocab, heads_dir)


def search_for_heads(lm, heads: MedusaHeads, heads_dir: Path | None, topk: list[list[float]], *,
                     max_nodes: int = 64, rows: tuple[int, ...] = (1,), head_vocab: int | None = None,
                     save: bool = False) -> dict:
    """For the heads' held-out top-k accuracies ``topk [n_heads, K]`` and each batch of ``rows``
    running rows, measure the costs; search one tree per batch size; (``save``) write ``tree.json`` beside
    the heads. The top-level ``paths`` are the tree for ``rows[0] = 1`` row; ``by_load`` holds every
    batch size's tree (the default by-load schedule, see :func:`heads.bundled.default_tree`).
    ``head_vocab``: heads that propose only the N tokens they were most often trained on (accuracies and
    costs measured so; recorded, and then the heads' default; None: their default, 0: every token)."""
    rows = tuple(sorted(set(int(r) for r in rows)))
    if not rows or rows[0] != 1:
        raise ValueError(f"rows (batch sizes to search for) must include 1, got {list(rows)}")
    start = time.perf_counter()
    head_vocab, vocab = search_vocab(lm, heads_dir, head_vocab)
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
    result = {**{k: v for k, v in by_load[0].items() if k != "rows"}, "device": device_label(),
              "heldout_topk_accuracy": topk, "head_vocab": head_vocab, "by_load": by_load,
              "search_s": round(time.perf_counter() - start, 1)}
    if save:
        if heads_dir is None:
            raise ValueError("save=True needs heads loaded from a directory")
        atomic.write_text(heads_dir / TREE_FILE, json.dumps(result, indent=1) + "\n")
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
