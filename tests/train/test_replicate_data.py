"""`replicate_release` on the data path: the sizes, SDXL conditioning and stage-2 references of the
authors' `finetune_sdxl.py`, and the project's own path unchanged without it.

Their script resizes with torchvision's `Resize(side)`: the short side becomes `side` and the long one
`int(side * long / short)`. Expected values below are derived from that arithmetic, not from a run.
"""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from easyref.train.config import TrainConfig
from easyref.train.data import DataSettings, TrainDataset, crop_target, sample_rng

SIDE = 32
NO_DROP = dict(image_drop_rate=0.0, text_drop_rate=0.0, both_drop_rate=0.0)


def settings(**overrides) -> DataSettings:
    values = dict(resolution=SIDE, bucket_stride=8, drop_image_size=16, crop="center", **NO_DROP)
    values.update(overrides)
    return DataSettings(**values)


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    """Random colours in [30, 255], so no pixel of it, resized or not, is black."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(30, 256, (height, width, 3), dtype=np.uint8))


def save(folder: Path, name: str, image: Image.Image) -> str:
    image.save(folder / name)
    return name


def authors_long_side(short: int, long: int) -> int:
    """torchvision `Resize(SIDE)`'s long side, computed exactly (a floor of the true ratio)."""
    return math.floor(Fraction(SIDE * long, short))


def rounded_long_side(short: int, long: int) -> int:
    """The project's own resize: the long side scaled by the same factor, rounded."""
    return round(long * (SIDE / short))


# Long sides where rounding and truncating differ: 107 * 32/64 = 53.5 (round: 54) and 36 * 32/20 = 57.6.
# Both truncate to an odd excess over SIDE, so the centre offsets differ too.
WIDE = [(107, 64), (36, 20)]


def test_the_cases_really_separate_round_from_int():
    for width, height in WIDE:
        truncated, rounded = authors_long_side(height, width), rounded_long_side(height, width)
        assert rounded == truncated + 1
        assert (truncated - SIDE) // 2 != (rounded - SIDE) // 2


def test_from_config_carries_the_flag():
    assert DataSettings.from_config(TrainConfig(replicate_release=True)).replicate_release is True
    assert DataSettings.from_config(TrainConfig()).replicate_release is False


@pytest.mark.parametrize("width, height", WIDE)
@pytest.mark.parametrize("portrait", [False, True])
def test_resize_truncates_with_the_flag_and_rounds_without(width, height, portrait):
    image = noise(width, height)
    if portrait:
        image = image.transpose(Image.Transpose.TRANSPOSE)
    for truncate, long_side in ((True, authors_long_side(height, width)), (False, rounded_long_side(height, width))):
        crop, (top, left) = crop_target(image, (SIDE, SIDE), sample_rng(0, 0, 0), "center", truncate)
        offset = (long_side - SIDE) // 2
        assert (top, left) == ((offset, 0) if portrait else (0, offset))
        size = (SIDE, long_side) if portrait else (long_side, SIDE)
        expected = image.resize(size, Image.BILINEAR).crop((left, top, left + SIDE, top + SIDE))
        assert np.array_equal(np.asarray(crop), np.asarray(expected))


@pytest.mark.parametrize("truncate", [True, False])
def test_random_offsets_span_exactly_the_resized_excess(truncate):
    width, height = WIDE[0]
    long_side = authors_long_side(height, width) if truncate else rounded_long_side(height, width)
    image = noise(width, height)
    lefts = {crop_target(image, (SIDE, SIDE), sample_rng(0, e, 0), "random", truncate)[1][1] for e in range(400)}
    assert max(lefts) == long_side - SIDE and min(lefts) == 0


