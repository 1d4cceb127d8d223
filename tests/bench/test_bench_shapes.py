"""The miniature MRBench: scoring invariants, and the whole command on the smoke recipe."""

from __future__ import annotations

import json
from pathlib import Path

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
    wrong_subject = [
        render(
            target_scene(other if g.subject != other else Subject("circle", "red", "solid"), g.background, g.position)
        )
        for g in groups
    ]
    scored = summarize(score_images(oracle, groups, wrong_subject))
    assert scored["identity"] == 0.0 and scored["prompt"] == 1.0 and scored["similarity"] < 0.95
    moved = [
        render(target_scene(g.subject, g.background, "center" if g.position != "center" else "top left"))
        for g in groups
    ]
    scored = summarize(score_images(oracle, groups, moved))
    assert scored["identity"] == 1.0 and scored["prompt"] == 0.0


def _assert_smoke_summary(out: Path, methods: tuple[str, ...]) -> None:
    from easyref.bench.shapes import CELLS

    summary = json.loads((out / "summary.json").read_text())
    assert len(CELLS) == 16  # 6 by distractors + 5 by references (one shared) + 6 by kind
    assert {(r["method"], r["seed"]) for r in summary["runs"]} == {(m, s) for m in methods for s in (0, 1)}
    assert len(summary["runs"]) == 2 * 2 * 16 and len(summary["cells"]) == 2 * 16
    assert all(c["seeds"] == [0, 1] and len(c["identity_by_seed"]) == 2 for c in summary["cells"])
    assert [r["baseline"] for r in summary["paired"]] == ["easyref-bi"] * 17  # 16 cells + pooled
    assert all(
        r["seeds"] == [0, 1] and r["beyond_spread"] in (True, False)
        for r in summary["paired"]
        if r["cell"] != "all cells"
    )
    table = (out / "summary.md").read_text()
    assert table.count("| easyref |") == 17 and "By group kind" in table and "| pick | held-out | easyref |" in table
    assert (out / "by_references.png").is_file() and (out / "by_references_colour.png").is_file()


def _assert_adapters_differ_by_modes_and_seed(out: Path, methods: tuple[str, ...]) -> None:
    adapter = {(m, s): out / "work" / f"model-{m}-s{s}" / "adapter" for m in methods for s in (0, 1)}
    configs = {key: json.loads((folder / "easyref_config.json").read_text()) for key, folder in adapter.items()}
    assert {m: (c["reference_mode"], c["attention_mode"]) for (m, _), c in configs.items()} == {
        "easyref": ("joint", "official"),
        "easyref-bi": ("joint", "bidirectional"),
    }
    weights = {key: (folder / "easyref.safetensors").read_bytes() for key, folder in adapter.items()}
    assert weights["easyref-bi", 0] != weights["easyref-bi", 1]  # the seeds are separate runs


def test_bench_shapes_runs_end_to_end_on_the_smoke_recipe(tmp_path, capsys):
    out = tmp_path / "bench"
    methods = ("easyref", "easyref-bi")  # the four methods differ only in two settings, checked below
    assert (
        main(
            [
                "bench",
                "shapes",
                "--preset",
                "smoke",
                "--groups",
                "1",
                "--steps",
                "1",
                "--methods",
                *methods,
                "--out",
                str(out),
            ]
        )
        == 0
    )
    _assert_smoke_summary(out, methods)
    assert "By number of references" in capsys.readouterr().out
    _assert_adapters_differ_by_modes_and_seed(out, methods)
    # the models are reused: evaluating the trained folders again needs no training
    assert (
        main(
            [
                "bench",
                "shapes",
                "--models-dir",
                str(out / "work"),
                "--groups",
                "1",
                "--steps",
                "1",
                "--methods",
                "easyref",
                "mean",
                "--seeds",
                "1",
                "--out",
                str(tmp_path / "again"),
            ]
        )
        == 0
    )
    again = json.loads((tmp_path / "again" / "summary.json").read_text())
    assert {(r["method"], r["seed"]) for r in again["runs"]} == {("easyref", 1)}  # no mean was trained


