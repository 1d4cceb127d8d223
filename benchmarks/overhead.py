"""Generation-time overhead of EasyRef over the plain SDXL pipeline with the same components and steps.

Run (from the repository root):

    .venv/bin/python benchmarks/overhead.py                    # tiny SDXL + tiny Qwen2-VL, CPU, 64x64, 30 and 10 steps
    .venv/bin/python benchmarks/overhead.py --steps 30 --repeats 3
    python benchmarks/overhead.py --real-config --device cuda  # SDXL's real UNet (random fp16 weights), UNet loop only

Default (tiny) mode writes tiny random SDXL and Qwen2-VL folders with `easyref.tiny`, loads the plain
pipeline with `diffusers.StableDiffusionXLPipeline.from_pretrained` and, separately (so the plain one
keeps an untouched UNet), a second copy wrapped by `EasyRefPipeline.from_components` with a
`ReferenceEncoder` (reference_image_size 56, random aggregation layer/adapter: fine for timing).
Both run the same prompt, negative prompt, guidance 5.0, steps, size and seed. Columns:

- plain s: `StableDiffusionXLPipeline(...)`; EasyRef s: `EasyRefPipeline(references=..., ...)`, the
  whole call (reference encoding + cached negative branch + denoising with the adapter);
- EasyRef, embeds given s: the same call with `reference_embeds=` precomputed (denoising with the
  adapter only: the cost of the decoupled cross-attention);
- EasyRef, negative recomputed s: `clear_reference_cache()` before every call, as the release did;
- encode s: `encode_references` alone; negative s: one `encode_negative` (what the cache saves per call).

A second table times one UNet call with and without the adapter (same weights), isolating the cost
of the decoupled cross-attention from pipeline-level noise.

Time = median of `--repeats` calls after `--warmup` calls, the variants taking turns call by call (so
that all see the same machine conditions); a ratio is the median of the per-round ratios. The issue's
target: EasyRef/plain <= 1.10.

`--real-config` builds only SDXL's UNet (real config, random weights) and times the bare UNet denoise
loop (CFG batch 2, `--sample-size` latents, 77 text tokens of width 2048) without, then with the
EasyRef adapter installed (`easyref.adapter.install_adapter`, 64 random reference tokens of width
1536 passed as `added_cond_kwargs["image_embeds"]`), then without again after `unload_adapter` (a
drift check). Reference encoding is not included there (see
encode_scaling.py --real-config).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

logger = logging.getLogger("benchmarks.overhead")

PROMPT = "a cat sitting on a red sofa"
NEGATIVE = "monochrome, lowres, bad anatomy, worst quality, low quality"

SDXL_UNET_CONFIG = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    norm_num_groups=32,
)


def make_images(count: int, size: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


# ------------------------------------------------------------------------------------------------ tiny, whole pipelines
TINY_HEADERS = [
    "steps",
    "plain s",
    "EasyRef s",
    "EasyRef/plain",
    "EasyRef, embeds given s",
    "embeds given/plain",
    "EasyRef, negative recomputed s",
    "recomputed/plain",
    "encode s",
    "negative branch s",
    "negative cached",
    "ratio <= 1.10",
]


def load_tiny_pipelines(args, device, dtype):
    """(plain, easyref): tiny SDXL pipelines loaded twice so that the plain one keeps an adapter-free UNet."""
    from diffusers import StableDiffusionXLPipeline

    from easyref import EasyRefConfig, EasyRefPipeline, ReferenceEncoder
    from easyref.tiny import save_tiny_qwen2vl, save_tiny_sdxl

    with tempfile.TemporaryDirectory() as tmp:
        sdxl_dir = save_tiny_sdxl(Path(tmp) / "sdxl")
        qwen_dir = save_tiny_qwen2vl(Path(tmp) / "qwen2vl")
        plain = StableDiffusionXLPipeline.from_pretrained(sdxl_dir, dtype=dtype).to(device)
        base = StableDiffusionXLPipeline.from_pretrained(sdxl_dir, dtype=dtype).to(device)  # its own UNet
        config = EasyRefConfig(
            mllm=str(qwen_dir), mllm_hidden_size=64, cross_attention_dim=64, reference_image_size=args.image_size
        )
        encoder = ReferenceEncoder.from_pretrained(qwen_dir, config, dtype=dtype)
        easyref = EasyRefPipeline.from_components(base, encoder)
    assert plain.unet is not easyref.unet, "the plain pipeline must keep its own, adapter-free UNet"
    for pipe in (plain, easyref):
        pipe.set_progress_bar_config(disable=True)
    return plain, easyref


def generation_kwargs(args) -> dict:
    """The call arguments both pipelines share, so that only the reference branch differs."""
    return dict(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        guidance_scale=args.guidance_scale,
        height=args.height,
        width=args.width,
        output_type="pil",
    )


def time_reference_encoding(easyref, refs, args, device):
    """(embeds, encode s, negative s, whether the negative branch is cached)."""
    with torch.inference_mode():
        embeds = easyref.encode_references([refs], [PROMPT])
        t = _common.interleaved_times(
            {
                "encode": lambda: easyref.encode_references([refs], [PROMPT]),
                "negative": lambda: easyref.reference_encoder.encode_negative(),
            },
            args.repeats,
            args.warmup,
            device,
        )
        t_encode, t_negative = t.median("encode"), t.median("negative")
    easyref.negative_reference_tokens()
    cached = easyref.negative_reference_tokens() is easyref.negative_reference_tokens()
    return embeds, t_encode, t_negative, cached


def time_generation(plain, easyref, refs, embeds, steps: int, args, device) -> _common.Timings:
    """The four whole-pipeline variants at `steps`, taking turns call by call."""
    common = generation_kwargs(args)

    def gen():
        return torch.Generator("cpu").manual_seed(args.seed)

    def uncached_call():
        easyref.clear_reference_cache()
        return easyref(references=refs, num_inference_steps=steps, generator=gen(), **common)

    return _common.interleaved_times(
        {
            "plain": lambda: plain(num_inference_steps=steps, generator=gen(), **common),
            "easyref": lambda: easyref(references=refs, num_inference_steps=steps, generator=gen(), **common),
            "embeds": lambda: easyref(reference_embeds=embeds, num_inference_steps=steps, generator=gen(), **common),
            "uncached": uncached_call,
        },
        args.repeats,
        args.warmup,
        device,
    )


def generation_row(steps: int, t: _common.Timings, t_encode: float, t_negative: float, cached: bool) -> list:
    t_plain, t_ref, t_embeds, t_uncached = (t.median(k) for k in ("plain", "easyref", "embeds", "uncached"))
    r_ref, r_embeds, r_uncached = (t.ratio(k, "plain") for k in ("easyref", "embeds", "uncached"))
    logger.info(
        "steps=%d plain %.3fs easyref %.3fs (embeds given %.3fs, uncached %.3fs)",
        steps,
        t_plain,
        t_ref,
        t_embeds,
        t_uncached,
    )
    return [
        steps,
        f"{t_plain:.3f}",
        f"{t_ref:.3f}",
        f"**{r_ref:.3f}**",
        f"{t_embeds:.3f}",
        f"{r_embeds:.3f}",
        f"{t_uncached:.3f}",
        f"{r_uncached:.3f}",
        f"{t_encode:.3f}",
        f"{t_negative:.3f}",
        "yes" if cached else "no",
        "yes" if r_ref <= 1.10 else "no",
    ]


def time_unet_call(plain, easyref, embeds, args, device, dtype):
    """(timings, latent shape): one UNet call with / without the adapter, same weights, CFG batch 2.

    Isolates the decoupled cross-attention's own cost from pipeline-level noise.
    """
    unet_cfg = plain.unet.config
    scale = plain.vae_scale_factor  # 2 for the tiny VAE, 8 for SDXL's
    latents = torch.randn(
        2, unet_cfg.in_channels, args.height // scale, args.width // scale, device=device, dtype=dtype
    )
    text = torch.randn(2, 77, unet_cfg.cross_attention_dim, device=device, dtype=dtype)
    pooled = unet_cfg.projection_class_embeddings_input_dim - 6 * unet_cfg.addition_time_embed_dim
    added = {
        "text_embeds": torch.randn(2, pooled, device=device, dtype=dtype),
        "time_ids": torch.randn(2, 6, device=device, dtype=dtype),
    }
    reference = [embeds.to(device, dtype).expand(2, -1, -1).unsqueeze(1)]
    with torch.inference_mode():
        u = _common.interleaved_times(
            {
                "plain": lambda: plain.unet(latents, 500, encoder_hidden_states=text, added_cond_kwargs=added),
                "adapter": lambda: easyref.unet(
                    latents, 500, encoder_hidden_states=text, added_cond_kwargs=dict(added, image_embeds=reference)
                ),
            },
            args.unet_repeats,
            3,
            device,
        )
    return u, latents.shape


def print_tiny_report(args, device, dtype, rows: list, u: _common.Timings, latent_shape) -> None:
    print("### EasyRef generation time / plain SDXL time: tiny SDXL + tiny Qwen2-VL (easyref.tiny)\n")
    print(
        f"{_common.machine_line(device, args.busy)}; dtype {str(dtype).removeprefix('torch.')}; "
        f"{args.height}x{args.width}, {args.references} references (reference_image_size {args.image_size}), "
        f"guidance {args.guidance_scale}; median of {args.repeats} after {args.warmup} warm-up, variants interleaved; "
        f"ratios = median of per-round ratios\n"
    )
    print(_common.markdown_table(TINY_HEADERS, rows))
    print()
    print(
        _common.markdown_table(
            ["one UNet call (CFG batch 2)", "plain ms", "with adapter ms", "adapter/plain"],
            [
                [
                    f"tiny UNet, {latent_shape[-2]}x{latent_shape[-1]} latents, 77 text + 64 reference tokens",
                    f"{u.median('plain') * 1e3:.2f}",
                    f"{u.median('adapter') * 1e3:.2f}",
                    f"{u.ratio('adapter', 'plain'):.3f}",
                ]
            ],
        )
    )


def run_tiny(args, device, dtype) -> None:
    plain, easyref = load_tiny_pipelines(args, device, dtype)
    refs = make_images(args.references, args.input_size, args.seed)
    embeds, t_encode, t_negative, cached = time_reference_encoding(easyref, refs, args, device)
    rows = []
    for steps in args.steps:
        t = time_generation(plain, easyref, refs, embeds, steps, args, device)
        rows.append(generation_row(steps, t, t_encode, t_negative, cached))
    easyref.negative_reference_tokens()  # leave the cache filled
    u, latent_shape = time_unet_call(plain, easyref, embeds, args, device, dtype)
    print_tiny_report(args, device, dtype, rows, u, latent_shape)


# ------------------------------------------------------------------------------------------------ real SDXL UNet only
REAL_HEADERS = [
    "steps",
    "UNet loop plain s (before / after)",
    "UNet loop + adapter s",
    "adapter/plain (mean)",
    "extra ms per step",
    "+ adapter, K/V once s",
    "K/V once/plain",
]


def build_real_unet(args, device, dtype):
    """(unet, parameter count): SDXL's real UNet config with random weights, built directly on the device."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(args.seed)
    unet_config = dict(SDXL_UNET_CONFIG, sample_size=args.sample_size)
    logger.info("building SDXL's UNet (random %s weights) on %s", dtype, device)
    with torch.device(device):
        unet = UNet2DConditionModel(**unet_config).to(dtype).eval()
    return unet, sum(p.numel() for p in unet.parameters())


