"""Lossless speculative sampling is exact in distribution (Monte-Carlo against the exact distribution).

Target and draft are different tiny random models over an 8-token vocabulary
(chain and tree drafts), random Medusa heads over a tree (deterministic
top-k candidates, verified as point masses), a random feature draft's chain
or a draft model's chain beside prompt-lookup chains (drawn and deterministic
siblings in one tree), or the target's own first layer (early exit).
The exact distribution of the first three generated tokens (512 outcomes) comes
from teacher-forced target forwards; 6000 speculative samples (one row per
seed) are compared with Pearson's chi-square test, cells with expected count
< 5 pooled, p-value from the Wilson-Hilferty approximation. A correct rule must
give p > 1e-3; a deliberately broken rule (rejections resample from the target
instead of the residual norm(max(0, p - q))) must give p < 1e-6, which shows
the test has the power to catch a wrong rule (measured: p ~ 1e-130 at 6000 samples).
"""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import specdec
import specdec.verify
from flax import nnx
from heads.medusa import new_heads
from specdec.config import tiny_config
from specdec.engine import spec_chunk
from specdec.loading import LoadedModel
from specdec.model import init_model, teacher_forced_logits

VOCAB, PROMPT, NEW, SAMPLES = 8, [1, 2, 3], 3, 6000


@pytest.fixture(scope="module")
def pair():
    target = LoadedModel.from_module(init_model(tiny_config(vocab_size=VOCAB), seed=11), name="t8")
    draft = LoadedModel.from_module(init_model(tiny_config(vocab_size=VOCAB, n_layers=1), seed=12), name="d8")
    return target, draft


def exact_distribution(target) -> dict[tuple, float]:
    outcomes = list(itertools.product(range(VOCAB), repeat=NEW))
    seqs = jnp.asarray([PROMPT + list(o) for o in outcomes])
    logp = jax.nn.log_softmax(teacher_forced_logits(target.module, seqs), axis=-1)
    p = len(PROMPT)
    total = sum(logp[jnp.arange(len(outcomes)), p - 1 + i, seqs[:, p + i]] for i in range(NEW))
    return dict(zip(outcomes, np.exp(np.asarray(total, np.float64))))


def chi_square_p(counts: dict, exact: dict, n: int) -> float:
    cells = sorted(exact, key=exact.get, reverse=True)
    obs, exp = [], []
    pooled_o = pooled_e = 0.0
    for c in cells:
        e = exact[c] * n
        if e >= 5:
            obs.append(counts.get(c, 0))
            exp.append(e)
        else:
            pooled_o += counts.get(c, 0)
            pooled_e += e
    obs.append(pooled_o)
    exp.append(pooled_e)
    x = sum((o - e) ** 2 / e for o, e in zip(obs, exp) if e > 0)
    df = len(obs) - 1
    z = ((x / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
    return 0.5 * math.erfc(z / math.sqrt(2))


def sample_counts(target, **method) -> dict:
    res = specdec.generate(target, [PROMPT] * SAMPLES, temperature=1.0, verification="rejection",
                           max_new_tokens=NEW, seed=list(range(SAMPLES)), **method)
    counts: dict = {}
    for r in res:
        counts[tuple(r.tokens)] = counts.get(tuple(r.tokens), 0) + 1
    return counts


def _method(kind: str, target, draft) -> dict:
    if kind == "medusa-tree":  # deterministic top-k candidates over a tree: verified as point masses
        heads = new_heads(target.module, base_name="t8", n_heads=2)
        nnx.update(heads, jax.tree.map(lambda x: x + 0.7 * jax.random.normal(jax.random.key(1), x.shape),
                                       nnx.state(heads, nnx.Param)))
        return dict(method="medusa", heads=heads, tree=[(0,), (1,), (2,), (0, 0), (0, 1), (1, 0)])
    if kind.startswith("eagle"):
        from heads.feature_draft import default_spec, new_feature_draft

        feature = new_feature_draft(target.module, default_spec(target.module, None), seed=3)
        if kind == "eagle-lookup":  # drawn feature-draft chain beside deterministic prompt-lookup tokens
            return dict(method="eagle", feature_draft=feature, k=2, lookup=2, lookup_width=2)
        if kind == "eagle-tree":  # a tree of draft ranks: each rank 0 drawn, the runners-up point masses
            return dict(method="eagle", feature_draft=feature, tree=[(0,), (1,), (0, 0), (0, 1), (1, 0), (1, 1)])
        return dict(method="eagle", feature_draft=feature, k=3, draft_branches=3)  # chains below runner-up tokens
    if kind == "draft-lookup":  # a drawn draft-model chain beside prompt lookup (the draft re-feeds their path)
        return dict(method="draft", draft=draft, k=2, lookup=2)
    if kind == "early-exit":  # the target's first layer drafts; verification reuses its K/V
        return dict(method="early_exit", exit_layer=1, k=2)
    return dict(method="draft", draft=draft, k=2, draft_width={"chain": 1, "tree": 3}[kind])


@pytest.mark.parametrize("kind", ["chain", "tree", "medusa-tree", "eagle-lookup", "eagle-branches", "eagle-tree",
                                  "draft-lookup", "early-exit"])
def test_rejection_sampling_matches_target_distribution(pair, kind):
    target, draft = pair
    p = chi_square_p(sample_counts(target, **_method(kind, target, draft)), exact_distribution(target), SAMPLES)
    print(f"{kind}: p = {p:.3g}")
    assert p > 1e-3, f"speculative samples differ from the target distribution (chi-square p = {p:.2e})"


def test_broken_rule_is_detected(pair, monkeypatch):
    """Resampling from the target instead of the residual is biased; the same test must reject it."""
    target, draft = pair
    spec_chunk.clear_cache()  # the program this test's decode verifies in: it retraces with the broken rule
    monkeypatch.setattr(specdec.verify, "residual_distribution", lambda r, q: r)
    try:
        p = chi_square_p(sample_counts(target, **_method("chain", target, draft)), exact_distribution(target),
                         SAMPLES)
    finally:
        spec_chunk.clear_cache()
    print(f"broken: p = {p:.3g}")
    assert p < 1e-6, f"the broken rule went unnoticed (chi-square p = {p:.2e})"