def test_scored_cells_are_kept_and_reused_only_for_the_same_weights_and_settings(tmp_path, monkeypatch):
    from easyref.bench import shapes as bench

    models = tmp_path / "work"
    assert (
        main(
            [
                "bench",
                "shapes",
                "--preset",
                "smoke",
                "--groups",
                "1",
                "--steps",
                "1",
                "--methods",
                "easyref",
                "--seeds",
                "0",
                "--kinds",
                "pick",
                "--out",
                str(tmp_path),
                "--work",
                str(models),
            ]
        )
        == 0
    )
    first = json.loads((tmp_path / "summary.json").read_text())
    assert len(list((tmp_path / "cells").glob("*.json"))) == 2  # pick, held-in and held-out
    monkeypatch.setattr(bench, "load_method", lambda *a, **k: pytest.fail("a kept cell was generated again"))
    folders = bench.find_models(models)
    again = bench.evaluate_methods(folders, tmp_path, groups=1, steps=1, cells=bench.select_cells(kinds=["pick"]))
    assert again["runs"] == first["runs"]

    class Loaded(Exception):
        pass

    def load(*args, **kwargs):
        raise Loaded

    monkeypatch.setattr(bench, "load_method", load)
    with pytest.raises(Loaded):  # other settings: the cell is scored again, so the model is loaded
        bench.evaluate_methods(folders, tmp_path, groups=1, steps=2, cells=bench.select_cells(kinds=["pick"]))
    record = next((tmp_path / "cells").glob("*.json"))
    for text in ("{not json", "[1, 2]", '{"key": {"groups": 1}, "scores": [{"identity": true}]}'):
        record.write_text(text)
        assert bench.cached_scores(record, {"groups": 1}) is None


def test_each_method_trains_stage_3_with_its_modes_and_seed(tmp_path, monkeypatch):
    from easyref.bench import shapes as bench
    from easyref.shapes import build

    trained, packaged = [], []

    class FakeTrainer:
        def __init__(self, config, resume, cpu):
            self.config, self.resume = config, resume

        def train(self):
            trained.append(self.config)
            resumed.append((Path(self.config.output_dir).name, self.resume))

    resumed = []
    stopped = tmp_path / "stage3-mean-s3" / "checkpoint-0000005" / "model"  # a run stopped part way
    stopped.mkdir(parents=True)
    (stopped / "easyref.safetensors").write_bytes(b"")

    monkeypatch.setattr("easyref.train.trainer.Trainer", FakeTrainer)
    monkeypatch.setattr(build, "package", lambda work, out, recipe, timings, adapter: packaged.append((out, adapter)))
    folders = bench.train_methods(tmp_path, build.PRESETS["smoke"], methods=bench.METHODS, seeds=(0, 3))
    modes = {(c.reference_mode, c.attention_mode, c.seed, Path(c.output_dir).name) for c in trained}
    assert modes == {
        ("joint", "bidirectional", 0, "stage3-easyref-bi-s0"),
        ("joint", "bidirectional", 3, "stage3-easyref-bi-s3"),
        ("mean", "official", 0, "stage3-mean-s0"),
        ("mean", "official", 3, "stage3-mean-s3"),
        ("concat", "official", 0, "stage3-concat-s0"),
        ("concat", "official", 3, "stage3-concat-s3"),
        ("joint", "official", 0, "stage3"),  # the demo build's own stage 3 is EasyRef's at the recipe's seed
        ("joint", "official", 3, "stage3-easyref-s3"),
    }
    assert all(c.init_from.endswith("stage2/final") for c in trained)  # every method from the same stage 2
    assert sorted(folders) == sorted((m, s) for m in bench.METHODS for s in (0, 3))
    assert {out.name for out, _ in packaged} == {f"model-{m}-s{s}" for m in bench.METHODS for s in (0, 3)}
    assert {name: resume for name, resume in resumed if resume} == {"stage3-mean-s3": "latest"}


def test_bench_shapes_rejects_bad_input(tmp_path, capsys):
    cases = {
        ("--models-dir", str(tmp_path), "--out", str(tmp_path / "o")): "no model-METHOD-sSEED/",
        ("--preset", "huge"): "--preset must be one of",
        ("--preset", "smoke", "--methods", "easyref", "median"): "unknown method 'median'",
        ("--preset", "smoke", "--seeds", "-1"): "--seeds must be between",
        ("--preset", "smoke", "--kinds", "style"): "--kinds: unknown 'style'",
        ("--preset", "smoke", "--splits", "held-over"): "--splits: unknown 'held-over'",
        # no preset, no models to score: the old default trained the `cpu` preset for hours
        ("--out", str(tmp_path / "o")): "bench shapes needs --preset",
    }
    for argv, phrase in cases.items():
        assert main(["bench", "shapes", *argv]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("easyref: error:") and phrase in err[0], (argv, err)
    assert not (tmp_path / "o").exists()


def test_bench_shapes_scores_existing_models_without_a_preset(tmp_path, monkeypatch):
    """--models-dir trains nothing: no preset is needed, and the scoring sizes are the benchmark's."""
    from easyref.bench import shapes as bench

    calls = []
    monkeypatch.setattr(bench, "find_models", lambda folder: {("easyref", 0): tmp_path / "model-easyref-s0"})
    monkeypatch.setattr(bench, "evaluate_methods", lambda folders, out, **sizes: calls.append(sizes))
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "summary.md").write_text("summary\n")
    assert main(["bench", "shapes", "--models-dir", str(tmp_path), "--seeds", "0", "--out", str(tmp_path / "o")]) == 0
    assert (calls[0]["groups"], calls[0]["steps"]) == bench.EVAL_SIZES["cpu"] == (64, 30)


