"""Results record where and from what they came (device, commit, JAX, and for speculative benchmarks
the target's cost curve on that machine), land in one folder per study and run, whole or not at all,
and the index marks each study's current run."""

from __future__ import annotations

import json

import jax
import pytest

import record_results
from record_results import git_state, machine_name, run_folder, write_results
from specdec.bench import cost_curve_record


@pytest.fixture
def results(tmp_path, monkeypatch):
    monkeypatch.setattr(record_results, "RESULTS", tmp_path)
    monkeypatch.setattr(record_results, "device_label", lambda: "cpu: 2-core AVX512, AMD EPYC 9B14")
    return tmp_path


def test_results_record_commit_jax_and_cost_curve(tiny_lm, results):
    curve = cost_curve_record(tiny_lm, widths=(1, 2, 4))
    assert [c["k"] for c in curve["cost_curve"]] == [1, 2, 4] and curve["cost_curve"][0]["relative_cost"] == 1.0
    path = write_results("demo", {"model": "tiny", "rows": [{"method": "autoregressive", "tokens_per_s": 1.5}],
                                  **curve}, ["method", "tokens_per_s"])
    saved = json.loads(path.read_text())
    assert path.parent == run_folder("demo") and path.parent.name == f"epyc-avx512-{saved['date']}"
    assert path.relative_to(results).parts[0] == "demo"
    state = git_state()
    assert len(state["commit"]) == 40 and isinstance(state["dirty"], bool)
    assert (saved["commit"], saved["dirty"], saved["jax"]) == (state["commit"], state["dirty"], jax.__version__)
    markdown = path.with_suffix(".md").read_text()
    assert f"- commit: {state['commit']}" in markdown and "c(1) = 1.00, c(2) = " in markdown
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".partial")]


def test_the_index_marks_each_studys_newest_run_current(results):
    for study, folder, date in (("a", "xeon-avx512-2026-12-01", "2026-12-01"), ("a", "epyc-avx512-2026-12-05",
                                "2026-12-05"), ("b", "h100-2026-11-30", "2026-11-30")):
        (results / study / folder).mkdir(parents=True)
        (results / study / folder / f"{study}.json").write_text(json.dumps({"date": date, "device": folder[:-11],
                                                                            "commit": "f" * 40, "dirty": False}))
    (results / "b" / "cpu-avx2-2026-12-02").mkdir()  # a run whose JSON is missing is still listed
    listed = record_results.runs()
    assert [r["folder"] for r in listed["a"]] == ["a/epyc-avx512-2026-12-05", "a/xeon-avx512-2026-12-01"]
    assert [r["folder"] for r in listed["b"]] == ["b/cpu-avx2-2026-12-02", "b/h100-2026-11-30"]
    rows = [line for line in record_results.write_index().read_text().splitlines() if line.startswith("| a") or
            line.startswith("|  |")]
    assert rows[0].startswith("| a | [a/epyc-avx512-2026-12-05]") and rows[0].endswith("| current |")
    assert rows[1].endswith("| older |")


def test_machine_names_and_bad_study_names():
    assert machine_name("cpu: 2-core AVX512, Intel(R) Xeon(R) Processor") == "xeon-avx512"
    assert machine_name("cpu: 2-core AVX2") == "cpu-avx2"
    assert machine_name("gpu: NVIDIA H100 80GB HBM3") == "h100-80gb-hbm3"
    with pytest.raises(ValueError, match="must be one folder name"):
        run_folder("../escape")
