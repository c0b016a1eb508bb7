"""Trees of draft ranks: rank paths, the most frequent tree, the replay (on its own replies and on others)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from heads.tree_search import frequent_tree
from training.rank_trees import cross_tokens_per_forward, decoded_tokens_per_forward, path_shares, replay_counts, \
    root_paths, write_trees

R = 4  # max_rank: "ranked lower"

# one reply of 5 entries, depth 3: row j, column d is the rank at depth d + 1 from root j - d
REPLY = np.array([[0, 9, 9],
                  [1, 0, 9],
                  [0, 2, 1],
                  [R, 0, 0],
                  [0, R, 0]])


def test_root_paths_follow_the_diagonal_and_stop_at_a_miss():
    assert list(root_paths(REPLY, 0, R)) == [(0,), (0, 0), (0, 0, 1)]  # ranks[0,0], ranks[1,1], ranks[2,2]
    assert list(root_paths(REPLY, 1, R)) == [(1,), (1, 2), (1, 2, 0)]
    assert list(root_paths(REPLY, 3, R)) == []  # its own depth-1 token ranked lower
    assert list(root_paths(REPLY, 4, R)) == [(0,)]  # the reply ends


def test_shares_pick_prefix_closed_trees_and_the_replay_counts_steps():
    share = path_shares([REPLY], R)
    assert share[(0,)] == pytest.approx(3 / 5) and share[(1, 2, 0)] == pytest.approx(1 / 5)
    assert all(share[p[:-1]] >= share[p] for p in share if len(p) > 1)
    tree = frequent_tree(share, 3)
    assert tree[0] == (0,) and all(p[:-1] in tree or len(p) == 1 for p in tree)
    # a chain of 3 rank-0 tokens over the reply's 4 tokens after the first: root 0 accepts 2 (3 tokens),
    # root 3 accepts none (1 token): 4 tokens in 2 forwards
    assert decoded_tokens_per_forward([REPLY], [(0,), (0, 0), (0, 0, 0)], R) == pytest.approx(4 / 2)
    # with (0, 0, 1) root 0 accepts 3: all 4 tokens in 1 forward
    assert decoded_tokens_per_forward([REPLY], [(0,), (0, 0), (0, 0, 0), (0, 0, 1)], R) == pytest.approx(4 / 1)
    assert decoded_tokens_per_forward([REPLY], [], R) == 1.0


def test_cross_replay_scores_trees_on_replies_they_were_not_chosen_on():
    """Each half's 1-node tree is its own rank 0 or 1 path, which the other half never follows."""
    zeros, ones = np.zeros((4, 1), int), np.ones((4, 1), int)
    assert replay_counts([zeros], [(0,)], R) == (3, 2)  # root 0 accepts 1 (2 tokens), root 2 the last one
    assert decoded_tokens_per_forward([zeros, ones], frequent_tree(path_shares([zeros, ones], R), 2), R) == 1.5
    assert cross_tokens_per_forward([zeros, ones], 1, R) == 1.0  # 3 tokens in 3 forwards on each half
    assert cross_tokens_per_forward([zeros, zeros], 1, R) == 1.5
    assert cross_tokens_per_forward([zeros], 1, R) is None  # no half to replay on


def test_write_trees_records_each_tree_and_rejects_bad_sizes(tmp_path):
    rows = write_trees([REPLY, REPLY], [2, 100], tmp_path, R, {"heads": "toy"})
    assert [(r["file"], r["max_rank"], r["heads"]) for r in rows] == [("tree-2.json", R, "toy"),
                                                                       ("tree-100.json", R, "toy")]
    assert rows[1]["nodes"] == len(path_shares([REPLY], R)) < 100  # every path that ever held
    assert json.loads((tmp_path / "tree-2.json").read_text())["paths"] == rows[0]["paths"]
    for bad, match in (([], "at least 1 node"), ([0], "at least 1 node")):
        with pytest.raises(ValueError, match=match):
            write_trees([REPLY], bad, tmp_path, R, {})
    with pytest.raises(ValueError, match="max_rank must be at least 1"):
        write_trees([REPLY], [2], tmp_path, 0, {})
    with pytest.raises(ValueError, match="no held-out replies"):
        write_trees([], [2], tmp_path, R, {})