def real_unet_inputs(args, device, dtype) -> dict:
    """Random CFG-batch inputs: latents, 77 text tokens, SDXL's added conditions, 64 reference tokens."""
    batch = 2  # classifier-free guidance
    latents = torch.randn(batch, 4, args.sample_size, args.sample_size, device=device, dtype=dtype)
    text = torch.randn(batch, 77, 2048, device=device, dtype=dtype)
    added = {
        "text_embeds": torch.randn(batch, 1280, device=device, dtype=dtype),
        "time_ids": torch.tensor([[1024, 1024, 0, 0, 1024, 1024]] * batch, device=device, dtype=dtype),
    }
    reference = torch.randn(batch, 1, 64, 1536, device=device, dtype=dtype)
    return {"latents": latents, "text": text, "added": added, "reference": reference}


def denoise_loop(unet, inputs: dict, timesteps: list[int], steps: int, with_reference: bool):
    added = inputs["added"]
    kwargs = dict(added, image_embeds=[inputs["reference"]]) if with_reference else added
    latents = inputs["latents"]
    for t in timesteps[:steps]:
        noise = unet(latents, t, encoder_hidden_states=inputs["text"], added_cond_kwargs=kwargs).sample
        latents = latents - 0.001 * noise
    return latents


def time_loops(unet, inputs: dict, timesteps: list[int], with_reference: bool, args, device) -> dict[int, float]:
    """Median seconds of the denoise loop for each `--steps` value."""
    return {
        s: _common.median_time(
            lambda: denoise_loop(unet, inputs, timesteps, s, with_reference), args.repeats, args.warmup, device
        )[0]
        for s in args.steps
    }


