"""Reference attention maps on the bundled model: what they show holds up, and the sheet draws them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from easyref.explain import explain_sheet, overlay

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
    return [Image.open(ROOT / "examples" / "refs" / f"{i}.png").convert("RGB") for i in (1, 2, 3)]


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


def test_the_sheet_shows_every_reference_with_its_share(demo_refs):
    maps = [torch.rand(3, 3) for _ in demo_refs]
    sheet = explain_sheet(demo_refs, maps, cell=128)
    assert sheet.size == (3 * 128, 128 + 24)
    assert overlay(demo_refs[0], torch.ones(3, 3), cell=128).size == (128, 128)  # a flat map: no division by zero
    with pytest.raises(ValueError, match="3 references but 2 maps"):
        explain_sheet(demo_refs, maps[:2])
