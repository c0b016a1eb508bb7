"""Medusa heads as a proposer for the speculative engine.

The proposer's state is the target's final-normed hidden state ``[B, d]`` at
the position just before the root (the one whose logits produced the root).
Each step, the heads turn it into per-head top-k tokens, which fill the tree
spec's nodes; after verification the state becomes the target's hidden state
at the last accepted node of the tree forward, so no extra forward is run.
Candidates are deterministic (top-k), so under lossless tree sampling
(rule "rejection") they are verified as point masses.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from drafts.prompt_lookup import lookup_beside
from heads.bundled import default_head_vocab, default_trees, heads_for
from heads.medusa import MedusaHeads, checked_vocab, head_vocab_ids
from specdec.tree import TreeBuffers, candidate_tokens, load_spec, tree_buffers
from specdec.engine import Commit, Proposal, View, no_proposal
from specdec.method_spec import WithLookup, build_by_load, option, register
from specdec.sampling import Sampling
from specdec.tree import Tree


@dataclass(frozen=True)
class MedusaProposer:
    """Propose a tree from Medusa heads. Params: ``{"heads": heads state, "table": base LM head [V, d] | None,
    "vocab": [N] int32 | None}``; with ``vocab`` the table holds only those tokens' rows ``[N, d]``."""

    commits_any_path = True  # its state is the target's hidden state at the accepted path's end (specdec.union)
    graphdef: nnx.GraphDef
    spec: tuple[tuple[int, ...], ...]

    @cached_property
    def buffers(self) -> TreeBuffers:
        return tree_buffers(self.spec)

    @property
    def tree(self) -> Tree:
        return self.buffers.tree

    def prefill(self, params, tokens, prompt_lens, capacity, hidden: jax.Array) -> jax.Array:
        return jnp.take_along_axis(hidden, (prompt_lens - 1)[:, None, None], axis=1)[:, 0]  # the last prompt token's

    def propose(self, params, hidden: jax.Array, view: View, sampling: Sampling, rule: str):
        if self.tree.size == 1:  # "chain-0": speculation off
            return hidden, no_proposal(hidden.shape[0])
        heads = nnx.merge(self.graphdef, params["heads"])
        logits = heads.logits(hidden, params["table"], self.tree.max_depth)  # [B, depth, V or N]
        best, top = jax.lax.top_k(logits, self.buffers.top_k)
        if params["vocab"] is not None:  # a reduced head vocabulary: back to target ids
            top = params["vocab"][top]
        probs = jnp.exp(best.astype(jnp.float32) - jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1, keepdims=True))
        return hidden, Proposal(tokens=candidate_tokens(top.astype(jnp.int32), self.buffers), draft_probs=None,
                                confidence=candidate_tokens(probs, self.buffers))  # each head's (within vocab)

    def commit(self, params, hidden: jax.Array, commit: Commit) -> jax.Array:
        v = commit.verdict
        last = jnp.take_along_axis(v.path, v.n_accepted[:, None], axis=1)  # [B, 1] last accepted node
        new = jnp.take_along_axis(commit.target.hidden, last[:, :, None], axis=1)[:, 0]
        return jnp.where(commit.active[:, None], new.astype(hidden.dtype), hidden)


def medusa_proposer(target, heads, spec, vocab=None) -> tuple[MedusaProposer, dict]:
    """Check that ``heads`` fit ``target`` (a ``LoadedModel``) and build the proposer and its params.

    vocab: ``[N]`` target token ids the heads may propose (their logits are computed for these only,
    a far cheaper projection than the whole vocabulary; lossless, since the target verifies); None: all.
    """
    from specdec.model import fingerprint, head_table

    base = target.module
    cfg = heads.config
    if cfg.base_fingerprint != fingerprint(base):
        raise ValueError(f"these Medusa heads were trained for base model {cfg.base_model!r}, not for "
                         f"{target.name!r}: load heads trained for this model or train new ones")
    buffers = tree_buffers(spec)
    if buffers.tree.max_depth > cfg.n_heads:
        raise ValueError(f"the tree is {buffers.tree.max_depth} deep but there are only {cfg.n_heads} heads; "
                         f"use a tree of depth <= {cfg.n_heads}")
    graphdef, state = nnx.split(heads)
    table = head_table(base) if cfg.shared_lm_head else None
    if vocab is not None:
        vocab = checked_vocab(vocab, cfg)
        if len(vocab) < buffers.top_k:
            raise ValueError(f"the tree takes each head's top {buffers.top_k} tokens but head_vocab has only "
                             f"{len(vocab)}: pass a larger head_vocab or a narrower tree")
        table = table[vocab]
    spec = tuple(tuple(p) for p in spec)
    return MedusaProposer(graphdef=graphdef, spec=spec), {"heads": state, "table": table, "vocab": vocab}


@register
@dataclass(frozen=True, kw_only=True)
class Medusa(WithLookup):
    """Medusa heads on the target's last hidden state propose a tree, verified with tree attention."""

    name: ClassVar[str] = "medusa"
    summary: ClassVar[str] = "heads on the target's hidden state propose a tree of candidates, verified at once"
    tuned: ClassVar[str] = "tree"
    tune_choices: ClassVar[tuple] = ("chain-0", "chain-1", "chain-2", "tree-8", "tree-16")
    heads: Any = option(None, "Medusa heads directory (default: the bundled heads)", cli=str)
    tree: Any = option(None, "a built-in tree (chain-0..4, tree-8/16/32/64; chain-0: speculation off) or a JSON "
                       "file of paths (default: the searched tree saved with the heads)", cli=str, by_load=True)
    head_vocab: int | None = option(None, "the heads propose only the N tokens they were most often trained on (a "
                                    "cheaper projection; lossless; 0: every token; default: the one the heads' tree "
                                    "was searched with, else their training vocabulary)")

    def build(self, target) -> tuple[Any, Any]:
        heads, heads_dir = self.heads, None
        if not isinstance(heads, MedusaHeads):
            heads, heads_dir = heads_for(target, heads)
        tree = default_trees(heads_dir) if self.tree is None else self.tree  # read beside the heads only then
        head_vocab = default_head_vocab(heads_dir) if self.head_vocab is None else self.head_vocab
        vocab = head_vocab_ids(target, head_vocab, heads_dir)
        return build_by_load(lambda tree: lookup_beside(self, *medusa_proposer(target, heads, load_spec(tree), vocab)),
                             self.budget, tree=tree)
