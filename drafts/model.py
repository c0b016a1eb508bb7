"""Draft models made from a target: small Llama-family decoders that share its tokenizer.

A draft is a :class:`DraftLlama`: a Llama with a few layers whose input embedding
covers the target's whole vocabulary, and whose output may be reduced to the N
most frequent tokens (``vocab_map[i]`` is the target id of draft output ``i``).
Its logits come back over the target's vocabulary with ``-inf`` outside the
reduced set, so proposers, samplers and verification work unchanged, and the
target still verifies over its full vocabulary (lossless).

Initialisation (:class:`DraftSpec`): ``random``; ``embeddings`` (the target's
embedding and LM head, random layers); ``layers`` (that, plus copies of chosen
target layers). With ``share_embeddings`` the draft holds the target's own
embedding array (no copy), and that and the reduced head built from it stay
frozen and are not saved: loading re-attaches them from the target.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from specdec.config import LlamaConfig
from specdec.model import Llama, head_table

INITS = ("random", "embeddings", "layers")
SHARED_PATHS = ("embed", "lm_head", "head_table")  # parameter paths that ``share_embeddings`` freezes and never saves


@dataclass(frozen=True, kw_only=True)
class DraftSpec:
    """How a draft is built from its target."""

    n_layers: int = 2
    init: str = "layers"  # "random" | "embeddings" | "layers"
    layers: tuple[int, ...] | None = None  # init "layers": target layers to copy (default: first n-1 and the last)
    share_embeddings: bool = True  # hold the target's embedding (frozen, not saved) instead of a copy
    vocab_size: int | None = None  # reduced output vocabulary: the N most frequent tokens (None: all)
    ffn_dim: int | None = None  # MLP width of random layers (default: the target's; init "layers" keeps it)

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.n_layers < 1:
            raise ValueError(f"a draft needs at least one layer, got n_layers={self.n_layers}")
        if self.layers is not None and len(self.layers) != self.n_layers:
            raise ValueError(f"layers {self.layers} has {len(self.layers)} entries, not n_layers={self.n_layers}")
        if self.share_embeddings and self.init == "random":
            raise ValueError("share_embeddings needs init 'embeddings' or 'layers' (random init has its own table)")
        if self.init == "layers" and self.ffn_dim is not None:
            raise ValueError("init 'layers' copies target layers, so ffn_dim must stay None")

    def target_layers(self, target_layers: int) -> tuple[int, ...]:
        """The target layers copied by init "layers": as given, else the first ``n_layers - 1`` and the
        last (the best of the choices measured in ``experiments/draft_init_layers.py``)."""
        chosen = self.layers or (*range(self.n_layers - 1), target_layers - 1)
        if len(set(chosen)) != len(chosen) or not all(0 <= i < target_layers for i in chosen):
            raise ValueError(f"layers {chosen} must be distinct indices into the target's {target_layers} layers")
        return chosen

    def config(self, target: LlamaConfig) -> LlamaConfig:
        """The draft's model config: the target's, with fewer layers (and maybe a narrower MLP); a
        reduced vocabulary has its own head table, so the embedding is then tied. Where the target
        mixes layer types (Gemma's sliding and global layers), draft layer i has the type (window,
        RoPE base) of target layer ``target_layers()[i]``, the one init "layers" copies into it."""
        types = target.layer_types and tuple(target.layer_types[i] for i in self.target_layers(target.n_layers))
        return target.replace(n_layers=self.n_layers, ffn_dim=self.ffn_dim or target.ffn_dim, layer_types=types,
                              tie_embeddings=target.tie_embeddings or self.vocab_size is not None)


class DraftLlama(Llama):
    """A Llama whose output is optionally reduced to ``vocab_map`` (``[N]`` target ids)."""

    def __init__(self, cfg: LlamaConfig, *, reduced_vocab: int | None = None, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        if reduced_vocab is None:
            self.vocab_map = self.head_table = None
        else:
            self.vocab_map = nnx.Variable(jnp.arange(reduced_vocab, dtype=jnp.int32))
            self.head_table = nnx.Param(jnp.zeros((reduced_vocab, cfg.d_model), cfg.jnp_dtype))

    def draft_logits(self, hidden: jax.Array) -> jax.Array:
        """Final-normed ``hidden: [..., d]`` -> float32 logits over the draft's own outputs ``[..., N]``."""
        if self.head_table is None:
            return super().logits(hidden)
        table = self.head_table[...]
        return jax.lax.dot_general(hidden, table, (((hidden.ndim - 1,), (1,)), ((), ()))).astype(jnp.float32)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Logits over the target's vocabulary ``[..., V]``: ``-inf`` outside the reduced vocabulary."""
        small = self.draft_logits(hidden)
        if self.vocab_map is None:
            return small
        full = jnp.full(small.shape[:-1] + (self.config.vocab_size,), -jnp.inf, jnp.float32)
        return full.at[..., self.vocab_map[...]].set(small)


