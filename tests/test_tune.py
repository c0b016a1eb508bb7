"""Schedules tuned on this device: the candidate grid, the pick from measurements, saved files, and a
real (tiny-model) tuning run whose schedule decodes exactly like autoregressive decoding."""

from __future__ import annotations

import argparse
import json

import pytest

import specdec
from specdec import bench, tune as tune_module
from specdec.cli import main as cli_main
from specdec.cli_methods import method_options
from specdec.tune import candidates, hopeless, read_schedule, save_schedule, tune


def test_candidates_offer_only_budgets_that_can_drop_a_draft_token():
    assert candidates("prompt_lookup", 1, (0, 1, 4), (1, 2, 4)) == {
        "k=0": {"k": 0}, "k=1": {"k": 1},
        "k=4": {"k": 4}, "k=4 budget=1": {"k": 4, "budget": 1}, "k=4 budget=2": {"k": 4, "budget": 2}}
    eight = candidates("draft", 8, (0, 1), (4, 8))
    assert eight == {"k=0": {"k": 0}, "k=1": {"k": 1}, "k=1 budget=4": {"k": 1, "budget": 4}}
    medusa = candidates("medusa", 2, ("chain-0", "chain-1", "tree-8"), (2, 8))
    assert list(medusa) == ["tree=chain-0", "tree=chain-1", "tree=tree-8", "tree=tree-8 budget=2",
                            "tree=tree-8 budget=8"]  # 2 rows x 8 nodes: budget 16 would drop nothing


def test_candidates_count_the_tokens_each_choice_really_drafts():
    assert candidates("draft", 2, (0, 2), (4, 8)) == {"k=0": {"k": 0}, "k=2": {"k": 2}}  # 2 rows x k 2: 4 tokens
    wide = candidates("draft", 2, (0, 2), (4, 8), drafted=lambda s: 3 * s["k"])  # e.g. branches: 12 tokens
    assert list(wide) == ["k=0", "k=2", "k=2 budget=4", "k=2 budget=8"]


def test_candidates_cross_k_with_draft_widths():
    tried = candidates("eagle", 1, (0, 2), (4,), widths=(3, 1))
    assert tried == {"k=0": {"k": 0}, "k=2 width=1": {"k": 2, "draft_width": 1},
                     "k=2 width=3": {"k": 2, "draft_width": 3},
                     "k=2 width=3 budget=4": {"k": 2, "draft_width": 3, "budget": 4}}  # 2 x 3 tokens: 4 drops some
    with pytest.raises(ValueError, match="widths must be integers >= 1"):
        candidates("eagle", 1, (1,), widths=(0,))
    with pytest.raises(ValueError, match="tuned for methods prompt_lookup, draft, eagle, not 'medusa'"):
        candidates("medusa", 1, widths=(2,))


def test_candidates_reject_bad_input():
    with pytest.raises(ValueError, match="method must be one of"):
        candidates("superposed", 1)
    with pytest.raises(ValueError, match="budgets must be integers >= 1"):
        candidates("prompt_lookup", 1, (1,), (0,))
    with pytest.raises(ValueError, match="no candidate k"):
        candidates("prompt_lookup", 1, ())


@pytest.fixture(autouse=True)
def _flat_cost_curve(monkeypatch):
    """Every forward costs one one-token forward (nothing is hopeless) unless a test says otherwise."""
    monkeypatch.setattr(tune_module, "target_cost_curve", lambda lm, widths, batch: {w: 1.0 for w in widths})


def _fake_rates(fastest: dict[int, str]):
    """A ``step_rates`` stand-in: at r rows the setting ``fastest[r]`` decodes 2 tokens a step, the rest 1."""

    def rates(model, ids, settings, **_):
        best = fastest[len(ids)]
        return {name: {"step_ms": 10.0, "tokens_per_step": 2.0 if name == best else 1.0} for name in settings}

    return rates


def test_tune_keeps_the_fastest_setting_at_each_load(monkeypatch, tiny_lm):
    monkeypatch.setattr(tune_module, "step_rates", _fake_rates({1: "k=0", 2: "k=2 budget=1", 4: "k=2 budget=1",
                                                                8: "k=1"}))
    tuned = tune(tiny_lm, "prompt_lookup", [[1, 2]] * 8, rows=(8, 1, 2, 4), choices=(0, 1, 2), budgets=(1,))
    assert tuned.options == {"k": {1: 0, 2: 2, 8: 1}, "budget": {1: None, 2: 1, 8: None}}
    chosen = [(t["rows"], t["setting"]) for t in tuned.rows if t.get("chosen")]
    assert chosen == [(1, "k=0"), (2, "k=2 budget=1"), (4, "k=2 budget=1"), (8, "k=1")]
    assert all(t["x_vs_autoregressive"] == (2.0 if t.get("chosen") else 1.0) for t in tuned.rows)
    monkeypatch.setattr(tune_module, "step_rates", _fake_rates({1: "k=2", 2: "k=2"}))
    assert tune(tiny_lm, "prompt_lookup", [[1]] * 2, rows=(1, 2), choices=(0, 2), budgets=(1,)).options == {"k": 2}


