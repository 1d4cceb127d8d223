"""The shapes world's group kinds: rival, repeat and pick groups hold exactly the cases their names
promise (checked on many groups of every split and size), and the training data and oracle take them."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from easyref.shapes.base import world_words
from easyref.shapes.world import KINDS, PICK_ATTRIBUTES, make_groups, render, split_of

SIZES = [(split, n) for split in ("held-in", "held-out") for n in (2, 3, 5, 8)]


def objects(scene) -> list:
    return [scene.subject, *scene.distractors]


def apart(scene) -> bool:
    boxes = [(p.cx, p.cy, p.size) for p in objects(scene)]
    return all(
        max(abs(a[0] - b[0]), abs(a[1] - b[1])) > (a[2] + b[2]) / 2 for i, a in enumerate(boxes) for b in boxes[i + 1 :]
    )


def inside(scene) -> bool:
    return all(p.size / 2 <= p.cx <= 1 - p.size / 2 and p.size / 2 <= p.cy <= 1 - p.size / 2 for p in objects(scene))


@pytest.mark.parametrize("split, n", SIZES)
def test_rival_groups_have_large_rivals_that_never_recur(split, n):
    for group in make_groups(split, 24, n, 2, seed=3, kind="rival"):
        seen = Counter(p.subject for scene in group.references for p in scene.distractors)
        assert all(count == 1 for count in seen.values())  # rivals differ across references
        for scene in group.references:
            assert len(scene.distractors) == 2 and apart(scene) and inside(scene)
            assert all(r.size >= scene.subject.size * 0.999 for r in scene.distractors)  # as large or larger
            assert all(split_of(r.subject) == split and r.subject != group.subject for r in scene.distractors)


@pytest.mark.parametrize("split, n", SIZES)
def test_repeat_groups_have_one_rival_in_all_references_but_one(split, n):
    for group in make_groups(split, 24, n, 2, seed=4, kind="repeat"):
        presence = Counter(s for scene in group.references for s in {p.subject for p in objects(scene)})
        assert presence[group.subject] == n
        recurring = [s for s, count in presence.items() if s != group.subject and count > 1]
        if n > 2:  # with two references "all but one" is one: a repeat group is then a rival group
            assert len(recurring) == 1 and presence[recurring[0]] == n - 1
        assert all(count < n for s, count in presence.items() if s != group.subject)  # only the subject everywhere
        for scene in group.references:
            assert apart(scene) and all(r.size >= scene.subject.size * 0.999 for r in scene.distractors)


@pytest.mark.parametrize("split, n", SIZES)
def test_pick_groups_hold_both_subjects_and_the_prompt_names_the_asked_one(split, n):
    attributes = Counter()
    for group in make_groups(split, 24, n, 1, seed=5, kind="pick"):
        a, b = group.subject, group.other
        assert (a.shape != b.shape, a.colour != b.colour, a.pattern != b.pattern) == (True, True, True)
        for scene in group.references:
            present = [p.subject for p in objects(scene)]
            assert present.count(a) == 1 and present.count(b) == 1 and apart(scene) and inside(scene)
        attributes[group.attribute] += 1
        words = group.prompt.replace(",", " ,").split()
        assert getattr(a, group.attribute) in words
        assert not {a.shape, a.colour, a.pattern, b.shape, b.colour, b.pattern} - {getattr(a, group.attribute)} & set(
            words
        )
        assert set(words) <= set(world_words())  # the base model's tokenizers know every word
        assert group.target.subject.subject == a and f"{group.background} background" in group.prompt
    assert set(attributes) == set(PICK_ATTRIBUTES)


def test_kinds_are_deterministic_and_plain_groups_unchanged_by_them():
    for kind in KINDS:
        a, b = make_groups("held-out", 4, 3, 2, seed=9, kind=kind), make_groups("held-out", 4, 3, 2, seed=9, kind=kind)
        assert [render(s).tobytes() for g in a for s in g.references] == [
            render(s).tobytes() for g in b for s in g.references
        ]
    plain = make_groups("held-out", 4, 3, 2, seed=9)
    assert plain[0].id == "held-out-9-00000" and plain[0].kind == "plain"  # names and draws as before kinds existed
    assert make_groups("held-out", 4, 3, 2, seed=9, kind="rival")[0].id == "rival-held-out-9-00000"
    with pytest.raises(ValueError, match="kind must be one of"):
        make_groups("held-out", 1, 3, 2, seed=9, kind="style")


def test_the_oracle_reads_the_asked_subject_of_a_pick_target():
    from easyref.shapes.evaluate import score_images, summarize
    from easyref.shapes.oracle import load_oracle

    groups = make_groups("held-out", 12, 3, 0, seed=6, kind="pick")
    assert summarize(score_images(load_oracle(), groups, [render(g.target) for g in groups]))["identity"] == 1.0


def test_training_data_holds_every_kind(tmp_path):
    from easyref.shapes.data import write_training_data

    paths = write_training_data(tmp_path, groups=40, min_refs=2, max_refs=3, seed=0)
    records = [json.loads(line) for line in paths["groups"].read_text().splitlines()]
    kinds = Counter(r["target"].split("/")[1].split("-")[0] for r in records)
    assert set(kinds) == {"held", "rival", "repeat", "pick"}  # plain groups are named held-in-...
    assert any(not r["text"].startswith("an object") for r in records)  # pick prompts name an attribute
