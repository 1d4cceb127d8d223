"""Training data: record formats, path safety, stage augmentations, reproducibility, batching across ranks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from easyref.train.data import (
    DataError,
    DataSettings,
    RankBatchSampler,
    Skipped,
    TrainBatch,
    TrainDataset,
    TrainSample,
    bucket_sizes,
    choose_drop,
    choose_references,
    collate,
    crop_target,
    expand_box,
    face_box,
    global_batches,
    load_records,
    nearest_bucket,
    resolve_path,
    sample_rng,
    square_box,
    to_tensor,
)

NO_DROP = dict(image_drop_rate=0.0, text_drop_rate=0.0, both_drop_rate=0.0)


def settings(**overrides) -> DataSettings:
    values = dict(resolution=32, bucket_stride=8, drop_image_size=16, **NO_DROP)
    values.update(overrides)
    return DataSettings(**values)


def save(path: Path, image: Image.Image, **kwargs) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path.name


def gradient(width: int, height: int) -> Image.Image:
    """R = x and G = y, so any crop tells where it was taken from (sizes must stay below 256)."""
    x, y = np.meshgrid(np.arange(width), np.arange(height))
    return Image.fromarray(np.stack([x, y, np.zeros_like(x)], axis=-1).astype(np.uint8))


def write_jsonl(path: Path, objects: list) -> Path:
    path.write_text("\n".join(json.dumps(o) for o in objects) + "\n")
    return path


# ---------------------------------------------------------------------------------------------- records


def test_json_list_with_references_and_caption_lists(tmp_path):
    records = [
        {"image_file": ["a.jpg", "b.jpg"], "text": ["one", "two"], "target": "t.jpg"},
        {"image_file": "c.jpg", "text": "single", "target": "u.jpg"},
    ]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    assert load_records(path) == records


def test_jsonl_face_and_stage1_records_with_blank_lines(tmp_path):
    objects = [
        {"face": [[[1, 2, 30, 40, 0.99], [0, 0, 5, 5, 0.5]]], "text": ["a face"], "target": "f.jpg"},
        {"target": "only.jpg"},
        {"target": "caption.jpg", "text": "hello"},
    ]
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(objects[0]) + "\n\n" + json.dumps(objects[1]) + "\n   \n" + json.dumps(objects[2]))
    assert load_records(path) == objects


@pytest.mark.parametrize(
    "record, fragment",
    [
        ([1, 2], "not a JSON object"),
        ({"text": "x"}, "no 'target'"),
        ({"target": 5}, "'target'"),
        ({"target": ""}, "'target'"),
        ({"target": "t.jpg", "image_file": 3}, "'image_file'"),
        ({"target": "t.jpg", "image_file": ["a.jpg", None]}, "'image_file'"),
        ({"target": "t.jpg", "text": 7}, "'text'"),
        ({"target": "t.jpg", "face": [[[1, 2, 3]]]}, "4 numbers"),
        ({"target": "t.jpg", "face": [[[10, 2, 5, 8, 0.9]]]}, "empty"),
        ({"target": "t.jpg", "face": [[[1, 9, 5, 9, 0.9]]]}, "empty"),
        ({"target": "t.jpg", "face": [[["a", 1, 5, 9]]]}, "4 numbers"),
        ({"target": "t.jpg", "face": []}, "'face'"),
        # the authors' script's form: a list of boxes
        ({"target": "t.jpg", "face": [[1, 2, 3]]}, "4 numbers"),
        ({"target": "t.jpg", "face": [[1, 2, 3, 4, 0.9, 7]]}, "4 numbers"),
        ({"target": "t.jpg", "face": [[1, 2, 3, 4, "high"]]}, "4 numbers"),
        ({"target": "t.jpg", "face": [[1, 2, 3, None]]}, "4 numbers"),
        ({"target": "t.jpg", "face": [[10, 2, 5, 8, 0.9]]}, "empty"),
        ({"target": "t.jpg", "face": [[1, 2, 5, 9, True]]}, "4 numbers"),
        ({"target": "t.jpg", "face": [[]]}, "'face'"),
        ({"target": "t.jpg", "face": [[[]]]}, "4 numbers"),
        ({"target": "t.jpg", "face": [5, 6, 7, 8]}, "'face'"),
        ({"target": "t.jpg", "face": "1 2 3 4"}, "'face'"),
        ({"target": "t.jpg", "face": {"box": [1, 2, 3, 4]}}, "'face'"),
        ({"target": "t.jpg", "face": [[[[1, 2, 3, 4]]]]}, "4 numbers"),
    ],
)
def test_malformed_records_name_file_and_line(tmp_path, record, fragment):
    path = write_jsonl(tmp_path / "data.jsonl", [{"target": "ok.jpg"}, {"target": "ok2.jpg"}, record])
    with pytest.raises(DataError, match=r"data\.jsonl line 3: ") as info:
        load_records(path)
    assert fragment in str(info.value) and "\n" not in str(info.value)

    listed = tmp_path / "data.json"
    listed.write_text(json.dumps([{"target": "ok.jpg"}, record]))
    with pytest.raises(DataError, match=r"data\.json record 2: "):
        load_records(listed)


@pytest.mark.parametrize(
    "face",
    [
        [[1, 2, 30, 40, 0.99], [0, 0, 5, 5, 0.5]],  # what the authors' script reads (`item["face"][0]`)
        [[1, 2, 30, 40]],  # the score is optional
        [[[1, 2, 30, 40, 0.99], [0, 0, 5, 5, 0.5]]],  # what their README shows
        [[[1, 2, 30, 40]]],
    ],
)
def test_both_face_forms_give_the_first_box(tmp_path, face):
    record = {"face": face, "text": "a face", "target": "f.jpg"}
    path = write_jsonl(tmp_path / "data.jsonl", [record])
    assert load_records(path) == [record]
    assert face_box(record, "here") == (1.0, 2.0, 30.0, 40.0)


def test_both_face_forms_train_the_same_stage2_sample(tmp_path):
    name = save(tmp_path / "face.png", gradient(64, 48))
    box = [20, 10, 36, 26, 0.9]
    forms = ([box], [[box]])
    samples = [TrainDataset([{"target": name, "face": f}], tmp_path, settings(stage=2))[(3, 0)] for f in forms]
    assert np.array_equal(np.asarray(samples[0].references[0]), np.asarray(samples[1].references[0]))
    assert torch.equal(samples[0].pixel_values, samples[1].pixel_values)


def test_a_huge_bad_face_value_is_still_one_short_line(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [{"target": "t.jpg", "face": [list(range(100000))]}])
    with pytest.raises(DataError, match=r"data\.jsonl line 1: face box must be 4 numbers") as info:
        load_records(path)
    assert len(str(info.value)) < 300 and "\n" not in str(info.value)


def test_jsonl_lines_split_on_newlines_only(tmp_path):
    """A caption may hold U+2028 (a line separator to `str.splitlines`, not to JSON Lines), as the
    benchmark's manifests may: both read JSON Lines through the same splitter."""
    path = tmp_path / "data.jsonl"
    path.write_text('{"target": "a.jpg", "text": "one\u2028two"}\n{"target": "b.jpg"}\n', encoding="utf-8")
    records = load_records(path)
    assert [r["target"] for r in records] == ["a.jpg", "b.jpg"] and records[0]["text"] == "one\u2028two"


