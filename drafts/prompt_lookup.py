"""Prompt lookup: a model-free proposer that copies from the row's own context.

Find the most recent earlier occurrence of the context's last n tokens
(n from ``max_ngram`` down to ``min_ngram``, longest match wins) and propose
the k tokens that followed it; with ``width`` > 1, also the continuations of
the next-best matches that start with another token, as sibling chains. Rows
without a match propose padding, which the target simply rejects. Draft tokens
are deterministic, so lossless sampling treats them as point masses.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from specdec.engine import Commit, Proposal, View, draft_length, draft_width, no_proposal, whole_number
from specdec.method_spec import DEFAULT_K, Budgeted, WithLookup, build_by_load, option, register
from specdec.sampling import Sampling, argmax
from specdec.tree import Tree
from specdec.union import UnionProposer, union_tree


def lookup(history: jax.Array, lengths: jax.Array, *, k: int, max_ngram: int, min_ngram: int,
           width: int = 1) -> tuple[jax.Array, jax.Array]:
    """Continuations ``[B, width, k]`` of each row's best earlier matches of its last n-gram, and each
    match's n ``[B, width]`` (0: no match, the continuation is padding).

    Matches rank by n (longest first), then by recency; a match whose first continuation token an
    earlier-ranked one already proposes is skipped, so the ``width`` chains start with distinct tokens.

    Args:
      history: [B, H] tokens by position; positions ``0 .. lengths[b]`` are known.
      lengths: [B] position of each row's newest token.
    """
    b, h = history.shape
    padded = jnp.pad(history, ((0, 0), (0, max_ngram + k)))
    starts = jnp.arange(h)[None, :]
    # matched[b, c]: the longest n whose earlier occurrence ends just before position c (0: none)
    matched = jnp.zeros((b, h), jnp.int32)
    for n in range(min_ngram, max_ngram + 1):
        tail = jnp.take_along_axis(padded, jnp.clip(lengths[:, None] - n + 1 + jnp.arange(n), 0), axis=1)
        match = jnp.ones((b, h), bool)
        for i in range(n):
            match &= padded[:, i:i + h] == tail[:, i:i + 1]
        # an earlier occurrence (not the tail itself) whose continuation starts at a known token
        match &= (starts + n <= lengths[:, None]) & (lengths[:, None] - n + 1 >= 0)
        matched = jnp.where(jnp.pad(match, ((0, 0), (n, 0)))[:, :h], n, matched)
    score = jnp.where(matched > 0, matched * h + starts, -1)
    firsts = padded[:, :h]
    conts, ns = [], []
    for _ in range(width):
        at = argmax(score)
        n = jnp.where(jnp.max(score, axis=1) >= 0, jnp.take_along_axis(matched, at[:, None], axis=1)[:, 0], 0)
        tokens = jnp.take_along_axis(padded, at[:, None] + jnp.arange(k)[None, :], axis=1)
        conts.append(jnp.where(n[:, None] > 0, tokens, 0))
        ns.append(n)
        score = jnp.where(firsts == tokens[:, :1], -1, score)
    return jnp.stack(conts, axis=1).astype(jnp.int32), jnp.stack(ns, axis=1)


@dataclass(frozen=True)
class PromptLookupProposer:
    """``width`` chains of ``k`` copied tokens under the root (see :func:`lookup`)."""

    commits_any_path = True  # stateless (specdec.union)
    k: int
    max_ngram: int = 3
    min_ngram: int = 1
    width: int = 1

    def __post_init__(self) -> None:
        draft_length(self.k)
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {self.min_ngram} and {self.max_ngram}")
        whole_number(self.width, "width (prompt-lookup chains per step)", 1)

    @cached_property
    def tree(self) -> Tree:
        return union_tree([Tree.chain(self.k)] * self.width)

    def prefill(self, params, tokens, prompt_lens, capacity, hidden=None):
        return None

    def propose(self, params, state, view: View, sampling: Sampling, rule: str):
        if self.k == 0:
            return state, no_proposal(view.lengths.shape[0])
        tokens, n = lookup(view.history, view.lengths, k=self.k, max_ngram=self.max_ngram, min_ngram=self.min_ngram,
                           width=self.width)
        # a longer match is likelier to continue; n / (max_ngram + 1) ranks chains for a budget
        confidence = jnp.broadcast_to((n / (self.max_ngram + 1))[:, :, None], tokens.shape)
        b = tokens.shape[0]
        return state, Proposal(tokens=tokens.reshape(b, -1), draft_probs=None, confidence=confidence.reshape(b, -1))

    def commit(self, params, state, commit: Commit):
        return state


def with_lookup(proposer, params, k: int, **lookup) -> tuple[Any, Any]:
    """``(proposer, params)`` with ``k``-token prompt-lookup chains beside the proposer's tree
    (``lookup``: the chains' width, max_ngram and min_ngram); k 0 returns them unchanged."""
    k = whole_number(k, "lookup (prompt-lookup tokens beside the tree)")
    if k == 0:
        return proposer, params
    if hasattr(proposer, "refeed"):  # a draft model re-writes any path the union may accept
        proposer = dataclasses.replace(proposer, refeed=max(proposer.refeed, proposer.tree.max_depth, k))
    return UnionProposer((proposer, PromptLookupProposer(k=k, **lookup))), (params, None)


def lookup_beside(spec: WithLookup, proposer, params) -> tuple[Any, Any]:
    """``(proposer, params)`` with the prompt-lookup chains ``spec.lookup`` and ``spec.lookup_width`` ask for."""
    width = whole_number(spec.lookup_width, "lookup_width (prompt-lookup chains beside the tree)", 1)
    return with_lookup(proposer, params, spec.lookup, width=width)


@register
@dataclass(frozen=True, kw_only=True)
class PromptLookup(Budgeted):
    """Prompt lookup: drafts copied from the row's own context (no draft model)."""

    name: ClassVar[str] = "prompt_lookup"
    summary: ClassVar[str] = "copies the continuation of the context's last n-gram from earlier in the context"
    tuned: ClassVar[str] = "k"
    tune_choices: ClassVar[tuple] = (0, 1, 2, 4)
    k: int | dict = option(DEFAULT_K, "draft tokens per step (0 turns speculation off)", by_load=True)
    max_ngram: int = option(3, "longest n-gram matched")
    min_ngram: int = option(1, "shortest n-gram matched")
    draft_width: int | dict = option(1, "chains copied from distinct matches", by_load=True)

    def build(self, target) -> tuple[Any, Any]:
        def one(k, width):
            return PromptLookupProposer(k=k, width=draft_width(width, target.config.vocab_size),
                                        max_ngram=self.max_ngram, min_ngram=self.min_ngram), None

        return build_by_load(one, self.budget, k=self.k, width=self.draft_width)
