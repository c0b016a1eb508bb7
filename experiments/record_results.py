"""Where the experiment scripts write what they measured, and the index of it.

One folder per study and one run per machine and date inside it:
``experiments/results/<study>/<machine>-<date>/<study>.{json,md,png}``. Each JSON follows the schema
of DESIGN.md and records the command, the commit (and whether the tree was dirty), the JAX version,
the device and the date. Every write is atomic and regenerates ``experiments/results/index.md``,
which lists each study's current run (its newest) above the older ones still kept.

    python experiments/record_results.py   # regenerate the index
"""

from __future__ import annotations

import datetime
import io
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import jax

from specdec import atomic
from specdec.bench import device_label

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = RESULTS.parents[1]


def machine_name(label: str) -> str:
    """A folder-safe machine name from a device label: "cpu: 2-core AVX512, Intel(R) Xeon(R) ..." ->
    "xeon-avx512"; "gpu: NVIDIA H100 80GB HBM3" -> "h100-80gb-hbm3"."""
    kind, _, rest = label.partition(":")
    if kind != "cpu":
        return "-".join(w for w in re.findall(r"[a-z0-9]+", rest.lower()) if w != "nvidia") or kind
    vendor = next((name for key, name in (("EPYC", "epyc"), ("Xeon", "xeon"), ("Ryzen", "ryzen")) if key in rest),
                  "cpu")
    simd = re.search(r"\b(AVX512|AVX2)\b", rest)
    return f"{vendor}-{simd.group(1).lower()}" if simd else vendor


def run_folder(study: str, label: str | None = None, date: str | None = None) -> Path:
    """``experiments/results/<study>/<machine>-<date>/`` of a run on this device today."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", study):
        raise ValueError(f"study name {study!r} must be one folder name (letters, digits, '_', '-', '.')")
    label = label or device_label()
    return RESULTS / study / f"{machine_name(label)}-{date or datetime.date.today().isoformat()}"


def command_line() -> str:
    """The command that is running, as one could type it again from the repository root."""
    return " ".join(shlex.quote(a) for a in [".venv/bin/python", *sys.argv])


def git_state() -> dict:
    """``{"commit": HEAD's hash, "dirty": whether tracked files outside experiments/results differ
    from it}`` (None values outside a git checkout): results that earlier runs wrote do not change
    what is measured."""

    def git(*args: str) -> str | None:
        proc = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
        return proc.stdout.strip() if proc.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)experiments/results")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def _markdown(study: str, payload: dict, columns: list[str]) -> str:
    lines = [f"# {study}", "", f"- device: {payload['device']}", f"- date: {payload['date']}",
             f"- commit: {payload['commit']}{' (dirty tree)' if payload['dirty'] else ''}",
             f"- JAX: {payload['jax']}", f"- command: `{payload['command']}`", f"- model: {payload.get('model')}",
             f"- prompts: {payload.get('prompts')}", ""]
    if payload.get("cost_curve"):
        lines += ["- target cost curve on this machine: " + ", ".join(
            f"c({c['k']}) = {c['relative_cost']:.2f}" for c in payload["cost_curve"]), ""]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in payload["rows"]:
        cells = []
        for col in columns:
            value = row.get(col, row.get("options", {}).get(col, ""))
            cells.append(f"{value:.3g}" if isinstance(value, float) else "" if value is None else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    if payload.get("notes"):
        lines += ["", *[f"- {n}" for n in payload["notes"]]]
    return "\n".join(lines) + "\n"


def write_results(study: str, payload: dict, columns: list[str]) -> Path:
    """Write this run's ``<study>.json`` (``payload`` with the benchmark, device, date, command, commit,
    dirty and JAX fields in front) and a Markdown table of its ``rows`` (``columns``: row keys or
    option names) into :func:`run_folder`, then regenerate the index. Returns the JSON's path."""
    label = device_label()
    payload = {"benchmark": study, "device": label, "date": datetime.date.today().isoformat(),
               "command": command_line(), **git_state(), "jax": jax.__version__, **payload}
    out = run_folder(study, label, payload["date"])
    atomic.write_text(out / f"{study}.md", _markdown(study, payload, columns))
    path = atomic.write_text(out / f"{study}.json", json.dumps(payload, indent=1) + "\n")
    write_index()
    return path


def pyplot():
    """matplotlib's ``pyplot`` on the file-only Agg backend; a clear error without the ``plots`` extra.

    A plotting script calls it before any timing, so a missing matplotlib stops it at once, not
    after the run.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise RuntimeError("plots need matplotlib: pip install -e '.[plots]' (or make peers)") from err
    return plt


def save_plot(study: str, series: dict[str, tuple[list, list]], *, xlabel: str, ylabel: str, title: str,
              logx: bool = False, logy: bool = False) -> Path:
    """Line plot of ``{label: (xs, ys)}`` to ``<study>.png`` in this run's folder (needs matplotlib)."""
    plt = pyplot()
    label = device_label()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=name)
    if logx:
        ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{title}\n({label})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    out = run_folder(study, label) / f"{study}.png"
    atomic.write_bytes(out, png.getvalue())
    return out


def runs() -> dict[str, list[dict]]:
    """``{study: [run, ...]}`` newest first, each run ``{"folder", "date", "device", "commit", "dirty",
    "commit_from_history"}`` read from its JSON (runs without a readable JSON are listed with what their
    folder name says; ``commit_from_history``: the run predates commit recording, so its commit is the
    one that added it)."""
    found: dict[str, list[dict]] = {}
    for folder in sorted(p for p in RESULTS.glob("*/*") if p.is_dir()):
        study = folder.parent.name
        try:
            saved = json.loads((folder / f"{study}.json").read_text())
        except (OSError, ValueError):
            saved = {}
        found.setdefault(study, []).append({
            "folder": folder.relative_to(RESULTS).as_posix(), "date": saved.get("date", folder.name[-10:]),
            "device": saved.get("device", folder.name[:-11]), "commit": saved.get("commit"),
            "dirty": saved.get("dirty"), "commit_from_history": "commit_source" in saved})
    return {study: sorted(found[study], key=lambda r: r["date"], reverse=True) for study in sorted(found)}


def write_index() -> Path:
    """Regenerate ``experiments/results/index.md``: each study's current (newest) run, then its older ones."""
    lines = ["# Results index", "", "Generated by `python experiments/record_results.py` (and by every results "
             "write); do not edit by hand. The current run of each study is its newest; older runs are kept only "
             "where another machine's figures are still cited.", "",
             "| study | run | device | date | commit | |", "|---|---|---|---|---|---|"]
    for study, kept in runs().items():
        for i, run in enumerate(kept):
            commit = ("added in " if run["commit_from_history"] else "") + (run["commit"] or "?")[:10] + (
                " (dirty)" if run["dirty"] else "")
            lines.append(f"| {study if i == 0 else ''} | [{run['folder']}]({run['folder']}/{study}.md) | "
                         f"{run['device']} | {run['date']} | {commit} | {'current' if i == 0 else 'older'} |")
    return atomic.write_text(RESULTS / "index.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    print(write_index())
