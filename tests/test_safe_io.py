"""`safe_io.replace_folder`: a finished folder takes the place of the old one without a moment where
the old one is half deleted."""

from __future__ import annotations

import os

import pytest

from easyref import safe_io


def folder(path, text):
    path.mkdir()
    (path / "weights").write_text(text)
    return path


def test_replaces_an_existing_folder_and_leaves_nothing_behind(tmp_path):
    dest = folder(tmp_path / "base", "old")
    safe_io.replace_folder(folder(tmp_path / ".base.tmp", "new"), dest)
    assert (dest / "weights").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]
    safe_io.replace_folder(folder(tmp_path / "fresh", "first"), tmp_path / "other")  # nothing to replace
    assert (tmp_path / "other" / "weights").read_text() == "first"


def test_a_crash_between_the_renames_keeps_the_old_folder_whole(tmp_path, monkeypatch):
    dest, new = folder(tmp_path / "base", "old"), folder(tmp_path / ".base.tmp", "new")
    renames = []

    def crash_on_second(src, dst):
        renames.append((src, dst))
        if len(renames) == 2:
            raise KeyboardInterrupt  # killed right between moving the old aside and moving the new in
        os.rename(src, dst)

    monkeypatch.setattr(safe_io.os, "replace", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        safe_io.replace_folder(new, dest)
    assert (tmp_path / ".base.old.tmp" / "weights").read_text() == "old"
    assert (new / "weights").read_text() == "new"
