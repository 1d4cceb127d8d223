"""Benchmark manifests: loading with complete error reports, writing, and the folder and COCO converters."""

from __future__ import annotations

import json
import re

import pytest
from PIL import Image

from easyref.bench.manifest import (
    BenchItem,
    ManifestError,
    load_manifest,
    manifest_from_coco,
    manifest_from_folders,
    write_manifest,
)


def make_image(path, color=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path)
    return path


def write_lines(path, records):
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def problems_of(excinfo):
    return excinfo.value.problems


@pytest.fixture
def bench(tmp_path):
    root = tmp_path / "bench"
    for name in ("g1/a.png", "g1/b.png", "g1/target.png", "g2/x.jpg"):
        make_image(root / name)
    return root


# ------------------------------------------------------------------------------------------------ load


def test_valid_manifest_loads_with_resolved_paths_and_defaults(bench):
    manifest = write_lines(
        bench / "m.jsonl",
        [
            {
                "id": "g1",
                "domain": "character",
                "split": "held-out",
                "references": ["g1/a.png", "g1/b.png"],
                "target": "g1/target.png",
                "prompts": ["a cat", "a dog"],
            },
            "",
            {"id": "g2", "references": ["g2/x.jpg"], "prompt": "a single prompt"},
        ],
    )
    first, second = load_manifest(manifest)
    assert first == BenchItem(
        "g1",
        "character",
        "held-out",
        ((bench / "g1/a.png").resolve(), (bench / "g1/b.png").resolve()),
        (bench / "g1/target.png").resolve(),
        ("a cat", "a dog"),
    )
    assert all(p.is_absolute() for p in first.references)
    assert (second.domain, second.split, second.target, second.prompts) == (
        "default",
        "held-in",
        None,
        ("a single prompt",),
    )


