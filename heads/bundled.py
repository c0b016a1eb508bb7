"""Heads shipped with specdec (one directory per base model under ``heads/``) and a loading cache."""

from __future__ import annotations

from pathlib import Path

from heads.medusa import CONFIG_FILE, MedusaHeads, load_heads
from specdec.model import fingerprint
from specdec.saved import find_bundled

BUNDLED = Path(__file__).resolve().parent
TREE_FILE = "tree.json"  # the searched tree saved beside a set of heads (``specdec search-tree --save``)
_LOADED: dict[tuple[str, str], MedusaHeads] = {}


def heads_for(target, path: str | Path | None) -> tuple[MedusaHeads, Path]:
    """Heads at ``path`` (default: the bundled heads for ``target``), loaded once per base model."""
    mark = fingerprint(target.module)
    if path is None:
        path = find_bundled(BUNDLED, CONFIG_FILE, "config.base_fingerprint", mark)
        if path is None:
            raise ValueError(f"specdec ships no Medusa heads for {target.name!r}: pass heads=<directory> "
                             f"(train them with `specdec train-heads --model ...`)")
    path = Path(path).resolve()
    key = (str(path), mark)
    if key not in _LOADED:
        _LOADED[key] = load_heads(path, target.module)
    return _LOADED[key], path


def default_tree(heads_dir: Path | None) -> str:
    """The tree saved beside the heads (``tree.json``), else the built-in ``tree-16``."""
    if heads_dir is not None and (heads_dir / TREE_FILE).is_file():
        return str(heads_dir / TREE_FILE)
    return "tree-16"
