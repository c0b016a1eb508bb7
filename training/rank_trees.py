"""Trees of draft ranks for a feature draft or Medusa heads, chosen from where the target's tokens ranked
on held-out text.

:func:`training.feature_draft.reply_ranks` (a feature draft) and
:func:`training.medusa.heads_reply_ranks` (Medusa heads) give, for every held-out
reply, the rank of each next token among the candidates at each depth. A tree of
``n`` nodes is then the ``n`` rank paths that most often start a root's ranks
(:func:`path_shares`, :func:`heads.tree_search.frequent_tree`), and
:func:`decoded_tokens_per_forward` replays greedy decoding of the replies with
it: each step accepts the deepest tree path the ranks follow, and the next root
is the token after. That replay, not the average over every root, is what a
decode measures: the roots it visits follow a miss, where the text is harder.
A large tree also fits its own replies (paths seen once), so
:func:`cross_tokens_per_forward` replays trees on replies they were not chosen on.

``specdec draft-tree`` runs :func:`write_draft_trees`, which writes
``tree-<nodes>.json`` for ``method="eagle", tree=...``, and ``specdec heads-tree``
:func:`write_heads_trees`, for ``method="medusa", tree=...`` (``--tree`` on the
command line)."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from heads.tree_search import frequent_tree


def root_paths(ranks: np.ndarray, root: int, max_rank: int) -> Iterator[tuple[int, ...]]:
    """The rank paths that hold from ``root`` in a reply's ``ranks: [n, depth]``, shortest first."""
    path: tuple[int, ...] = ()
    for d in range(min(ranks.shape[1], len(ranks) - root)):
        if ranks[root + d, d] >= max_rank:
            return
        path += (int(ranks[root + d, d]),)
        yield path


def path_shares(replies: Sequence[np.ndarray], max_rank: int) -> dict[tuple[int, ...], float]:
    """``{path: share of roots (every entry of every reply) from which it holds}``."""
    counts: dict[tuple[int, ...], int] = {}
    roots = sum(len(r) for r in replies)
    for ranks in replies:
        for root in range(len(ranks)):
            for path in root_paths(ranks, root, max_rank):
                counts[path] = counts.get(path, 0) + 1
    return {p: c / max(roots, 1) for p, c in counts.items()}


def replay_counts(replies: Sequence[np.ndarray], paths: Sequence[Sequence[int]], max_rank: int) -> tuple[int, int]:
    """(tokens, target forwards) of greedy decoding with the tree of ``paths``, replayed over ``replies``
    from each one's first token to its last: a step accepts the deepest path that holds and is in the
    tree, and adds the target's own token after it."""
    tree = {tuple(p) for p in paths}
    tokens = forwards = 0
    for ranks in replies:  # entry j's token is the reply's (j + 1)-th; the first comes from the prefill
        root = 0
        while root < len(ranks) - 1:
            accepted = 0
            for path in root_paths(ranks, root, max_rank):
                if path not in tree:
                    break
                accepted = len(path)
            tokens, forwards = tokens + min(accepted + 1, len(ranks) - 1 - root), forwards + 1
            root += accepted + 1
    return tokens, forwards


def decoded_tokens_per_forward(replies: Sequence[np.ndarray], paths: Sequence[Sequence[int]],
                               max_rank: int) -> float:
    """Tokens per target forward of the replay (:func:`replay_counts`)."""
    tokens, forwards = replay_counts(replies, paths, max_rank)
    return tokens / max(forwards, 1)


def cross_tokens_per_forward(replies: Sequence[np.ndarray], nodes: int, max_rank: int) -> float | None:
    """Tokens per target forward of ``nodes``-node trees replayed on replies they were not chosen on: the
    tree of every other reply's most frequent paths over the rest, and the other way round (None with
    fewer than two replies). Unlike the replay on the replies that chose the tree, it does not rise with
    paths seen once."""
    if len(replies) < 2:
        return None
    tokens = forwards = 0
    halves = (replies[::2], replies[1::2])
    for chosen_on, replayed in (halves, halves[::-1]):
        t, f = replay_counts(replayed, frequent_tree(path_shares(chosen_on, max_rank), nodes), max_rank)
        tokens, forwards = tokens + t, forwards + f
    return tokens / max(forwards, 1)


def write_draft_trees(lm, draft_dir: str | Path, nodes: Sequence[int], out: str | Path, *, depth: int = 8,
                      max_rank: int = 8) -> list[dict]:
    """Measure the ranks of the feature draft at ``draft_dir`` (for ``lm``, a ``LoadedModel``) on its
    held-out split and write ``out/tree-<n>.json`` for each ``n`` of ``nodes`` (see :func:`write_trees`)."""
    from drafts.saved import read_metadata
    from heads.feature_draft import CONFIG_FILE, load_feature_draft
    from training.feature_draft import FeatureDraftTrainConfig, prepare_data, reply_ranks

    _check_sizes(nodes, max_rank)
    cfg = _recorded_config(FeatureDraftTrainConfig, read_metadata(draft_dir, CONFIG_FILE),
                           f"the feature draft at {draft_dir}", "train it with `specdec train-feature-draft`")
    replies = reply_ranks(load_feature_draft(draft_dir, lm), prepare_data(lm, cfg, "heldout"), depth, max_rank)
    return write_trees(replies, nodes, out, max_rank, {"feature_draft": Path(draft_dir).name})


