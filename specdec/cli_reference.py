"""The command-line reference (docs/cli.md) as Markdown, generated from ``specdec.cli.build_parser()``.

    .venv/bin/python -m specdec.cli_reference > docs/cli.md

One section per subcommand: its help line and a table of its options (flag, value, default, help).
``tests/test_cli_reference.py`` checks that docs/cli.md equals :func:`markdown`, so the page cannot
drift from the parser. argparse has no public way to list a parser's actions; this reads its
``_actions`` and the sub-parsers' help, the attributes ``--help`` itself prints.
"""

from __future__ import annotations

import argparse
import sys

from specdec.cli import build_parser

REGENERATE = ".venv/bin/python -m specdec.cli_reference > docs/cli.md"


def _cell(text) -> str:
    """``text`` on one line, safe inside a Markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _value(action: argparse.Action) -> str:
    """What an option takes: nothing (a flag), one of its choices, or a typed value (and how many)."""
    if action.nargs == 0:
        return "flag"
    if action.choices:
        value = ", ".join(f"`{c}`" for c in action.choices)
    else:
        value = {int: "int", float: "float"}.get(action.type, action.metavar or action.dest.upper())
    more = {"+": " (one or more)", "*": " (zero or more)"}.get(action.nargs, "")
    return value + more + (" (repeatable)" if isinstance(action, argparse._AppendAction) else "")


def _default(action: argparse.Action) -> str:
    if action.required:
        return "required"
    if action.nargs == 0 or action.default in (None, "", argparse.SUPPRESS):
        return ""
    default = action.default
    return "`" + (" ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)) + "`"


def _help(action: argparse.Action, prog: str) -> str:
    text = action.help or ""
    return _cell(text % dict(vars(action), prog=prog) if "%" in text else text)


def _options(parser: argparse.ArgumentParser) -> list[str]:
    rows = ["| option | value | default | help |", "|---|---|---|---|"]
    for action in parser._actions:
        if action.dest == "help" or not action.option_strings:
            continue
        flags = ", ".join(f"`{f}`" for f in action.option_strings)
        rows.append(f"| {flags} | {_value(action)} | {_default(action)} | {_help(action, parser.prog)} |")
    return rows


def markdown() -> str:
    """docs/cli.md: every subcommand of ``specdec`` with its options, in the parser's order."""
    parser = build_parser()
    lines = ["# Command-line reference", "",
             f"Generated from `specdec.cli.build_parser()` by `{REGENERATE}`; do not edit by hand.", "",
             _cell(parser.description or ""), ""]
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {a.dest: a.help for a in subparsers._choices_actions}
    lines += [f"- [`specdec {name}`](#specdec-{name}): {_cell(helps.get(name, ''))}" for name in subparsers.choices]
    for name, sub in subparsers.choices.items():
        lines += ["", f"## specdec {name}", "", _cell(helps.get(name, "")), ""] + _options(sub)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(markdown())
