"""Speculative decoding of SmolLM2-135M-Instruct (prompt lookup, draft, bundled Medusa heads): the checker
finds no MISMATCH on 20 HumanEval prompts."""

from __future__ import annotations

import pytest

from specdec.cli import main as cli_main
from specdec.datasets import humaneval_chat_prompts
from specdec.equivalence import check

pytestmark = pytest.mark.real
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def reference(smollm2):
    """Autoregressive greedy results, each prompt alone (shared by every check below)."""
    prompts = humaneval_chat_prompts(20)
    return prompts, check(smollm2, prompts, "autoregressive", max_new_tokens=NEW_TOKENS).reference


PL, DRAFT = dict(method="prompt_lookup", k=4), dict(method="draft", k=3)


@pytest.mark.parametrize("method, batch", [(PL, 1), (PL, 4), (DRAFT, 1), (DRAFT, 4), (dict(method="medusa"), 4)],
                         ids=["prompt_lookup-1", "prompt_lookup-4", "target_as_draft-1", "target_as_draft-4",
                              "medusa_bundled_heads-4"])
def test_no_mismatch_on_humaneval(smollm2, reference, method, batch):
    prompts, ref = reference
    options = dict(method)
    if options["method"] == "draft":
        options["draft"] = smollm2
    report = check(smollm2, prompts, batch_size=batch, reference=ref, max_new_tokens=NEW_TOKENS, **options)
    assert report.counts["MISMATCH"] == 0, report.table()
    if options["method"] == "draft":  # the target drafting for itself: (nearly) everything accepted
        assert min(r.accepted_per_forward for r in report.results) > 3.0
    if options["method"] == "medusa":  # trained heads and their searched tree: 1.3 measured; fresh heads ~1.0
        assert sum(r.accepted_per_forward for r in report.results) / len(prompts) > 1.2


def test_strict_medusa_tree(smollm2, reference):
    prompts, _ = reference
    report = check(smollm2, prompts[:4], "medusa", tree="tree-16", batch_size=4, strict=True,
                   max_new_tokens=NEW_TOKENS)
    assert report.counts["identical"] == 4, report.table()


def test_medusa_cli_generate(capsys):
    assert cli_main(["generate", "--method", "medusa", "--tree", "tree-8", "--prompt", "Count from 1 to 20.",
                     "--max-new-tokens", "24"]) == 0
    assert "tokens per target forward" in capsys.readouterr().err


def test_strict_check_has_no_ties(smollm2, reference):
    """Strict mode: the reference as wide as the tree, in the same batches: bitwise-equal greedy output."""
    prompts, _ = reference
    report = check(smollm2, prompts[:8], "prompt_lookup", k=4, batch_size=4, strict=True,
                   max_new_tokens=NEW_TOKENS)
    assert report.counts["identical"] == 8, report.table()


def test_check_cli(capsys):
    assert cli_main(["check", "--method", "prompt_lookup", "--humaneval", "2", "--batch-size", "2",
                     "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr().out
    assert "prompt_lookup: " in out and "0 MISMATCH" in out
