"""Saving and loading drafts (orbax parameters + ``draft_config.json``), and the drafts shipped
with specdec (one directory per target under ``drafts/``)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from drafts.model import DraftSpec, head_rows, new_draft, trainable
from specdec.loading import LoadedModel
from specdec.model import Llama, fingerprint
from specdec.saved import read_config, restore_params, save_dir, saved_for

CONFIG_FILE = "draft_config.json"
BUNDLED = Path(__file__).resolve().parent
_LOADED: dict[tuple[str, str], LoadedModel] = {}


def _saved_state(module: nnx.Module, spec: DraftSpec) -> nnx.State:
    """What a draft file holds: the trained parameters and the vocabulary map (not shared arrays)."""
    state = nnx.state(module, trainable(spec))
    if spec.vocab_size:
        state = nnx.merge_state(state, nnx.state(module, nnx.PathContains("vocab_map")))
    return state


def save_draft(draft: nnx.Module, spec: DraftSpec, target: Llama, path: str | Path, *, target_name: str,
               dtype: str = "bfloat16", extra: dict | None = None, file: str = CONFIG_FILE) -> Path:
    """Write ``draft`` (a :class:`DraftLlama`, or a module holding one, for ``target``) to the
    directory ``path``, parameters cast to ``dtype``, its metadata in ``file``."""
    pure = nnx.to_pure_dict(_saved_state(draft, spec))
    pure = jax.tree.map(lambda a: a if jnp.issubdtype(a.dtype, jnp.integer) else a.astype(dtype), pure)
    meta = {"spec": {**asdict(spec), "layers": list(spec.layers) if spec.layers else None}, "saved_dtype": dtype,
            "target": target_name, "target_fingerprint": fingerprint(target), **(extra or {})}
    return save_dir(path, pure, file, meta)


def read_metadata(path: str | Path, file: str = CONFIG_FILE) -> dict:
    """The JSON metadata saved with a draft at ``path``."""
    return read_config(path, file, what="draft", fix="re-save or re-train the draft (specdec train-draft)")


def saved_spec(meta: dict) -> DraftSpec:
    """The :class:`DraftSpec` recorded in a saved draft's metadata (:func:`read_metadata`)."""
    raw = dict(meta["spec"])
    return DraftSpec(**{**raw, "layers": tuple(raw["layers"]) if raw.get("layers") else None})


def restore_saved(path: str | Path, target: LoadedModel, file: str, build: Callable) -> nnx.Module:
    """The module saved by :func:`save_draft` at ``path``, checked against and attached to ``target``
    (its dtype too). ``build(spec, vocab_map)`` makes an untrained module of the saved shape."""
    path = Path(path).resolve()
    meta = read_metadata(path, file)
    base = target.module
    if meta["target_fingerprint"] != fingerprint(base):
        raise ValueError(f"the draft at {path} was trained for target {meta['target']!r} (fingerprint "
                         f"{meta['target_fingerprint']}), not for this model (fingerprint {fingerprint(base)}): "
                         f"load a draft made for this model or train a new one")
    spec = saved_spec(meta)
    vocab_map = np.arange(spec.vocab_size, dtype=np.int32) if spec.vocab_size else None
    module = build(DraftSpec(**{**asdict(spec), "init": "embeddings" if spec.share_embeddings else "random"}),
                   vocab_map)
    state = _saved_state(module, spec)
    like = jax.tree.map(lambda a: a if jnp.issubdtype(a.dtype, jnp.integer) else a.astype(meta["saved_dtype"]),
                        nnx.to_pure_dict(state))
    restored = restore_params(path, like, "draft")
    dtype = target.config.jnp_dtype
    nnx.replace_by_pure_dict(state, jax.tree.map(
        lambda a: a if jnp.issubdtype(a.dtype, jnp.integer) else jnp.asarray(a, dtype), restored))
    nnx.update(module, state)
    if spec.share_embeddings and spec.vocab_size:  # the frozen reduced head: the target's rows, rebuilt
        draft = getattr(module, "body", module)  # a feature draft holds its DraftLlama as ``body``
        draft.head_table.set_value(head_rows(base, draft.vocab_map[...]))
    return module


def load_draft(path: str | Path, target: LoadedModel) -> LoadedModel:
    """The draft saved at ``path``, checked against and attached to ``target`` (its dtype too)."""
    draft = restore_saved(path, target, CONFIG_FILE,
                          lambda spec, vocab_map: new_draft(target.module, spec, vocab_map=vocab_map))
    return LoadedModel.from_module(draft, target.tokenizer, name=f"draft:{Path(path).resolve().name}")


def draft_for(target: LoadedModel, path: str | Path | None) -> tuple[LoadedModel, Path]:
    """``(draft, its directory)`` at ``path`` (default: the one bundled for ``target``), loaded once
    per target."""
    return saved_for(target, path, root=BUNDLED, file=CONFIG_FILE, key="target_fingerprint", what="draft",
                     how="pass draft=<model or directory> (train one with `specdec train-draft --model ...`)",
                     cache=_LOADED, load=lambda p: load_draft(p, target))
