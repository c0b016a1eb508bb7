"""Atomic writes: a reader sees the old file or the new one, and a failed write leaves no part behind."""

from __future__ import annotations

import os

import pytest

from specdec import atomic


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing(tmp_path, monkeypatch):
    path = atomic.write_text(tmp_path / "new" / "a.json", "old")
    assert path.read_text() == "old"

    def killed(src, dst):
        raise OSError("killed before the rename")

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(OSError, match="killed"):
        atomic.write_bytes(path, b"new")
    assert path.read_text() == "old" and os.listdir(path.parent) == ["a.json"]
    monkeypatch.undo()
    atomic.write_bytes(path, b"new")
    assert path.read_text() == "new" and os.listdir(path.parent) == ["a.json"]
