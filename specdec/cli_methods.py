"""The command line's method flags, generated from the registered method specs
(:mod:`specdec.method_spec`): ``--method``, one flag per option, by-load values, and ``--schedule``."""

from __future__ import annotations

import argparse
import dataclasses

import specdec.methods  # noqa: F401  (every method registered before its flags are generated)
from specdec.method_spec import REGISTRY, all_options
from specdec.tune import read_schedule


def method_options(args) -> dict:
    """The speculative options given on the command line (absent ones left to the method's defaults),
    with those of ``--schedule``."""
    options = {name: getattr(args, name) for name in all_options() if getattr(args, name, None) is not None}
    if getattr(args, "schedule", None):
        tuned = read_schedule(args.schedule, args.method)
        if clash := sorted(name for name in set(tuned) & set(options) if tuned[name] != options[name]):
            raise ValueError(f"--schedule {args.schedule} sets {', '.join(f'{c}={tuned[c]}' for c in clash)}; "
                             f"drop {', '.join('--' + c.replace('_', '-') for c in clash)} or the schedule")
        options.update(tuned)
    return options


def by_load_type(cast):
    """argparse type: ``VALUE``, or ``ROWS:VALUE,ROWS:VALUE,...`` (by running rows, from 1) as a dict."""

    def parse(text: str):
        if ":" not in text:
            return cast(text)
        try:
            pairs = [part.split(":", 1) for part in text.split(",")]
            return {int(rows): cast(value) for rows, value in pairs}
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected VALUE or ROWS:VALUE,ROWS:VALUE,... (e.g. 1:4,8:2), "
                                             f"got {text!r}") from None

    return parse


def _option_help(declared: list[tuple[str, dataclasses.Field]]) -> str:
    """One flag's help from the fields declaring it: their help (one per wording, naming the methods
    when they differ), each method's default, and the by-load syntax where it applies."""
    wordings: dict[str, list[str]] = {}
    for method, f in declared:
        default = "" if f.default is None or f.default is False else f"; default {f.default}"
        wordings.setdefault(f.metadata["help"] + default, []).append(method)
    parts = [text if len(wordings) == 1 else f"--method {'/'.join(methods)}: {text}"
             for text, methods in wordings.items()]
    methods = sorted({m for m, _ in declared})
    by_load = "; ROWS:VALUE,ROWS:VALUE,... picks it by running rows (e.g. 1:4,8:2)" if any(
        f.metadata["by_load"] for _, f in declared) else ""
    return f"{'; '.join(parts)}{by_load} (--method {', '.join(methods)})"


def add_method_args(parser: argparse.ArgumentParser, default: str, *, tuning: bool = False) -> None:
    """``--method`` and one flag per option of the registered methods (their specs' fields; see
    :mod:`specdec.method_spec`), plus ``--schedule`` unless ``tuning`` (then only tunable methods)."""
    methods = [name for name, cls in REGISTRY.items() if cls.tuned or not tuning]
    parser.add_argument("--method", default=default, choices=methods)
    for name, fields in all_options(methods).items():
        meta = fields[0][1].metadata
        if meta["cli"] is None:  # Python only (e.g. profile)
            continue
        cast = by_load_type(meta["cli"]) if meta["by_load"] else meta["cli"]
        parser.add_argument("--" + name.replace("_", "-"), type=cast, choices=meta["choices"],
                            help=_option_help(fields))
    if not tuning:
        parser.add_argument("--schedule", help="k (or Medusa tree), budget and draft width by load from a file "
                            "written by `specdec tune --out FILE` (measured on this device)")
