"""The few-row CPU kernel: equal to XLA's product, row-independent bitwise, differentiable, and
used only where it applies."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specdec import few_rows

HIGHEST = jax.lax.Precision.HIGHEST


def test_kernel_is_built_and_registered():
    """The CI and developer machines have g++ and a CPU backend: the kernel must be in use there
    (otherwise the model would silently fall back to XLA's products)."""
    assert few_rows.available(), "few-row kernel failed to build or register (see the warning above)"


def _ref(x, w, out_in):
    return np.asarray(jax.lax.dot_general(x, w, (((1,), (1 if out_in else 0,)), ((), ())), precision=HIGHEST))


@pytest.mark.parametrize("out_in", [False, True])
@pytest.mark.parametrize("k,n", [(64, 96), (37, 50), (16, 17), (3, 5)])
def test_equals_xla_product(out_in, k, n):
    rng = np.random.default_rng(k * n)
    w = jnp.asarray(rng.standard_normal((n, k) if out_in else (k, n)), jnp.float32)
    for m in range(1, few_rows.MAX_ROWS + 1):
        x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
        got = np.asarray(jax.jit(few_rows.few_rows, static_argnums=2)(x, w, out_in))
        np.testing.assert_allclose(got, _ref(x, w, out_in), rtol=1e-5, atol=1e-5 * k)


@pytest.mark.parametrize("out_in", [False, True])
def test_a_row_does_not_depend_on_the_rows_beside_it(out_in):
    rng = np.random.default_rng(1)
    k, n = 200, 130
    w = jnp.asarray(rng.standard_normal((n, k) if out_in else (k, n)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((few_rows.MAX_ROWS, k)), jnp.float32)
    alone = [np.asarray(few_rows.few_rows(x[i:i + 1], w, out_in))[0] for i in range(len(x))]
    together = np.asarray(few_rows.few_rows(x, w, out_in))
    for m in (2, 5):
        np.testing.assert_array_equal(np.asarray(few_rows.few_rows(x[:m], w, out_in)), together[:m])
    np.testing.assert_array_equal(np.stack(alone), together)


@pytest.mark.parametrize("out_in", [False, True])
def test_a_row_does_not_depend_on_the_thread_count(out_in):
    """One thread (as in a forked child) and the pool give the same bits: the contraction is cut in
    the same two halves whatever the threads."""
    rng = np.random.default_rng(3)
    k, n = 328, 200
    w = jnp.asarray(rng.standard_normal((n, k) if out_in else (k, n)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((5, k)), jnp.float32)
    call = jax.ffi.ffi_call(few_rows.TARGET, jax.ShapeDtypeStruct((5, n), jnp.float32))
    runs = [np.asarray(call(x, w, out_in=np.int64(out_in), threads=np.int64(t))) for t in (1, 2, 4)]
    for run in runs[1:]:
        np.testing.assert_array_equal(run, runs[0])


def test_gradients_match_xla():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((3, 24)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((24, 40)), jnp.float32)

    def loss(product):
        return lambda x, w: jnp.sum(jnp.tanh(product(x, w)))

    got = jax.grad(loss(lambda x, w: few_rows.few_rows(x, w, False)), argnums=(0, 1))(x, w)
    want = jax.grad(loss(lambda x, w: jnp.dot(x, w, precision=HIGHEST)), argnums=(0, 1))(x, w)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def _uses_kernel(lhs, rhs, dims=None):
    dims = dims or (((lhs.ndim - 1,), (0,)), ((), ()))
    text = jax.jit(lambda a, b: few_rows.dot_general(a, b, dims)).lower(lhs, rhs).as_text()
    return few_rows.TARGET in text


@pytest.fixture
def all_rows(monkeypatch):
    """The kernel serves up to ``MAX_ROWS`` rows whatever this machine's measured choice."""
    monkeypatch.setattr(few_rows, "max_rows", lambda: few_rows.MAX_ROWS)


def test_dot_general_routes_only_few_float32_rows(all_rows):
    w = jnp.ones((8, 4), jnp.float32)
    assert _uses_kernel(jnp.ones((2, 3, 8)), w)                       # 6 rows, leading dims kept
    assert _uses_kernel(jnp.ones((2, 4)), jnp.ones((3, 4)), (((1,), (1,)), ((), ())))
    assert not _uses_kernel(jnp.ones((few_rows.MAX_ROWS + 1, 8)), w)  # too many rows
    assert not _uses_kernel(jnp.ones((2, 8), jnp.bfloat16), w.astype(jnp.bfloat16))
    out = few_rows.dot_general(jnp.ones((2, 3, 8)), w, (((2,), (0,)), ((), ())))
    assert out.shape == (2, 3, 4) and np.all(np.asarray(out) == 8.0)


def test_max_rows_is_measured_once_per_machine_and_routes(tmp_path, monkeypatch):
    """The per-machine choice is measured when no readable record exists, kept in the cache, and
    dot_general sends the kernel only that many rows."""
    measured = []
    monkeypatch.setattr(few_rows, "cache_dir", lambda: tmp_path)
    monkeypatch.setattr(few_rows, "_calibrate", lambda: measured.append(1) or 3)
    few_rows.max_rows.cache_clear()
    try:
        assert few_rows.max_rows() == 3 and len(measured) == 1
        (record,) = (tmp_path / "kernels").glob("few_rows-*.json")
        assert json.loads(record.read_text())["max_rows"] == 3
        w = jnp.ones((8, 4), jnp.float32)
        assert _uses_kernel(jnp.ones((3, 8)), w) and not _uses_kernel(jnp.ones((4, 8)), w)
        few_rows.max_rows.cache_clear()
        assert few_rows.max_rows() == 3 and len(measured) == 1          # read back, not measured
        record.write_text("{not json")
        few_rows.max_rows.cache_clear()
        assert few_rows.max_rows() == 3 and len(measured) == 2          # unreadable: measured again
        assert json.loads(record.read_text())["max_rows"] == 3
        monkeypatch.setattr(few_rows, "cache_dir", lambda: tmp_path / "file" / "x")
        (tmp_path / "file").write_text("")                              # no cache directory possible
        few_rows.max_rows.cache_clear()
        with pytest.warns(UserWarning, match="could not record"):
            assert few_rows.max_rows() == 3 and len(measured) == 3
    finally:
        few_rows.max_rows.cache_clear()


def test_max_rows_measures_when_first_asked_inside_a_trace(tmp_path, monkeypatch):
    """A fresh cache: the first product traced (inside jit, as a model's forward asks) measures the
    machine eagerly and records it."""
    monkeypatch.setattr(few_rows, "cache_dir", lambda: tmp_path)
    monkeypatch.setattr(few_rows, "CALIBRATION_ROWS", (1, 2))
    monkeypatch.setattr(few_rows, "CALIBRATION_WEIGHTS", (2, 64, 64))
    few_rows.max_rows.cache_clear()
    try:
        dims = (((1,), (0,)), ((), ()))
        out = jax.jit(lambda a, b: few_rows.dot_general(a, b, dims))(jnp.ones((2, 8)), jnp.ones((8, 4)))
        assert np.all(np.asarray(out) == 8.0)
        (record,) = (tmp_path / "kernels").glob("few_rows-*.json")
        assert json.loads(record.read_text())["max_rows"] in (0, 1, 2)
    finally:
        few_rows.max_rows.cache_clear()


def test_model_forward_agrees_with_xla_products(tiny, all_rows):
    """The tiny model's logits for a 4-token block, kernel on and off, agree to float32 rounding;
    ``xla_products`` keeps the kernel out of what is traced inside it."""
    from specdec.cache import init_cache
    from specdec.model import forward

    tokens = jnp.asarray([[5, 9, 2, 7]], jnp.int32)
    positions = jnp.arange(4, dtype=jnp.int32)[None]
    cache = init_cache(tiny.config, 1, 16)

    def lowered():
        return jax.jit(lambda: forward(tiny, cache, positions=positions, tokens=tokens).logits).lower()

    kernel = lowered()
    with few_rows.xla_products():
        xla = lowered()
    assert few_rows.TARGET in kernel.as_text() and few_rows.TARGET not in xla.as_text()
    np.testing.assert_allclose(np.asarray(kernel.compile()()), np.asarray(xla.compile()()), rtol=1e-4, atol=1e-4)