@pytest.mark.parametrize("replicate", [True, False])
def test_stage1_time_ids_keep_the_file_size_and_use_the_matching_offset(tmp_path, replicate):
    width, height = WIDE[1]
    name = save(tmp_path, "t.png", noise(width, height))
    sample = TrainDataset([{"target": name}], tmp_path, settings(replicate_release=replicate))[(0, 0)]
    long_side = authors_long_side(height, width) if replicate else rounded_long_side(height, width)
    expected = [height, width, 0, (long_side - SIDE) // 2, SIDE, SIDE]  # the authors read the file's size here too
    assert sample.time_ids.tolist() == expected and sample.time_ids.dtype == torch.float32


@pytest.mark.parametrize("replicate", [True, False])
def test_stage3_original_size_is_the_resized_size_only_with_the_flag(tmp_path, replicate):
    width, height = WIDE[0]
    names = [save(tmp_path, f"{i}.png", noise(width, height, seed=i)) for i in range(3)]
    record = {"target": names[0], "image_file": names[1:]}
    sample = TrainDataset([record], tmp_path, settings(stage=3, replicate_release=replicate))[(0, 0)]
    if replicate:
        long_side = authors_long_side(height, width)
        expected = [SIDE, long_side, 0, (long_side - SIDE) // 2, SIDE, SIDE]
    else:
        long_side = rounded_long_side(height, width)
        expected = [height, width, 0, (long_side - SIDE) // 2, SIDE, SIDE]
    assert sample.time_ids.tolist() == expected


def test_stage3_buckets_feed_the_resized_size_that_covers_the_bucket(tmp_path):
    width, height = 101, 47  # a landscape file whose aspect matches no bucket exactly
    names = [save(tmp_path, f"{i}.png", noise(width, height, seed=i)) for i in range(2)]
    data = TrainDataset(
        [{"target": names[0], "image_file": names[1:]}],
        tmp_path,
        settings(stage=3, keep_aspect=True, replicate_release=True),
    )
    bucket_w, bucket_h = data.bucket_of(0)
    original_h, original_w, top, left, target_h, target_w = data[(0, 0)].time_ids.tolist()
    assert (target_w, target_h) == (bucket_w, bucket_h)
    # The side with the larger scale is matched exactly, the other is the floor of its exact scaling.
    if Fraction(bucket_w, width) >= Fraction(bucket_h, height):
        assert (original_w, original_h) == (bucket_w, math.floor(Fraction(bucket_w * height, width)))
    else:
        assert (original_w, original_h) == (math.floor(Fraction(bucket_h * width, height)), bucket_h)
    assert (top, left) == ((original_h - bucket_h) // 2, (original_w - bucket_w) // 2)
    assert (original_w, original_h) != (width, height)


# Face box inside a 60 x 40 file, small enough that every expansion fits without shifting.
FACE = [20, 10, 36, 26, 0.9]


@pytest.mark.parametrize("portrait", [False, True])
@pytest.mark.parametrize("crop", ["center", "random"])
def test_stage2_reference_is_the_consistency_crop_with_a_black_band(tmp_path, portrait, crop):
    width, height = (40, 60) if portrait else (60, 40)
    x1, y1, x2, y2, score = FACE
    face = [y1, x1, y2, x2, score] if portrait else FACE
    name = save(tmp_path, "f.png", noise(width, height))
    record = {"target": name, "face": [face]}
    ours = TrainDataset([record], tmp_path, settings(stage=2, crop=crop))
    theirs = TrainDataset([record], tmp_path, settings(stage=2, crop=crop, replicate_release=True))
    bands = set()
    for epoch in range(12):
        raw_crop = ours[(epoch, 0)].references[0]  # the same draws: the flag adds none
        sample = theirs[(epoch, 0)]
        top, left = (int(v) for v in sample.time_ids[2:4])
        reference = np.asarray(sample.references[0])
        assert reference.shape == (SIDE, SIDE, 3)  # the target's size, not the face crop's
        # A square face crop resizes to exactly SIDE x SIDE; cut at the target's offset, the part past its
        # right (landscape: left > 0) or bottom (portrait: top > 0) edge is black.
        assert raw_crop.width == raw_crop.height
        resized = np.asarray(raw_crop.resize((SIDE, SIDE), Image.BILINEAR))
        assert top == 0 or left == 0
        band = left if left else top
        inside = SIDE - band
        if portrait:
            assert left == 0
            assert np.array_equal(reference[:inside], resized[top:])
            assert not reference[inside:].any()
        else:
            assert top == 0
            assert np.array_equal(reference[:, :inside], resized[:, left:])
            assert not reference[:, inside:].any()
        bands.add(band)
    long_side = authors_long_side(40, 60)
    assert max(bands) <= long_side - SIDE
    if crop == "center":
        assert bands == {(long_side - SIDE) // 2}
    else:
        assert len(bands) > 1


def test_stage2_default_reference_is_the_raw_face_crop(tmp_path):
    """Without the flag the reference is the face crop itself: square, its own size, no black band."""
    name = save(tmp_path, "f.png", noise(60, 40))
    data = TrainDataset([{"target": name, "face": [FACE]}], tmp_path, settings(stage=2, flip_rate=0.0))
    x1, y1, x2, y2, _ = FACE
    for epoch in range(6):
        reference = np.asarray(data[(epoch, 0)].references[0])
        side = reference.shape[0]
        assert reference.shape == (side, side, 3) and max(x2 - x1, y2 - y1) <= side <= 40
        assert reference.min() > 0


def test_stage2_flag_leaves_the_target_of_a_square_file_alone(tmp_path):
    """Where the file is square the target's resize has nothing to truncate: same target, no band."""
    name = save(tmp_path, "f.png", noise(48, 48))
    record = {"target": name, "face": [FACE]}
    ours = TrainDataset([record], tmp_path, settings(stage=2))[(0, 0)]
    theirs = TrainDataset([record], tmp_path, settings(stage=2, replicate_release=True))[(0, 0)]
    assert torch.equal(ours.pixel_values, theirs.pixel_values)
    assert torch.equal(ours.time_ids, theirs.time_ids)
    reference = np.asarray(theirs.references[0])
    assert reference.shape == (SIDE, SIDE, 3) and reference.min() > 0
    expected = ours.references[0].resize((SIDE, SIDE), Image.BILINEAR)
    assert np.array_equal(reference, np.asarray(expected))
