"""The UNet step and the VAE decode on the CPU: float32, bfloat16 and float16, NCHW and channels-last, side by side.

A mid-size model with random weights: SDXL's UNet widths (320/640/1280 channels, 2 resnets per block,
cross-attention width 2048, SDXL's added conditions) with one transformer layer per attention block
instead of SDXL's 1/2/10 (641 M parameters instead of 2.6 B), and SDXL's VAE as configured (84 M). Per
configuration: the median seconds of one UNet call on the classifier-free-guidance batch (2 rows) and of
one VAE decode (1 image), the configurations taking turns in each round; then the share of the CPU time
that `aten::_slow_conv2d_forward` (PyTorch's fallback convolution, used where oneDNN has no kernel for the
dtype) takes in one profiled call of each, and which convolution kernels ran.

The last table is what `easyref` does on this CPU (`easyref.pipeline.prefer_fast_layout` and the decode
dtype `EasyRefPipeline` picks) against what it did before (NCHW, the VAE in the pipeline's dtype, and
diffusers' own float16 upcast of a `force_upcast` VAE).

    .venv/bin/python benchmarks/cpu_dtype.py --threads 1 --dtypes float32 bfloat16 float16 --skip "float16 NCHW"
    .venv/bin/python benchmarks/cpu_dtype.py --threads 1 --size 64 --repeats 2 --dtypes float32 bfloat16 float16

float16 in NCHW, on a CPU without oneDNN float16 kernels (most x86 CPUs), decodes a 64 px image in about a
minute: at 256 px leave that row out (`--skip`). On a machine shared with other work, `--threads 1` gives the
steadiest comparison (wall and CPU time then agree); the rounds are interleaved so that each configuration
sees the same conditions, and the CPU's load before the run is logged.
"""

from __future__ import annotations

import argparse
import copy
import logging
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import check_idle, parse_dtype, setup_logging  # noqa: E402

logger = logging.getLogger("benchmarks")

LAYOUTS = {"NCHW": torch.contiguous_format, "channels-last": torch.channels_last}
SLOW_CONV = "aten::_slow_conv2d_forward"


def mid_size_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=128,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(320, 640, 1280),
        layers_per_block=2,
        transformer_layers_per_block=(1, 1, 1),  # SDXL: (1, 2, 10)
        attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    ).eval()


def sdxl_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[128, 256, 512, 512],
        layers_per_block=2,
        latent_channels=4,
        sample_size=1024,
        scaling_factor=0.13025,
        force_upcast=True,
    ).eval()


def unet_call(unet, size: int, layout):
    """One UNet call as the SDXL pipeline makes it under guidance: 2 rows, 77 text tokens; the weights are
    put in `layout` first (untimed when they are in it already: `Module.to` keeps tensors in their format)."""
    dtype, side = unet.dtype, size // 8
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, side, side, generator=gen).to(dtype)
    text = torch.randn(2, 77, 2048, generator=gen).to(dtype)
    added = {"text_embeds": torch.randn(2, 1280, generator=gen).to(dtype), "time_ids": torch.zeros(2, 6, dtype=dtype)}
    timestep = torch.tensor(500.0)

    def call():
        with torch.no_grad():
            return unet(sample, timestep, text, added_cond_kwargs=added).sample

    return Timed(unet, layout, call)


def decode_call(vae, size: int, latent_dtype: torch.dtype, layout):
    """One decode of latents in `latent_dtype` (the UNet's), cast to the VAE's as a pipeline does."""
    side = size // 8
    latents = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(0)).to(latent_dtype)

    def call():
        with torch.no_grad():
            return vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample

    return Timed(vae, layout, call)


class Timed:
    """A call on a module in a given memory format. One module per dtype serves both layouts (a copy per
    layout would double the memory of a 2.6 GB float32 UNet on a shared machine): `prepare` converts it,
    outside the timed region, and `timed_rounds` below times `__call__` only."""

    def __init__(self, module, layout, call):
        self.module, self.layout, self.call = module, layout, call

    def prepare(self) -> None:
        first = next(p for p in self.module.parameters() if p.dim() == 4)
        if not first.is_contiguous(memory_format=self.layout):
            self.module.to(memory_format=self.layout)

    def __call__(self):
        return self.call()


def timed_rounds(calls: dict, repeats: int, warmup: int):
    """`_common.interleaved_times`, each call's module put in its layout before the clock starts. Besides
    the wall time, the CPU time of this process (all its threads): on a machine shared with other work the
    wall time of a call grows with what the others take, its CPU time much less."""
    import time

    from _common import Timings

    times, cpu = Timings({name: [] for name in calls}), Timings({name: [] for name in calls})
    for round_ in range(warmup + repeats):
        for name, call in calls.items():
            call.prepare()
            start, start_cpu = time.perf_counter(), time.process_time()
            call()
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
        logger.info("round %d of %d done", round_ + 1, warmup + repeats)
    return times, cpu


def conv_profile(call) -> tuple[float, list[str]]:
    """(share of self CPU time in the slow convolution, the convolution kernels that ran) of one call."""
    from torch.profiler import ProfilerActivity, profile

    call.prepare()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        call()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1
    slow = sum(e.self_cpu_time_total for e in events if e.key == SLOW_CONV)
    kernels = sorted({e.key.removeprefix("aten::") for e in events if e.key in (SLOW_CONV, "aten::mkldnn_convolution")})
    return slow / total, kernels


