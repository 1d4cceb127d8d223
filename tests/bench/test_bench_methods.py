"""Bench methods: one interface over EasyRef, the IP-Adapter mean/concat baselines and prompt-only SDXL.

Everything is loaded back from tiny folders through the same `from_pretrained` / `load_ip_adapter`
paths a real model takes."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import randomize_adapter, shape_image, tiny_config
from tiny_models import save_tiny_ip_adapter

from easyref import EasyRefPipeline, ReferenceEncoder
from easyref.bench.methods import (
    METHOD_NAMES,
    EasyRefMethod,
    GenerationSettings,
    IPAdapterMethod,
    Method,
    PromptOnlyMethod,
    load_method,
)

SETTINGS = GenerationSettings(steps=2, guidance=5.0, height=32, width=48, negative_prompt="blurry")
PROMPTS, SEEDS = ["a cat", "a dog on grass"], [3, 4]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def refs():
    return [shape_image("red"), shape_image("blue", "black", (50, 50)), shape_image("green", "gray", (40, 70))]


@pytest.fixture(scope="module")
def ip_dirs(tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("ip")
    return {plus: save_tiny_ip_adapter(root / f"plus{plus}", tiny_dirs["sdxl"], plus=plus) for plus in (False, True)}


@pytest.fixture(scope="module")
def easyref_adapter(tiny_dirs, tmp_path_factory):
    """A saved EasyRef checkpoint with random (visible) adapter weights, and the pipeline it came from."""
    from diffusers import StableDiffusionXLPipeline

    torch.manual_seed(0)
    encoder = ReferenceEncoder.from_pretrained(tiny_dirs["qwen"], tiny_config(tiny_dirs["qwen"])).eval()
    pipe = EasyRefPipeline.from_components(StableDiffusionXLPipeline.from_pretrained(tiny_dirs["sdxl"]), encoder)
    randomize_adapter(pipe.unet, 0)
    pipe.set_progress_bar_config(disable=True)
    return pipe.save_adapter(tmp_path_factory.mktemp("easyref") / "adapter"), pipe


def ip_method(tiny_dirs, ip_dirs, mode="mean", plus=False, scale=1.0) -> IPAdapterMethod:
    return IPAdapterMethod(
        tiny_dirs["sdxl"], ip_dirs[plus], weight_name="ip_adapter.safetensors", subfolder="", mode=mode, scale=scale
    )


@pytest.fixture(scope="module")
def methods(tiny_dirs, ip_dirs, easyref_adapter):
    return {
        "easyref": EasyRefMethod(tiny_dirs["sdxl"], mllm=tiny_dirs["qwen"], adapter=easyref_adapter[0]),
        "ip-adapter-mean": ip_method(tiny_dirs, ip_dirs, "mean"),
        "ip-adapter-concat": ip_method(tiny_dirs, ip_dirs, "concat"),
        "ip-plus-mean": ip_method(tiny_dirs, ip_dirs, "mean", plus=True),
        "ip-plus-concat": ip_method(tiny_dirs, ip_dirs, "concat", plus=True),
        "sdxl": PromptOnlyMethod(tiny_dirs["sdxl"]),
    }


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.int16) for im in images])


def assert_same(a, b):
    # PIL output is 8-bit: a float difference of ~1e-6 may still flip one rounding
    assert np.abs(pixels(a) - pixels(b)).max() <= 1


def assert_differ(a, b):
    assert np.abs(pixels(a) - pixels(b)).mean() > 2.0


ALL = ["easyref", "ip-adapter-mean", "ip-adapter-concat", "ip-plus-mean", "ip-plus-concat", "sdxl"]


@pytest.mark.parametrize("key", ALL)
def test_count_size_batching_and_seeds(methods, refs, key):
    method = methods[key]
    assert isinstance(method, Method)
    both = method.generate(refs[:2], PROMPTS, SEEDS, SETTINGS)
    assert len(both) == 2 and all(im.size == (48, 32) and im.mode == "RGB" for im in both)
    for i in range(2):  # batching must not matter: each image has its own generator
        assert_same(both[i : i + 1], method.generate(refs[:2], PROMPTS[i : i + 1], SEEDS[i : i + 1], SETTINGS))
    assert_differ(both[:1], method.generate(refs[:2], PROMPTS[:1], [99], SETTINGS))
    json.dumps(method.describe())


def test_default_resolution_is_the_model_default(methods, refs):
    settings = dataclasses.replace(SETTINGS, height=None, width=None)
    assert [im.size for im in methods["ip-adapter-mean"].generate(refs[:1], ["a"], [0], settings)] == [(32, 32)]


@pytest.mark.parametrize("plus", [False, True])
def test_mean_and_concat_agree_on_one_reference(methods, refs, plus):
    prefix = "ip-plus" if plus else "ip-adapter"
    mean = methods[f"{prefix}-mean"].generate(refs[:1], PROMPTS, SEEDS, SETTINGS)
    assert_same(mean, methods[f"{prefix}-concat"].generate(refs[:1], PROMPTS, SEEDS, SETTINGS))


@pytest.mark.parametrize("plus", [False, True])
def test_mean_averages_and_concat_keeps_each_reference(methods, refs, plus):
    prefix = "ip-plus" if plus else "ip-adapter"
    mean, concat = methods[f"{prefix}-mean"], methods[f"{prefix}-concat"]
    one = mean.generate(refs[:1], PROMPTS[:1], SEEDS[:1], SETTINGS)
    assert_same(one, mean.generate([refs[0], refs[0]], PROMPTS[:1], SEEDS[:1], SETTINGS))
    two_mean = mean.generate(refs[:2], PROMPTS[:1], SEEDS[:1], SETTINGS)
    assert_differ(one, two_mean)  # the second reference counts
    assert_differ(two_mean, concat.generate(refs[:2], PROMPTS[:1], SEEDS[:1], SETTINGS))


def test_ip_adapter_embeds_shapes(methods, refs):
    mean, concat = methods["ip-adapter-mean"], methods["ip-adapter-concat"]
    (m,) = mean.reference_embeds(refs, count=2, cfg=True)
    (c,) = concat.reference_embeds(refs, count=2, cfg=True)
    assert m.shape == (4, 1, 32) and c.shape == (4, 3, 32)
    assert torch.count_nonzero(m[:2]) == 0 and torch.count_nonzero(c[:2]) == 0  # diffusers' zero negative
    torch.testing.assert_close(m[2:, 0], c[2:].mean(1))
    plus = methods["ip-plus-concat"]
    (p,) = plus.reference_embeds(refs, count=1, cfg=True)
    assert p.shape == (2, 3, 17, 32)  # penultimate CLIP hidden states: 16 patches + CLS per reference
    # Plus negatives as diffusers makes them: the encoder's features of an all-zero (normalised) image
    zeros = torch.zeros(1, 3, 32, 32)
    black = plus.pipe.image_encoder(zeros, output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(p[0], black.expand(3, 17, 32))


def test_ip_adapter_scale_zero_equals_prompt_only(methods, tiny_dirs, ip_dirs, refs):
    off = ip_method(tiny_dirs, ip_dirs, "concat", scale=0.0)
    floor = methods["sdxl"].generate([], PROMPTS, SEEDS, SETTINGS)
    assert_same(off.generate(refs, PROMPTS, SEEDS, SETTINGS), floor)
    assert_differ(methods["ip-adapter-concat"].generate(refs, PROMPTS, SEEDS, SETTINGS), floor)
    assert_same(methods["sdxl"].generate(refs, PROMPTS, SEEDS, SETTINGS), floor)  # references ignored


def test_easyref_method_matches_the_pipeline(methods, easyref_adapter, refs):
    pipe = easyref_adapter[1]
    gens = [torch.Generator().manual_seed(s) for s in SEEDS]
    call = dict(negative_prompt="blurry", num_inference_steps=2, guidance_scale=5.0, height=32, width=48)
    direct = pipe([refs] * 2, PROMPTS, generator=gens, **call).images
    assert_same(methods["easyref"].generate(refs, PROMPTS, SEEDS, SETTINGS), direct)
    assert methods["easyref"].describe()["easyref_config"]["num_reference_tokens"] == 64


def test_tiny_ip_adapter_loads_in_diffusers(methods):
    from diffusers.models.embeddings import ImageProjection, IPAdapterPlusImageProjection

    plain, plus = methods["ip-adapter-mean"].pipe.unet, methods["ip-plus-mean"].pipe.unet
    assert isinstance(plain.encoder_hid_proj.image_projection_layers[0], ImageProjection)
    assert isinstance(plus.encoder_hid_proj.image_projection_layers[0], IPAdapterPlusImageProjection)
    assert methods["ip-plus-mean"].describe()["image_features"] == "hidden_states[-2]"


def test_settings_are_json_and_negative_is_shared():
    record = json.loads(json.dumps(dataclasses.asdict(GenerationSettings())))
    assert record["steps"] == 30 and record["guidance"] == 5.0 and record["height"] is None
    assert GenerationSettings(negative_prompt=None).negative() == ""


def test_request_checks(methods, refs):
    with pytest.raises(ValueError, match="seeds"):
        methods["sdxl"].generate(refs, PROMPTS, [1], SETTINGS)
    with pytest.raises(ValueError, match="reference"):
        methods["ip-adapter-mean"].generate([], PROMPTS, SEEDS, SETTINGS)


def test_load_method_names(tiny_dirs, ip_dirs):
    with pytest.raises(ValueError, match="valid methods: easyref, ip-adapter-mean, ip-adapter-concat, sdxl"):
        load_method("ip-adapter-max", base=tiny_dirs["sdxl"])
    assert METHOD_NAMES == ("easyref", "ip-adapter-mean", "ip-adapter-concat", "sdxl")
    method = load_method("sdxl", base=tiny_dirs["sdxl"])
    assert isinstance(method, PromptOnlyMethod) and method.name == "sdxl"
    options = dict(ip_adapter=ip_dirs[False], weight_name="ip_adapter.safetensors", subfolder="")
    method = load_method("ip-adapter-concat", base=tiny_dirs["sdxl"], **options)
    assert isinstance(method, IPAdapterMethod) and (method.name, method.mode) == ("ip-adapter-concat", "concat")
    with pytest.raises(ValueError, match="mode"):
        IPAdapterMethod(tiny_dirs["sdxl"], mode="max")


@pytest.mark.parametrize("key", ["ip-adapter-concat", "ip-plus-mean"])
def test_ip_adapter_without_guidance_passes_no_negative_half(methods, refs, key):
    settings = dataclasses.replace(SETTINGS, guidance=1.0)
    assert len(methods[key].generate(refs, PROMPTS, SEEDS, settings)) == 2