def real_row(steps: int, before: float, with_adapter: float, after: float, kv_once: float) -> list:
    t_plain, t_ref = (before + after) / 2, with_adapter
    logger.info("steps=%d plain %.3fs adapter %.3fs", steps, t_plain, t_ref)
    return [
        steps,
        f"{before:.3f} / {after:.3f}",
        f"{t_ref:.3f}",
        f"**{t_ref / t_plain:.3f}**",
        f"{(t_ref - t_plain) / steps * 1e3:.2f}",
        f"{kv_once:.3f}",
        f"{kv_once / t_plain:.3f}",
    ]


def time_with_and_without_adapter(unet, n_params: int, args, device, dtype):
    """(rows, adapter parameter count): one UNet plain, with the adapter installed, then plain again.

    The second plain pass, after `unload_adapter`, checks that the machine did not drift meanwhile.
    """
    from easyref import EasyRefConfig
    from easyref.adapter import install_adapter, reference_kv_once, unload_adapter

    inputs = real_unet_inputs(args, device, dtype)
    timesteps = torch.linspace(999, 0, max(args.steps)).long().tolist()
    with torch.inference_mode():
        before = time_loops(unet, inputs, timesteps, False, args, device)
        install_adapter(unet, EasyRefConfig(cross_attention_dim=2048))
        adapter_params = sum(p.numel() for p in unet.parameters()) - n_params
        with_adapter = time_loops(unet, inputs, timesteps, True, args, device)
        with reference_kv_once(unet):  # the reference keys/values of a loop projected at its first step only
            kv_once = time_loops(unet, inputs, timesteps, True, args, device)
        unload_adapter(unet)
        after = time_loops(unet, inputs, timesteps, False, args, device)
        rows = [real_row(s, before[s], with_adapter[s], after[s], kv_once[s]) for s in args.steps]
    return rows, adapter_params


