"""Sampling: processing of logits, Gumbel-max draws, per-(row, position) keys."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from specdec.sampling import Sampling, argmax, gumbel_noise

LOGITS = jnp.asarray([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])


def test_greedy_is_argmax():
    s = Sampling()
    assert s.greedy
    logits = jax.random.normal(jax.random.key(0), (5, 50))
    got = s.sample(logits, jnp.arange(5), jnp.zeros(5, jnp.int32))
    np.testing.assert_array_equal(got, jnp.argmax(logits, -1))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.sampled_from([-np.inf, -1.5, -0.0, 0.0, 0.25, 3.0, np.inf, np.nan]), min_size=1,
                         max_size=7), min_size=1, max_size=4).filter(lambda rows: len({len(r) for r in rows}) == 1))
def test_argmax_is_jnp_argmax_with_ties_infinities_and_nans(rows):
    """The fast argmax picks what ``jnp.argmax`` picks: the first of tied maxima, the first NaN."""
    x = jnp.asarray(rows, jnp.float32)
    got = argmax(x)
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(got, jnp.argmax(x, axis=-1))


def test_top_k_and_top_p_masks():
    lp = Sampling(temperature=1.0, top_k=2).log_probs(LOGITS)
    assert np.isfinite(lp[0, :2]).all() and np.isneginf(lp[0, 2:]).all()
    np.testing.assert_allclose(jnp.exp(lp).sum(), 1.0, rtol=1e-6)
    probs = jax.nn.softmax(LOGITS[0])  # 0.557, 0.205, 0.124, ...
    lp = Sampling(temperature=1.0, top_p=0.7).log_probs(LOGITS)
    assert np.isfinite(lp[0, :2]).all() and np.isneginf(lp[0, 2:]).all()
    np.testing.assert_allclose(jnp.exp(lp[0, :2]), probs[:2] / probs[:2].sum(), rtol=1e-5)
    lp = Sampling(temperature=1.0, top_p=0.5).log_probs(LOGITS)  # top token alone already reaches 0.5
    assert np.isfinite(lp[0, 0]) and np.isneginf(lp[0, 1:]).all()


def test_temperature_scales_logits():
    lp = Sampling(temperature=0.5).log_probs(LOGITS)
    np.testing.assert_allclose(lp, jax.nn.log_softmax(LOGITS / 0.5), rtol=1e-6)


def test_gumbel_max_matches_the_distribution():
    """Draws over many (seed, position) keys follow the processed softmax (chi-square test)."""
    s = Sampling(temperature=0.8, top_k=5)
    n = 20000
    logits = jnp.broadcast_to(LOGITS, (n, 6))
    draws = np.asarray(s.sample(logits, jnp.arange(n) % 97, jnp.arange(n) // 97))
    counts = np.bincount(draws, minlength=6)
    expected = np.asarray(jnp.exp(s.log_probs(LOGITS)[0])) * n
    assert counts[5] == 0  # outside the top-5
    chi2 = (((counts[:5] - expected[:5]) ** 2) / expected[:5]).sum()
    assert chi2 < 20.5, (counts, expected)  # p ~ 0.0004 at 4 degrees of freedom


def test_keys_depend_only_on_seed_and_position():
    a = gumbel_noise(jnp.asarray([3, 4]), jnp.asarray([10, 11]), 32)
    b = gumbel_noise(jnp.asarray([9, 4, 3]), jnp.asarray([0, 11, 10]), 32)
    np.testing.assert_array_equal(a[0], b[2])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], a[1])
    c = gumbel_noise(jnp.asarray([3]), jnp.asarray([12]), 32)
    assert not np.array_equal(a[0], c[0])


@pytest.mark.parametrize("bad, match", [
    (dict(temperature=-1.0), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=-3), "top_k"),
    (dict(top_k=2.5), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
])
def test_bad_sampling_values_are_rejected(bad, match):
    with pytest.raises(ValueError, match=match):
        Sampling(**bad)