def test_invalid_json_and_file_types(tmp_path):
    lines = tmp_path / "bad.jsonl"
    lines.write_text('{"target": "a.jpg"}\n{"target": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl line 2: invalid JSON"):
        load_records(lines)
    listed = tmp_path / "bad.json"
    listed.write_text('[\n{"target": "a.jpg"},\n{oops}\n]')
    with pytest.raises(DataError, match=r"bad\.json line 3: invalid JSON"):
        load_records(listed)
    not_list = tmp_path / "obj.json"
    not_list.write_text('{"target": "a.jpg"}')
    with pytest.raises(DataError, match="JSON list"):
        load_records(not_list)
    other = tmp_path / "data.csv"
    other.write_text("target\na.jpg\n")
    with pytest.raises(DataError, match=r"data\.csv"):
        load_records(other)
    with pytest.raises(DataError, match="not found"):
        load_records(tmp_path / "missing.json")


def test_text_list_str_and_missing(tmp_path):
    name = save(tmp_path / "t.png", gradient(40, 40))
    records = [{"target": name, "text": ["alpha", "beta"]}, {"target": name, "text": "gamma"}, {"target": name}]
    data = TrainDataset(records, tmp_path, settings())
    drawn = {data[(epoch, 0)].text for epoch in range(40)}
    assert drawn == {"alpha", "beta"}
    assert data[(0, 1)].text == "gamma"
    assert data[(0, 2)].text == ""


def test_dataset_rejects_records_missing_stage_fields(tmp_path):
    with pytest.raises(DataError, match=r"record index 1 .*'face'"):
        records = [{"target": "a.png", "face": [[[0, 0, 4, 4, 1]]]}, {"target": "b.png"}]
        TrainDataset(records, tmp_path, settings(stage=2))
    with pytest.raises(DataError, match=r"record index 0 .*'image_file'"):
        TrainDataset([{"target": "a.png"}], tmp_path, settings(stage=3))
    with pytest.raises(DataError, match=r"record index 0 .*'image_file'"):
        TrainDataset([{"target": "a.png", "image_file": []}], tmp_path, settings(stage=3))
    with pytest.raises(DataError, match="record index 0: record has no 'target'"):
        TrainDataset([{"text": "x"}], tmp_path, settings())


@pytest.mark.parametrize(
    "overrides",
    [
        dict(stage=4),
        dict(crop="middle"),
        dict(truncate_rate=1.5),
        dict(flip_rate=-0.1),
        dict(image_drop_rate=0.5, text_drop_rate=0.4, both_drop_rate=0.2),
        dict(resolution=36),
        dict(max_references=0),
    ],
)
def test_settings_validation(overrides):
    with pytest.raises(ValueError):
        settings(**overrides)


# ---------------------------------------------------------------------------------------------- paths


def test_path_escapes_are_refused_unless_allowed(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    save(root / "in.png", gradient(20, 20))
    save(outside / "x.png", gradient(20, 20))
    (root / "link").symlink_to(outside, target_is_directory=True)
    (root / "inner").symlink_to(root / "in.png")

    assert resolve_path(root, "sub/../in.png") == root / "sub/../in.png"
    assert resolve_path(root, "inner").resolve() == (root / "in.png").resolve()
    for bad in ("../outside/x.png", str(outside / "x.png"), "link/x.png"):
        with pytest.raises(DataError, match="escapes the data root .*--allow-outside-root"):
            resolve_path(root, bad)
        assert resolve_path(root, bad, allow_outside=True).resolve() == (outside / "x.png").resolve()

    records = [{"target": "in.png"}, {"target": "link/x.png"}]
    with pytest.raises(DataError, match=r"record index 1 .*escapes"):
        TrainDataset(records, root, settings())
    data = TrainDataset(records, root, settings(), allow_outside_root=True)
    assert isinstance(data[(0, 1)], TrainSample)


# ---------------------------------------------------------------------------------------------- stage 2 faces


def test_square_and_expand_box_geometry():
    assert square_box((10, 20, 30, 60)) == (0.0, 20.0, 40.0, 60.0)
    assert square_box((0, 0, 8, 2)) == (0.0, -3.0, 8.0, 5.0)
    assert expand_box((40, 40, 60, 60), 0.0, 100, 100) == (40, 40, 60, 60)
    assert expand_box((40, 40, 60, 60), 0.5, 100, 100) == (30, 30, 70, 70)
    # Near the left/top edge the box is shifted in, keeping its full (expanded) size.
    assert expand_box((0, 2, 20, 22), 0.5, 100, 100) == (0, 0, 40, 40)
    # Near the right/bottom edge too.
    assert expand_box((85, 90, 100, 105), 0.5, 100, 100) == (70, 70, 100, 100)
    # Never larger than the image's short side.
    assert expand_box((10, 10, 50, 50), 0.5, 60, 50) == (5, 0, 55, 50)


def test_face_crop_is_square_expanded_inside_and_flipped_at_rate(tmp_path):
    width, height = 200, 150
    name = save(tmp_path / "face.png", gradient(width, height))
    face = (150, 20, 190, 50)  # 40 x 30, close to the right edge so the expansion must shift
    record = {"target": name, "face": [[[*face, 0.98]]]}
    flip_rate = 0.3
    data = TrainDataset([record], tmp_path, settings(stage=2, flip_rate=flip_rate))
    side = 40
    flips, sides = 0, []
    draws = 300
    for epoch in range(draws):
        ref = np.asarray(data[(epoch, 0)].references[0]).astype(int)
        h, w = ref.shape[:2]
        assert h == w
        sides.append(w)
        assert side <= w <= 2 * side
        flipped = ref[0, 0, 0] > ref[0, -1, 0]
        flips += flipped
        left = ref[0, -1, 0] if flipped else ref[0, 0, 0]
        top = ref[0, 0, 1]
        assert 0 <= left and left + w <= width and 0 <= top and top + h <= height
        # The square face box (150..190 x 15..55) stays fully inside the crop.
        assert left <= 150 and left + w >= 190 and top <= 15 and top + h >= 55
        # Columns are consecutive image columns (no resize, no clipping).
        assert np.array_equal(np.abs(np.diff(ref[0, :, 0])), np.ones(w - 1, dtype=int))
    assert max(sides) - min(sides) > side / 2  # the expansion ratio really varies
    sigma = math.sqrt(draws * flip_rate * (1 - flip_rate))
    assert abs(flips - draws * flip_rate) < 4 * sigma


# ---------------------------------------------------------------------------------------------- stage 3 / drops


def test_choose_references_truncation_rate_and_sizes():
    refs = list(range(6))
    rate, draws = 0.4, 2000
    sizes = [len(choose_references(refs, sample_rng(1, 0, i), 24, rate)) for i in range(draws)]
    truncated = sum(size < len(refs) for size in sizes)
    assert abs(truncated - rate * draws) < 4 * math.sqrt(draws * rate * (1 - rate))
    assert {size for size in sizes if size < len(refs)} == {2, 3, 4, 5}

    many = list(range(30))
    picks = [choose_references(many, sample_rng(2, 0, i), 24, 0.0) for i in range(20)]
    assert all(len(p) == 24 and len(set(p)) == 24 and set(p) <= set(many) for p in picks)
    assert len({tuple(p) for p in picks}) > 1
    assert sorted(choose_references([7, 8], sample_rng(0, 0, 0), 24, 1.0)) == [7, 8]


def test_choose_drop_rates_are_exclusive_and_close():
    config = settings(image_drop_rate=0.1, text_drop_rate=0.2, both_drop_rate=0.15)
    draws = 4000
    counts: dict[tuple[bool, bool], int] = {}
    for i in range(draws):
        outcome = choose_drop(sample_rng(3, 1, i), config)
        counts[outcome] = counts.get(outcome, 0) + 1
    expected = {(True, False): 0.1, (False, True): 0.2, (True, True): 0.15, (False, False): 0.55}
    for outcome, p in expected.items():
        assert abs(counts.get(outcome, 0) - p * draws) < 4 * math.sqrt(draws * p * (1 - p)), outcome


def test_stage3_references_and_drops(tmp_path):
    refs = [save(tmp_path / f"r{i}.png", Image.new("RGB", (10 + i, 12), (i * 40, 0, 0))) for i in range(4)]
    target = save(tmp_path / "t.png", gradient(48, 40))
    record = {"image_file": refs, "text": ["caption"], "target": target}

    sample = TrainDataset([record], tmp_path, settings(stage=3))[(0, 0)]
    assert sorted(im.size[0] for im in sample.references) == [10, 11, 12, 13]
    assert all(im.mode == "RGB" for im in sample.references)
    assert sample.text == "caption"

    dropped = TrainDataset([record], tmp_path, settings(stage=3, image_drop_rate=1.0))[(0, 0)]
    assert len(dropped.references) == 1
    black = dropped.references[0]
    assert black.size == (16, 16) and black.mode == "RGB" and black.getextrema() == ((0, 0),) * 3
    assert dropped.text == "caption"

    no_text = TrainDataset([record], tmp_path, settings(stage=3, text_drop_rate=1.0))[(0, 0)]
    assert no_text.text == "" and len(no_text.references) == 4

    both = TrainDataset([record], tmp_path, settings(stage=3, both_drop_rate=1.0))[(0, 0)]
    assert both.text == "" and both.references[0].getextrema() == ((0, 0),) * 3


def test_stage1_reference_is_the_cropped_target(tmp_path):
    name = save(tmp_path / "t.png", gradient(60, 40))
    sample = TrainDataset([{"target": name}], tmp_path, settings(stage=1))[(0, 0)]
    (reference,) = sample.references
    assert reference.size == (32, 32)
    assert torch.equal(to_tensor(reference), sample.pixel_values)


# ---------------------------------------------------------------------------------------------- images


def test_exif_orientation_is_honoured(tmp_path):
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 20, 20))  # left half red as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90 degrees clockwise, so the red half ends up on top
    name = save(tmp_path / "rot.jpg", stored, exif=exif, quality=95)
    data = TrainDataset([{"target": name}], tmp_path, settings(crop="center", keep_aspect=True))
    assert data.size_of(0) == (20, 40)
    width, height = data.bucket_of(0)
    assert height > width
    sample = data[(0, 0)]
    assert sample.time_ids[:2].tolist() == [40, 20]
    top, bottom = sample.pixel_values[:, 1], sample.pixel_values[:, -2]
    assert top[0].mean() > 0.8 and top[2].mean() < -0.8  # red
    assert bottom[2].mean() > 0.8 and bottom[0].mean() < -0.8  # blue


