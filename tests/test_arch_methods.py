"""Every decoding method on the sliding-window architectures (Gemma 3, Gemma 2, Mistral), and every
lossless method in the "bf16" precision policy.

The architecture cases are the committed tiny checkpoints of tests/fixtures/archs (window 8, shorter
than the prompts and the cache); each lossless proposer must return exactly the autoregressive tokens
in a ragged batch and through the request pool. SkipDecode and superposed decoding are lossy: they
must run and return the requested number of tokens.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

import specdec
import specdec.equivalence
from conftest import greedy_rows
from drafts.model import DraftSpec, new_draft
from heads.feature_draft import default_spec, new_feature_draft
from heads.medusa import new_heads
from specdec.config import PRECISION_POLICIES
from specdec.equivalence import check, tie_tolerance
from specdec.loading import LoadedModel
from specdec.model import head_table
from specdec.weights import hf_tensors, model_from_hf

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
from archs import ROOT, TOKENS, WINDOW  # noqa: E402

ARCHS = ("gemma3", "gemma2", "mistral")
LOSSLESS = ("draft", "prompt_lookup", "medusa", "eagle", "early_exit")
PROMPTS = [TOKENS[:11], TOKENS[2:24], TOKENS[5:19]]  # ragged, each longer than the window
NEW, CACHE = 16, 64  # the fixtures' context is 64 positions
assert min(map(len, PROMPTS)) > WINDOW

def proposer_options(lm, method: str) -> dict:
    """``generate`` options of one lossless ``method`` on ``lm``: a fresh 1-layer draft copied from the
    target's last layer, prompt lookup, fresh Medusa heads, a random feature draft, early exit."""
    module = lm.module
    if method == "draft":
        draft = new_draft(module, DraftSpec(n_layers=1, init="layers"), seed=1)
        return dict(method="draft", draft=LoadedModel.from_module(draft, name=f"{lm.name}-draft"), k=3)
    if method == "prompt_lookup":
        return dict(method="prompt_lookup", k=4)
    if method == "medusa":
        return dict(method="medusa", heads=new_heads(module, base_name=lm.name, dtype=lm.config.dtype),
                    tree="tree-8")
    if method == "eagle":
        return dict(method="eagle", feature_draft=new_feature_draft(module, default_spec(module, None), seed=3),
                    k=3, draft_width=2)
    return dict(method="early_exit", exit_layer=2, k=3)


@pytest.fixture(scope="module")
def target(request):
    """(an architecture case's model, its greedy autoregressive outputs on PROMPTS)."""
    lm = specdec.load(ROOT / request.param, precision="highest")
    return lm, specdec.generate(lm, PROMPTS, max_new_tokens=NEW, max_cache_len=CACHE)


def _cases(archs=ARCHS):
    return [pytest.param(name, method, id=f"{name}-{method}") for name in archs for method in LOSSLESS]


@pytest.mark.parametrize("target, method", _cases(), indirect=["target"])
def test_ragged_batch_equals_autoregressive(target, method):
    lm, ref = target
    out = specdec.generate(lm, PROMPTS, max_new_tokens=NEW, max_cache_len=CACHE, **proposer_options(lm, method))
    assert [r.tokens for r in out] == [r.tokens for r in ref]


@pytest.mark.parametrize("target, method", _cases(["gemma3"]), indirect=["target"])  # admissions: arch-blind
def test_request_pool_equals_autoregressive(target, method):
    lm, ref = target
    out = specdec.generate(lm, PROMPTS, max_new_tokens=NEW, max_cache_len=CACHE, slots=2,
                           **proposer_options(lm, method))
    assert [r.tokens for r in out] == [r.tokens for r in ref]


@pytest.mark.parametrize("target", ["gemma3"], indirect=True)
def test_lossy_methods_run_on_gemma3(target):
    """SkipDecode and superposed decoding return the requested tokens; superposed decoding with one
    draft and no n-grams is greedy decoding."""
    lm, ref = target
    skip = specdec.generate(lm, PROMPTS, max_new_tokens=NEW, max_cache_len=CACHE, ignore_eos=True,
                            method="skipdecode", target_speedup=2.0)
    assert [len(r.tokens) for r in skip] == [NEW] * len(PROMPTS)
    assert skip[0].stats.mean_active_layers < lm.config.n_layers
    sup = specdec.generate(lm, PROMPTS, max_new_tokens=NEW, method="superposed", num_drafts=3, alpha=0)
    assert all(len(r.drafts) == 3 and all(len(d.tokens) == NEW for d in r.drafts) for r in sup)
    one = specdec.generate(lm, PROMPTS, max_new_tokens=NEW, method="superposed", num_drafts=1, alpha=0)
    assert [r.tokens for r in one] == [r.tokens for r in ref]


