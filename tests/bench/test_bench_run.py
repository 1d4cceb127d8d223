"""`easyref bench run / score / convert`: records, resume, shards, summaries, CLI errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from tiny_models import save_tiny_clip, save_tiny_dino

from easyref.bench.manifest import load_manifest, write_manifest
from easyref.bench.methods import GenerationSettings, load_method
from easyref.bench.runner import (
    RunError,
    plan,
    read_records,
    run_bench,
    safe_name,
    settings_header,
    shard,
    start_run,
    write_summary,
)
from easyref.cli import main

SETTINGS = GenerationSettings(steps=2, guidance=3.0, seed=7)


@pytest.fixture(scope="module")
def metric_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("metric_models")
    return {"clip": save_tiny_clip(root / "clip"), "dino": save_tiny_dino(root / "dino")}


@pytest.fixture(scope="module")
def scorer(metric_dirs):
    from easyref.bench.metrics import FeatureModels

    return FeatureModels.from_pretrained(metric_dirs["clip"], metric_dirs["dino"], device="cpu")


@pytest.fixture(scope="module")
def sdxl_method(tiny_dirs):
    return load_method("sdxl", base=tiny_dirs["sdxl"], device="cpu")


@pytest.fixture
def manifest(tmp_path):
    """Three groups: two held-in (one with a target and two prompts), one held-out with an odd id."""
    root = tmp_path / "bench"
    (root / "img").mkdir(parents=True)
    colours = ["red", "blue", "green", "yellow", "white"]
    for i, colour in enumerate(colours):
        Image.new("RGB", (40, 40), colour).save(root / "img" / f"{i}.png")
    lines = [
        {
            "id": "g1",
            "references": ["img/0.png", "img/1.png"],
            "target": "img/2.png",
            "prompts": ["a red thing", "a blue thing"],
        },
        {"id": "g2", "domain": "style", "references": ["img/3.png"], "prompt": "a yellow thing"},
        {"id": "odd/id", "split": "held-out", "references": ["img/4.png", "img/0.png"], "prompts": ["a white thing"]},
    ]
    path = root / "manifest.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path


def _rows(out: Path) -> list[dict]:
    return json.loads((out / "summary.json").read_text())["rows"]


def _records(out: Path) -> dict[str, dict]:
    return {k: {m: v for m, v in r.items()} for k, r in read_records(out).items()}


# ---------------------------------------------------------------------- planning
def test_seeds_depend_on_the_image_not_on_the_method_or_shard(manifest):
    items = load_manifest(manifest)
    units = [u for group in plan(items, samples=2, seed=7) for u in group]
    assert len(units) == (2 + 1 + 1) * 2
    assert len({u.seed for u in units}) == len(units)
    again = [u.seed for group in plan(items, samples=2, seed=7) for u in group]
    assert again == [u.seed for u in units]
    assert [u.seed for group in plan(items, samples=2, seed=8) for u in group] != again
    shards = [shard(plan(items, 1, 7), r, 2) for r in range(2)]
    assert sorted(g[0].item.id for s in shards for g in s) == sorted(i.id for i in items)


def test_item_ids_map_to_distinct_safe_file_names():
    assert safe_name("g1") == "g1"
    names = {safe_name(x) for x in ("a/b", "a_b", "a b", "../x", "")}
    assert len(names) == 5 and all("/" not in n and not n.startswith(".") for n in names)


# ---------------------------------------------------------------------- runs
def test_run_makes_scores_and_summarizes_every_image(manifest, tmp_path, sdxl_method, scorer):
    out = tmp_path / "run"
    items = load_manifest(manifest)
    start_run(out, settings_header(sdxl_method, SETTINGS, manifest, 2))
    assert run_bench(items, sdxl_method, SETTINGS, out, samples=2, scorer=scorer, progress=False) == 8
    records = read_records(out)
    assert len(records) == 8 and all((out / r["image"]).is_file() for r in records.values())
    assert {r["split"] for r in records.values()} == {"held-in", "held-out"}
    with_target = [r for r in records.values() if r["item"] == "g1"]
    assert all("clip_i_target" in r and "dino_i_target" in r for r in with_target)
    assert all("clip_i_target" not in r for r in records.values() if r["item"] != "g1")
    rows = write_summary(out)
    assert [(r["split"], r["groups"], r["images"]) for r in rows] == [
        ("held-in", 2, 6),
        ("held-out", 1, 2),
        ("all", 3, 8),
    ]
    held_in = [r["clip_i"] for r in records.values() if r["split"] == "held-in"]
    assert rows[0]["clip_i"] == pytest.approx(sum(held_in) / len(held_in))
    assert "| sdxl | held-out | 1 | 2 |" in (out / "summary.md").read_text()
    assert (out / "summary.csv").read_text().splitlines()[0].startswith("method,split,groups,images,clip_i")
    assert len(list((out / "sheets").glob("*.png"))) == 3


class Crashing:
    """Delegates to a method and dies on its n-th group, as a killed job would."""

    def __init__(self, method, crash_at: int):
        self.method, self.crash_at, self.calls, self.name = method, crash_at, 0, method.name

    def describe(self):
        return self.method.describe()

    def generate(self, *args):
        self.calls += 1
        if self.calls == self.crash_at:
            raise KeyboardInterrupt
        return self.method.generate(*args)


def test_an_interrupted_run_resumes_to_the_same_summary(manifest, tmp_path, sdxl_method, scorer):
    items = load_manifest(manifest)
    whole = tmp_path / "whole"
    run_bench(items, sdxl_method, SETTINGS, whole, scorer=scorer, progress=False)
    interrupted = tmp_path / "interrupted"
    crashing = Crashing(sdxl_method, crash_at=2)
    with pytest.raises(KeyboardInterrupt):
        run_bench(items, crashing, SETTINGS, interrupted, scorer=scorer, progress=False)
    with open(next(interrupted.glob("records-*.jsonl")), "a") as f:
        f.write('{"key": "torn')  # the crash cut a line short
    resumed = Crashing(sdxl_method, crash_at=0)
    # one image per call: g1's second image, g2 and odd/id; not g1's first again
    assert run_bench(items, resumed, SETTINGS, interrupted, scorer=scorer, progress=False) == 3
    assert resumed.calls == 3
    assert write_summary(interrupted) == write_summary(whole)
    # the half-finished group resumes to the very pixels of the uninterrupted run
    for _key, record in read_records(whole).items():
        assert Image.open(whole / record["image"]).tobytes() == Image.open(interrupted / record["image"]).tobytes()
    assert all(line.endswith("}") for line in next(interrupted.glob("records-*.jsonl")).read_text().splitlines())


def test_two_processes_give_the_same_summary_as_one(manifest, tmp_path, sdxl_method, scorer):
    items = load_manifest(manifest)
    one, two = tmp_path / "one", tmp_path / "two"
    run_bench(items, sdxl_method, SETTINGS, one, scorer=scorer, progress=False)
    made = [
        run_bench(items, sdxl_method, SETTINGS, two, scorer=scorer, rank=r, world=2, progress=False) for r in (0, 1)
    ]
    assert sorted(made) == [1, 3] and len(list(two.glob("records-*.jsonl"))) == 2
    assert write_summary(two) == write_summary(one)


def test_a_run_folder_refuses_other_settings(manifest, tmp_path, sdxl_method):
    out = tmp_path / "run"
    start_run(out, settings_header(sdxl_method, SETTINGS, manifest, 1))
    start_run(out, settings_header(sdxl_method, SETTINGS, manifest, 1))  # the same run resumes
    other = GenerationSettings(steps=3, guidance=3.0, seed=7)
    with pytest.raises(RunError, match="different settings"):
        start_run(out, settings_header(sdxl_method, other, manifest, 1))


# ---------------------------------------------------------------------- command line
def _cli_run_args(manifest: Path, method: str, base: Path, out: Path, mllm: Path | None = None) -> list[str]:
    args = ["bench", "run", "--manifest", str(manifest), "--method", method, "--base", str(base)]
    if mllm is not None:
        args += ["--mllm", str(mllm)]
    # small enough for the tiny CPU models to finish in seconds
    return args + ["--steps", "2", "--height", "64", "--width", "64", "--out", str(out)]


def _cli_score_args(manifest: Path, images: Path, out: Path, method_name: str, metrics: list[str]) -> list[str]:
    args = ["bench", "score", "--manifest", str(manifest), "--images", str(images), "--out", str(out)]
    return args + ["--method-name", method_name, *metrics]


def _assert_same_image_scores(original_out: Path, rescored_out: Path) -> None:
    original, again = _rows(original_out), _rows(rescored_out)
    assert [r["images"] for r in again] == [r["images"] for r in original]
    for a, b in zip(original, again):
        assert a["clip_i"] == pytest.approx(b["clip_i"], abs=1e-6) and a["dino_i"] == pytest.approx(
            b["dino_i"], abs=1e-6
        )


def test_cli_run_easyref_then_score_the_images_elsewhere(manifest, tmp_path, tiny_dirs, metric_dirs, capsys):
    out = tmp_path / "er"
    metrics = ["--clip", str(metric_dirs["clip"]), "--dino", str(metric_dirs["dino"]), "--device", "cpu"]
    args = _cli_run_args(manifest, "easyref", tiny_dirs["sdxl"], out, mllm=tiny_dirs["qwen"])
    assert main(args + metrics) == 0
    table = capsys.readouterr().out
    assert "| easyref | held-in | 2 | 3 |" in table and "CLIP-T" in table and "DINO-I (target)" in table
    run = json.loads((out / "run.json").read_text())
    assert run["settings"]["steps"] == 2 and run["method"]["method"] == "easyref"
    assert main(args + metrics) == 0  # resuming a finished run makes nothing new
    assert len(read_records(out)) == 4

    rescored = tmp_path / "rescored"
    assert main(_cli_score_args(manifest, out / "images", rescored, "easyref", metrics)) == 0
    floor = tmp_path / "sdxl-floor"
    table_args = ["bench", "table", str(out), str(floor), "--out", str(tmp_path / "t.md")]
    assert main(table_args) == 2  # the floor run does not exist yet
    assert main(_cli_run_args(manifest, "sdxl", tiny_dirs["sdxl"], floor) + metrics) == 0
    capsys.readouterr()
    assert main(table_args) == 0
    merged = (tmp_path / "t.md").read_text()
    assert capsys.readouterr().out == merged
    assert "| easyref | held-out | 1 | 1 |" in merged and "| sdxl | held-out | 1 | 1 |" in merged
    assert (tmp_path / "t.csv").is_file()

    _assert_same_image_scores(out, rescored)


def test_cli_user_mistakes_are_one_line_errors(manifest, tmp_path, tiny_dirs, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "references": ["nope.png"], "prompts": ["x"]}\n{"id": "a"}\n')
    base = ["bench", "run", "--method", "sdxl", "--base", str(tiny_dirs["sdxl"]), "--out", str(tmp_path / "o")]
    assert main(base + ["--manifest", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("easyref: error: manifest") and "bad.jsonl:1:" in err and "bad.jsonl:2:" in err
    assert main(base + ["--manifest", str(tmp_path / "missing.jsonl")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(base + ["--manifest", str(manifest), "--split", "held-out", "--limit", "0"]) == 2
    assert (
        main(
            [
                "bench",
                "score",
                "--manifest",
                str(manifest),
                "--images",
                str(tmp_path / "none"),
                "--out",
                str(tmp_path / "s"),
            ]
        )
        == 2
    )
    assert "--images" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_convert_folders_and_coco(tmp_path):
    groups = tmp_path / "groups"
    for name in ("cat", "dog"):
        (groups / name).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(groups / name / "a.png")
        (groups / name / "prompts.txt").write_text(f"a {name} on a beach\n")
    assert main(["bench", "convert", "folders", str(groups), str(groups / "m.jsonl")]) == 0
    assert [i.id for i in load_manifest(groups / "m.jsonl")] == ["cat", "dog"]

    coco = tmp_path / "coco"
    (coco / "val").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(coco / "val" / "1.jpg")
    (coco / "captions.json").write_text(
        json.dumps(
            {"images": [{"id": 1, "file_name": "1.jpg"}], "annotations": [{"image_id": 1, "caption": " A dog. "}]}
        )
    )
    assert (
        main(["bench", "convert", "coco", str(coco / "captions.json"), str(coco / "val"), str(coco / "m.jsonl")]) == 0
    )
    [item] = load_manifest(coco / "m.jsonl", root=coco / "val")
    assert item.prompts == ("A dog.",) and len(item.references) == 1
    assert main(["bench", "convert", "coco", str(coco / "nope.json"), str(coco / "val"), str(coco / "x.jsonl")]) == 2
    assert not (coco / "x.jsonl").exists()


def test_write_manifest_round_trips(manifest, tmp_path):
    items = load_manifest(manifest)
    copy = write_manifest(items, manifest.parent / "copy.jsonl", manifest.parent)
    assert load_manifest(copy) == items


def test_a_scored_easyref_run_loads_the_mllm_once(manifest, tmp_path, tiny_dirs, metric_dirs, monkeypatch):
    """One process holds the pipeline (its MLLM loaded once, the trunk and aggregation layer sharing it)
    beside the CLIP and DINO metric models, which bring no second copy."""
    from transformers import Qwen2VLForConditionalGeneration

    loads = []
    original = Qwen2VLForConditionalGeneration.from_pretrained.__func__

    def counted(cls, *args, **kwargs):
        loads.append(args[0] if args else kwargs.get("pretrained_model_name_or_path"))
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(Qwen2VLForConditionalGeneration, "from_pretrained", classmethod(counted))
    metrics = ["--clip", str(metric_dirs["clip"]), "--dino", str(metric_dirs["dino"]), "--device", "cpu"]
    args = _cli_run_args(manifest, "easyref", tiny_dirs["sdxl"], tmp_path / "er", mllm=tiny_dirs["qwen"])
    assert main(args + metrics) == 0
    assert [str(path) for path in loads] == [str(tiny_dirs["qwen"])]
