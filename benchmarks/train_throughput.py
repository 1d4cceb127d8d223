"""Training throughput (samples/s) and peak memory: `easyref train`'s loop against the authors' way.

Run (from the repository root):

    .venv/bin/python benchmarks/train_throughput.py                   # tiny models, stages 1-3, CPU, ~1 min
    python benchmarks/train_throughput.py --real-config --device cuda # stage 3, SDXL + Qwen2-VL-2B sizes

Tiny mode: every stage of the real `Trainer` on the tiny random models and a synthetic dataset
(`easyref.train.example`), ours at batch 4 against the release's way at batch 1, in one process.

Real mode (a GPU): stage 3 with SDXL's UNet/VAE/CLIP text encoders and Qwen2-VL-2B-Instruct built from
their configs with random weights, 1024 px targets, 8 references per group at 336 px, bf16 autocast,
gradient checkpointing on and off. `--scale-down` shrinks every model for a quick CPU check of the
script (its numbers mean nothing).

"ours" = `easyref.train.Trainer`: batches of B groups (one target size per batch), one vision call
for all references of the batch. "release" = the same trainer and data, but the authors' per-sample
loop: batch 1, and a reference forward that calls the vision tower once per image and computes the
language model's full-vocabulary logits (float32) as the release's `multimodal_llm(...)` call does.
Samples/s = samples in the timed steps / their wall time, after warm-up steps (data loading
included, 2+ worker processes). Peak memory: `torch.cuda.max_memory_allocated` (GPU) or the process's
peak RSS (CPU; monotonic within the process, so each CPU row runs in its own subprocess).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from easyref.train.models import TrainingModel  # noqa: E402

logger = logging.getLogger("benchmarks")


class ReleaseStyleModel(TrainingModel):
    """The authors' reference forward: vision tower per image, full-vocabulary logits computed and held."""

    def forward(self, inputs, noisy_latents, timesteps, prompt_embeds, pooled_embeds, time_ids):
        enc = self.encoder
        inputs = inputs.to(enc.device)
        hidden = enc.embed_tokens(inputs.input_ids)
        sizes = inputs.image_grid_thw.prod(-1).tolist()
        features = [
            enc.visual(patches.to(enc.visual.get_dtype()), grid_thw=grid).pooler_output
            for patches, grid in zip(inputs.pixel_values.split(sizes), inputs.image_grid_thw.split(1))
        ]
        image_mask = (inputs.input_ids == enc.image_token_id).unsqueeze(-1)
        hidden = hidden.masked_scatter(image_mask, torch.cat(features).to(hidden.dtype))
        mask = inputs.attention_mask
        trunk, positions = enc.run_trunk(hidden, mask)
        logits = torch.nn.functional.linear(trunk, enc.embed_tokens.weight).float()  # tied lm_head, as released
        tokens = enc.aggregate(trunk, mask, positions)
        out = self.denoise(tokens, noisy_latents, timesteps, prompt_embeds, pooled_embeds, time_ids)
        del logits  # held until here, like the release's output object
        return out


# ---------------------------------------------------------------------- data
def write_dataset(root: Path, groups: int, refs: int, size: int, stage: int) -> Path:
    """Random-noise images (JPEG): `groups` records of one target + `refs` references each."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True, exist_ok=True)
    pool = []
    for i in range(refs + 3):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
            root / f"images/{i}.jpg", quality=90
        )
        pool.append(f"images/{i}.jpg")
    records = []
    for g in range(groups):
        target = pool[g % 3]
        if stage == 1:
            records.append({"image_file": target, "text": f"caption {g}", "target": target})
        elif stage == 2:
            records.append(
                {
                    "face": [[[size // 4, size // 4, size // 2, size // 2, 0.9]]],
                    "text": f"caption {g}",
                    "target": target,
                }
            )
        else:
            records.append({"image_file": pool[3:], "text": f"caption {g}", "target": target})
    path = root / f"stage{stage}.json"
    path.write_text(json.dumps(records))
    return path


# ---------------------------------------------------------------------- models
def build_real_models(scale_down: bool, device: torch.device, lora_rank: int, num_layers: int, vision_depth: int):
    """SDXL + Qwen2-VL-2B architectures with random weights, built directly on the device."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from easyref import EasyRefConfig, ReferenceEncoder
    from easyref.adapter import install_adapter
    from easyref.tiny import tiny_clip_tokenizer
    from easyref.train.models import StageModels

    tokenizer, mllm_config = _common.qwen2vl_2b_with_tiny_tokenizer(num_layers, vision_depth)
    clip_tok = tiny_clip_tokenizer()
    one, two = _common.sdxl_text_configs(len(clip_tok), scale_down)
    torch.manual_seed(0)
    with torch.device(device):
        mllm = Qwen2VLForConditionalGeneration._from_config(mllm_config, attn_implementation="sdpa")
        unet = UNet2DConditionModel(**_common.sdxl_unet_config(scale_down))
        vae = AutoencoderKL(**_common.sdxl_vae_config(scale_down))
        text_encoder = CLIPTextModel(CLIPTextConfig(**one))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**two))
    config = EasyRefConfig(
        mllm="qwen2vl-2b-random", mllm_hidden_size=1536, cross_attention_dim=2048, lora_rank=lora_rank, has_trunk=True
    )
    encoder = ReferenceEncoder(config, mllm, tokenizer, Qwen2VLImageProcessorPil())
    install_adapter(unet, config)
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
    )
    text_pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=clip_tok,
        tokenizer_2=clip_tok,
        unet=unet,
        scheduler=scheduler,
    )
    text_pipe.set_progress_bar_config(disable=True)
    return StageModels(config, encoder, unet, vae, text_pipe, scheduler)


