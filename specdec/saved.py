"""Saved draft components (Medusa heads, drafts): their JSON configs and the bundled copies."""

from __future__ import annotations

import json
from pathlib import Path


def read_config(path: str | Path, file: str, *, what: str, fix: str) -> dict:
    """The JSON ``file`` in directory ``path``, with clear errors when it is missing or corrupt."""
    target = Path(path) / file
    if not target.is_file():
        raise FileNotFoundError(f"{path} holds no {what}: {file} is missing ({fix})")
    try:
        return json.loads(target.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{target} is corrupt ({err}); {fix}") from err


def find_bundled(root: Path, file: str, key: str, fingerprint: str) -> Path | None:
    """The directory under ``root`` whose ``file`` records ``fingerprint`` under ``key`` (a dotted
    path into the JSON, e.g. ``config.base_fingerprint``), if any."""
    for meta in sorted(root.glob(f"*/{file}")):
        value = json.loads(meta.read_text())
        for part in key.split("."):
            value = value.get(part, {}) if isinstance(value, dict) else {}
        if value == fingerprint:
            return meta.parent
    return None