def test_root_argument_overrides_the_manifest_folder(bench, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    manifest = write_lines(
        tmp_path / "elsewhere" / "m.jsonl", [{"id": "g", "references": ["g2/x.jpg"], "prompts": ["p"]}]
    )
    (item,) = load_manifest(manifest, root=bench)
    assert item.references == ((bench / "g2/x.jpg").resolve(),)
    with pytest.raises(ManifestError, match="not found"):
        load_manifest(manifest)


def test_every_kind_of_error_is_reported_with_its_line_in_one_exception(bench):
    manifest = write_lines(
        bench / "m.jsonl",
        [
            "{not json",  # 1
            "[1, 2]",  # 2
            {"id": "a", "references": ["g2/x.jpg"], "prompts": ["p"], "colour": "red"},  # 3
            {"id": "b", "references": [], "prompts": ["p"]},  # 4
            {"id": "c", "references": ["g2/x.jpg"]},  # 5
            {"id": "d", "references": ["g2/x.jpg"], "prompts": []},  # 6
            {"id": 7, "references": ["g2/x.jpg"], "prompts": ["p"]},  # 7
            {"id": "e", "split": "test", "references": ["g2/x.jpg"], "prompts": ["p"]},  # 8
            {"id": "f", "references": ["g2/missing.png"], "prompts": ["p"]},  # 9
            {"id": "g", "references": "g2/x.jpg", "prompts": ["p"]},  # 10
            {"id": "h", "references": ["g2/x.jpg"], "prompts": ["p", 3]},  # 11
            {"id": "i", "references": ["g2/x.jpg"], "target": 5, "prompts": ["p"]},  # 12
            {"id": "j", "references": ["g2/x.jpg"], "prompt": "p", "prompts": ["q"]},  # 13
            {"id": "k", "references": ["g2/x.jpg"], "prompts": ["p"], "domain": ""},  # 14
        ],
    )
    with pytest.raises(ManifestError) as excinfo:
        load_manifest(manifest)
    problems = problems_of(excinfo)
    expected = {
        1: "invalid JSON",
        2: "expected a JSON object",
        3: "unknown key",
        4: "'references' must be a non-empty",
        5: "missing 'prompts'",
        6: "'prompts' must be a non-empty",
        7: "'id' must be",
        8: "'split' must be",
        9: "image file not found",
        10: "'references' must be",
        11: "'prompts' entries",
        12: "'target' must be",
        13: "either 'prompt' or 'prompts'",
        14: "'domain' must be",
    }
    for line, text in expected.items():
        assert any(p.startswith(f"{manifest}:{line}: ") and text in p for p in problems), (line, problems)
    assert len(problems) == len(expected)
    message = str(excinfo.value)
    assert message.splitlines()[0] == f"manifest {manifest}: {len(expected)} problems"
    assert len(message.splitlines()) == 1 + len(expected)


def test_duplicate_ids_name_both_lines(bench):
    record = {"id": "g", "references": ["g2/x.jpg"], "prompts": ["p"]}
    manifest = write_lines(bench / "m.jsonl", [record, "", {**record, "domain": "style"}])
    with pytest.raises(ManifestError) as excinfo:
        load_manifest(manifest)
    (problem,) = problems_of(excinfo)
    assert problem.startswith(f"{manifest}:3: ") and "duplicate id 'g'" in problem and "line 1" in problem


def test_empty_manifest_is_an_error(bench):
    manifest = bench / "m.jsonl"
    manifest.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(ManifestError, match="no groups"):
        load_manifest(manifest)


def test_long_problem_lists_are_capped(bench):
    manifest = write_lines(bench / "m.jsonl", ["{bad"] * 30)
    with pytest.raises(ManifestError) as excinfo:
        load_manifest(manifest)
    lines = str(excinfo.value).splitlines()
    assert lines[0].endswith(": 30 problems") and lines[-1].strip() == "... and 10 more" and len(lines) == 22


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_paths_outside_the_root_are_rejected_unless_allowed(tmp_path, kind):
    root = tmp_path / "root"
    root.mkdir()
    outside = make_image(tmp_path / "outside.png")
    if kind == "symlink":
        (root / "link.png").symlink_to(outside)
    ref = {"dotdot": "../outside.png", "absolute": str(outside), "symlink": "link.png"}[kind]
    manifest = write_lines(root / "m.jsonl", [{"id": "g", "references": [ref], "target": ref, "prompts": ["p"]}])
    with pytest.raises(ManifestError) as excinfo:
        load_manifest(manifest)
    assert len(problems_of(excinfo)) == 2
    assert all(re.match(rf"{re.escape(str(manifest))}:1: .*outside the root", p) for p in problems_of(excinfo))
    (item,) = load_manifest(manifest, allow_outside_root=True)
    assert item.references == (outside.resolve(),) and item.target == outside.resolve()


def test_absolute_path_inside_the_root_is_accepted(bench):
    manifest = write_lines(bench / "m.jsonl", [{"id": "g", "references": [str(bench / "g2/x.jpg")], "prompts": ["p"]}])
    assert load_manifest(manifest)[0].references == ((bench / "g2/x.jpg").resolve(),)


def test_check_files_false_skips_existence_but_not_the_root(bench):
    manifest = write_lines(bench / "m.jsonl", [{"id": "g", "references": ["later/a.png"], "prompts": ["p"]}])
    assert load_manifest(manifest, check_files=False)[0].references == ((bench / "later/a.png").resolve(),)
    escaping = write_lines(bench / "e.jsonl", [{"id": "g", "references": ["../a.png"], "prompts": ["p"]}])
    with pytest.raises(ManifestError, match="outside the root"):
        load_manifest(escaping, check_files=False)


# ----------------------------------------------------------------------------------------------- write


def test_write_then_load_round_trips_exactly(bench, tmp_path):
    items = [
        BenchItem(
            "g1",
            "character",
            "held-out",
            ((bench / "g1/a.png").resolve(), (bench / "g1/b.png").resolve()),
            (bench / "g1/target.png").resolve(),
            ("a cat", "ünïcode prompt\u2028with separator"),
        ),
        BenchItem("g2", "default", "held-in", ((bench / "g2/x.jpg").resolve(),), None, ("p",)),
    ]
    manifest = write_manifest(items, bench / "out" / "m.jsonl", bench)
    records = [json.loads(line) for line in manifest.read_text(encoding="utf-8").split("\n") if line.strip()]
    assert records[0]["references"] == ["g1/a.png", "g1/b.png"] and "target" not in records[1]
    assert load_manifest(manifest, root=bench) == items
    assert [p.name for p in manifest.parent.iterdir()] == ["m.jsonl"]  # no temp file left behind


def test_write_refuses_duplicate_ids(bench):
    item = BenchItem("g", "default", "held-in", ((bench / "g2/x.jpg").resolve(),), None, ("p",))
    with pytest.raises(ManifestError, match="duplicate id 'g'"):
        write_manifest([item, item], bench / "m.jsonl", bench)
    assert not (bench / "m.jsonl").exists()


# --------------------------------------------------------------------------------------------- folders


def make_group(folder, images=("1.png", "2.PNG"), prompts="a photo\n"):
    folder.mkdir(parents=True, exist_ok=True)
    for name in images:
        make_image(folder / name)
    if prompts is not None:
        (folder / "prompts.txt").write_text(prompts, encoding="utf-8")
    return folder


def test_folders_without_split_level(tmp_path):
    root = tmp_path / "bench"
    make_group(
        root / "b-group",
        images=("z.webp", "a.JPG", "target.png"),
        prompts="# comment\n\n  first prompt  \nsecond prompt\n",
    )
    (root / "b-group" / "notes.txt").write_text("not an image", encoding="utf-8")
    make_group(root / "a-group", images=("x.bmp",))
    out = root / "manifest.jsonl"
    items = manifest_from_folders(root, out=out, domain="style")
    assert [i.id for i in items] == ["a-group", "b-group"]
    b = items[1]
    assert b.references == ((root / "b-group/a.JPG").resolve(), (root / "b-group/z.webp").resolve())
    assert b.target == (root / "b-group/target.png").resolve()
    assert b.prompts == ("first prompt", "second prompt")
    assert {(i.split, i.domain) for i in items} == {("held-in", "style")}
    assert items[0].target is None
    assert load_manifest(out) == items


def test_folders_with_split_level(tmp_path):
    root = tmp_path / "bench"
    make_group(root / "held-in" / "g1")
    make_group(root / "held-out" / "g2")
    items = manifest_from_folders(root, split="held-in")
    assert [(i.id, i.split, i.domain) for i in items] == [("g1", "held-in", "default"), ("g2", "held-out", "default")]


def test_folder_problems_are_collected(tmp_path):
    root = tmp_path / "bench"
    make_group(root / "held-in" / "ok")
    make_group(root / "held-in" / "no-images", images=())
    make_group(root / "held-in" / "only-target", images=("target.png",))
    make_group(root / "held-out" / "no-prompts", prompts=None)
    make_group(root / "held-out" / "blank-prompts", prompts="# nothing\n\n")
    make_group(root / "held-out" / "ok")
    make_group(root / "stray")
    with pytest.raises(ManifestError) as excinfo:
        manifest_from_folders(root)
    problems = problems_of(excinfo)
    expected = [
        "no-images: no reference images",
        "only-target: no reference images",
        "no-prompts: missing prompts.txt",
        "no prompts",
        "duplicate id 'ok'",
        "stray: beside",
    ]
    for text in expected:
        assert any(text in p for p in problems), (text, problems)
    assert len(problems) == len(expected)


def test_empty_folder_root_is_an_error(tmp_path):
    with pytest.raises(ManifestError, match="no group folders"):
        manifest_from_folders(tmp_path)


# ------------------------------------------------------------------------------------------------ COCO


@pytest.fixture
def coco(tmp_path):
    images = tmp_path / "val2017"
    for image_id in (3, 1, 2):
        make_image(images / f"{image_id:012d}.jpg")
    data = {
        "images": [{"id": i, "file_name": f"{i:012d}.jpg", "width": 8, "height": 8} for i in (3, 1, 2)],
        "annotations": [
            {"id": 10 * i + k, "image_id": i, "caption": f" caption {k} of {i} "} for i in (2, 3, 1) for k in range(3)
        ],
    }
    captions = tmp_path / "captions_val2017.json"
    captions.write_text(json.dumps(data), encoding="utf-8")
    return captions, images


def test_coco_items_sorted_with_first_caption(coco, tmp_path):
    captions, images = coco
    out = tmp_path / "coco.jsonl"
    items = manifest_from_coco(captions, images, out=out)
    assert [i.id for i in items] == ["1", "2", "3"]
    first = items[0]
    assert first.references == ((images / "000000000001.jpg").resolve(),) and first.target == first.references[0]
    assert (first.prompts, first.domain, first.split) == (("caption 0 of 1",), "coco", "held-in")
    assert load_manifest(out, root=images) == items


def test_coco_limit_and_captions_per_image(coco):
    captions, images = coco
    items = manifest_from_coco(captions, images, limit=2, captions_per_image=2)
    assert [i.id for i in items] == ["1", "2"]
    assert items[1].prompts == ("caption 0 of 2", "caption 1 of 2")


def test_coco_missing_images_all_reported(coco):
    captions, images = coco
    (images / "000000000001.jpg").unlink()
    (images / "000000000003.jpg").unlink()
    with pytest.raises(ManifestError) as excinfo:
        manifest_from_coco(captions, images)
    problems = problems_of(excinfo)
    assert len(problems) == 2 and "image 1" in problems[0] and "image 3" in problems[1]
    assert all("not found" in p for p in problems)
    # Only the images within the limit are checked.
    with pytest.raises(ManifestError, match=r": 1 problem\n"):
        manifest_from_coco(captions, images, limit=1)


def test_coco_file_that_is_not_coco_is_an_error(tmp_path):
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps({"images": [{"id": 1}]}), encoding="utf-8")
    with pytest.raises(ManifestError, match="not a COCO captions file"):
        manifest_from_coco(captions, tmp_path)


# --------------------------------------------------------------------------------------------- the command's line
@pytest.mark.parametrize("kind", ["folders", "coco"])
def test_convert_reports_the_written_manifest_once(tmp_path, coco, kind):
    """One `wrote` line: the command reports the manifest, the library's own line stays at debug level."""
    import subprocess
    import sys

    out = tmp_path / "m.jsonl"
    if kind == "folders":
        make_group(tmp_path / "groups" / "g1")
        argv = ["folders", str(tmp_path / "groups"), str(out)]
    else:
        argv = ["coco", str(coco[0]), str(coco[1]), str(out)]
    result = subprocess.run(
        [sys.executable, "-m", "easyref", "bench", "convert", *argv], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    groups = "1 group" if kind == "folders" else "3 groups"
    assert (result.stdout + result.stderr).splitlines() == [f"easyref: wrote {groups} to {out}"]
    assert out.is_file()