# ---------------------------------------------------------------------- one measured row
def measure(trainer, warmup: int, steps: int, device) -> tuple[float, float]:
    """(samples/s, peak GiB) over `steps` optimizer steps after `warmup` steps."""
    trainer.fit(warmup)
    _common.sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    samples, start = trainer.state.samples, time.perf_counter()
    trainer.fit(warmup + steps)
    _common.sync(device)
    elapsed = time.perf_counter() - start
    from easyref.train.trainer import _peak_memory_gib

    return (trainer.state.samples - samples) / elapsed, _peak_memory_gib()


def shared_train_options(
    args, method: str, stage: int, batch: int, checkpointing: bool, workdir: Path, data: Path
) -> dict:
    """TrainConfig fields both modes share: no checkpoint or log falls inside the timed steps, and nothing is
    dropped, so every sample runs the reference branch being compared."""
    return dict(
        stage=stage,
        output_dir=str(workdir / f"run-{method}-{stage}-{checkpointing}"),
        data=str(data),
        data_root=str(data.parent),
        batch_size=batch,
        max_steps=10**6,
        checkpoint_every=10**6,
        log_every=10**6,
        tensorboard=False,
        num_workers=args.workers,
        gradient_checkpointing=checkpointing,
        image_drop_rate=0.0,
        text_drop_rate=0.0,
        both_drop_rate=0.0,
        max_references=args.refs,
        mixed_precision=args.mixed_precision,
        learning_rate=1e-5,
        crop="center",
    )


def real_trainer(args, common: dict, stage: int, device: torch.device, model_class):
    from easyref.train.config import TrainConfig
    from easyref.train.trainer import Trainer

    models = build_real_models(args.scale_down, device, args.lora_rank, args.num_layers, args.vision_depth)
    # the models are passed in, so init_from is never read; stage 2-3 configs only require one
    config = TrainConfig(
        **common,
        init_from="(in memory)" if stage > 1 else None,
        resolution=args.resolution,
        reference_image_size=336,
        lora_rank=args.lora_rank,
    )
    return Trainer(config, cpu=device.type == "cpu", models=models, model_class=model_class)


def tiny_trainer(common: dict, stage: int, workdir: Path, model_class):
    """A trainer on the tiny models that `prepare_tiny` wrote; stages 2-3 start from its stage-1 checkpoint."""
    from easyref.train.config import TrainConfig
    from easyref.train.trainer import Trainer

    tiny = workdir / "tiny"
    stage1 = workdir / "stage1-init"
    extra = {"init_from": str(stage1)} if stage > 1 else {}
    config = TrainConfig(
        **common,
        **extra,
        base=str(tiny / "sdxl"),
        mllm=str(tiny / "qwen2vl"),
        resolution=32,
        bucket_stride=16,
        reference_image_size=56,
        lora_rank=4,
    )
    return Trainer(config, cpu=True, model_class=model_class)


def run_row(args, method: str, stage: int, batch: int, checkpointing: bool, workdir: Path) -> dict:
    device = torch.device(args.device)
    real = args.real_config
    data = write_dataset(
        workdir / f"data{stage}", groups=64, refs=args.refs, size=args.resolution if real else 48, stage=stage
    )
    common = shared_train_options(args, method, stage, batch, checkpointing, workdir, data)
    model_class = ReleaseStyleModel if method == "release" else TrainingModel
    if real:
        trainer = real_trainer(args, common, stage, device, model_class)
    else:
        trainer = tiny_trainer(common, stage, workdir, model_class)
    try:
        sps, peak = measure(trainer, args.warmup, args.steps, device)
    except torch.OutOfMemoryError:
        sps, peak = float("nan"), float("inf")
    return {
        "method": method,
        "stage": stage,
        "batch": batch,
        "checkpointing": checkpointing,
        "samples_per_s": sps,
        "peak_gib": peak,
    }


