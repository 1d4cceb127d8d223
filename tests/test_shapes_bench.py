"""The miniature MRBench: scoring invariants, and the whole command on the smoke recipe."""

from __future__ import annotations

import json

import pytest

from easyref.cli import main
from easyref.shapes.evaluate import score_images, summarize
from easyref.shapes.oracle import load_oracle
from easyref.shapes.world import Subject, make_groups, render, target_scene


@pytest.fixture(scope="module")
def oracle():
    return load_oracle()


def test_the_targets_themselves_score_perfectly(oracle):
    groups = make_groups("held-out", 12, 3, 2, seed=5)
    summary = summarize(score_images(oracle, groups, [render(g.target) for g in groups]))
    assert summary["count"] == 12
    assert summary["identity"] == summary["prompt"] == 1.0
    assert summary["similarity"] > 0.999


def test_wrong_subject_or_wrong_place_is_caught(oracle):
    groups = make_groups("held-in", 12, 3, 0, seed=6)
    other = Subject("star", "purple", "dotted")
    wrong_subject = [render(target_scene(other if g.subject != other else Subject("circle", "red", "solid"),
                                         g.background, g.position)) for g in groups]
    scored = summarize(score_images(oracle, groups, wrong_subject))
    assert scored["identity"] == 0.0 and scored["prompt"] == 1.0 and scored["similarity"] < 0.95
    moved = [render(target_scene(g.subject, g.background, "center" if g.position != "center" else "top left")) for g in groups]
    scored = summarize(score_images(oracle, groups, moved))
    assert scored["identity"] == 1.0 and scored["prompt"] == 0.0


def test_bench_shapes_runs_end_to_end_on_the_smoke_recipe(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "shapes", "--preset", "smoke", "--groups", "1", "--steps", "1", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert {c["method"] for c in summary["cells"]} == {"easyref", "mean", "concat"}
    assert len(summary["cells"]) == 3 * 10  # 6 distractor cells + 5 reference cells, one shared
    assert [r["baseline"] for r in summary["paired"]] == ["mean"] * 11 + ["concat"] * 11  # 10 cells + pooled
    assert (out / "by_references.png").is_file() and (out / "by_references_colour.png").is_file() and (out / "summary.md").read_text().count("| easyref |") == 11
    assert "By number of references" in capsys.readouterr().out
    configs = {m: json.loads((out / "work" / f"model-{m}" / "adapter" / "easyref_config.json").read_text())
               for m in ("easyref", "mean", "concat")}
    assert {m: c["reference_mode"] for m, c in configs.items()} == {"easyref": "joint", "mean": "mean", "concat": "concat"}
    # the models are reused: evaluating the trained folders again needs no training
    assert main(["bench", "shapes", "--models-dir", str(out / "work"), "--groups", "1", "--steps", "1",
                 "--out", str(tmp_path / "again")]) == 0


def test_bench_shapes_rejects_bad_input(tmp_path, capsys):
    assert main(["bench", "shapes", "--models-dir", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert main(["bench", "shapes", "--preset", "huge"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert all(line.startswith("easyref: error:") for line in err) and len(err) == 2


def test_sign_test_against_hand_values():
    from easyref.shapes.bench import sign_test_p

    assert sign_test_p(0, 0) == 1.0
    assert sign_test_p(5, 0) == sign_test_p(0, 5) == 2 / 32
    assert sign_test_p(3, 1) == 2 * (1 + 4) / 16
    assert sign_test_p(4, 4) == 1.0  # an even split caps at 1


def test_paired_identity_counts_groups_one_method_alone_got_right():
    from easyref.shapes.bench import markdown_tables, paired_identity, sign_test_p

    outcomes = {
        ("easyref", "held-out", 3, 2): [True, True, False, False, True],
        ("mean", "held-out", 3, 2): [True, False, True, False, False],
        ("easyref", "held-in", 3, 0): [True, False],
        ("mean", "held-in", 3, 0): [True, False],
        ("concat", "held-out", 3, 2): [False] * 5,
    }
    rows = paired_identity(outcomes)
    by = {(r["baseline"], r["cell"]): r for r in rows}
    assert (by["mean", "held-out, 3 refs, 2 distractors"]["only_method"],
            by["mean", "held-out, 3 refs, 2 distractors"]["only_baseline"]) == (2, 1)
    assert (by["mean", "held-in, 3 refs, 0 distractors"]["only_method"],
            by["mean", "held-in, 3 refs, 0 distractors"]["only_baseline"]) == (0, 0)
    assert (by["mean", "all cells"]["only_method"], by["mean", "all cells"]["only_baseline"]) == (2, 1)
    assert by["concat", "all cells"]["only_method"] == 3 and by["concat", "all cells"]["p"] == 2 / 8
    assert ("concat", "held-in, 3 refs, 0 distractors") not in by  # a cell concat never ran is not compared
    table = markdown_tables({"cells": [], "paired": rows})
    assert "| mean | all cells | 2 | 1 | 1.000 |" in table
    assert "| x | all cells | 20 | 0 | < 0.001 |" in markdown_tables(
        {"cells": [], "paired": [{"baseline": "x", "cell": "all cells", "only_method": 20, "only_baseline": 0,
                                  "p": sign_test_p(20, 0)}]})