def test_image_modes_convert_to_rgb(tmp_path):
    sixteen = np.full((24, 24), 128 * 257, dtype=np.uint16)
    rgba = Image.new("RGBA", (24, 24), (10, 200, 30, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))
    images = {
        "p.png": Image.new("RGB", (24, 24), (200, 10, 10)).convert("P", palette=Image.Palette.ADAPTIVE),
        "la.png": Image.new("LA", (24, 24), (90, 255)),
        "rgba.png": rgba,
        "i16.png": Image.fromarray(sixteen),
        "cmyk.jpg": Image.new("CMYK", (24, 24), (0, 255, 255, 0)),
    }
    names = [save(tmp_path / name, image) for name, image in images.items()]
    assert Image.open(tmp_path / "i16.png").mode.startswith("I")
    data = TrainDataset([{"target": n} for n in names], tmp_path, settings(resolution=24, crop="center"))
    refs = {name: data[(0, i)].references[0] for i, name in enumerate(names)}
    assert all(ref.mode == "RGB" and ref.size == (24, 24) for ref in refs.values())
    assert abs(np.asarray(refs["i16.png"]).astype(int) - 128).max() <= 1  # scaled, not clipped to white
    assert np.asarray(refs["la.png"])[5, 5].tolist() == [90, 90, 90]
    red = np.asarray(refs["cmyk.jpg"])[12, 12].astype(int)
    assert red[0] > 200 and red[1] < 60 and red[2] < 60
    assert np.asarray(refs["p.png"])[3, 3].tolist() == [200, 10, 10]
    rgb = np.asarray(refs["rgba.png"])
    assert rgb[0, 0].tolist() == [255, 255, 255] and rgb[5, 5].tolist() == [10, 200, 30]  # alpha over white


