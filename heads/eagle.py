"""A feature draft (EAGLE style) as a proposer: k drafted tokens per step over the target's features.

State: the draft's KV cache, whose length ``s`` counts the entries written from
true target features, and ``pending [B, span, d]``: the target's features at
positions ``s .. L - 1`` (``L``: the committed length, the root's position),
not yet entered. Each step enters them first, in one draft forward that also
reads each one's next token from the history (the last of them is the root);
the last entry's output drafts the first token. Each further depth enters the
guessed feature with the token just drafted. After verification, the target's
features at the accepted path's nodes become the pending ones, so the entries
written from guesses are overwritten and nothing the target rejected is read.
No extra target forward is run.

``k = 0`` turns speculation off while still entering the features, so a by-load
schedule can switch it back on. ``width > 1`` adds leaf siblings at every depth,
``branches > 1`` a chain below each of the root's likeliest children, drafted as
extra rows over a copy of the draft's cache (see :func:`drafts.draft_model.draft_tree`).
A spec of rank paths (``paths``) drafts any tree instead, one depth per draft forward
(:func:`draft_ranked_tree`).

A static tree of draft ranks drafted by a feature draft: one draft forward per depth.

The tree is a spec in the Medusa format (:mod:`specdec.tree`): entry ``d`` of a
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

from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from drafts.draft_model import draft_chain, draft_tree, pick_draft
from drafts.prompt_lookup import lookup_beside
from heads.feature_draft import FeatureDraft, feature_draft_for
from specdec.cache import KVCache, init_cache
from specdec.engine import Commit, Proposal, View, draft_branches, draft_length, draft_width, no_proposal
from specdec.method_spec import DEFAULT_K, DraftTree, build_by_load, option, register, schedule
from specdec.sampling import Sampling
from specdec.tree import Tree, canonical_paths, load_spec


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


class FeatureState(NamedTuple):
    cache: KVCache  # the draft's cache; ``lengths`` = entries written from target features
    pending: jax.Array  # [B, span, d] target features at positions lengths .. committed length - 1


@dataclass(frozen=True)
class FeatureDraftProposer:
    """Propose with a :class:`heads.feature_draft.FeatureDraft` (``graphdef`` + its params as ``pparams``).
    ``span``: the most features a step can leave pending (``k + 1``; one value for a whole by-load
    schedule, so that its proposers share the state layout)."""

    commits_any_path = True  # it enters the target's features at the accepted path (specdec.union)
    graphdef: nnx.GraphDef
    k: int
    width: int = 1
    span: int = 0
    branches: int = 1
    paths: tuple[tuple[int, ...], ...] = ()  # a tree of draft ranks (a specdec.tree spec) instead of a chain

    @property
    def tree(self) -> Tree:
        return Tree.from_paths(self.paths) if self.paths else draft_tree(self.k, self.width, self.branches)

    def prefill(self, params, tokens: jax.Array, prompt_lens: jax.Array, capacity: int,
                hidden: jax.Array) -> FeatureState:
        draft = nnx.merge(self.graphdef, params)
        b, p = tokens.shape
        res = draft.run(init_cache(draft.config, b, capacity), hidden[:, :p - 1], tokens[:, 1:],
                        jnp.broadcast_to(jnp.arange(p - 1), (b, p - 1)), compute_logits=False)
        last = jnp.take_along_axis(hidden, (prompt_lens - 1)[:, None, None], axis=1)  # pairs with the root
        pending = jnp.zeros((b, self.span, hidden.shape[-1]), hidden.dtype).at[:, :1].set(last)
        return FeatureState(res.cache.with_lengths(prompt_lens - 1), pending)

    def propose(self, params, state: FeatureState, view: View, sampling: Sampling, rule: str):
        draft = nnx.merge(self.graphdef, params)
        start, length = state.cache.lengths, view.lengths
        at = start[:, None] + jnp.arange(self.span)[None, :]
        nexts = jnp.take_along_axis(view.history, jnp.minimum(at + 1, view.history.shape[1] - 1), axis=1)
        newest = jnp.clip(length - start - 1, 0, self.span - 1)[:, None]  # the entry that reads the root
        res = draft.run(state.cache, state.pending, nexts, at, logits_at=newest, compute_logits=self.k > 0)
        cache = res.cache.with_lengths(length)
        if self.k == 0:
            return FeatureState(cache, state.pending), no_proposal(length.shape[0])
        if self.paths:
            return FeatureState(cache, state.pending), draft_ranked_tree(
                draft, cache, res.hidden[:, 0], res.logits[:, 0], view, self.paths, sampling, rule)

        def step(carry, token, position):  # enter (guessed feature, drafted token) at the entry before it
            cache, guess = carry
            out = draft.run(cache, guess[:, None], token[:, None], (position - 1)[:, None])
            return (out.cache.advance(jnp.ones_like(position)), out.hidden[:, 0]), out.logits[:, 0]

        _, prop = draft_chain(step, (cache, res.hidden[:, 0]), res.logits[:, 0], view, self.k, self.width,
                              sampling, rule, self.branches)
        return FeatureState(cache, state.pending), prop

    def commit(self, params, state: FeatureState, commit: Commit) -> FeatureState:
        path = commit.verdict.path[:, :self.span]
        feats = jnp.take_along_axis(commit.target.hidden, path[:, :, None], axis=1)  # the accepted nodes' features
        pending = state.pending.at[:, :path.shape[1]].set(feats.astype(state.pending.dtype))
        return state._replace(pending=jnp.where(commit.active[:, None, None], pending, state.pending))


def feature_draft_proposer(target, draft, *, k=None, width: int = 1, span: int | None = None,
                           branches: int = 1, tree=None) -> FeatureDraftProposer:
    """Check that the feature draft fits ``target`` (a ``LoadedModel``) and build its proposer: a chain
    of ``k`` (with ``width`` candidates per depth and ``branches`` chains, see
    :func:`drafts.draft_model.draft_tree`), or ``tree``, a spec of draft ranks (:func:`specdec.tree.load_spec`)."""
    paths = ()
    if tree is not None:
        if k is not None or width != 1 or branches != 1:
            raise ValueError("give the feature draft either a tree (of draft ranks) or k / draft_width / "
                             "draft_branches, not both")
        paths = tuple(load_spec(tree))
        k = max((len(p) for p in paths), default=0)
    k = draft_length(4 if k is None else k)
    if draft.config.d_model != target.config.d_model or draft.config.vocab_size != target.config.vocab_size:
        raise ValueError(f"this feature draft reads features of width {draft.config.d_model} over "
                         f"{draft.config.vocab_size} tokens; the target has {target.config.d_model} and "
                         f"{target.config.vocab_size}: train a feature draft for this model")
    width = draft_width(width, target.config.vocab_size)
    span = k + 1 if span is None else span
    if span < k + 1:
        raise ValueError(f"span must be >= k + 1 = {k + 1}, got {span}")
    return FeatureDraftProposer(graphdef=nnx.split(draft)[0], k=k, width=width, span=span,
                                branches=draft_branches(branches, target.config.vocab_size), paths=paths)


@register
@dataclass(frozen=True, kw_only=True)
class Eagle(DraftTree):
    """EAGLE-style feature drafts: a one-layer draft on the target's features proposes a chain or a tree."""

    name: ClassVar[str] = "eagle"
    summary: ClassVar[str] = "a one-layer draft on the target's hidden features proposes k tokens or a tree"
    tuned: ClassVar[str] = "k"
    tune_choices: ClassVar[tuple] = (0, 1, 2, 4)
    feature_draft: Any = option(None, "feature draft directory (default: the bundled one)", cli=str)
    k: int | dict | None = option(None, f"draft tokens per step (default {DEFAULT_K}; 0 turns speculation off)",
                                  by_load=True)
    draft_width: int | dict | None = option(None, "candidates per depth (default 1)", by_load=True)
    draft_branches: int | None = option(None, "a chain of k below each of the root's this many likeliest "
                                        "children (default 1)")
    tree: Any = option(None, "a tree of draft ranks instead of k (e.g. from `specdec draft-tree`)", cli=str,
                       by_load=True)

    def __post_init__(self):
        super().__post_init__()
        if self.tree is not None and any(v is not None for v in (self.k, self.draft_width, self.draft_branches)):
            raise ValueError("method 'eagle' takes a tree (of draft ranks) or k / draft_width / draft_branches, "
                             "not both: drop one")

    def build(self, target) -> tuple[Any, Any]:
        draft = self.feature_draft
        if not isinstance(draft, FeatureDraft):
            draft = feature_draft_for(target, draft)  # the bundled one, or one saved by `specdec train-feature-draft`
        params = nnx.state(draft)
        if self.tree is not None:  # a tree of draft ranks, by load or one
            depth = max(max((len(p) for p in load_spec(t)), default=0) for t in schedule(self.tree).values())
            span = max(depth, self.lookup) + 1
            return build_by_load(lambda tree: lookup_beside(
                self, feature_draft_proposer(target, draft, tree=tree, span=span), params), self.budget, tree=self.tree)
        k = DEFAULT_K if self.k is None else self.k
        branches = 1 if self.draft_branches is None else self.draft_branches
        span = max(*schedule(k).values(), self.lookup) + 1  # one state layout for every tree of a by-load schedule
        return build_by_load(lambda k, width: lookup_beside(
            self, feature_draft_proposer(target, draft, k=k, width=width, branches=branches, span=span), params),
            self.budget, k=k, width=1 if self.draft_width is None else self.draft_width)
