"""Saving and loading drafts (orbax parameters + ``draft_config.json``), and the drafts shipped
with specdec (one directory per target under ``drafts/``)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from drafts.model import DraftLlama, DraftSpec, head_rows, new_draft, trainable
from specdec.loading import LoadedModel
from specdec.model import Llama, fingerprint
from specdec.saved import find_bundled, read_config

CONFIG_FILE = "draft_config.json"
PARAMS_DIR = "params"
BUNDLED = Path(__file__).resolve().parent
_LOADED: dict[tuple[str, str], LoadedModel] = {}


def _saved_state(draft: DraftLlama, spec: DraftSpec) -> nnx.State:
    """What a draft file holds: the trained parameters and the vocabulary map (not shared arrays)."""
    state = nnx.state(draft, trainable(spec))
    if draft.vocab_map is not None:
        state = nnx.merge_state(state, nnx.state(draft, nnx.PathContains("vocab_map")))
    return state


def save_draft(draft: DraftLlama, spec: DraftSpec, target: Llama, path: str | Path, *, target_name: str,
               dtype: str = "bfloat16", extra: dict | None = None) -> Path:
    """Write ``draft`` (for ``target``) to the directory ``path``, parameters cast to ``dtype``."""
    import orbax.checkpoint as ocp

    path = Path(path).resolve()
    path.mkdir(parents=True, exist_ok=True)
    pure = nnx.to_pure_dict(_saved_state(draft, spec))
    pure = jax.tree.map(lambda a: a if jnp.issubdtype(a.dtype, jnp.integer) else a.astype(dtype), pure)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(path / PARAMS_DIR, pure, force=True)
    ckpt.wait_until_finished()
    meta = {"spec": {**asdict(spec), "layers": list(spec.layers) if spec.layers else None}, "saved_dtype": dtype,
            "target": target_name, "target_fingerprint": fingerprint(target), **(extra or {})}
    (path / CONFIG_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    return path


def read_metadata(path: str | Path) -> dict:
    """The JSON metadata saved with a draft at ``path``."""
    return read_config(path, CONFIG_FILE, what="draft", fix="re-save or re-train the draft (specdec train-draft)")


def load_draft(path: str | Path, target: LoadedModel) -> LoadedModel:
    """The draft saved at ``path``, checked against and attached to ``target`` (its dtype too)."""
    import orbax.checkpoint as ocp

    path = Path(path).resolve()
    meta = read_metadata(path)
    base = target.module
    if meta["target_fingerprint"] != fingerprint(base):
        raise ValueError(f"the draft at {path} was trained for target {meta['target']!r} (fingerprint "
                         f"{meta['target_fingerprint']}), not for this model (fingerprint {fingerprint(base)}): "
                         f"load a draft made for this model or train one with `specdec train-draft`")
    raw = dict(meta["spec"])
    spec = DraftSpec(**{**raw, "layers": tuple(raw["layers"]) if raw.get("layers") else None})
    vocab_map = np.arange(spec.vocab_size, dtype=np.int32) if spec.vocab_size else None
    draft = new_draft(base, DraftSpec(**{**asdict(spec), "init": "embeddings"}) if spec.share_embeddings else
                      DraftSpec(**{**asdict(spec), "init": "random"}), vocab_map=vocab_map)
    state = _saved_state(draft, spec)
    like = jax.tree.map(lambda a: a if jnp.issubdtype(a.dtype, jnp.integer) else a.astype(meta["saved_dtype"]),
                        nnx.to_pure_dict(state))
    try:
        restored = ocp.StandardCheckpointer().restore(path / PARAMS_DIR, like)
    except Exception as err:  # orbax raises several types for missing/corrupt/mismatched files
        raise ValueError(f"could not read the draft parameters in {path / PARAMS_DIR}: {err}") from err
    dtype = target.config.jnp_dtype
    nnx.replace_by_pure_dict(state, jax.tree.map(
        lambda a: a if jnp.issubdtype(a.dtype, jnp.integer) else jnp.asarray(a, dtype), restored))
    nnx.update(draft, state)
    if spec.share_embeddings and spec.vocab_size:  # the frozen reduced head: the target's rows, rebuilt
        draft.head_table.set_value(head_rows(base, draft.vocab_map[...]))
    return LoadedModel.from_module(draft, target.tokenizer, name=f"draft:{path.name}")


def draft_for(target: LoadedModel, path: str | Path | None) -> LoadedModel:
    """The draft at ``path`` (default: the one bundled for ``target``), loaded once per target."""
    mark = fingerprint(target.module)
    if path is None:
        path = find_bundled(BUNDLED, CONFIG_FILE, "target_fingerprint", mark)
        if path is None:
            raise ValueError(f"specdec ships no draft for {target.name!r}: pass draft=<model or directory> "
                             f"(train one with `specdec train-draft --model ...`)")
    key = (str(Path(path).resolve()), mark)
    if key not in _LOADED:
        _LOADED[key] = load_draft(path, target)
    return _LOADED[key]
