"""`python -m easyref.shapes.build OUT`: train the bundled default model from nothing.

1. render the shapes world's training split to disk (`shapes.data`);
2. pretrain the base text-to-image model, our SDXL stand-in (`shapes.base`);
3. pretrain a tiny Qwen2-VL, our stand-in for the pretrained MLLM: its vision tower on the subjects'
   attributes, then its language model on captions (`shapes.mllm`);
4. run EasyRef's three stages through `easyref.train.Trainer`, exactly as `easyref train` does;
5. package `sdxl/`, `qwen2vl/`, `adapter/` (and `world.json`: the prompts' backgrounds and places) into OUT:
   the layout `easyref generate` loads by default.

`--preset smoke` runs every step for a handful of iterations (a check of the recipe, about 10 s on CPU);
`--preset cpu` builds the model of benchmarks/RESULTS.md 5f (a 3-level base, stage 3 on every group
kind), about 1 h 45 min on 2 cores from nothing, the bundled VAE reused. It is not the shipped model: it
drew the subject right less often (11% against 49% on held-out plain groups), so the bundled weights are
still those their recipe.json describes (a 2-level base, plain groups).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

logger = logging.getLogger(__name__)


@dataclass
class Recipe:
    groups: int
    vae_steps: int
    base_steps: int
    mllm_steps: int
    stage_steps: tuple[int, int, int]
    batch_size: int
    stage_lr: tuple[float, float, float] = (1e-3, 3e-4, 2e-4)
    lora_rank: int = 8
    reference_image_size: int = 112
    # the MLLM's vision-tower pretraining (shapes.mllm phase 1); a width-32, 2-layer ViT did not
    # learn shape in the CPU budget, width 64 with 3 layers names 72% of held-out shapes at 6,000 steps
    vision_steps: int = 0
    vision_width: int = 32
    vision_depth: int = 2
    num_workers: int = 0  # on a 2-core machine worker processes only compete with the training threads
    seed: int = 0
    unet_levels: int = 3  # the base UNet's resolution levels (`shapes.base.UNET_LEVELS`)
    base_chunk: int | None = None  # the base's UNet trained in runs of this many steps (`build_base_model`)
    # "bundled": reuse the bundled default model's VAE (trained to vae_steps by an earlier build) instead
    # of training one; a copy of the package without weights trains it
    vae_from: str | None = None


PRESETS = {
    "smoke": Recipe(
        groups=48, vae_steps=3, base_steps=3, mllm_steps=3, stage_steps=(2, 2, 2), batch_size=4, vision_steps=3
    ),
    # sized for one lent GPU in under ten minutes (not yet run with the 3-level base, which needs more
    # steps than the 2-level one did); the data loader needs the machine's many cores
    "gpu": Recipe(
        groups=3000,
        vae_steps=1500,
        base_steps=12000,
        mllm_steps=1500,
        stage_steps=(600, 1200, 1800),
        batch_size=32,
        num_workers=12,
        vision_steps=12000,
        vision_width=64,
        vision_depth=3,
    ),
    # about 1 h 45 min on this project's 2-core CPU machine, estimated from timed fractions: the bundled
    # VAE reused (it took 4,000 x 0.29 s), the 3-level base 10,000 x 0.42 s in runs of 2,000, MLLM 750 s,
    # stages 1-3 1,351 s (timed). Why these sizes: a VAE of 600 steps washes colours out (MSE 0.054); a
    # 3-level UNet is needed to put objects in the asked corner (a 2-level one picks a random corner);
    # it reads background and place right 38% of the time at 4,000 base steps, 58% at 8,000 and 61% at
    # 10,000, where it levels off (benchmarks/RESULTS.md 5d). A finished base trains on to more if
    # base_steps is raised.
    "cpu": Recipe(
        groups=1500,
        vae_steps=4000,
        base_steps=10000,
        mllm_steps=1500,
        stage_steps=(400, 800, 1500),
        batch_size=16,
        vision_steps=9000,
        vision_width=64,
        vision_depth=3,
        vae_from="bundled",
        base_chunk=2000,
    ),
    "full": Recipe(
        groups=3000,
        vae_steps=3000,
        base_steps=8000,
        mllm_steps=3000,
        stage_steps=(1500, 1500, 3000),
        batch_size=32,
        vision_steps=20000,
        vision_width=64,
        vision_depth=3,
    ),
}


# What every EasyRef stage in the shapes world uses: 64 px targets, small buckets, CPU-sized runs that
# keep one checkpoint; the rest of a stage's config comes from the recipe (`stage_config`).
WORLD_STAGE_SETTINGS = {
    "resolution": 64,
    "crop": "center",
    "bucket_stride": 16,
    "max_references": 8,
    "keep_checkpoints": 1,
    "mixed_precision": "no",
    "gradient_checkpointing": False,
    "tensorboard": False,
}
STAGE_DATA = {1: "pairs.jsonl", 2: "faces.jsonl", 3: "groups.jsonl"}


def stage_config(recipe: Recipe, stage: int, work: Path):
    from ..train.config import TrainConfig

    steps = recipe.stage_steps[stage - 1]
    return TrainConfig(
        **WORLD_STAGE_SETTINGS,
        stage=stage,
        base=str(work / "base"),
        mllm=str(work / "qwen2vl"),
        init_from=str(work / f"stage{stage - 1}" / "final") if stage > 1 else None,
        output_dir=str(work / f"stage{stage}"),
        data=str(work / "data" / STAGE_DATA[stage]),
        data_root=str(work / "data"),
        truncate_rate=0.4 if stage == 3 else 0.0,
        reference_image_size=recipe.reference_image_size,
        lora_rank=recipe.lora_rank,
        learning_rate=recipe.stage_lr[stage - 1],
        batch_size=recipe.batch_size,
        max_steps=steps,
        checkpoint_every=max(1, steps // 3),
        log_every=max(1, min(50, steps)),
        num_workers=recipe.num_workers,
        seed=recipe.seed,
    )


def build(out: Path, recipe: Recipe, work: Path, cpu: bool) -> Path:
    import torch

    timings = {}
    device = "cuda" if torch.cuda.is_available() and not cpu else "cpu"
    # each phase is skipped when an earlier (interrupted) build already finished it: a phase's
    # output appears only once it is complete, so a half-done phase simply runs again
    continue_base(work, recipe, device)
    drop_stale_mllm(work, recipe)
    for name, done, run in _phases(recipe, work, device, cpu):
        if done.exists():
            logger.info("%s: already built (%s), skipped", name, done)
            continue
        started = time.perf_counter()
        run()
        timings[f"{name}_s"] = time.perf_counter() - started
    package(work, out, recipe, timings)
    return out


def _phases(recipe: Recipe, work: Path, device: str, cpu: bool) -> list[tuple[str, Path, object]]:
    """(name, the file that exists once the phase is done, how to run it), in build order."""
    from ..train.trainer import Trainer
    from .base import build_base_model
    from .data import write_training_data
    from .mllm import build_mllm

    def base():
        build_base_model(
            work / "base",
            recipe.vae_steps,
            recipe.base_steps,
            recipe.batch_size,
            seed=recipe.seed,
            device=device,
            levels=recipe.unet_levels,
            vae_from=_vae_source(recipe),
            chunk=recipe.base_chunk,
        )

    def mllm():
        build_mllm(
            work / "qwen2vl",
            recipe.mllm_steps,
            32,
            seed=recipe.seed,
            reference_image_size=recipe.reference_image_size,
            device=device,
            vision_steps=recipe.vision_steps,
            vision_width=recipe.vision_width,
            vision_depth=recipe.vision_depth,
        )

    phases = [
        (
            "data",
            work / "data" / "groups.jsonl",
            lambda: write_training_data(work / "data", groups=recipe.groups, seed=recipe.seed),
        ),
        ("base", work / "base" / "model_index.json", base),
        ("qwen2vl", work / "qwen2vl" / "config.json", mllm),
    ]
    for stage in (1, 2, 3):
        train = lambda stage=stage: Trainer(stage_config(recipe, stage, work), cpu=cpu).train()
        phases.append((f"stage{stage}", work / f"stage{stage}" / "final" / "easyref.safetensors", train))
    return phases


def _vae_source(recipe: Recipe) -> Path | None:
    if recipe.vae_from != "bundled":
        return Path(recipe.vae_from) if recipe.vae_from else None
    from ..bundled import BUNDLED_DIR

    if (BUNDLED_DIR / "sdxl" / "vae" / "config.json").is_file():
        return BUNDLED_DIR / "sdxl"
    logger.info("no bundled model to take the VAE from: training one")
    return None


def continue_base(work: Path, recipe: Recipe, device: str) -> None:
    """A finished base with fewer steps than the recipe asks trains on, so builds accumulate across
    sessions; everything trained on the old base is then stale and goes. A base of another UNet shape
    is rebuilt."""
    from .base import continue_base_model

    record = work / "base" / "training.json"
    if not record.is_file():
        return
    built = json.loads(record.read_text())
    if built.get("levels", 2) != recipe.unet_levels:  # records from before `levels` existed are 2-level
        logger.info(
            "base: a %s-level UNet, the recipe asks %d levels; rebuilding it and what was trained on it",
            built.get("levels", 2),
            recipe.unet_levels,
        )
        shutil.rmtree(work / "base")
        _drop_stages(work)
        return
    done = built["base_steps"]
    if done >= recipe.base_steps:
        return
    logger.info("base: continuing from %d to %d steps", done, recipe.base_steps)
    _drop_stages(work)
    while done < recipe.base_steps:  # each run is saved whole, so a build stopped between runs keeps them
        done = min(recipe.base_steps, done + (recipe.base_chunk or recipe.base_steps))
        continue_base_model(work / "base", done, recipe.batch_size, device=device)


def _drop_stages(work: Path) -> None:
    """The stages and packaged models, once what they were trained on has changed."""
    for stale in [*work.glob("stage[123]*"), *work.glob("model-*")]:
        shutil.rmtree(stale)


def drop_stale_mllm(work: Path, recipe: Recipe) -> None:
    """An MLLM built to another recipe is rebuilt, and the stages trained on it go with it."""
    record = work / "qwen2vl" / "training.json"
    if not record.is_file():
        return
    built = json.loads(record.read_text())
    wanted = {
        "steps": recipe.mllm_steps,
        "vision_steps": recipe.vision_steps,
        "vision_width": recipe.vision_width,
        "vision_depth": recipe.vision_depth,
    }
    older = {"vision_steps": 0, "vision_width": 32, "vision_depth": 2}  # records from before phase 1 existed
    if all(built.get(key, older.get(key)) == value for key, value in wanted.items()):
        return
    logger.info("qwen2vl: built to another recipe (%s), rebuilding it and the stages", record)
    shutil.rmtree(work / "qwen2vl")
    _drop_stages(work)


def latest_adapter(work: Path) -> tuple[Path, str]:
    """The most advanced inference checkpoint in a (possibly interrupted) build."""
    for stage in (3, 2, 1):
        final = work / f"stage{stage}" / "final"
        if (final / "easyref.safetensors").is_file():
            return final, f"stage {stage} final"
        checkpoints = sorted((work / f"stage{stage}").glob("checkpoint-*/model/easyref.safetensors"))
        if checkpoints:
            return checkpoints[-1].parent, f"stage {stage} {checkpoints[-1].parent.parent.name}"
    raise FileNotFoundError(f"no EasyRef checkpoint under {work}")


def package(work: Path, out: Path, recipe: Recipe, timings: dict, adapter: Path | None = None) -> None:
    """The three folders the CLI loads, weights in float16 where that halves the size."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    from ..safe_io import replace_folder

    adapter, source = (adapter, str(adapter)) if adapter else latest_adapter(work)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe = StableDiffusionXLPipeline.from_pretrained(work / "base")
    pipe.unet.to(torch.float16)
    pipe.save_pretrained(tmp / "sdxl")
    shutil.copytree(work / "qwen2vl", tmp / "qwen2vl")
    shutil.copytree(adapter, tmp / "adapter")
    _portable_config(tmp / "adapter" / "easyref_config.json")
    info = {"recipe": asdict(recipe), "timings_s": timings, "adapter_from": source}
    (tmp / "recipe.json").write_text(json.dumps(info, indent=1))
    write_world_file(tmp)
    replace_folder(tmp, out)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    logger.info("packaged %s (%.1f MB)", out, size / 1e6)