def prepare_tiny(workdir: Path) -> None:
    """Tiny model folders and a stage-1 checkpoint for stages 2-3 to start from."""
    from easyref.tiny import save_tiny_qwen2vl, save_tiny_sdxl
    from easyref.train.config import TrainConfig
    from easyref.train.example import write_example_data
    from easyref.train.trainer import Trainer

    save_tiny_sdxl(workdir / "tiny" / "sdxl")
    save_tiny_qwen2vl(workdir / "tiny" / "qwen2vl")
    paths = write_example_data(workdir / "example", size=48)
    config = TrainConfig(
        stage=1,
        base=str(workdir / "tiny" / "sdxl"),
        mllm=str(workdir / "tiny" / "qwen2vl"),
        output_dir=str(workdir / "stage1-run"),
        data=str(paths["pairs"]),
        data_root=str(workdir / "example"),
        resolution=32,
        bucket_stride=16,
        reference_image_size=56,
        max_steps=1,
        num_workers=0,
        mixed_precision="no",
        tensorboard=False,
        gradient_checkpointing=False,
    )
    final = Trainer(config, cpu=True).train()
    final.rename(workdir / "stage1-init")


def plan(args) -> list[tuple[str, int, int, bool]]:
    if args.rows:  # e.g. "ours:2:off,release:1:off"
        rows = []
        for item in args.rows.split(","):
            method, batch, ckpt = item.split(":")
            rows.append((method, 3 if args.real_config else 1, int(batch), ckpt == "on"))
        return rows
    if args.real_config:
        rows = []
        for ckpt in (True, False):
            rows += [("ours", 3, args.batch, ckpt), ("release", 3, 1, ckpt)]
        rows.insert(1, ("ours", 3, 1, True))  # batch 1 too: what batching adds beyond the per-image loop
        return rows
    return [(m, s, b, False) for s in (1, 2, 3) for m, b in (("ours", args.batch), ("release", 1))]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--real-config", action="store_true", help="SDXL + Qwen2-VL-2B sizes, stage 3 (use a GPU)")
    p.add_argument("--scale-down", action="store_true", help="with --real-config: tiny widths, to check the script")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--refs", type=int, default=8, help="references per group")
    p.add_argument("--batch", type=int, default=4, help="ours: groups per batch (release: always 1)")
    p.add_argument("--lora-rank", type=int, default=128)
    p.add_argument("--num-layers", type=int, default=28, help="Qwen2-VL text layers (real: 28)")
    p.add_argument("--vision-depth", type=int, default=32, help="Qwen2-VL vision blocks (real: 32)")
    p.add_argument("--mixed-precision", default=None, help="default: bf16 with --real-config, else no")
    p.add_argument("--rows", help="only these rows, as METHOD:BATCH:on|off,... (grad ckpt on/off)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--row", help=argparse.SUPPRESS)  # internal: run one CPU row in a subprocess
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    args.mixed_precision = args.mixed_precision or ("bf16" if args.real_config else "no")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device, busy = _common.start_run(args)
    logging.getLogger("easyref").setLevel(logging.WARNING)
    if args.row:  # child process: one row, result as JSON on stdout
        method, stage, batch, ckpt = json.loads(args.row)
        print(json.dumps(run_row(args, method, stage, batch, ckpt, Path(args.workdir))))
        return 0
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        if not args.real_config:
            prepare_tiny(workdir)
        for row in plan(args):
            logger.info("running %s", row)
            if device.type == "cpu":  # peak RSS only grows: a fresh process per row
                command = [
                    sys.executable,
                    __file__,
                    *(argv if argv is not None else sys.argv[1:]),
                    "--row",
                    json.dumps(row),
                    "--workdir",
                    str(workdir),
                ]
                out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
                results.append(json.loads(out.strip().splitlines()[-1]))
            else:
                results.append(run_row(args, *row, workdir))
                logger.info("%s", results[-1])
                gc.collect()
                torch.cuda.empty_cache()
    print_table(args, results, busy)
    return 0


def print_table(args, results: list[dict], busy) -> None:
    ours = {}
    for r in results:  # the speed-up column compares with ours at its largest batch
        key = (r["stage"], r["checkpointing"])
        if r["method"] == "ours" and r["batch"] >= ours.get(key, {"batch": 0})["batch"]:
            ours[key] = r
    rows = []
    for r in results:
        base = ours[(r["stage"], r["checkpointing"])]
        speed = base["samples_per_s"] / r["samples_per_s"] if r["samples_per_s"] > 0 else float("nan")
        rows.append(
            [
                r["method"],
                r["stage"],
                r["batch"],
                "on" if r["checkpointing"] else "off",
                f"{r['samples_per_s']:.3f}",
                f"{r['peak_gib']:.2f}",
                f"{speed:.2f}x",
            ]
        )
    what = "real configs (random weights)" if args.real_config else "tiny models"
    if args.scale_down:
        what += ", SCALED DOWN (script check only)"
    print(
        f"\n{_common.machine_line(args.device)}\n{what}; {args.refs} refs/group; {args.mixed_precision}; "
        f"{args.warmup} warm-up + {args.steps} timed steps"
        + (f"; CPU busy before run: {busy:.0f}%" if busy is not None else "")
    )
    print(
        _common.markdown_table(
            ["method", "stage", "batch", "grad ckpt", "samples/s", "peak GiB", "ours speed-up"], rows
        )
    )


if __name__ == "__main__":
    raise SystemExit(main())