@pytest.mark.parametrize("target", ["gemma3"], indirect=True)
def test_medusa_heads_train_on_gemma3(target, tmp_path):
    """A few optimiser steps of Medusa heads over Gemma 3's packed hidden states lower the loss."""
    from training.data import head_labels
    from training.features import backbone_features
    from training.medusa import HeadsTrainConfig, fit

    lm, _ = target
    packed = greedy_rows(lm, 16, seed=0)
    feats = backbone_features(lm, packed, head_labels(packed, 4))
    heads = new_heads(lm.module, base_name=lm.name)
    log = fit(heads, head_table(lm.module), feats, HeadsTrainConfig(batch_size=64, epochs=3, lr=1e-2,
                                                                     checkpoint_every=1000), tmp_path)
    losses = [r["loss"] for r in log]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]



@pytest.mark.parametrize("target", ["gemma3"], indirect=True)
@pytest.mark.parametrize("component", ["draft", "feature_draft"])
def test_drafts_train_on_gemma3(target, component, tmp_path):
    """A few optimiser steps of a draft (distillation) and of a feature draft on Gemma 3's own
    greedy text lower the loss; the trained draft still decodes exactly."""
    lm, ref = target
    rows = greedy_rows(lm, 16, seed=0)
    if component == "draft":
        from training.draft import DraftTrainConfig, fit, teacher_targets

        spec = DraftSpec(n_layers=1, init="layers")
        module = new_draft(lm.module, spec, seed=1)
        config = DraftTrainConfig(batch_size=8, epochs=3.0, lr=3e-3, warmup=0.1, checkpoint_every=1000, vocab_size=0)
        log = fit(module, spec, teacher_targets(lm, rows, k=lm.config.vocab_size), config, tmp_path)
        options = dict(method="draft", draft=LoadedModel.from_module(module, name="trained-draft"), k=3)
    else:
        from training.feature_draft import FeatureDraftTrainConfig, fit, target_rows

        spec = default_spec(lm.module, None)
        module = new_feature_draft(lm.module, spec, seed=3)
        config = FeatureDraftTrainConfig(batch_size=8, epochs=3.0, lr=3e-3, warmup=0.1, checkpoint_every=1000,
                                         vocab_size=0)
        log = fit(module, spec, target_rows(lm, rows), config, tmp_path)
        options = dict(method="eagle", feature_draft=module, k=3)
    losses = [r["loss"] for r in log]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    out = specdec.generate(lm, PROMPTS, max_new_tokens=NEW, max_cache_len=CACHE, **options)
    assert [r.tokens for r in out] == [r.tokens for r in ref]

# ----------------------------------------------------------------------------- bf16

BF16_PROMPTS = [[5, 9, 2, 44, 17], [7] * 11 + [3, 8, 7, 7, 7], list(range(20, 45))]


@pytest.fixture(scope="module")
def tiny_bf16(tiny):
    """The conftest ``tiny`` model under the "bf16" policy (its weights rounded to bfloat16)."""
    cfg = tiny.config.replace(**PRECISION_POLICIES["bf16"])
    return LoadedModel.from_module(model_from_hf(cfg, hf_tensors(tiny).__getitem__), name="tiny-bf16")


@pytest.mark.parametrize("method", LOSSLESS)
def test_bf16_strict_equivalence(tiny_bf16, method):
    """Strict mode compares forwards of one width: bitwise identical in bfloat16 too."""
    report = check(tiny_bf16, BF16_PROMPTS, strict=True, max_new_tokens=[20, 14, 9],
                   **proposer_options(tiny_bf16, method))
    assert report.counts["identical"] == len(BF16_PROMPTS), report.table()


def test_bf16_checks_use_the_bf16_tie_tolerance(tiny, tiny_bf16, monkeypatch):
    assert tie_tolerance(tiny_bf16.config) == 1.0 and tie_tolerance(tiny.config) == 1e-3
    used = []
    classify = specdec.equivalence.classify
    monkeypatch.setattr(specdec.equivalence, "classify",
                        lambda *a, tolerance, **kw: used.append(tolerance) or classify(*a, tolerance=tolerance, **kw))
    report = check(tiny_bf16, BF16_PROMPTS, method="prompt_lookup", k=4, max_new_tokens=12,
                   reference_batch_size=len(BF16_PROMPTS))
    assert used == [1.0] * len(BF16_PROMPTS) and report.verdict != "MISMATCH", report.table()