def test_cells_can_be_selected_by_kind_and_split():
    from easyref.bench.shapes import CELLS, select_cells

    assert select_cells() == CELLS
    assert select_cells(["rival", "repeat", "pick"], ["held-out"]) == [
        ("rival", "held-out", 3, 2),
        ("repeat", "held-out", 3, 2),
        ("pick", "held-out", 3, 0),
    ]
    assert len(select_cells(["plain"])) == 10 and select_cells(["plain"], ["held-in"]) == [
        ("plain", "held-in", 3, d) for d in (0, 1, 2)
    ]


def test_sign_test_against_hand_values():
    from easyref.bench.shapes import sign_test_p

    assert sign_test_p(0, 0) == 1.0
    assert sign_test_p(5, 0) == sign_test_p(0, 5) == 2 / 32
    assert sign_test_p(3, 1) == 2 * (1 + 4) / 16
    assert sign_test_p(4, 4) == 1.0  # an even split caps at 1


def test_paired_identity_sums_over_seeds_and_weighs_the_gap_against_seed_spread():
    from easyref.bench.shapes import aggregate, markdown_tables, paired_identity, sign_test_p

    hard, easy = ("repeat", "held-out", 3, 2), ("plain", "held-in", 3, 0)
    outcomes = {
        ("easyref", 0, hard): [True, True, False, False, True],
        ("easyref", 1, hard): [True, True, True, False, True],
        ("mean", 0, hard): [True, False, True, False, False],
        ("mean", 1, hard): [False, False, False, False, True],
        ("easyref", 0, easy): [True, False],
        ("mean", 0, easy): [True, False],
        ("concat", 0, hard): [False] * 5,
        ("concat", 1, hard): [True] * 5,
    }
    runs = [
        {
            "method": m,
            "seed": s,
            "kind": c[0],
            "split": c[1],
            "refs": c[2],
            "distractors": c[3],
            "count": len(v),
            **{k: sum(v) / len(v) for k in ("identity", "shape", "colour", "pattern", "prompt", "similarity")},
        }
        for (m, s, c), v in outcomes.items()
    ]
    rows = paired_identity(outcomes, aggregate(runs))
    by = {(r["baseline"], r["cell"]): r for r in rows}
    mean_hard = by["mean", "repeat, held-out, 3 refs, 2 rivals"]
    assert (mean_hard["only_method"], mean_hard["only_baseline"], mean_hard["seeds"]) == (2 + 3, 1 + 0, [0, 1])
    assert mean_hard["p"] == sign_test_p(5, 1)
    # seed means: easyref 0.7, mean 0.3 (gap 0.4); spreads: easyref 0.2, mean 0.2
    assert abs(mean_hard["gap"] - 0.4) < 1e-9 and abs(mean_hard["seed_spread"] - 0.2) < 1e-9
    assert mean_hard["beyond_spread"] is True
    concat_hard = by["concat", "repeat, held-out, 3 refs, 2 rivals"]  # concat's seeds differ by 100 points
    assert abs(concat_hard["gap"] - 0.2) < 1e-9 and concat_hard["beyond_spread"] is False
    one_seed = by["mean", "plain, held-in, 3 refs, 0 distractors"]
    assert (one_seed["only_method"], one_seed["only_baseline"], one_seed["beyond_spread"]) == (0, 0, None)
    assert (by["mean", "all cells"]["only_method"], by["mean", "all cells"]["only_baseline"]) == (5, 1)
    assert ("concat", "plain, held-in, 3 refs, 0 distractors") not in by  # a cell concat never ran is not compared
    table = markdown_tables({"cells": aggregate(runs), "paired": rows})
    assert "| mean | repeat, held-out, 3 refs, 2 rivals | 5 | 1 | 0.219 | +40.0 | yes |" in table
    assert "| repeat | held-out | easyref | 70.0 | 60.0 / 80.0 |" in table