def token_frequencies(sequences, vocab_size: int) -> np.ndarray:
    """How often each token id occurs in ``sequences`` (iterables of ids): ``[vocab_size]`` int64."""
    counts = np.zeros(vocab_size, np.int64)
    for seq in sequences:
        np.add.at(counts, np.asarray(seq, np.int64), 1)
    return counts


def frequent_vocab(counts: np.ndarray, size: int, always: tuple[int, ...] = ()) -> np.ndarray:
    """The ``size`` most frequent token ids (``always`` included, e.g. EOS), sorted: ``[size]`` int32."""
    if not 0 < size <= len(counts):
        raise ValueError(f"reduced vocabulary size must be in [1, {len(counts)}], got {size}")
    ranked = [t for t in always if 0 <= t < len(counts)]
    ranked += [int(t) for t in np.argsort(-counts, kind="stable") if int(t) not in set(always)]
    return np.sort(np.asarray(ranked[:size], np.int32))


def new_draft(target: Llama, spec: DraftSpec, *, vocab_map: np.ndarray | None = None, seed: int = 0) -> DraftLlama:
    """A draft for ``target`` built as ``spec`` says; ``vocab_map`` (``[N]`` target ids) when
    ``spec.vocab_size`` is set."""
    if (spec.vocab_size is None) != (vocab_map is None) or (
            vocab_map is not None and len(vocab_map) != spec.vocab_size):
        raise ValueError(f"spec.vocab_size={spec.vocab_size} needs a vocab_map of that many token ids "
                         f"(see frequent_vocab), got {None if vocab_map is None else len(vocab_map)}")
    cfg = spec.config(target.config)
    draft = DraftLlama(cfg, reduced_vocab=spec.vocab_size, rngs=nnx.Rngs(seed))
    if vocab_map is not None:
        if np.any((vocab_map < 0) | (vocab_map >= cfg.vocab_size)) or len(np.unique(vocab_map)) != len(vocab_map):
            raise ValueError(f"vocab_map must hold distinct target ids in [0, {cfg.vocab_size})")
        draft.vocab_map[...] = jnp.asarray(vocab_map, jnp.int32)
    if spec.init != "random":
        take = (lambda v: v) if spec.share_embeddings else jnp.copy  # sharing: the target's own array
        draft.embed.embedding.set_value(take(target.embed.embedding.get_value()))
        if draft.lm_head is not None:
            draft.lm_head.kernel.set_value(take(target.lm_head.kernel.get_value()))
        if vocab_map is not None:
            draft.head_table.set_value(head_rows(target, draft.vocab_map[...]))
    if spec.init == "layers":
        for mine, theirs in enumerate(spec.target_layers(target.config.n_layers)):
            nnx.update(draft.layers[mine], jax.tree.map(jnp.copy, nnx.state(target.layers[theirs])))
        draft.norm.weight.set_value(jnp.copy(target.norm.weight.get_value()))
    return draft


def head_rows(target: Llama, vocab_map: jax.Array) -> jax.Array:
    """The target's LM head rows of the draft's outputs: ``[N, d]``."""
    return head_table(target)[vocab_map]


def trainable(spec: DraftSpec):
    """The NNX filter of the parameters a training run updates (shared embeddings stay frozen)."""
    if not spec.share_embeddings:
        return nnx.Param
    return nnx.All(nnx.Param, nnx.Not(nnx.Any(*(nnx.PathContains(p) for p in SHARED_PATHS))))
