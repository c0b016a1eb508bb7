"""Shared fixtures: tiny random models for speed, the real SmolLM2 model once per session."""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from heads.medusa import new_heads
from specdec.compile_cache import use_compile_cache
from specdec.config import tiny_config
from specdec.fetch import cache_dir
from specdec.loading import LoadedModel
from specdec.model import init_model, teacher_forced_logits
from specdec.sampling import Sampling

if os.environ.get("PYTEST_XDIST_WORKER") and "SPECDEC_COMPILE_CACHE" not in os.environ:
    # one directory per pytest-xdist worker: JAX writes a cache entry in place, without a lock, so a worker
    # could read an entry the other is still writing (a truncated program; XLA segfaults on one)
    os.environ["SPECDEC_COMPILE_CACHE"] = str(cache_dir() / f"xla-{os.environ['PYTEST_XDIST_WORKER']}")
use_compile_cache()  # compiled programs persist across runs (``SPECDEC_COMPILE_CACHE=off``: none)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop the compiled programs of each test module after it (they stay in the on-disk cache): a
    worker holding hundreds of XLA executables nears the kernel's memory-map limit (vm.max_map_count),
    where XLA crashed (a segfault) serializing or loading one."""
    yield
    jax.clear_caches()


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook reads the xdist_group marks
def pytest_collection_modifyitems(items):
    """Real-model tests first (the longest); under pytest-xdist (``-n auto --dist loadgroup``) the tests
    that share the pool's reference decode run in one worker, and every other test goes to whichever
    worker is free (a worker loads the real model once, in about 10 s)."""
    for item in items:
        if "reference" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("real-pool"))
    items.sort(key=lambda item: item.get_closest_marker("real") is None)  # stable: order kept otherwise


def pytest_runtest_setup(item):
    """Tiny-model tests are compile-bound: their programs compile with LLVM's cheap settings
    (``jax_disable_most_optimizations`` changes only the backend's code generation, not the HLO or its
    arithmetic). Real-model tests, bound by run time, compile with XLA's defaults."""
    jax.config.update("jax_disable_most_optimizations", item.get_closest_marker("real") is None)


@pytest.fixture(scope="session")
def tiny():
    """A 3-layer GQA model with a tied head (module form)."""
    return init_model(tiny_config(), seed=0)


@pytest.fixture(scope="session")
def tiny_lm(tiny):
    return LoadedModel.from_module(tiny, name="tiny")


@pytest.fixture(scope="session")
def methods(tiny):
    """Each proposer's generate options on ``tiny``: a different 1-layer random draft, prompt lookup,
    random Medusa heads, a random feature draft."""
    from heads.feature_draft import default_spec, new_feature_draft
    from heads.medusa import new_heads

    draft = LoadedModel.from_module(init_model(tiny_config(n_layers=1), seed=7), name="tiny-draft")
    return {"draft": dict(method="draft", draft=draft, k=3),
            "prompt_lookup": dict(method="prompt_lookup", k=4),
            "medusa": dict(method="medusa", heads=new_heads(tiny, base_name="tiny"), tree="tree-8"),
            "eagle": dict(method="eagle", feature_draft=new_feature_draft(tiny, default_spec(tiny, None), seed=3),
                          k=3, draft_width=2)}


@pytest.fixture(scope="session")
def smollm2():
    import specdec

    return specdec.loading.load_once("smollm2-135m")


@pytest.fixture(scope="session")
def gemma3():
    """Gemma-3-270M (the pretrained base model, Q4_K_M GGUF dequantized to float32)."""
    import specdec

    return specdec.loading.load_once("gemma3-270m")


@functools.partial(jax.jit, static_argnames="graphdef")
def _teacher_forced(graphdef, state, tokens):
    return teacher_forced_logits(nnx.merge(graphdef, state), tokens)


def full_logits(model, tokens) -> jnp.ndarray:
    """Teacher-forced logits [B, T, V] of ``tokens: [B, T]`` from an empty cache (no decoding code)."""
    return _teacher_forced(*nnx.split(model), jnp.asarray(tokens))


def last_logits(model, seq: list[int]) -> jnp.ndarray:
    """[1, V] next-token logits after ``seq`` (padded to a multiple of 32 to limit recompiles)."""
    padded = seq + [0] * (-len(seq) % 32)
    return full_logits(model, jnp.asarray([padded]))[:, len(seq) - 1]


def sampling_reference(model, prompt: list[int], n: int, seed: int = 0,
                       sampling: Sampling = Sampling()) -> list[int]:
    """Decoding with no KV cache: a full forward per token, noise keyed by (seed, position).

    With the default ``Sampling()`` this is greedy decoding.
    """
    seq = list(prompt)
    for _ in range(n):
        logits = last_logits(model, seq)
        seq.append(int(sampling.sample(logits, jnp.asarray([seed]), jnp.asarray([len(seq)]))[0]))
    return seq[len(prompt):]


def greedy_rows(lm, rows: int, seed: int, length: int = 32):
    """Packed training rows of random prompts continued greedily by ``lm`` (so the data is the
    target's own; the replies are the assistant tokens)."""
    import numpy as np

    import specdec
    from training.data import Example, pack

    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, lm.config.vocab_size, rng.integers(2, 8)).tolist() for _ in range(rows)]
    outs = specdec.generate(lm, prompts, max_new_tokens=24, ignore_eos=True)
    return pack([Example(p + o.tokens, [0] * len(p) + [1] * len(o.tokens)) for p, o in zip(prompts, outs)], length)


def random_heads(model, seed: int, scale: float, **kw):
    """Heads whose residual blocks have random weights (``scale`` 0: fresh, identity heads)."""
    heads = new_heads(model, base_name="tiny", **kw)
    state = nnx.state(heads, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    nnx.update(heads, jax.tree.unflatten(treedef, noisy))
    return heads
