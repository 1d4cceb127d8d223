"""The CPU's fast path for low-precision dtypes: channels-last convolutions (`prefer_fast_layout`), a float32
decode where the CPU has no fast kernels for the VAE's dtype, and `generate`'s one warning line for a dtype
slower than float32 here. float32 pixels are unchanged by all of it, to the bit."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from conftest import shape_image

from easyref import pipeline as pipeline_module
from easyref.cli import main
from easyref.devices import cpu_decode_upcast, cpu_has_fast_kernels, fast_cpu_layout, vae_decode_dtype
from easyref.pipeline import prefer_fast_layout

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "a red circle"
# bfloat16 keeps 8 significant bits: a pixel value in [0.5, 1) is stored to within 2^-9, and every layer
# rounds again. Reordering a convolution's sums changes each rounding by about one unit; over the tiny
# model's layers, two steps and the decode those units add up (measured: 4 units at most, 0.7 on average,
# about what bfloat16 itself moves the image from float32). 16 units of the coarsest spacing a pixel sees
# (2^-8) bound the largest change and 2 units the mean; float16 (3 more bits) stays far inside both.
BF16_UNIT = 2.0**-8
MAX_CHANGE, MEAN_CHANGE = 16 * BF16_UNIT, 2 * BF16_UNIT


def layout_of(module) -> str:
    weight = next(p for p in module.parameters() if p.dim() == 4)
    if weight.is_contiguous():
        return "NCHW"
    return "channels-last" if weight.is_contiguous(memory_format=torch.channels_last) else "other"


def generate(pipe, steps: int = 2):
    refs = [shape_image("red"), shape_image("red", "gray")]
    return pipe(refs, PROMPT, num_inference_steps=steps, seed=0, output_type="np").images


def test_float32_keeps_its_layout_and_its_pixels_to_the_bit(make_pipeline):
    pipe = make_pipeline().to("cpu")
    assert layout_of(pipe.unet) == layout_of(pipe.vae) == "NCHW"
    fast = generate(pipe)
    assert layout_of(pipe.unet) == layout_of(pipe.vae) == "NCHW"  # the call left it as it was too
    plain = make_pipeline()
    plain.fast_layout = False  # the pipeline as it ran before the fast path existed
    assert np.array_equal(fast, generate(plain))
    assert not fast_cpu_layout("cpu", torch.float32) and not cpu_decode_upcast("cpu", torch.float32)


def on_any_cpu(device, dtype) -> bool:
    """`devices.fast_cpu_layout` as on a CPU without fast kernels for any low-precision dtype."""
    return str(device) == "cpu" and str(dtype) in ("torch.bfloat16", "torch.float16")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_channels_last_stays_close_to_nchw(make_pipeline, monkeypatch, dtype):
    natural = make_pipeline().to(dtype)  # this CPU's choice, set by to(): channels-last where kernels lack
    expected = "NCHW" if cpu_has_fast_kernels(dtype) else "channels-last"
    assert layout_of(natural.unet) == layout_of(natural.vae) == expected
    monkeypatch.setattr(pipeline_module, "fast_cpu_layout", on_any_cpu)  # channels-last whatever the kernels
    pipe = make_pipeline().to(dtype)
    assert layout_of(pipe.unet) == layout_of(pipe.vae) == "channels-last"
    fast = generate(pipe)
    assert pipe.vae.dtype == dtype and layout_of(pipe.vae) == "channels-last"  # an upcast decode casts back
    nchw = make_pipeline().to(dtype)
    nchw.fast_layout = False
    nchw.unet.to(memory_format=torch.contiguous_format)
    nchw.vae.to(memory_format=torch.contiguous_format)
    reference = generate(nchw)
    assert layout_of(nchw.unet) == "NCHW"
    assert np.isfinite(fast).all()
    change = np.abs(fast - reference)
    assert change.max() <= MAX_CHANGE and change.mean() <= MEAN_CHANGE, (change.max(), change.mean())
    # and the layout costs no precision of its own: as near the float32 image as the NCHW one, give or take
    exact = generate(make_pipeline())
    assert np.abs(fast - exact).mean() <= 2 * np.abs(reference - exact).mean() + BF16_UNIT / 4


def test_the_layout_follows_the_dtype_and_is_put_back(make_pipeline, monkeypatch):
    monkeypatch.setattr(pipeline_module, "fast_cpu_layout", on_any_cpu)
    pipe = make_pipeline().to(torch.bfloat16)
    assert layout_of(pipe.unet) == "channels-last"
    pipe.to(torch.float32)  # float32 again: the layout this pipeline set goes, so float32 pixels are as ever
    assert layout_of(pipe.unet) == layout_of(pipe.vae) == "NCHW"
    mine = make_pipeline()
    mine.unet.to(memory_format=torch.channels_last)  # a layout the user chose stays
    assert not prefer_fast_layout(mine) and layout_of(mine.unet) == "channels-last"
    unloaded = make_pipeline().to(torch.bfloat16)
    plain = unloaded.unload()  # the user's UNet comes back as it came
    assert layout_of(plain.unet) == layout_of(plain.vae) == "NCHW"


def test_a_cpu_without_fast_kernels_decodes_in_float32(make_pipeline, monkeypatch):
    pipe = make_pipeline().to(torch.bfloat16)
    layout = layout_of(pipe.vae)
    seen = []
    pipe.vae.post_quant_conv.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    generate(pipe, steps=1)
    assert seen == [torch.bfloat16] if cpu_has_fast_kernels(torch.bfloat16) else [torch.float32]
    monkeypatch.setattr(pipeline_module, "cpu_decode_upcast", lambda device, dtype: True)  # as on such a CPU
    seen.clear()
    images = generate(pipe, steps=1)
    assert seen == [torch.float32] and np.isfinite(images).all()
    assert pipe.vae.dtype == torch.bfloat16 and "decode" not in pipe.vae.__dict__  # put back as it was
    assert layout_of(pipe.vae) == layout


def test_float16_vae_without_force_upcast_decodes_in_float32_on_this_cpu(make_pipeline):
    pipe = make_pipeline().to(torch.float16)
    pipe.vae.register_to_config(force_upcast=False)  # diffusers would decode it in float16
    seen = []
    pipe.vae.post_quant_conv.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    generate(pipe, steps=1)
    expected = torch.float16 if cpu_has_fast_kernels(torch.float16) else torch.float32
    assert seen == [expected] and pipe.vae.dtype == torch.float16
    assert layout_of(pipe.vae) == ("NCHW" if cpu_has_fast_kernels(torch.float16) else "channels-last")  # kept
    assert vae_decode_dtype("cpu", torch.float16, force_upcast=False) == str(expected).removeprefix("torch.")


@pytest.fixture
def env(tmp_path):
    shape_image("red").save(tmp_path / "ref.png")
    return tmp_path


def run_generate(env, dtype: str, caplog) -> list[str]:
    argv = ["generate", "--ref", str(env / "ref.png"), "--prompt", "an object on a white background, at the top left"]
    argv += ["--out", str(env / f"{dtype}.png"), "--steps", "1", "--seed", "0", "--device", "cpu", "--dtype", dtype]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="easyref"):
        assert main(argv) == 0
    return [r.getMessage() for r in caplog.records if "slower than float32" in r.getMessage()]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_generate_says_in_one_line_when_the_dtype_is_slower_than_float32_here(env, caplog, dtype):
    lines = run_generate(env, dtype, caplog)
    slow = dtype != "float32" and not cpu_has_fast_kernels(getattr(torch, dtype))
    assert len(lines) == (1 if slow else 0), lines
    if slow:
        (line,) = lines
        assert "\n" not in line and f"--dtype {dtype}" in line and "--dtype float32" in line