def write_world_file(folder: Path) -> None:
    """What `easyref.bundled` tells users of the model about its prompts, from the world it learned."""
    from ..bundled import WORLD_FILE
    from .world import BACKGROUNDS, POSITIONS

    world = {"backgrounds": list(BACKGROUNDS), "positions": list(POSITIONS)}
    (folder / WORLD_FILE).write_text(json.dumps(world, indent=1) + "\n")


def _portable_config(path: Path) -> None:
    """Name the base and MLLM by their folders (not this build's path) and use an empty text negative prompt:
    the world's word-level tokenizer has no words for SDXL's default negative prompt."""
    config = json.loads(path.read_text())
    config.update(base="sdxl", mllm="qwen2vl", negative_prompt="")
    path.write_text(json.dumps(config, indent=2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="output folder (sdxl/, qwen2vl/, adapter/)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    parser.add_argument("--work", type=Path, help="working folder (default: OUT.work)")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is present")
    parser.add_argument(
        "--package-only",
        action="store_true",
        help="package the most advanced checkpoint of an existing (maybe interrupted) build",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    work = args.work or args.out.with_name(args.out.name + ".work")
    if args.package_only:
        package(work, args.out, PRESETS[args.preset], {})
    else:
        build(args.out, PRESETS[args.preset], work, args.cpu)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
