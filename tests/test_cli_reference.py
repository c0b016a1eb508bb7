"""docs/cli.md is the reference generated from the CLI's parser: it must match the parser as it is."""

from pathlib import Path

from specdec.cli_reference import REGENERATE, markdown

DOC = Path(__file__).resolve().parents[1] / "docs" / "cli.md"


def test_cli_reference_is_current():
    assert DOC.is_file(), f"docs/cli.md is missing: generate it with `{REGENERATE}`"
    assert DOC.read_text() == markdown(), f"docs/cli.md is stale (the CLI changed): regenerate it with `{REGENERATE}`"


def test_every_subcommand_and_option_is_listed():
    text = markdown()
    for name in ("generate", "batch", "check", "tune", "train-heads", "fetch"):
        assert f"## specdec {name}\n" in text
    assert "| `--max-new-tokens` | int | `128` |" in text  # generate's option, its type and its default
