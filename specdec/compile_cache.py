"""A persistent cache of compiled XLA programs: a second run of the same decode, test or benchmark reads
its programs from disk instead of compiling them again (XLA keys each program by its HLO, compile
options, backend and JAX version, so a stale entry is never used)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import jax

from specdec.fetch import cache_dir

OFF = ("0", "off", "false", "no")
MAX_BYTES = 2 << 30  # emptied at start-up past this: JAX's own size limit rescans the directory on every write


def compile_cache_dir(setting: str | None, configured: str | None) -> Path | None:
    """Where compiled programs go: ``configured`` (a cache directory already set in JAX's config, e.g.
    by ``JAX_COMPILATION_CACHE_DIR``) wins; then ``setting`` (``$SPECDEC_COMPILE_CACHE``): ``off``
    (or 0/false/no) for none, a path for that directory; unset: ``<specdec cache>/xla``."""
    if configured:
        return Path(configured)
    if setting is not None and setting.strip().lower() in OFF:
        return None
    return Path(setting) if setting else cache_dir() / "xla"


def trim(directory: Path, max_bytes: int = MAX_BYTES) -> bool:
    """Empty ``directory`` when its files hold more than ``max_bytes``; returns whether it did."""
    try:
        size = sum(f.stat().st_size for f in directory.iterdir())
    except FileNotFoundError:  # absent, or being emptied by another process (a pytest-xdist worker)
        return False
    if size <= max_bytes:
        return False
    shutil.rmtree(directory, ignore_errors=True)
    return True


def use_compile_cache() -> Path | None:
    """Turn on JAX's persistent compilation cache for every program, however quick to compile
    (call before the first compile). Returns the directory used, or None when switched off."""
    configured = jax.config.jax_compilation_cache_dir
    directory = compile_cache_dir(os.environ.get("SPECDEC_COMPILE_CACHE"), configured)
    if directory is None:
        return None
    if not configured:  # a directory set in JAX's config is the caller's: never emptied here
        trim(directory)
        directory.mkdir(parents=True, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return directory