def test_corrupt_and_missing_files_are_skipped_or_raise_in_strict(tmp_path):
    good = save(tmp_path / "good.png", gradient(64, 64))
    full = (tmp_path / "good.png").read_bytes()
    (tmp_path / "broken.png").write_bytes(full[: len(full) // 2])
    records = [{"target": good}, {"target": "broken.png"}, {"target": "gone.png"}]
    data = TrainDataset(records, tmp_path, settings())
    broken, gone = data[(2, 1)], data[(2, 2)]
    assert isinstance(broken, Skipped) and broken.key == (2, 1) and broken.path.endswith("broken.png")
    assert isinstance(gone, Skipped) and gone.reason == "file not found" and gone.path.endswith("gone.png")
    assert data.size_of(2) is None

    batch = collate([data[(2, 0)], broken, gone])
    assert isinstance(batch, TrainBatch) and len(batch) == 1 and batch.skipped == [broken, gone]
    empty = collate([broken, gone])
    assert len(empty) == 0 and empty.pixel_values.shape[0] == 0 and empty.time_ids.shape == (0, 6)

    strict = TrainDataset(records, tmp_path, settings(), strict=True)
    with pytest.raises(DataError, match=r"broken\.png"):
        strict[(0, 1)]
    with pytest.raises(DataError, match=r"gone\.png .*not found"):
        strict[(0, 2)]


def test_stage3_missing_reference_is_skipped(tmp_path):
    target = save(tmp_path / "t.png", gradient(32, 32))
    ref = save(tmp_path / "r.png", gradient(16, 16))
    record = {"target": target, "image_file": [ref, "nope.png"]}
    item = TrainDataset([record], tmp_path, settings(stage=3))[(0, 0)]
    assert isinstance(item, Skipped) and item.path.endswith("nope.png")


# ---------------------------------------------------------------------------------------------- determinism


def test_same_key_same_sample_other_epoch_other_augmentation(tmp_path):
    names = [save(tmp_path / f"{i}.png", gradient(60 + 10 * i, 40)) for i in range(3)]
    records = [{"target": n, "face": [[[5, 5, 25, 25, 1.0]]], "text": ["a", "b", "c"]} for n in names]
    config = settings(stage=2, image_drop_rate=0.2, text_drop_rate=0.2, both_drop_rate=0.2)
    first, second = TrainDataset(records, tmp_path, config), TrainDataset(records, tmp_path, config)
    for index in range(3):
        a, b = first[(1, index)], second[(1, index)]
        assert torch.equal(a.pixel_values, b.pixel_values) and torch.equal(a.time_ids, b.time_ids)
        assert (a.text, a.noise_seed) == (b.text, b.noise_seed)
        assert [np.asarray(r).tobytes() for r in a.references] == [np.asarray(r).tobytes() for r in b.references]
        others = [first[(epoch, index)] for epoch in range(2, 8)]
        assert len({s.noise_seed for s in others + [a]}) == 7
        assert any(not torch.equal(s.time_ids, a.time_ids) for s in others)
    assert first[(0, 0)].noise_seed != TrainDataset(records, tmp_path, settings(stage=2, seed=1))[(0, 0)].noise_seed
    with pytest.raises(TypeError):
        first[0]


def test_sample_rng_streams():
    assert sample_rng(0, 1, 2).random() == sample_rng(0, 1, 2).random()
    firsts = {sample_rng(s, e, i).random() for s in range(3) for e in range(3) for i in range(3)}
    assert len(firsts) == 27


def test_time_ids_for_centre_crop(tmp_path):
    name = save(tmp_path / "t.png", gradient(60, 40))
    sample = TrainDataset([{"target": name}], tmp_path, settings(crop="center"))[(0, 0)]
    # 60x40 scaled by 0.8 to cover 32x32 gives 48x32; the centred crop starts 8 columns in.
    assert sample.time_ids.dtype == torch.float32
    assert sample.time_ids.tolist() == [40, 60, 0, 8, 32, 32]
    assert sample.pixel_values.shape == (3, 32, 32)
    assert -1.0 <= sample.pixel_values.min() and sample.pixel_values.max() <= 1.0


def test_crop_target_random_stays_in_bounds():
    image = gradient(90, 30)
    for i in range(50):
        crop, (top, left) = crop_target(image, (24, 16), sample_rng(0, 0, i), "random")
        assert crop.size == (24, 16) and top == 0 and 0 <= left <= 48 - 24


# ---------------------------------------------------------------------------------------------- buckets


def test_bucket_sizes_and_nearest():
    for resolution, stride in ((1024, 64), (64, 8), (32, 8)):
        buckets = bucket_sizes(resolution, stride)
        assert (resolution, resolution) in buckets
        for width, height in buckets:
            assert width % stride == 0 and height % stride == 0
            assert abs(width * height / resolution**2 - 1) <= 0.1
            assert 0.25 <= width / height <= 4
        assert max(w / h for w, h in buckets) >= 3.5 and min(w / h for w, h in buckets) <= 1 / 3.5
    buckets = bucket_sizes(1024, 64)
    assert nearest_bucket(3000, 3000, buckets) == (1024, 1024)
    wide = nearest_bucket(1600, 900, buckets)
    assert wide[0] > wide[1] and abs(math.log(wide[0] / wide[1]) - math.log(16 / 9)) < 0.1
    assert nearest_bucket(900, 1600, buckets) == wide[::-1]


def aspect_dataset(tmp_path, count: int = 24, **overrides) -> TrainDataset:
    shapes = [(64, 32), (32, 64), (48, 48), (80, 20), (40, 50), (70, 40)]
    names = [save(tmp_path / f"{i}.png", gradient(*shapes[i % len(shapes)])) for i in range(count)]
    config = settings(keep_aspect=True, **overrides)
    return TrainDataset([{"target": n} for n in names], tmp_path, config)


def test_keep_aspect_batches_have_one_size(tmp_path):
    data = aspect_dataset(tmp_path)
    assert len({data.bucket_of(i) for i in range(len(data))}) >= 4
    batches = global_batches(data, 2, seed=0, epoch=0)
    assert batches
    for batch in batches:
        assert len(batch) == 2 and len({data.bucket_of(i) for i in batch}) == 1
    loader = torch.utils.data.DataLoader(
        data, batch_sampler=RankBatchSampler(data, 2, 1, 0, seed=0, epoch=0), collate_fn=collate
    )
    for batch in loader:
        width, height = data.bucket_of(batch.keys[0][1])
        assert batch.pixel_values.shape == (2, 3, height, width)
        assert width % 8 == 0 and height % 8 == 0
        assert batch.time_ids[:, 4:].tolist() == [[height, width]] * 2


# ---------------------------------------------------------------------------------------------- ranks


@pytest.mark.parametrize("keep_aspect", [False, True])
def test_rank_slices_union_equals_single_process(tmp_path, keep_aspect):
    data = (
        aspect_dataset(tmp_path, count=30)
        if keep_aspect
        else TrainDataset([{"target": f"{i}.png"} for i in range(30)], tmp_path, settings())
    )
    single = list(RankBatchSampler(data, 4, 1, 0, seed=5, epoch=3))
    halves = [list(RankBatchSampler(data, 4, 2, rank, seed=5, epoch=3)) for rank in (0, 1)]
    quarters = [list(RankBatchSampler(data, 4, 4, rank, seed=5, epoch=3)) for rank in range(4)]
    assert single and len(halves[0]) == len(halves[1]) == len(single)
    for g, batch in enumerate(single):
        assert halves[0][g] + halves[1][g] == batch
        assert sum((quarters[r][g] for r in range(4)), []) == batch
        assert all(key[0] == 3 for key in batch)
    indices = [key[1] for batch in single for key in batch]
    assert len(indices) == len(set(indices))
    if not keep_aspect:
        assert len(single) == 30 // 4
    assert [[k[1] for k in b] for b in single] == global_batches(data, 4, 5, 3)
    assert global_batches(data, 4, 5, 3) != global_batches(data, 4, 5, 4)
    with pytest.raises(ValueError, match="divisible"):
        RankBatchSampler(data, 4, 3, 0, seed=5, epoch=3)


def test_resume_from_start_continues_exactly(tmp_path):
    data = TrainDataset([{"target": f"{i}.png"} for i in range(40)], tmp_path, settings())
    full = list(RankBatchSampler(data, 4, 2, 1, seed=9, epoch=2))
    for start in (0, 3, len(full)):
        sampler = RankBatchSampler(data, 4, 2, 1, seed=9, epoch=2, start=start)
        assert len(sampler) == len(full) - start
        assert list(sampler) == full[start:]
    with pytest.raises(ValueError):
        RankBatchSampler(data, 4, 2, 1, seed=9, epoch=2, start=len(full) + 1)