def write_heads_trees(lm, heads_dir: str | Path, nodes: Sequence[int], out: str | Path, *, max_rank: int = 16,
                      head_vocab: int | None = None) -> list[dict]:
    """As :func:`write_draft_trees`, for the Medusa heads at ``heads_dir`` (see :func:`heads_heldout_ranks`).
    The trees are Medusa tree specs (``method="medusa", tree=FILE``)."""
    _check_sizes(nodes, max_rank)
    replies, about = heads_heldout_ranks(lm, heads_dir, max_rank, head_vocab)
    return write_trees(replies, nodes, out, max_rank, about)


def heads_heldout_ranks(lm, heads_dir: str | Path | None, max_rank: int,
                        head_vocab: int | None = None) -> tuple[list[np.ndarray], dict]:
    """:func:`training.medusa.heads_reply_ranks` of the Medusa heads at ``heads_dir`` (None: the bundled
    ones for ``lm``) on the held-out split of their training run, the heads ranking only their
    ``head_vocab`` most trained-on tokens (None: as their saved search, 0: every token). Returns the
    replies' ranks and what ranked them (heads, head_vocab)."""
    from heads.bundled import default_head_vocab, heads_for
    from heads.medusa import head_vocab_ids, read_metadata
    from specdec.model import head_table
    from training.medusa import HeadsTrainConfig, heads_reply_ranks, heldout_rows

    heads, heads_dir = heads_for(lm, heads_dir)
    cfg = _recorded_config(HeadsTrainConfig, read_metadata(heads_dir),
                           f"the metadata of the Medusa heads at {heads_dir}", "train them with `specdec train-heads`")
    size = default_head_vocab(heads_dir) if head_vocab is None else head_vocab
    replies = heads_reply_ranks(heads, head_table(lm.module), heldout_rows(lm, cfg), max_rank,
                                head_vocab_ids(lm, size, heads_dir))
    return replies, {"heads": Path(heads_dir).name, "head_vocab": size or 0}


def _recorded_config(config_type, metadata: dict, what: str, fix: str):
    """The training config (a ``config_type`` dataclass) recorded in saved ``metadata``: it names the
    held-out split. A clear error naming ``what`` and ending in ``fix`` when there is none."""
    recorded = metadata.get("training", {}).get("config")
    if not recorded:
        raise ValueError(f"{what} records no training config, so its held-out split is unknown: {fix}")
    return config_type(**{f.name: recorded[f.name] for f in fields(config_type) if f.name in recorded})


def _check_sizes(nodes: Sequence[int], max_rank: int) -> None:
    """A clear error unless ``nodes`` lists tree sizes of at least 1 and ``max_rank`` is at least 1."""
    if not nodes or min(nodes) < 1:
        raise ValueError(f"give tree sizes of at least 1 node, got {list(nodes)}")
    if max_rank < 1:
        raise ValueError(f"max_rank must be at least 1 (ranks 0 .. max_rank - 1 are measured), got {max_rank}")


def write_trees(replies: Sequence[np.ndarray], nodes: Sequence[int], out: str | Path, max_rank: int,
                about: dict) -> list[dict]:
    """Write ``out/tree-<n>.json`` for each ``n`` of ``nodes``: the most frequent rank paths of ``replies``
    with the held-out replay of each tree and ``about`` (what ranked). Returns one summary per tree: file,
    nodes (fewer than ``n`` when fewer paths ever held), depth, ``decoded_tokens_per_forward`` (the
    replay), max_rank, ``cross_tokens_per_forward`` (:func:`cross_tokens_per_forward`) and
    ``all_roots_tokens_per_forward`` (1 + the summed shares of its paths)."""
    _check_sizes(nodes, max_rank)
    if not replies:
        raise ValueError("no held-out replies to choose trees from: the held-out split has no reply tokens")
    share = path_shares(replies, max_rank)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in nodes:
        paths = frequent_tree(share, n)
        cross = cross_tokens_per_forward(replies, n, max_rank)
        row = {"file": f"tree-{n}.json", "nodes": len(paths), "depth": max((len(p) for p in paths), default=0),
               "max_rank": max_rank,
               "decoded_tokens_per_forward": round(decoded_tokens_per_forward(replies, paths, max_rank), 4),
               "all_roots_tokens_per_forward": round(1 + sum(share[p] for p in paths), 4),
               "cross_tokens_per_forward": None if cross is None else round(cross, 4),
               "heldout_replies": len(replies), "heldout_tokens": int(sum(len(r) for r in replies)),
               **about, "paths": [list(p) for p in paths]}
        (out / row["file"]).write_text(json.dumps(row, indent=1) + "\n")
        rows.append(row)
    return rows