def test_tune_keeps_the_numeric_options_it_measured_with(monkeypatch, tiny_lm):
    """Candidates with two prompt-lookup chains draft 2k tokens a row (budgets below that are tried), and
    the schedule carries draft_width: decoding it without would not be the setting measured."""
    monkeypatch.setattr(tune_module, "step_rates", _fake_rates({1: "k=2 budget=2"}))
    tuned = tune(tiny_lm, "prompt_lookup", [[1, 2]], rows=(1,), choices=(0, 2), budgets=(2,),
                 options={"draft_width": 2, "max_ngram": 2})
    assert [t["setting"] for t in tuned.rows] == ["autoregressive", "k=0", "k=2", "k=2 budget=2"]
    assert tuned.options == {"draft_width": 2, "max_ngram": 2, "k": 2, "budget": 2}
    monkeypatch.setattr(tune_module, "step_rates", _fake_rates({1: "k=2"}))
    assert tune(tiny_lm, "prompt_lookup", [[1, 2]], rows=(1,), choices=(0, 2), budgets=(2,)).options == {"k": 2}


def test_tune_picks_the_draft_width_by_load(monkeypatch, tiny_lm):
    monkeypatch.setattr(tune_module, "step_rates", _fake_rates({1: "k=2 width=3", 2: "k=1 width=1 budget=1"}))
    tuned = tune(tiny_lm, "prompt_lookup", [[1, 2]] * 2, rows=(1, 2), choices=(1, 2), budgets=(1,), widths=(1, 3))
    assert tuned.options == {"k": {1: 2, 2: 1}, "draft_width": {1: 3, 2: 1}, "budget": {1: None, 2: 1}}
    with pytest.raises(ValueError, match="'draft_width': those are what tune picks"):
        tune(tiny_lm, "prompt_lookup", [[1]], rows=(1,), widths=(1, 2), options={"draft_width": 2})


def test_hopeless_settings_cannot_beat_autoregressive_even_with_free_drafts():
    settings = {"k=0": {"k": 0}, "k=2": {"k": 2}, "k=4": {"k": 4}, "k=4 budget=1": {"k": 4, "budget": 1}}
    gained = {"k=0": 1.0, "k=2": 1.5, "k=4": 1.8, "k=4 budget=1": 1.2}
    curve = {1: 1.0, 3: 1.4, 5: 2.0}
    assert hopeless(settings, gained, lambda o: o["k"] + 1, curve) == {"k=4": 0.9}  # 1.5 / 1.4 > 1 > 1.8 / 2
    steep = {1: 1.0, 3: 3.0, 5: 5.0}  # k=0's bound is 1.0: not below autoregressive, and the highest
    assert set(hopeless(settings, gained, lambda o: o["k"] + 1, steep)) == {"k=2", "k=4"}
    no_off = {name: o for name, o in settings.items() if name != "k=0"}
    assert set(hopeless(no_off, gained, lambda o: o["k"] + 1, steep)) == {"k=4"}  # k=2, the best bound, stays


def test_tune_skips_the_settings_the_cost_curve_rules_out(monkeypatch, tiny_lm):
    monkeypatch.setattr(tune_module, "step_rates", _fake_rates({1: "k=2", 2: "k=2 budget=1"}))
    curves = []

    def curve(lm, widths, batch):
        curves.append((batch, sorted(widths)))
        return {w: 1.0 + (w - 1) * batch for w in widths}  # at 2 rows, verifying 3 tokens a row costs 5x

    monkeypatch.setattr(tune_module, "target_cost_curve", curve)
    tuned = tune(tiny_lm, "prompt_lookup", [[1, 2]] * 2, rows=(1, 2), choices=(0, 2), budgets=(1,))
    assert curves == [(2, [1, 3])]  # measured above one row only, for the widths the settings verify
    two = {t["setting"]: t for t in tuned.rows if t["rows"] == 2}
    assert two["k=2"]["skipped"] and two["k=2"]["bound_x_vs_autoregressive"] == pytest.approx(2.0 / 5.0)
    assert two["k=2 budget=1"]["chosen"] and "skipped" not in two["k=0"]
    assert tuned.options == {"k": 2, "budget": {1: None, 2: 1}}
    everything = tune(tiny_lm, "prompt_lookup", [[1, 2]] * 2, rows=(1, 2), choices=(0, 2), budgets=(1,), prune=False)
    assert not any(t.get("skipped") for t in everything.rows) and len(curves) == 1