def models_for(dtypes: list[torch.dtype]) -> tuple[dict, dict]:
    """Per dtype, the UNet and VAE (casts of one float32 random initialisation)."""
    torch.manual_seed(0)
    unet32, vae32 = mid_size_unet(), sdxl_vae()
    unets, vaes = {torch.float32: unet32}, {torch.float32: vae32}
    for dtype in dtypes:
        if dtype != torch.float32:
            unets[dtype], vaes[dtype] = copy.deepcopy(unet32).to(dtype), copy.deepcopy(vae32).to(dtype)
    return unets, vaes


def short(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def measure(args) -> dict:
    dtypes = [parse_dtype(d) for d in args.dtypes]
    if torch.float32 not in dtypes:
        dtypes.insert(0, torch.float32)  # the reference every ratio is taken against
    unets, vaes = models_for(dtypes)
    calls, rows = {}, []
    for dtype in dtypes:
        for name in LAYOUTS:
            row = f"{short(dtype)} {name}"
            if row in args.skip:
                continue
            rows.append((row, dtype, name))
            layout = LAYOUTS[name]
            calls[f"unet|{row}"] = unet_call(unets[dtype], args.size, layout)
            calls[f"vae|{row}"] = decode_call(vaes[dtype], args.size, dtype, layout)
            if dtype != torch.float32:  # the same latents decoded by the float32 VAE (the upcast)
                calls[f"vae32|{row}"] = decode_call(vaes[torch.float32], args.size, dtype, layout)
    times, cpu = timed_rounds(calls, args.repeats, args.warmup)
    profiles = {key: conv_profile(fn) for key, fn in calls.items() if not key.startswith("vae32")}
    return {"rows": rows, "times": times, "cpu": cpu, "profiles": profiles}


def policy(dtype: torch.dtype) -> tuple[str, str, str]:
    """What easyref does now on this CPU for a pipeline in `dtype`: the UNet's and the VAE's layouts, and the
    dtype the VAE decodes in."""
    from easyref.devices import fast_cpu_layout, vae_decode_dtype

    fast = "channels-last" if fast_cpu_layout(torch.device("cpu"), dtype) else "NCHW"
    return fast, fast, vae_decode_dtype(torch.device("cpu"), dtype, force_upcast=True)


def report(args, result: dict) -> str:
    rows, times, cpu, profiles = result["rows"], result["times"], result["cpu"], result["profiles"]

    def cell(key: str) -> str:
        return f"{times.median(key):.2f} ({cpu.median(key):.2f})" if key in times else "-"

    def ratio(key: str, base: str) -> str:  # per round, on CPU time: robust to what else the machine runs
        return f"{cpu.ratio(key, base):.2f}" if key in cpu else "-"

    lines = [
        f"CPU: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, capability {torch.backends.cpu.get_cpu_capability()}; "
        f"{args.size} x {args.size} px; median of {args.repeats} interleaved rounds: wall seconds (CPU seconds "
        "of all threads); ratios are medians over rounds of CPU seconds against float32 NCHW in the same round",
        "",
        "| dtype, layout | UNet call | x float32 | slow conv share | VAE decode | x float32 | slow conv share "
        "| decode upcast to float32 | conv kernels (UNet; VAE) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row, _, _ in rows:
        (unet_slow, unet_kernels), (vae_slow, vae_kernels) = profiles[f"unet|{row}"], profiles[f"vae|{row}"]

        lines.append(
            f"| {row} | {cell(f'unet|{row}')} | {ratio(f'unet|{row}', 'unet|float32 NCHW')} | {unet_slow:.0%} "
            f"| {cell(f'vae|{row}')} | {ratio(f'vae|{row}', 'vae|float32 NCHW')} | {vae_slow:.0%} "
            f"| {cell(f'vae32|{row}')} | {', '.join(unet_kernels)}; {', '.join(vae_kernels)} |"
        )
    lines += [
        "",
        "easyref before -> after on this CPU (before: NCHW, the VAE in the pipeline's dtype except diffusers' "
        "float16 upcast; after: `prefer_fast_layout` and the decode dtype the pipeline picks):",
        "",
        "| dtype | UNet call before | after | VAE decode before | after | layouts (UNet, VAE), decode dtype |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for dtype in dict.fromkeys(d for _, d, _ in rows):
        name = short(dtype)
        unet_layout, vae_layout, decode = policy(dtype)
        before_vae = "vae|float32 NCHW" if dtype == torch.float16 else f"vae|{name} NCHW"  # diffusers' upcast
        after_vae = f"vae|{name} {vae_layout}" if decode == name else f"vae32|{name} {vae_layout}"
        lines.append(
            f"| {name} | {cell(f'unet|{name} NCHW')} | {cell(f'unet|{name} {unet_layout}')} "
            f"| {cell(before_vae)} | {cell(after_vae)} | {unet_layout}, {vae_layout}, {decode} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256, help="image side in px (a multiple of 64)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument(
        "--skip", nargs="+", default=[], metavar="ROW", help='rows not to run, e.g. "float16 NCHW" (minutes at 256 px)'
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    if args.size % 64:
        parser.error("--size must be a multiple of 64 (the UNet halves the latent twice)")
    setup_logging(args.verbose)
    if args.threads:
        torch.set_num_threads(args.threads)
    check_idle()
    print(report(args, measure(args)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
