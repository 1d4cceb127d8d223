"""EasyRef over plain SDXL on the bundled model: whole generations and single UNet calls, side by side.

Variants, taking turns call by call (ratios are medians of per-round ratios):
- `plain`: diffusers' StableDiffusionXLPipeline over the bundled model's own SDXL folder (its own UNet);
- `easyref`: `EasyRefPipeline.from_pretrained("default")` as `easyref generate` loads it (LoRA fused),
  the same group every call (its vision features cached after the first, as when a user keeps a group);
- `easyref, new group`: the same with the vision-feature cache emptied before each call;
- `unfused`: the same with `fuse_lora=False` (the LoRA's layers run in every UNet call);
- `scale 0`: the fused pipeline at reference scale 0, which should cost what plain SDXL does.

    .venv/bin/python benchmarks/bundled_overhead.py [--size 128] [--steps 30] [--repeats 7]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a star on a white background, at the bottom right"


def load(device, dtype):
    from diffusers import StableDiffusionXLPipeline

    from easyref import EasyRefPipeline
    from easyref.bundled import bundled_model_dir

    plain = StableDiffusionXLPipeline.from_pretrained(bundled_model_dir() / "sdxl", dtype=dtype).to(device)
    fused = EasyRefPipeline.from_pretrained("default", dtype=dtype).to(device)
    unfused = EasyRefPipeline.from_pretrained("default", dtype=dtype, fuse_lora=False).to(device)
    for pipe in (plain, fused, unfused):
        pipe.set_progress_bar_config(disable=True)
    return plain, fused, unfused


def references():
    from easyref.images import open_image

    return [open_image(p) for p in sorted((ROOT / "examples" / "refs").glob("*.png"))]


def time_generations(plain, fused, unfused, refs, args, device) -> _common.Timings:
    common = dict(prompt=PROMPT, negative_prompt="", num_inference_steps=args.steps, height=args.size, width=args.size)

    def gen():
        return torch.Generator("cpu").manual_seed(0)

    def scale_zero():
        return fused(references=refs, scale=0.0, generator=gen(), **common)

    def new_group():  # references never seen: the vision-feature cache emptied first
        fused.reference_encoder.vision_cache.clear()
        return fused(references=refs, generator=gen(), **common)

    with torch.inference_mode():
        return _common.interleaved_times(
            {
                "plain": lambda: plain(generator=gen(), **common),
                "easyref": lambda: fused(references=refs, generator=gen(), **common),
                "easyref, new group": new_group,
                "unfused": lambda: unfused(references=refs, generator=gen(), **common),
                "scale 0": scale_zero,
            },
            args.repeats,
            args.warmup,
            device,
        )


def time_unet_calls(plain, fused, unfused, refs, args, device) -> _common.Timings:
    """One UNet call, CFG batch 2, the same inputs: the adapter's own cost, without pipeline noise."""
    config = plain.unet.config
    side = args.size // plain.vae_scale_factor
    latents = torch.randn(2, config.in_channels, side, side, device=device)
    text = torch.randn(2, 77, config.cross_attention_dim, device=device)
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    added = {"text_embeds": torch.randn(2, pooled, device=device), "time_ids": torch.randn(2, 6, device=device)}
    with torch.inference_mode():
        tokens = fused.encode_references([refs], [PROMPT]).expand(2, -1, -1).unsqueeze(1)
        with_tokens = dict(added, image_embeds=[tokens])

        def call(pipe, scale=1.0, extra=with_tokens):
            if pipe is not plain:
                pipe.set_scale(scale)
            return pipe.unet(latents, 500, encoder_hidden_states=text, added_cond_kwargs=extra)

        return _common.interleaved_times(
            {
                "plain": lambda: call(plain, extra=added),
                "easyref": lambda: call(fused),
                "unfused": lambda: call(unfused),
                "scale 0": lambda: call(fused, 0.0),
            },
            args.unet_repeats,
            3,
            device,
        )


def report(args, device, generations: _common.Timings, calls: _common.Timings) -> None:
    print(f"### EasyRef / plain SDXL on the bundled model, {args.size} x {args.size} px, {args.steps} steps\n")
    print(
        f"{_common.machine_line(device, args.busy)}; float32; demo group (3 references); guidance 5.0; median "
        f"of {args.repeats} generations and {args.unet_repeats} UNet calls after warm-up, variants interleaved\n"
    )
    rows = []
    for key in ("plain", "easyref", "easyref, new group", "unfused", "scale 0"):
        call = [f"{calls.median(key) * 1e3:.2f}", f"{calls.ratio(key, 'plain'):.3f}"] if key in calls else ["", ""]
        rows.append([key, f"{generations.median(key):.3f}", f"{generations.ratio(key, 'plain'):.3f}", *call])
    headers = ["variant", "generation s", "/ plain", "one UNet call ms", "/ plain"]
    print(_common.markdown_table(headers, rows))
    print(
        "\nThe `scale 0` UNet call goes through the adapted processors at scale 0; a `scale 0` generation does"
        " not (the pipeline then runs the UNet's own processors)."
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128, help="image side in px (the model was trained at 64)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--unet-repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    device, args.busy = _common.start_run(args)
    plain, fused, unfused = load(device, torch.float32)
    refs = references()
    generations = time_generations(plain, fused, unfused, refs, args, device)
    calls = time_unet_calls(plain, fused, unfused, refs, args, device)
    report(args, device, generations, calls)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
