"""Saved draft components (Medusa heads, drafts): their JSON configs and the bundled copies."""

from __future__ import annotations

import json
from pathlib import Path

PARAMS_DIR = "params"  # the orbax parameters inside a saved directory


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


def save_dir(path: str | Path, params: dict, file: str, meta: dict) -> Path:
    """Write the pure-dict ``params`` (orbax, under ``params/``) and the JSON ``meta`` to directory ``path``."""
    import orbax.checkpoint as ocp

    path = Path(path).resolve()
    path.mkdir(parents=True, exist_ok=True)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(path / PARAMS_DIR, params, force=True)
    ckpt.wait_until_finished()
    (path / file).write_text(json.dumps(meta, indent=1) + "\n")
    return path


def restore_params(path: str | Path, like: dict, what: str) -> dict:
    """The pure-dict parameters saved by :func:`save_dir` in ``path``, shaped like ``like``."""
    import orbax.checkpoint as ocp

    try:
        return ocp.StandardCheckpointer().restore(Path(path).resolve() / PARAMS_DIR, like)
    except Exception as err:  # orbax raises several types for missing/corrupt/mismatched files
        raise ValueError(f"could not read the {what} parameters in {Path(path) / PARAMS_DIR}: {err}") from err


def saved_for(target, path: str | Path | None, *, root: Path, file: str, key: str, what: str, how: str,
              cache: dict, load) -> tuple[object, Path]:
    """``(load(directory), directory)`` for the component at ``path``, or by default the one bundled
    under ``root`` for ``target`` (matched by fingerprint); loaded once per (directory, target)."""
    from specdec.model import fingerprint

    mark = fingerprint(target.module)
    if path is None:
        path = find_bundled(root, file, key, mark)
        if path is None:
            raise ValueError(f"specdec ships no {what} for {target.name!r}: {how}")
    path = Path(path).resolve()
    return loaded_once(cache, (str(path), mark), lambda: load(path)), path


def loaded_once(cache: dict, key, load):
    """``cache[key]``, filled by ``load()`` on first use."""
    if key not in cache:
        cache[key] = load()
    return cache[key]
