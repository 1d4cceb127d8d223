"""The MLLM's inputs: the release's reference resize rule, image modes and EXIF, chat rows."""

from __future__ import annotations

import io

from conftest import shape_image
from PIL import Image

from easyref.config import EasyRefConfig
from easyref.prompting import build_inputs, normalize_image


def test_resize_rule_336(tiny_dirs, make_encoder):
    """Real setting: 121..145 * 28^2 pixels, aspect kept, 120..145 visual tokens (144 for a square)."""
    encoder = make_encoder()
    config = EasyRefConfig(mllm_hidden_size=64)
    assert (config.min_pixels, config.max_pixels) == (121 * 784, 145 * 784)
    images = [
        shape_image("red", size=(1000, 500)),
        shape_image("red", size=(336, 336)),
        shape_image("red", size=(64, 900)),
    ]
    inputs = build_inputs([images], ["x"], encoder.tokenizer, encoder.image_processor, config)
    for (_t, h, w), image in zip(inputs.image_grid_thw.tolist(), images):
        pixels = h * w * 14 * 14
        assert config.min_pixels <= pixels <= config.max_pixels
        assert 120 <= h * w // 4 <= 145
        assert abs((w / h) - image.width / image.height) / (image.width / image.height) < 0.35
    assert inputs.image_grid_thw[1].tolist() == [1, 24, 24]  # a square gives 144 tokens
    pads = (inputs.input_ids == encoder.image_token_id).sum().item()
    assert pads == sum(h * w // 4 for _, h, w in inputs.image_grid_thw.tolist())


def test_normalize_image_modes_and_exif():
    rgba = shape_image("red").convert("RGBA")
    assert normalize_image(rgba).mode == "RGB"
    assert normalize_image(shape_image("red").convert("L")).mode == "RGB"
    exif_rotated = shape_image("red", size=(84, 56))
    exif = exif_rotated.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    buffer = io.BytesIO()
    exif_rotated.save(buffer, format="JPEG", exif=exif)
    loaded = Image.open(io.BytesIO(buffer.getvalue()))
    assert normalize_image(loaded).size == (56, 84)


def test_rows_follow_the_reference_mode(make_encoder, groups):
    """joint: one row per group; mean and concat: one row per reference, with the group sizes to
    recombine them (`easyref.reference_modes`)."""
    from easyref.prompting import prepare_inputs

    encoder = make_encoder()
    sizes = [len(group) for group in groups]
    for mode, rows, group_sizes in (
        ("joint", len(groups), None),
        ("mean", sum(sizes), sizes),
        ("concat", sum(sizes), sizes),
    ):
        config = EasyRefConfig(**{**encoder.config.to_dict(), "reference_mode": mode})
        inputs = prepare_inputs(groups, ["a", "b"], encoder.tokenizer, encoder.image_processor, config)
        assert inputs.input_ids.shape[0] == rows and inputs.group_sizes == group_sizes
