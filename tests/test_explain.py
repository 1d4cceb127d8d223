"""Reference attention maps on the bundled model: what they show holds up, and the sheet draws them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from easyref.explain import SHEET_COLUMNS, explain_sheet, heat_colours, label_sizes, overlay

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a star on a white background, at the bottom right"


@pytest.fixture(scope="module")
def encoder():
    from easyref.bundled import BUNDLED_DIR
    from easyref.pipeline import EasyRefPipeline

    pipe = EasyRefPipeline.from_pretrained(
        BUNDLED_DIR / "sdxl", mllm=BUNDLED_DIR / "qwen2vl", adapter=BUNDLED_DIR / "adapter"
    )
    return pipe.reference_encoder


@pytest.fixture(scope="module")
def demo_refs():
    return [Image.open(ROOT / "examples" / "pick" / f"{i}.png").convert("RGB") for i in (1, 2, 3)]


def maps_of(encoder, group):
    with torch.no_grad():
        return encoder(groups=[group], prompts=[PROMPT], return_maps=True)[1][0]


def test_a_black_reference_gets_the_smallest_share_wherever_it_stands(encoder, demo_refs):
    black = Image.new("RGB", (64, 64), "black")
    for group, where in (([*demo_refs[:2], black], 2), ([black, *demo_refs[:2]], 0)):
        shares = [float(m.sum()) for m in maps_of(encoder, group)]
        assert shares[where] < 0.5 * min(s for i, s in enumerate(shares) if i != where), shares


def test_a_copy_of_a_reference_gets_nearly_its_map(encoder, demo_refs):
    first, _, copy = maps_of(encoder, [demo_refs[0], demo_refs[1], demo_refs[0]])
    cosine = torch.nn.functional.cosine_similarity(first.flatten(), copy.flatten(), dim=0)
    assert cosine > 0.95  # not equal: positions differ, and the aggregation's attention is causal
    assert abs(float(first.sum() - copy.sum())) < 0.1


def test_the_sheet_shows_every_reference_with_its_share_and_the_scale(demo_refs):
    maps = [torch.rand(3, 3) for _ in demo_refs]
    sheet = explain_sheet(demo_refs, maps, cell=128)
    share_px, name_px = label_sizes(128)
    assert sheet.width == 3 * 128 and sheet.height > 128 + share_px + name_px
    assert share_px >= 128 // 6, "the shares are drawn large: the page shows the sheet shrunk"
    legend = np.asarray(sheet)[-(2 * name_px + 128 // 8) :].reshape(-1, 3)
    for end in heat_colours([0.0, 1.0]):  # the legend's bar runs from the low end of the scale to the high
        assert (legend == end).all(axis=1).any(), end
    # many references wrap into rows instead of shrinking the sheet to a sliver
    wide = explain_sheet(demo_refs * 3, maps * 3, cell=128)
    assert wide.width == SHEET_COLUMNS * 128 and wide.height > 2 * sheet.height - 128
    assert overlay(demo_refs[0], torch.ones(3, 3), cell=128).size == (128, 128)  # a flat map: no division by zero
    with pytest.raises(ValueError, match="3 references but 2 maps"):
        explain_sheet(demo_refs, maps[:2])


def test_a_black_references_overlay_shows_where_attention_fell():
    black = Image.new("RGB", (64, 64), "black")
    grid = torch.zeros(2, 2)
    grid[0, 0] = 1.0
    tile = np.asarray(overlay(black, grid, cell=128)).astype(int)
    hot, cold = tile[:64, :64].mean(axis=(0, 1)), tile[64:, 64:].mean(axis=(0, 1))
    assert hot.sum() - cold.sum() > 3 * 100, (hot, cold)  # a heat colour on black, not black made brighter
