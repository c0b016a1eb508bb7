"""Every architecture against Hugging Face transformers, and every decoding path on each.

The golden logits come from transformers (PyTorch, float32) loading the same tiny random
checkpoints (tests/fixtures/make_arch_golden.py); the tests need no torch.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import specdec
from specdec.cache import init_cache
from specdec.hf_checkpoint import config_to_hf, hf_config
from specdec.model import forward

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
from archs import CASES, PREFILL, ROOT, TOKENS  # noqa: E402

# float32 on both sides; the worst difference measured over all cases is ~2e-6
LOGIT_TOL = 5e-5


def _golden(name: str) -> dict:
    return json.loads((ROOT / name / "golden.json").read_text())


@pytest.fixture(scope="module", params=list(CASES))
def arch(request):
    """(case name, the model loaded from its Hugging Face directory)."""
    return request.param, specdec.load(ROOT / request.param, precision="highest")


def test_config_reads_back_as_written(arch):
    name, lm = arch
    assert lm.config == CASES[name]
    assert hf_config(config_to_hf(CASES[name])) == CASES[name]


# NTK ("dynamic") scaling past the trained context: transformers rotates a whole prefill with the prompt's
# length, specdec each token with its own; the cached-decode test compares the two
@pytest.mark.parametrize("arch", [name for name in CASES if name != "llama_dynamic"], indirect=True)
def test_prefill_logits_match_transformers(arch):
    name, lm = arch
    logits = forward(lm.module, init_cache(lm.config, 1, 32), tokens=jnp.asarray([TOKENS]),
                     positions=jnp.arange(len(TOKENS))[None]).logits[0]
    np.testing.assert_allclose(np.asarray(logits), _golden(name)["prefill_logits"], atol=LOGIT_TOL, rtol=0)


def test_cached_decode_logits_match_transformers(arch):
    name, lm = arch
    model, cache = lm.module, init_cache(lm.config, 1, 32)
    out = forward(model, cache, tokens=jnp.asarray([TOKENS[:PREFILL]]), positions=jnp.arange(PREFILL)[None])
    cache, steps = out.cache.advance(jnp.asarray([PREFILL])), []
    for pos in range(PREFILL, len(TOKENS)):
        out = forward(model, cache, tokens=jnp.asarray([[TOKENS[pos]]]), positions=jnp.asarray([[pos]]))
        cache = out.cache.advance(jnp.asarray([1]))
        steps.append(np.asarray(out.logits[0, 0]))
    np.testing.assert_allclose(np.stack(steps), _golden(name)["decode_logits"], atol=LOGIT_TOL, rtol=0)


def test_greedy_decoding_matches_transformers(arch):
    name, lm = arch
    res = specdec.generate(lm, [TOKENS[:PREFILL]], max_new_tokens=16, max_cache_len=48)
    assert res[0].tokens == _golden(name)["greedy"]


@pytest.mark.parametrize("method,options", [("prompt_lookup", {"k": 3}), ("early_exit", {"exit_layer": 2, "k": 3})])
def test_speculative_decoding_equals_autoregressive(arch, method, options):
    name, lm = arch
    prompts = [TOKENS[:PREFILL], TOKENS[3:20], TOKENS[:9]]
    ref = specdec.generate(lm, prompts, max_new_tokens=20, max_cache_len=64)
    ours = specdec.generate(lm, prompts, max_new_tokens=20, max_cache_len=64, method=method, **options)
    assert [r.tokens for r in ours] == [r.tokens for r in ref]
