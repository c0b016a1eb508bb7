"""Feature-level drafts (EAGLE style): a one-layer decoder that drafts over the target's features.

Entry ``j`` of a feature draft reads ``fc(concat(f_j, embed(x_{j+1})))``: the
target's final-normed hidden state at position ``j`` and the token at ``j + 1``.
It runs through the draft's decoder layer(s) and final norm; the result is the
draft's guess of ``f_{j+1}``, and the target's LM head (shared, frozen) turns it
into logits for token ``j + 2``. Drafting deeper feeds each guessed feature back
in with the token just drafted. The body is a :class:`drafts.model.DraftLlama`
(optionally with a reduced output vocabulary), so it is built, saved and loaded
the way drafts are; only the ``fc`` projection is new.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from drafts.model import DraftLlama, DraftSpec, new_draft
from specdec.cache import KVCache
from specdec.model import ForwardOutput, Llama, forward

CONFIG_FILE = "feature_draft_config.json"
BUNDLED = Path(__file__).resolve().parent
_LOADED: dict = {}


class FeatureDraft(nnx.Module):
    """``fc: [2d -> d]`` in front of a small :class:`DraftLlama` that shares the target's vocabulary."""

    def __init__(self, body: DraftLlama, *, rngs: nnx.Rngs):
        cfg = body.config
        self.fc = nnx.Linear(2 * cfg.d_model, cfg.d_model, use_bias=True, dtype=cfg.jnp_dtype,
                             param_dtype=cfg.jnp_dtype, rngs=rngs)
        self.body = body

    @property
    def config(self):
        return self.body.config

    def run(self, cache: KVCache, features: jax.Array, tokens: jax.Array, positions: jax.Array,
            **kwargs) -> ForwardOutput:
        """Entries ``(features [B, T, d], tokens [B, T])`` at ``positions [B, T]`` through the body
        (``kwargs`` go to :func:`specdec.model.forward`); ``hidden`` is the guessed next feature."""
        embedded = self.body.embed_input(self.body.embed(tokens))  # the target's own first-layer input
        x = self.fc(jnp.concatenate([features.astype(embedded.dtype), embedded], axis=-1))
        return forward(self.body, cache, embeds=x, positions=positions, **kwargs)


def default_spec(target: Llama, vocab_size: int | None = 8192) -> DraftSpec:
    """One layer copied from the target's last, the target's embedding shared, a reduced vocabulary."""
    return DraftSpec(n_layers=1, init="layers", layers=(target.config.n_layers - 1,), vocab_size=vocab_size)


def new_feature_draft(target: Llama, spec: DraftSpec, *, vocab_map: np.ndarray | None = None,
                      seed: int = 0) -> FeatureDraft:
    """A feature draft for ``target`` whose body is built as ``spec`` says (see :func:`drafts.model.new_draft`)."""
    if not spec.share_embeddings:
        raise ValueError("a feature draft reads the target's LM head: it needs share_embeddings=True")
    return FeatureDraft(new_draft(target, spec, vocab_map=vocab_map, seed=seed), rngs=nnx.Rngs(seed + 1))


def save_feature_draft(draft: FeatureDraft, spec: DraftSpec, target: Llama, path: str | Path, *, target_name: str,
                       dtype: str = "bfloat16", extra: dict | None = None) -> Path:
    """Write ``draft`` (for ``target``) to the directory ``path``, parameters cast to ``dtype``."""
    from drafts.saved import save_draft

    return save_draft(draft, spec, target, path, target_name=target_name, dtype=dtype, extra=extra,
                      file=CONFIG_FILE)


def load_feature_draft(path: str | Path, target) -> FeatureDraft:
    """The feature draft saved at ``path``, checked against and attached to ``target`` (a ``LoadedModel``)."""
    from drafts.saved import restore_saved

    return restore_saved(path, target, CONFIG_FILE, lambda spec, vocab_map: new_feature_draft(
        target.module, spec, vocab_map=vocab_map))


def feature_draft_for(target, path: str | Path | None) -> FeatureDraft:
    """The feature draft at ``path`` (default: the one bundled for ``target``), loaded once per target."""
    return _saved(target, path)[0]


def feature_draft_dir(target, path: str | Path | None) -> Path:
    """The directory :func:`feature_draft_for` loads from."""
    return _saved(target, path)[1]


def _saved(target, path):
    from specdec.saved import saved_for

    return saved_for(target, path, root=BUNDLED, file=CONFIG_FILE, key="target_fingerprint", what="feature draft",
                     how="pass feature_draft=<directory> (train one with `specdec train-feature-draft`)",
                     cache=_LOADED, load=lambda p: load_feature_draft(p, target))
