"""Benchmark results record where and from what they came: device, commit, JAX, and for
speculative benchmarks the target's cost curve on that machine."""

from __future__ import annotations

import json

import jax

import specdec.bench as bench
from specdec.bench import cost_curve_record, git_state, write_results


def test_results_record_commit_jax_and_cost_curve(tiny_lm, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "RESULTS", tmp_path)
    curve = cost_curve_record(tiny_lm, widths=(1, 2, 4))
    assert [c["k"] for c in curve["cost_curve"]] == [1, 2, 4] and curve["cost_curve"][0]["relative_cost"] == 1.0
    path = write_results("demo", {"model": "tiny", "rows": [{"method": "autoregressive", "tokens_per_s": 1.5}],
                                  **curve}, ["method", "tokens_per_s"])
    saved = json.loads(path.read_text())
    state = git_state()
    assert len(state["commit"]) == 40 and isinstance(state["dirty"], bool)
    assert (saved["commit"], saved["dirty"], saved["jax"]) == (state["commit"], state["dirty"], jax.__version__)
    markdown = path.with_suffix(".md").read_text()
    assert f"- commit: {state['commit']}" in markdown and "c(1) = 1.00, c(2) = " in markdown
