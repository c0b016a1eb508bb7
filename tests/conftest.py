"""Shared fixtures: tiny random models for speed, the real SmolLM2 model once per session."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

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


@functools.partial(jax.jit, static_argnames="graphdef")
def _teacher_forced(graphdef, state, tokens):
    model = nnx.merge(graphdef, state)
    b, t = tokens.shape
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    return forward(model, init_cache(model.config, b, t), tokens=tokens, positions=pos).logits


def full_logits(model, tokens) -> jnp.ndarray:
    """Teacher-forced logits [B, T, V] of ``tokens: [B, T]`` from an empty cache (no decoding code)."""
    return _teacher_forced(*nnx.split(model), jnp.asarray(tokens))


def last_logits(model, seq: list[int]) -> jnp.ndarray:
    """[1, V] next-token logits after ``seq`` (padded to a multiple of 32 to limit recompiles)."""
    padded = seq + [0] * (-len(seq) % 32)
    return full_logits(model, jnp.asarray([padded]))[:, len(seq) - 1]


def greedy_reference(model, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding with no KV cache: a full forward over the whole sequence per token."""
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(jnp.argmax(last_logits(model, seq)[0])))
    return seq[len(prompt):]
