"""The paper's tuning-free baselines: each reference read alone, token sets averaged or concatenated."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import shape_image


def singles(encoder, group, prompt):
    """Each reference as its own one-image group, through the joint (EasyRef) path of the same weights."""
    joint = dataclasses.replace(encoder.config, reference_mode="joint")
    encoder.config, saved = joint, encoder.config
    try:
        return torch.cat([encoder([[image]], [prompt]) for image in group])
    finally:
        encoder.config = saved


def test_mean_mode_averages_the_single_reference_tokens(make_encoder):
    encoder = make_encoder(reference_mode="mean")
    group = [shape_image("red"), shape_image("blue", "gray"), shape_image("green", "yellow")]
    with torch.no_grad():
        tokens = encoder([group], ["a cat"])
        expected = singles(encoder, group, "a cat").mean(0, keepdim=True)
    assert tokens.shape == (1, encoder.config.num_reference_tokens, 64)
    torch.testing.assert_close(tokens, expected, rtol=1e-4, atol=1e-5)


def test_concat_mode_concatenates_and_pads_cyclically(make_encoder):
    encoder = make_encoder(reference_mode="concat")
    a = [shape_image("red"), shape_image("blue", "gray"), shape_image("green", "yellow")]
    b = [shape_image("purple"), shape_image("orange", "gray")]
    with torch.no_grad():
        tokens = encoder([a, b], ["x", "y"])
        expected_a = singles(encoder, a, "x").flatten(0, 1)
        single_b = singles(encoder, b, "y")
    n = encoder.config.num_reference_tokens
    assert tokens.shape == (2, 3 * n, 64)
    torch.testing.assert_close(tokens[0], expected_a, rtol=1e-4, atol=1e-5)
    # the shorter group repeats its references: b0, b1, b0
    torch.testing.assert_close(tokens[1], single_b[[0, 1, 0]].flatten(0, 1), rtol=1e-4, atol=1e-5)


def test_one_reference_is_the_same_in_every_mode(make_encoder):
    image = shape_image("red")
    outs = []
    for mode in ("joint", "mean", "concat"):
        with torch.no_grad():
            outs.append(make_encoder(seed=3, reference_mode=mode)([[image]], ["a cat"]))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(outs[0], outs[2], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["mean", "concat"])
def test_pipeline_generates_in_baseline_modes(make_pipeline, mode):
    pipe = make_pipeline(reference_mode=mode)
    group = [shape_image("red"), shape_image("blue", "gray")]
    out = pipe(group, "a cat", num_inference_steps=2, seed=0, output_type="pt")
    n = pipe.easyref_config.num_reference_tokens
    assert out.reference_embeds.shape[1] == (2 * n if mode == "concat" else n)
    assert torch.isfinite(out.images).all()
    again = pipe(None, "a cat", num_inference_steps=2, seed=0, output_type="pt", reference_embeds=out.reference_embeds)
    torch.testing.assert_close(again.images, out.images)


def test_reference_mode_is_validated():
    from easyref import EasyRefConfig

    with pytest.raises(ValueError, match="reference_mode"):
        EasyRefConfig(reference_mode="median")
