"""Heads shipped with specdec (one directory per base model under ``heads/``) and a loading cache."""

from __future__ import annotations

import json
from pathlib import Path

from heads.medusa import CONFIG_FILE, MedusaHeads, load_heads, read_metadata
from specdec.saved import read_config, saved_for

BUNDLED = Path(__file__).resolve().parent
TREE_FILE = "tree.json"  # the searched tree saved beside a set of heads (``specdec search-tree --save``)
_LOADED: dict[tuple[str, str], MedusaHeads] = {}


def heads_for(target, path: str | Path | None) -> tuple[MedusaHeads, Path]:
    """Heads at ``path`` (default: the bundled heads for ``target``), loaded once per base model."""
    return saved_for(target, path, root=BUNDLED, file=CONFIG_FILE, key="config.base_fingerprint",
                     what="Medusa heads", how="pass heads=<directory> (train them with `specdec train-heads "
                     "--model ...`)", cache=_LOADED, load=lambda p: load_heads(p, target.module))


def _saved_search(heads_dir: Path | None) -> dict | None:
    """The search saved beside the heads (``tree.json``), None without one; a clear error when corrupt."""
    if heads_dir is None or not (heads_dir / TREE_FILE).is_file():
        return None
    return read_config(heads_dir, TREE_FILE, what="tree search",
                       fix="delete it or write it again with `specdec search-tree --save`")


def default_tree(heads_dir: Path | None) -> str:
    """The tree searched for one row, saved beside the heads (``tree.json``), else the built-in ``tree-16``."""
    return "tree-16" if _saved_search(heads_dir) is None else str(heads_dir / TREE_FILE)


def default_trees(heads_dir: Path | None) -> str | dict[int, list]:
    """What ``method="medusa"`` runs by default: the trees searched per batch size (``{rows: paths}``,
    picked by running rows) when ``tree.json`` holds more than one, else :func:`default_tree`."""
    saved = _saved_search(heads_dir)
    loads = [] if saved is None else saved.get("by_load", [])
    if len({json.dumps(load["paths"]) for load in loads}) < 2:
        return default_tree(heads_dir)
    return {int(load["rows"]): load["paths"] for load in loads}


def default_head_vocab(heads_dir: Path | None) -> int | None:
    """The head vocabulary (``head_vocab``) the heads' tree was searched with, recorded in ``tree.json``
    (``specdec search-tree --head-vocab N --save``), else the vocabulary they were trained over
    (``specdec train-heads --train-vocab N``); None: every token."""
    saved = _saved_search(heads_dir) or {}
    if "head_vocab" in saved or heads_dir is None:
        return saved.get("head_vocab") or None
    size = ((read_metadata(heads_dir).get("training") or {}).get("config") or {}).get("train_vocab")
    return size if isinstance(size, int) and size > 0 else None
