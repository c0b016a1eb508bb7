"""Prompt lookup: a model-free proposer that copies from the row's own context.

Find the most recent earlier occurrence of the context's last n tokens
(n from ``max_ngram`` down to ``min_ngram``, longest match wins) and propose
the k tokens that followed it. Rows without a match propose padding, which
the target simply rejects. Draft tokens are deterministic, so lossless
sampling treats them as point masses.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from specdec.engine import Commit, Proposal, View, draft_length, no_proposal
from specdec.sampling import Sampling
from specdec.tree import Tree


def lookup(history: jax.Array, lengths: jax.Array, *, k: int, max_ngram: int,
           min_ngram: int) -> tuple[jax.Array, jax.Array]:
    """Continuation ``[B, k]`` of the latest earlier match of each row's last n-gram, and the
    match's n ``[B]`` (0: no match, the continuation is padding).

    Args:
      history: [B, H] tokens by position; positions ``0 .. lengths[b]`` are known.
      lengths: [B] position of each row's newest token.
    """
    b, h = history.shape
    padded = jnp.pad(history, ((0, 0), (0, max_ngram + k)))
    starts = jnp.arange(h)[None, :]
    found = jnp.zeros((b,), bool)
    matched = jnp.zeros((b,), jnp.int32)
    cont = jnp.zeros((b,), jnp.int32)
    for n in range(max_ngram, min_ngram - 1, -1):
        tail = jnp.take_along_axis(padded, jnp.clip(lengths[:, None] - n + 1 + jnp.arange(n), 0), axis=1)
        match = jnp.ones((b, h), bool)
        for i in range(n):
            match &= padded[:, i:i + h] == tail[:, i:i + 1]
        # an earlier occurrence (not the tail itself) whose continuation starts at a known token
        match &= (starts + n <= lengths[:, None]) & (lengths[:, None] - n + 1 >= 0)
        hit = match.any(axis=1)
        latest = h - 1 - jnp.argmax(match[:, ::-1], axis=1)
        cont = jnp.where(~found & hit, latest + n, cont)
        matched = jnp.where(~found & hit, n, matched)
        found |= hit
    tokens = jnp.take_along_axis(padded, cont[:, None] + jnp.arange(k)[None, :], axis=1)
    return jnp.where(found[:, None], tokens, 0).astype(jnp.int32), matched


@dataclass(frozen=True)
class PromptLookupProposer:
    commits_any_path = True  # stateless (specdec.union)
    k: int
    max_ngram: int = 3
    min_ngram: int = 1

    def __post_init__(self) -> None:
        draft_length(self.k)
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {self.min_ngram} and {self.max_ngram}")

    @property
    def tree(self) -> Tree:
        return Tree.chain(self.k)

    def prefill(self, params, tokens, prompt_lens, slots, hidden=None):
        return None

    def propose(self, params, state, view: View, sampling: Sampling, rule: str):
        if self.k == 0:
            return state, no_proposal(view.lengths.shape[0])
        tokens, n = lookup(view.history, view.lengths, k=self.k, max_ngram=self.max_ngram, min_ngram=self.min_ngram)
        # a longer match is likelier to continue; n / (max_ngram + 1) ranks rows for a budget
        confidence = jnp.broadcast_to((n / (self.max_ngram + 1))[:, None], tokens.shape)
        return state, Proposal(tokens=tokens, draft_probs=None, confidence=confidence)

    def commit(self, params, state, commit: Commit):
        return state
