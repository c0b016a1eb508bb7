"""The persistent compilation cache: where it goes, when it is emptied, and that a second process reads it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from specdec.compile_cache import compile_cache_dir, trim

PROGRAM = """
import jax, jax.numpy as jnp, specdec
events = []
jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
directory = specdec.use_compile_cache()
jax.jit(lambda x: jnp.cumsum(x * 3 + 1))(jnp.arange(7)).block_until_ready()
print(directory, events.count("/jax/compilation_cache/cache_hits"))
"""


def _run(env_extra: dict[str, str]) -> tuple[str, int]:
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_DIR", "SPECDEC_COMPILE_CACHE")}
    out = subprocess.run([sys.executable, "-c", PROGRAM], env=env | env_extra, capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0], int(out[1])


def test_where_compiled_programs_go(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path))
    assert compile_cache_dir(None, None) == tmp_path / "xla"
    assert compile_cache_dir("", None) == tmp_path / "xla"
    assert compile_cache_dir("/elsewhere", None) == Path("/elsewhere")
    assert all(compile_cache_dir(off, None) is None for off in ("off", "0", "False", " no "))
    assert compile_cache_dir("off", "/set/in/jax") == Path("/set/in/jax")  # the caller's JAX setting wins


def test_trim_empties_only_an_oversized_directory(tmp_path):
    assert not trim(tmp_path / "absent")
    (tmp_path / "a").write_bytes(b"x" * 600)
    (tmp_path / "b").write_bytes(b"x" * 600)
    assert not trim(tmp_path, max_bytes=1200) and (tmp_path / "a").exists()
    assert trim(tmp_path, max_bytes=1199) and not tmp_path.exists()


def test_a_second_process_reads_the_compiled_program(tmp_path):
    first, hits_first = _run({"SPECDEC_CACHE": str(tmp_path)})
    programs = len(list((tmp_path / "xla").glob("*-cache")))
    assert Path(first) == tmp_path / "xla" and programs > 0 and hits_first == 0
    second, hits_second = _run({"SPECDEC_CACHE": str(tmp_path)})
    assert second == first and hits_second == programs  # every program read back, none compiled again
    off, hits_off = _run({"SPECDEC_CACHE": str(tmp_path / "other"), "SPECDEC_COMPILE_CACHE": "off"})
    assert off == "None" and hits_off == 0 and not (tmp_path / "other").exists()
