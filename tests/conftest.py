"""Shared fixtures: tiny random models for speed, the real SmolLM2 model once per session."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from specdec.cache import init_cache
from specdec.config import tiny_config
from specdec.loading import LoadedModel
from specdec.model import forward, init_model


@pytest.fixture(scope="session")
def tiny():
    """A 3-layer GQA model with a tied head (module form)."""
    return init_model(tiny_config(), seed=0)


@pytest.fixture(scope="session")
def tiny_lm(tiny):
    return LoadedModel.from_module(tiny, name="tiny")


@pytest.fixture(scope="session")
def smollm2():
    import specdec

    return specdec.load("smollm2-135m")


def full_logits(model, tokens) -> jnp.ndarray:
    """Teacher-forced logits [B, T, V] of ``tokens: [B, T]`` from an empty cache."""
    b, t = tokens.shape
    cache = init_cache(model.config, b, t)
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    return forward(model, cache, tokens=jnp.asarray(tokens), positions=pos).logits


def greedy_reference(model, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding with no KV cache: a full forward over the whole sequence per token."""
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(jnp.argmax(full_logits(model, jnp.asarray([seq]))[0, -1])))
    return seq[len(prompt):]
