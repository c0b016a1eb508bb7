"""Heads shipped with specdec (one directory per base model under ``heads/``) and a loading cache."""

from __future__ import annotations

from pathlib import Path

from heads.medusa import CONFIG_FILE, MedusaHeads, load_heads
from specdec.saved import saved_for

BUNDLED = Path(__file__).resolve().parent
TREE_FILE = "tree.json"  # the searched tree saved beside a set of heads (``specdec search-tree --save``)
_LOADED: dict[tuple[str, str], MedusaHeads] = {}


def heads_for(target, path: str | Path | None) -> tuple[MedusaHeads, Path]:
    """Heads at ``path`` (default: the bundled heads for ``target``), loaded once per base model."""
    return saved_for(target, path, root=BUNDLED, file=CONFIG_FILE, key="config.base_fingerprint",
                     what="Medusa heads", how="pass heads=<directory> (train them with `specdec train-heads "
                     "--model ...`)", cache=_LOADED, load=lambda p: load_heads(p, target.module))


def default_tree(heads_dir: Path | None) -> str:
    """The tree saved beside the heads (``tree.json``), else the built-in ``tree-16``."""
    if heads_dir is not None and (heads_dir / TREE_FILE).is_file():
        return str(heads_dir / TREE_FILE)
    return "tree-16"
