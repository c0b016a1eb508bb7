"""Speculative decoding of SmolLM2-135M-Instruct (prompt lookup, the bundled draft, the bundled Medusa heads)
through the request pool: the checker finds no MISMATCH on HumanEval + held-out ShareGPT prompts."""

from __future__ import annotations

import json

import pytest

import specdec
from specdec.api import encode_prompts
from specdec.autoregressive import prompt_bucket
from specdec.cli import main as cli_main
from specdec.datasets import humaneval_chat_prompts, sharegpt_prompts
from specdec.equivalence import check

pytestmark = pytest.mark.real
NEW_TOKENS = 10


def _in_bucket(lm, prompts: list[str], n: int, bucket: int = 160) -> list[str]:
    """The first ``n`` prompts whose chat-templated length pads to ``bucket`` tokens (129-160): the rows
    still differ in length, but each batch size compiles one prefill program (a compile of the
    30-layer model costs 5-9 s on a 2-core CPU; ten buckets cost nine times as many)."""
    ids = encode_prompts(lm, prompts, chat=True, system=None)  # as generate encodes them
    return [p for p, x in zip(prompts, ids) if prompt_bucket(len(x)) == bucket][:n]


@pytest.fixture(scope="session")
def prompts(smollm2) -> list[str]:
    """16 HumanEval + 16 held-out ShareGPT prompts of one length bucket."""
    chosen = (_in_bucket(smollm2, humaneval_chat_prompts(60), 16)
              + _in_bucket(smollm2, sharegpt_prompts(300, max_chars=600), 16))
    assert len(chosen) == 32
    return chosen


@pytest.fixture(scope="session")
def reference(smollm2, prompts):
    """Autoregressive greedy results of ``prompts``, each alone: one slot, so one request at a time in a
    batch of one (session scope: computed once per worker even when it runs other tests in between)."""
    return specdec.generate(smollm2, prompts, max_new_tokens=NEW_TOKENS, slots=1)


@pytest.mark.parametrize("method", [dict(method="draft", k=3), dict(method="medusa")],
                         ids=["bundled_draft", "medusa_bundled_heads"])
def test_request_pool_with_8_slots_has_no_mismatch(smollm2, prompts, reference, method):
    """All 32 prompts through 8 slots (ragged rows, admissions, then shrinking): each equals the
    prompt decoded alone. The two trained proposers (prompt lookup runs through the same pool in
    tests/test_batch.py; each real pool run compiles about five programs, ~40 s of CI per method)."""
    report = check(smollm2, prompts, reference=reference, max_new_tokens=NEW_TOKENS, slots=8, **method)
    assert report.counts["MISMATCH"] == 0, report.table()
    stats = report.results[0].stats
    assert len(stats.slot_utilisation) == 8 and stats.target_forwards < stats.row_forwards / 4
    assert stats.accepted_per_forward > 1.2  # trained draft / heads: ~1.4-1.5 measured; untrained ~1.0


@pytest.mark.xdist_group("real-one-row")  # one row, 40 tokens: test_eos_ends_a_chat_reply's compiled programs
def test_batch_cli(tmp_path, capsys):
    (tmp_path / "prompts.txt").write_text("Count to five.\n\nName a prime.\nSay hi.\n")
    assert cli_main(["batch", "--prompts-file", str(tmp_path / "prompts.txt"), "--slots", "1", "--prefill-alone",
                     "--max-new-tokens", "40", "--output", str(tmp_path / "o.jsonl")]) == 0
    lines = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert [x["prompt"] for x in lines] == ["Count to five.", "Name a prime.", "Say hi."]
    assert [x["seed"] for x in lines] == [0, 1, 2] and all(x["text"] for x in lines)
    assert "slot utilisation" in capsys.readouterr().err
    assert cli_main(["batch", "--prompts-file", str(tmp_path / "missing.txt")]) == 2


def test_check_cli_strict_medusa_tree(prompts, capsys):
    """``specdec check`` with Medusa tree-16 in strict mode (the reference as wide as the tree, in the same
    batches): bitwise-equal greedy output, no tie allowed."""
    argv = ["check", "--method", "medusa", "--tree", "tree-16", "--strict", "--batch-size", "2",
            "--max-new-tokens", str(NEW_TOKENS)]
    for prompt in prompts[:2]:
        argv += ["--prompt", prompt]
    assert cli_main(argv) == 0
    assert "medusa: 2 identical, 0 tie, 0 MISMATCH" in capsys.readouterr().out
