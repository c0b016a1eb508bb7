"""Few-row float32 matrix products on CPU that read each weight once for all rows.

A decoding step multiplies a handful of rows (one per token of the step, per batch row) by every
weight matrix. XLA's CPU backend streams the weights once for one row but runs two or more rows
through a general matrix product that costs far more than a second stream (experiments/
verify_cost_study.py). ``few_rows.cc`` streams each weight once for up to ``MAX_ROWS`` rows; it is
compiled with the machine's own instruction set on first use (``g++``), cached under the specdec
cache directory, and registered as an XLA FFI target. On first use on a machine it is timed against
XLA's product for 1 to ``MAX_ROWS`` rows (:func:`max_rows`, a few seconds, the choice cached per
machine): it serves the row counts up to the largest where it is faster. Without a compiler, on
another backend, for other dtypes or more rows, :func:`dot_general` is ``jax.lax.dot_general``.

Each output element is accumulated in one fixed order whatever the number of rows or threads, so
a row's logits do not depend on how many rows share the forward. ``SPECDEC_FEW_ROWS=0`` turns it off
(for the process), :func:`xla_products` for what is traced inside it.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import json
import math
import os
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from specdec import atomic
from specdec.bench import device_label, median_time
from specdec.fetch import cache_dir

SOURCE = Path(__file__).with_name("few_rows.cc")
TARGET = "specdec_few_rows"
MAX_ROWS = 16
FLAGS = ("-O3", "-march=native", "-mprefer-vector-width=512", "-ffp-contract=off", "-std=c++20", "-shared", "-fPIC", "-w")


def _key() -> str:
    return hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode() + jax.__version__.encode()).hexdigest()[:16]


def _library() -> Path:
    """Compile ``few_rows.cc`` for this machine once (atomically renamed into the cache)."""
    include = jax.ffi.include_dir()
    out = cache_dir() / "kernels" / f"few_rows-{_key()}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".so.partial")
    os.close(fd)
    try:
        subprocess.run(["g++", *FLAGS, f"-I{include}", str(SOURCE), "-o", tmp], check=True,
                       capture_output=True, text=True)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


@functools.cache
def available() -> bool:
    """Whether the kernel is in use: CPU backend, not turned off, compiled and registered."""
    if os.environ.get("SPECDEC_FEW_ROWS", "1") == "0" or jax.default_backend() != "cpu":
        return False
    try:
        lib = ctypes.CDLL(str(_library()))
    except (OSError, subprocess.CalledProcessError) as err:
        detail = getattr(err, "stderr", "") or err
        warnings.warn(f"specdec: few-row CPU kernel unavailable, using XLA's products ({detail})", stacklevel=2)
        return False
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.SpecdecFewRows), platform="cpu")
    return True


CALIBRATION_ROWS = (1, 2, 3, 4, 6, 8, 12, 16)
CALIBRATION_WEIGHTS = (16, 1024, 1024)  # 16 chained [1024, 1024] products: 64 MiB, like a model's layers


def _calibrate(rounds: int = 11) -> int:
    """The largest row count in ``CALIBRATION_ROWS`` at which a chain of products over
    ``CALIBRATION_WEIGHTS`` runs faster with the kernel than with XLA's products on this machine
    (the two programs timed in turn, median over ``rounds``); 0 if at none."""
    depth, k, n = CALIBRATION_WEIGHTS
    ws = [jax.random.normal(jax.random.key(i), (k, n), jnp.float32) / k**0.5 for i in range(depth)]

    def chain(product):
        def run(x, ws):
            for w in ws:
                x = product(x, w, False)
            return x
        return jax.jit(run)

    kernel, xla = chain(few_rows), chain(_xla)
    best = 0
    for m in CALIBRATION_ROWS:
        x = jnp.ones((m, k), jnp.float32)
        calls = [lambda fn=fn: fn(x, ws).block_until_ready() for fn in (kernel, xla)]
        for call in calls:
            call()
        times = np.median([[median_time(call, 1) for call in calls] for _ in range(rounds)], axis=0)
        if times[0] < times[1]:
            best = m
    return best


@functools.cache
def max_rows() -> int:
    """How many rows (at most) :func:`dot_general` sends to the kernel on this machine: measured
    by :func:`_calibrate` once per machine and kernel build, kept in the specdec cache (a missing
    or unreadable record is measured again). 0 when the kernel is unavailable."""
    if not available():
        return 0
    label = device_label()
    machine = hashlib.sha256(f"{label} {_threads()}".encode()).hexdigest()[:12]
    path = cache_dir() / "kernels" / f"few_rows-{_key()}-{machine}.json"
    try:
        return int(json.loads(path.read_text())["max_rows"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    with jax.ensure_compile_time_eval():  # first asked while a model is traced: measure eagerly
        best = _calibrate()
    record = {"max_rows": best, "machine": label, "threads": _threads(), "weights": list(CALIBRATION_WEIGHTS)}
    try:
        atomic.write_text(path, json.dumps(record))
    except OSError as err:  # a read-only or full cache: use the measurement, measure again next time
        warnings.warn(f"specdec: could not record the few-row kernel's measurement in {path.parent} ({err})",
                      stacklevel=2)
    return best


_forced_off = False


@contextlib.contextmanager
def xla_products():
    """Within this context, products traced go through ``jax.lax.dot_general`` (for comparisons;
    programs already compiled keep what they were traced with)."""
    global _forced_off
    before, _forced_off = _forced_off, True
    try:
        yield
    finally:
        _forced_off = before


def _threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def few_rows(x: jax.Array, w: jax.Array, out_in: bool) -> jax.Array:
    """``x: [m, k]`` times ``w: [k, n]`` (or ``w: [n, k]`` when ``out_in``) -> ``[m, n]``, float32."""
    n = w.shape[0] if out_in else w.shape[1]
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32),
                            vmap_method="sequential")
    return call(x, w, out_in=np.int64(out_in), threads=np.int64(_threads()))


def _xla(x, w, out_in):
    return jax.lax.dot_general(x, w, (((1,), (1 if out_in else 0,)), ((), ())),
                               precision=jax.lax.Precision.HIGHEST)


@few_rows.defjvp
def _few_rows_jvp(out_in, primals, tangents):
    (x, w), (dx, dw) = primals, tangents
    return few_rows(x, w, out_in), _xla(dx, w, out_in) + _xla(x, dw, out_in)


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs):
    """``jax.lax.dot_general``, through :func:`few_rows` for a float32 ``lhs: [..., k]`` of at
    most :func:`max_rows` rows against a 2-D float32 ``rhs`` on the CPU."""
    (lc, rc), (lb, rb) = dimension_numbers
    rows = math.prod(lhs.shape[:-1])
    if (not lb and not rb and rhs.ndim == 2 and tuple(lc) == (lhs.ndim - 1,) and tuple(rc) in ((0,), (1,))
            and lhs.dtype == rhs.dtype == jnp.float32 and 0 < rows <= MAX_ROWS
            and preferred_element_type in (None, jnp.float32) and kwargs.get("out_sharding") is None
            and not _forced_off and rows <= max_rows()):
        out_in = tuple(rc) == (1,)
        y = few_rows(lhs.reshape(rows, lhs.shape[-1]), rhs, out_in)
        return y.reshape(lhs.shape[:-1] + y.shape[-1:])
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type, **kwargs)
