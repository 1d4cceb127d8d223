"""`make demo`'s pick group: the committed references and the Makefile's prompts are the ones the code makes."""

from __future__ import annotations

import re
from pathlib import Path

from PIL import ImageChops

from easyref.images import open_image
from easyref.shapes.data import demo_group, demo_prompts, write_demo_references

ROOT = Path(__file__).resolve().parents[2]


def test_the_committed_demo_references_are_the_demo_group(tmp_path):
    written = write_demo_references(tmp_path)
    committed = sorted((ROOT / "examples" / "refs").glob("*.png"))
    assert [p.name for p in committed] == [p.name for p in written]
    for mine, theirs in zip(written, committed):
        assert ImageChops.difference(open_image(mine), open_image(theirs)).getbbox() is None


def test_the_demo_group_holds_both_subjects_everywhere_and_its_prompts_select_one_each():
    group = demo_group()
    assert group.kind == "pick" and group.split == "held-out"
    for scene in group.references:
        subjects = {placed.subject for placed in [scene.subject, *scene.distractors]}
        assert {group.subject, group.other} <= subjects
    first, second = demo_prompts(group)
    assert group.subject.shape in first and group.other.shape in second and first != second
    assert first.replace(group.subject.shape, "") == second.replace(group.other.shape, "")  # only the name differs


def test_make_demo_asks_the_demo_prompts():
    recipe = (ROOT / "Makefile").read_text().split("\ndemo:")[1].split("\n\n")[0]
    assert re.findall(r'--prompt "([^"]+)"', recipe) == list(demo_prompts(demo_group()))