def print_real_report(args, device, dtype, rows: list, n_params: int, adapter_params: int) -> None:
    compiled = ", torch.compile" if args.compile else ""
    print(f"### SDXL UNet denoise loop without / with the EasyRef adapter: real SDXL UNet config{compiled}\n")
    print(
        f"{_common.machine_line(device, args.busy)}; dtype {str(dtype).removeprefix('torch.')}; latents "
        f"{args.sample_size}x{args.sample_size} (= {8 * args.sample_size} px), CFG batch 2, "
        f"UNet {n_params / 1e9:.2f} B params, adapter adds {adapter_params / 1e6:.1f} M; "
        "reference encoding not included; "
        f"median of {args.repeats} after {args.warmup} warm-up\n"
    )
    print(_common.markdown_table(REAL_HEADERS, rows))


def run_real(args, device, dtype) -> None:
    unet, n_params = build_real_unet(args, device, dtype)
    if args.compile:
        unet.forward = torch.compile(unet.forward)  # the module itself stays, so the adapter installs as usual
    rows, adapter_params = time_with_and_without_adapter(unet, n_params, args, device, dtype)
    print_real_report(args, device, dtype, rows, n_params, adapter_params)


def parse_args(argv):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--steps", type=int, nargs="+", default=[30, 10], help="num_inference_steps values")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--unet-repeats", type=int, default=50, help="tiny mode: repeats of the single-UNet-call comparison")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--dtype", default=None, help="float32 | float16 | bfloat16 (default: float32 on CPU, float16 on CUDA)"
    )
    p.add_argument("--references", type=int, default=3, help="tiny mode: references per call")
    p.add_argument("--image-size", type=int, default=56, help="tiny mode: EasyRefConfig.reference_image_size")
    p.add_argument("--input-size", type=int, default=96, help="tiny mode: side of the random reference images")
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--guidance-scale", type=float, default=5.0)
    p.add_argument("--real-config", action="store_true", help="SDXL's real UNet, UNet-only loop (use a GPU)")
    p.add_argument("--sample-size", type=int, default=128, help="--real-config: latent side (128 = 1024 px)")
    p.add_argument("--compile", action="store_true", help="--real-config: torch.compile the UNet's forward")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    args.dtype = _common.parse_dtype(args.dtype or ("float16" if args.device.startswith("cuda") else "float32"))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device, args.busy = _common.start_run(args)
    (run_real if args.real_config else run_tiny)(args, device, args.dtype)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