def test_a_schedule_and_the_command_line_must_agree(tmp_path):
    path = tmp_path / "wide.json"
    path.write_text(json.dumps({"method": "eagle", "options": {"draft_width": 3, "k": {"1": 2, "8": 1}}}))
    args = argparse.Namespace(schedule=str(path), method="eagle", draft_width=3, lookup=4)
    assert method_options(args) == {"draft_width": 3, "lookup": 4, "k": {1: 2, 8: 1}}
    with pytest.raises(ValueError, match="sets draft_width=3; drop --draft-width or the schedule"):
        method_options(argparse.Namespace(schedule=str(path), method="eagle", draft_width=2))


def test_tune_rejects_bad_input(tiny_lm):
    with pytest.raises(ValueError, match="must include 1"):
        tune(tiny_lm, "prompt_lookup", [[1]] * 4, rows=(2, 4))
    with pytest.raises(ValueError, match="needs at least 4 prompts"):
        tune(tiny_lm, "prompt_lookup", [[1]] * 3, rows=(1, 4))
    with pytest.raises(ValueError, match="those are what tune picks"):
        tune(tiny_lm, "draft", [[1]], rows=(1,), options={"k": 2})


def test_a_tuned_schedule_decodes_exactly_like_autoregressive(tiny_lm, tmp_path, monkeypatch):
    """A real measurement on the tiny model (its cost curve too): whatever it picks or skips, the pool's
    output is unchanged."""
    monkeypatch.setattr(tune_module, "target_cost_curve", bench.target_cost_curve)
    prompts = [[5, 9, 14, 2, 5, 9, 14], [1, 2, 3, 1, 2], [8, 9], [10, 11, 12, 10, 11]]
    tuned = tune(tiny_lm, "prompt_lookup", prompts[:2], rows=(1, 2), choices=(0, 2), budgets=(1,), steps=2,
                 chunks=2)
    assert set(tuned.options) <= {"k", "budget"}
    assert sorted({(t["rows"], t["setting"]) for t in tuned.rows}) == sorted(
        [(1, "autoregressive"), (1, "k=0"), (1, "k=2"), (1, "k=2 budget=1"),
         (2, "autoregressive"), (2, "k=0"), (2, "k=2"), (2, "k=2 budget=1")])
    assert all(t["tokens_per_s"] > 0 for t in tuned.rows)
    assert sum(bool(t.get("chosen")) for t in tuned.rows) == 2
    options = read_schedule(save_schedule(tuned, tmp_path / "s.json", device="test"), "prompt_lookup")
    assert options == tuned.options
    alone = [specdec.generate(tiny_lm, p, max_new_tokens=20).tokens for p in prompts]
    pooled = specdec.generate(tiny_lm, prompts, max_new_tokens=20, slots=2, chunk_steps=4, method="prompt_lookup",
                              **options)
    assert [r.tokens for r in pooled] == alone


def test_saved_schedules_fail_clearly(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="specdec tune --out"):
        read_schedule(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        read_schedule(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match="not a schedule"):
        read_schedule(tmp_path / "other.json")
    (tmp_path / "draft.json").write_text(json.dumps({"method": "draft", "options": {"k": {"1": 0, "2": 1}}}))
    assert read_schedule(tmp_path / "draft.json", "draft") == {"k": {1: 0, 2: 1}}
    with pytest.raises(ValueError, match="schedule for method 'draft', not 'prompt_lookup'"):
        read_schedule(tmp_path / "draft.json", "prompt_lookup")
    assert cli_main(["generate", "--prompt", "x", "--method", "draft", "--k", "2",
                     "--schedule", str(tmp_path / "draft.json")]) == 2
    assert "sets k={1: 0, 2: 1}; drop --k or the schedule" in capsys.readouterr().err
    assert cli_main(["tune", "--prompts-file", str(tmp_path / "missing.txt")]) == 2  # before the model loads
    assert "missing.txt does not exist" in capsys.readouterr().err
