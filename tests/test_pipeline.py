"""EasyRefPipeline: invariants against the plain SDXL pipeline, batching, caching, input checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import shape_image
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

CALL = dict(num_inference_steps=2, height=32, width=32, output_type="np")


def gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_scale_zero_equals_plain_pipeline(make_pipeline, make_sdxl, groups):
    pipe = make_pipeline()
    plain = make_sdxl()
    prompt, negative = "a cat", "blurry"
    ours = pipe(groups[0], prompt, negative_prompt=negative, scale=0.0, generator=gens(0), **CALL).images
    reference = plain(prompt, negative_prompt=negative, generator=gens(0), **CALL).images
    np.testing.assert_allclose(ours, reference, atol=1e-5, rtol=0)
    full = pipe(groups[0], prompt, negative_prompt=negative, scale=1.0, generator=gens(0), **CALL).images
    assert np.abs(full - reference).max() > 1e-3, "at scale 1 the references must change the image"


def test_batch_of_groups_equals_each_alone(make_pipeline, groups):
    pipe = make_pipeline()
    prompts = ["a cat", "a dog"]
    both = pipe(groups, prompts, num_images_per_prompt=2, generator=gens(1, 2, 3, 4), **CALL)
    assert both.images.shape == (4, 32, 32, 3)
    for i, (group, prompt) in enumerate(zip(groups, prompts)):
        alone = pipe([group], [prompt], num_images_per_prompt=2, generator=gens(1 + 2 * i, 2 + 2 * i), **CALL)
        np.testing.assert_allclose(both.images[2 * i : 2 * i + 2], alone.images, atol=1e-5, rtol=0)
        torch.testing.assert_close(both.reference_embeds[i : i + 1], alone.reference_embeds, atol=1e-5, rtol=0)


def test_reference_tokens_once_per_call_and_negative_cached(make_pipeline, groups, monkeypatch):
    pipe = make_pipeline()
    encoder = pipe.reference_encoder
    calls = {"encode": 0, "negative": 0}
    original_encode, original_negative = encoder.encode, encoder.encode_negative

    def count_encode(*a, **k):
        calls["encode"] += 1
        return original_encode(*a, **k)

    def count_negative(*a, **k):
        calls["negative"] += 1
        return original_negative(*a, **k)

    monkeypatch.setattr(encoder, "encode", count_encode)
    monkeypatch.setattr(encoder, "encode_negative", count_negative)
    for _ in range(2):
        pipe(groups, ["a", "b"], num_inference_steps=4, height=32, width=32, output_type="np")
    # per call: one pass for all groups; the negative branch once per process (its own encode call)
    assert calls == {"encode": 3, "negative": 1}


def test_precomputed_reference_embeds(make_pipeline, groups):
    pipe = make_pipeline()
    first = pipe(groups[:1], "a cat", generator=gens(5), **CALL)
    again = pipe(prompt="a cat", reference_embeds=first.reference_embeds, generator=gens(5), **CALL)
    np.testing.assert_array_equal(first.images, again.images)


def test_reference_maps_change_nothing(make_pipeline, groups, monkeypatch):
    pipe = make_pipeline()
    plain = pipe(groups, ["a cat", "a dog"], generator=gens(5, 6), **CALL)
    assert plain.reference_maps is None
    calls = []
    encode = pipe.reference_encoder.encode_with_maps
    monkeypatch.setattr(pipe.reference_encoder, "encode_with_maps", lambda inputs: calls.append(1) or encode(inputs))
    explained = pipe(groups, ["a cat", "a dog"], generator=gens(5, 6), return_reference_maps=True, **CALL)
    assert calls == [1]  # one trunk pass gives the tokens and the maps
    np.testing.assert_array_equal(plain.images, explained.images)  # the maps' eager pass is a pass of its own
    assert [len(m) for m in explained.reference_maps] == [len(g) for g in groups]


def test_seed_is_reproducible(make_pipeline, groups):
    pipe = make_pipeline()
    a = pipe(groups[:1], "a cat", seed=11, **CALL).images
    b = pipe(groups[:1], "a cat", seed=11, **CALL).images
    np.testing.assert_array_equal(a, b)


def test_lora_pipeline_runs_and_unload_restores(make_pipeline, make_sdxl, groups):
    pipe = make_pipeline(lora_rank=4)
    plain = make_sdxl()(prompt="a cat", generator=gens(0), **CALL).images
    assert np.abs(pipe(groups[0], "a cat", scale=0.0, generator=gens(0), **CALL).images - plain).max() > 1e-4
    base = pipe.unload()
    assert isinstance(base, StableDiffusionXLPipeline)
    np.testing.assert_array_equal(base(prompt="a cat", generator=gens(0), **CALL).images, plain)


def test_encoder_is_a_registered_component(make_pipeline):
    pipe = make_pipeline()
    assert pipe.components["reference_encoder"] is pipe.reference_encoder
    pipe.to(torch.float64)
    assert pipe.reference_encoder.dtype == torch.float64 and pipe.unet.dtype == torch.float64
    assert "reference_encoder" in pipe.model_cpu_offload_seq


def test_img2img_base_pipeline(make_encoder, tiny_dirs, groups):
    from easyref import EasyRefPipeline

    sdxl = StableDiffusionXLImg2ImgPipeline.from_pretrained(tiny_dirs["sdxl"])
    pipe = EasyRefPipeline.from_components(sdxl, make_encoder())
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        groups[0],
        "a cat",
        image=shape_image("green", size=(32, 32)),
        strength=0.5,
        generator=gens(0),
        num_inference_steps=4,
        output_type="np",
    )
    assert out.images.shape == (1, 32, 32, 3) and np.isfinite(out.images).all()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(references=[]), "at least one reference"),
        (dict(references=None), "references are required"),
        (dict(references=[[shape_image("red")], []]), "group 1 is empty"),
        (dict(references=[[shape_image("red")]] * 2, prompt=["a", "b", "c"]), "2 reference groups but 3 prompts"),
        (dict(references=[shape_image("red")] * 7), "at most 6"),
        (dict(references=[["not an image"]]), "PIL images only"),
        (dict(scale=-1.0), "scale"),
        (dict(scale=float("nan")), "scale"),
        (dict(num_images_per_prompt=0), "num_images_per_prompt"),
        (dict(seed=1, generator=torch.Generator()), "either generator or seed"),
        (dict(negative_prompt=["a", "b"]), "2 negative prompts for 1 prompts"),
        (dict(prompt=[]), "prompt must be"),
        (dict(references=None, reference_embeds=torch.zeros(1, 3, 64)), "reference_embeds must have shape"),
        (dict(reference_embeds=torch.zeros(1, 64, 64)), "reuse tokens, give them alone"),
        (
            dict(references=None, reference_embeds=torch.zeros(1, 64, 64), return_reference_maps=True),
            "return_reference_maps needs references",
        ),
    ],
)
def test_check_inputs_errors(make_pipeline, kwargs, message):
    pipe = make_pipeline(randomize=False)
    call = dict(references=[shape_image("red")], prompt="a cat", **CALL)
    call.update(kwargs)
    with pytest.raises(ValueError, match=message):
        pipe(**call)


def test_controlnet_base_pipeline(make_encoder, tiny_dirs, groups):
    """The ControlNet sees text tokens only; the reference tokens reach the UNet alone."""
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline

    from easyref import EasyRefPipeline

    unet = StableDiffusionXLPipeline.from_pretrained(tiny_dirs["sdxl"]).unet
    # the tiny VAE downsamples 2x, so the control embedding must too (one strided block)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))
    plain = StableDiffusionXLControlNetPipeline.from_pretrained(tiny_dirs["sdxl"], controlnet=controlnet)
    pipe = EasyRefPipeline.from_components(plain, make_encoder())
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.base_pipeline == "StableDiffusionXLControlNetPipeline"
    control = shape_image("white", "black", size=(32, 32))
    out = pipe(groups[0], "a cat", image=control, generator=gens(0), **CALL)
    assert out.images.shape == (1, 32, 32, 3) and np.isfinite(out.images).all()


def test_a_loaded_pipeline_fuses_its_lora_and_saves_the_same_checkpoint(make_pipeline, tiny_dirs, groups, tmp_path):
    """`from_pretrained` folds the LoRA in (a UNet call then costs what plain SDXL's does); the images are
    the unfused pipeline's within float tolerance, and what a fused pipeline saves is still the LoRA itself."""
    from safetensors.torch import load_file

    from easyref import EasyRefPipeline
    from easyref.adapter import is_fused

    pipe = make_pipeline(lora_rank=4)
    pipe.save_adapter(tmp_path / "saved")
    loaded = EasyRefPipeline.from_pretrained(tiny_dirs["sdxl"], mllm=tiny_dirs["qwen"], adapter=tmp_path / "saved")
    loaded.set_progress_bar_config(disable=True)
    assert is_fused(loaded.unet) and not is_fused(pipe.unet)
    args = dict(references=groups[:1], prompt="a cat", num_inference_steps=2, seed=0, output_type="np")
    np.testing.assert_allclose(loaded(**args).images, pipe(**args).images, atol=1e-4)
    loaded.save_adapter(tmp_path / "again")
    saved, again = (
        load_file(tmp_path / "saved" / "easyref.safetensors"),
        load_file(tmp_path / "again" / "easyref.safetensors"),
    )
    assert saved.keys() == again.keys() and all(torch.equal(saved[k], again[k]) for k in saved)


def test_scale_zero_runs_nothing_of_the_reference_path(make_pipeline, groups, monkeypatch):
    """At scale 0 the references cannot change the image: no encoding, no reference projection, no
    reference attention; the adapted processors are back in place afterwards."""
    pipe = make_pipeline(lora_rank=4)
    processors = {name: type(proc) for name, proc in pipe.unet.attn_processors.items()}
    calls = []
    encode = pipe.reference_encoder.forward
    monkeypatch.setattr(pipe.reference_encoder, "forward", lambda *a, **k: calls.append("encoder") or encode(*a, **k))
    hooks = [pipe.unet.encoder_hid_proj.register_forward_hook(lambda *a: calls.append("projection"))]
    for proc in pipe.unet.attn_processors.values():
        for linear in getattr(proc, "to_k_ip", []):
            hooks.append(linear.register_forward_hook(lambda *a: calls.append("to_k_ip")))
    result = pipe(groups[0], "a cat", scale=0.0, generator=gens(0), **CALL)
    assert calls == [] and result.reference_embeds is None
    assert {name: type(proc) for name, proc in pipe.unet.attn_processors.items()} == processors
    pipe(groups[0], "a cat", scale=1.0, generator=gens(0), **CALL)
    assert {"encoder", "projection", "to_k_ip"} <= set(calls)  # the hooks see a call that uses the references


def test_reference_keys_and_values_are_projected_once_per_call(make_pipeline, groups, monkeypatch):
    """The reference tokens are fixed for a call: `to_k_ip`/`to_v_ip` run once per cross-attention layer
    per call, not once per step, and the images are those of diffusers' per-step projections."""
    import contextlib

    from easyref import pipeline as pipeline_module
    from easyref.adapter import reference_processors

    pipe = make_pipeline()
    layers, steps, calls = reference_processors(pipe.unet), 4, []
    for proc in layers.values():
        proc.to_k_ip[0].register_forward_hook(lambda *a: calls.append("k"))
        proc.to_v_ip[0].register_forward_hook(lambda *a: calls.append("v"))
    args = dict(references=groups[:1], prompt="a cat", num_inference_steps=steps, seed=0, output_type="np")
    once = pipe(**args).images
    assert calls.count("k") == calls.count("v") == len(layers)
    calls.clear()
    monkeypatch.setattr(pipeline_module, "reference_kv_once", lambda unet: contextlib.nullcontext())
    every_step = pipe(**args).images
    assert calls.count("k") == len(layers) * steps
    np.testing.assert_allclose(once, every_step, atol=1e-5, rtol=0)
    assert all(proc.kept is None and not proc.kv_once for proc in layers.values())  # nothing held after a call


def test_model_cpu_offload_hooks_the_mllm_first_and_changes_no_pixel(make_pipeline, groups):
    """diffusers' offload sequence includes the MLLM: it is hooked first (it runs first in a call), then
    the text encoders, the UNet and the VAE; a call through the hooks gives the same image."""
    pipe = make_pipeline()
    args = dict(references=groups[:1], prompt="a cat", num_inference_steps=2, seed=0, output_type="np")
    expected = pipe(**args).images
    pipe.enable_model_cpu_offload(device="cpu")
    order = [type(hook.model).__name__ for hook in pipe._all_hooks]
    assert order == [
        "ReferenceEncoder",
        "CLIPTextModel",
        "CLIPTextModelWithProjection",
        "UNet2DConditionModel",
        "AutoencoderKL",
    ]
    np.testing.assert_allclose(pipe(**args).images, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("scheduler", ["LCMScheduler", "TCDScheduler", "EulerAncestralDiscreteScheduler"])
def test_a_swapped_scheduler_is_the_one_used(make_pipeline, groups, scheduler, monkeypatch):
    """Few-step schedulers (LCM, TCD) and others swap in as on any diffusers pipeline; the references still
    steer the image."""
    import diffusers

    pipe = make_pipeline()
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    steps = []
    step = pipe.scheduler.step
    monkeypatch.setattr(pipe.scheduler, "step", lambda *a, **k: steps.append(1) or step(*a, **k))
    args = dict(prompt="a cat", num_inference_steps=2, seed=0, guidance_scale=1.0, output_type="np")
    with_refs = pipe(references=groups[:1], **args).images
    assert len(steps) == 2 and np.isfinite(with_refs).all()
    without = pipe(references=groups[:1], scale=0.0, **args).images
    assert np.abs(with_refs - without).max() > 1e-3


def test_a_compiled_unet_with_the_adapter_gives_the_same_images(make_pipeline, groups):
    """`torch.compile` of the adapted UNet (dynamo tracing our processors; the aot_eager backend keeps the
    test free of a C compiler) gives the uncompiled images; K/V once per call steps aside under it."""
    pipe = make_pipeline(lora_rank=4)
    pipe.fuse_lora()
    args = dict(references=groups[:1], prompt="a cat", num_inference_steps=2, seed=0, output_type="np")
    expected = pipe(**args).images
    pipe.unet.forward = torch.compile(pipe.unet.forward, backend="aot_eager")
    np.testing.assert_allclose(pipe(**args).images, expected, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def float32_images(tiny_dirs):
    return _low_precision_run(tiny_dirs, torch.float32)[0]


def _low_precision_run(tiny_dirs, dtype):
    """(images, dtypes the VAE decoded in, the pipeline) for one loaded pipeline at `dtype`."""
    from model_checks import TINY_SETTINGS

    from easyref import EasyRefPipeline

    pipe = EasyRefPipeline.from_pretrained(
        tiny_dirs["sdxl"], mllm=tiny_dirs["qwen"], config_overrides=TINY_SETTINGS, dtype=dtype
    )
    pipe.set_progress_bar_config(disable=True)
    decoded = []
    pipe.vae.post_quant_conv.register_forward_pre_hook(lambda module, args: decoded.append(args[0].dtype))
    group = [shape_image("red"), shape_image("blue", "gray", (40, 70))]
    images = pipe(references=[group], prompt="a cat", num_inference_steps=2, seed=0, output_type="np").images
    return images, decoded, pipe


@pytest.mark.filterwarnings("ignore::FutureWarning")  # diffusers' notice about its own VAE upcast
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_generation_stays_close_to_float32_with_the_vae_in_float32_for_fp16(
    tiny_dirs, float32_images, dtype
):
    """Every model runs in the asked precision; an fp16 VAE decodes in float32 (SDXL's VAE overflows in
    fp16) and is put back; images are finite and within 0.05 mean absolute difference of float32's on the
    [0, 1] scale (measured: 0.020 bf16, 0.023 fp16)."""
    images, decoded, pipe = _low_precision_run(tiny_dirs, dtype)
    parts = (pipe.unet, pipe.text_encoder, pipe.text_encoder_2, pipe.vae, pipe.reference_encoder)
    assert {part.dtype for part in parts} == {dtype}
    assert decoded == [torch.float32 if dtype == torch.float16 else dtype]
    assert np.isfinite(images).all() and images.std() > 0.05
    assert np.abs(images - float32_images).mean() < 0.05
