"""A static tree of draft ranks drafted by a feature draft: one draft forward per depth.

The tree is a spec in the Medusa format (:mod:`heads.trees`): entry ``d`` of a
path is the rank of the token taken at depth ``d + 1`` among the draft's
candidates after that path's parent, so every node may have children, not only
the chain's tokens as in :func:`drafts.draft_model.draft_tree`. Rank 0 is the
draft's own pick (greedy, or the coupled draw when sampling); ranks 1.. are its
next likeliest tokens. Depth ``d``'s tokens come from the logits of depth
``d - 1``'s nodes; those logits come from one draft forward over every node up
to depth ``d - 1``, each node entering its parent's guessed feature with its own
token under the tree's ancestor mask. The entries are written past the draft's
committed length and never committed: the next step overwrites them.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from drafts.draft_model import pick_draft
from specdec.engine import Proposal, View
from specdec.sampling import Sampling
from specdec.tree import Tree, canonical_paths


def draft_ranked_tree(draft, cache, root_hidden: jax.Array, root_logits: jax.Array, view: View,
                      paths: Sequence[Sequence[int]], sampling: Sampling, rule: str) -> Proposal:
    """Draft the tree of ``paths`` (canonical order, the tree's node order) below the root.

    ``draft``: a merged :class:`heads.feature_draft.FeatureDraft`; ``cache``: its cache whose
    lengths are the committed lengths (the root's entry written); ``root_hidden: [B, d]`` and
    ``root_logits: [B, V]``: that entry's guessed feature and logits. Returns the proposal for
    nodes 1 .. N - 1 (tokens ``[B, N - 1]``, their draft probability as confidence, and under
    rule "rejection" with sampling each node's distribution: its parent's for rank 0, a point
    mass for the others).
    """
    paths = canonical_paths(paths)
    tree = Tree.from_paths(paths)
    depth, parents = tree.depth, np.asarray(tree.parents)
    ranks = np.array([0] + [p[-1] for p in paths])
    has_children = np.isin(np.arange(tree.size), parents[1:])
    length, seeds, b = view.lengths, view.seeds, view.lengths.shape[0]
    sampled = rule == "rejection" and not sampling.greedy
    feats = {0: root_hidden}  # node -> its guessed feature [B, d] (what its children enter)
    prev, logits = np.array([0]), root_logits[:, None]  # nodes with children at the depth above; their logits
    tokens, confidence, probs = [], [], []
    for d in range(1, tree.max_depth + 1):
        at = np.flatnonzero(depth == d)
        width, n = int(ranks[at].max()) + 1, len(prev)
        first, others, q = pick_draft(logits.reshape(b * n, -1), jnp.repeat(seeds, n), jnp.repeat(length + d, n),
                                      sampling, rule, width)
        tops = jnp.concatenate([first[:, None], others], axis=1).reshape(b, n, width)
        q = q.reshape(b, n, -1)
        parent = np.searchsorted(prev, parents[at])  # each node's parent among ``prev``
        node_tokens = tops[:, parent, ranks[at]]  # [B, n_d]
        node_q = q[:, parent]  # [B, n_d, V]
        tokens.append(node_tokens)
        confidence.append(jnp.take_along_axis(node_q, node_tokens[..., None], axis=2)[..., 0])
        if sampled:
            point = jax.nn.one_hot(node_tokens, node_q.shape[-1], dtype=node_q.dtype)
            probs.append(jnp.where((ranks[at] == 0)[None, :, None], node_q, point))
        prev = at[has_children[at]]
        if not len(prev):
            break
        block = np.arange(1, at[-1] + 1)  # every node up to depth d
        run = draft.run(cache, jnp.stack([feats[p] for p in parents[block]], axis=1),
                        jnp.concatenate(tokens, axis=1), length[:, None] + depth[block][None, :] - 1,
                        block_mask=jnp.asarray(tree.ancestors[1:, 1:][:len(block), :len(block)]),
                        logits_at=jnp.broadcast_to(jnp.asarray(prev - 1), (b, len(prev))))
        feats.update({int(node): run.hidden[:, i] for i, node in enumerate(prev)})
        logits = run.logits
    draft_probs = None
    if sampled:
        draft_probs = jnp.concatenate([jnp.zeros_like(probs[0][:, :1])] + probs, axis=1)  # node 0: unused
    return Proposal(tokens=jnp.concatenate(tokens, axis=1), draft_probs=draft_probs,
                    confidence=jnp.concatenate(confidence, axis=1))
