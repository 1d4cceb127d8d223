"""`easyref` command line: generate, train, convert, bench.

    easyref generate --ref a.png --ref b.png --prompt "..." --out out.png
    easyref train --config stage1 --set data=pairs.json data_root=images
    easyref convert RELEASE_DIR_OR_FILE OUT_DIR
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
from pathlib import Path

from PIL import Image, PngImagePlugin

from .images import to_rgb
from .safe_io import current_umask, describe_os_error

logger = logging.getLogger("easyref")

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
DTYPES = ("auto", "float32", "float16", "bfloat16")


class UserError(Exception):
    """A mistake in what the user asked for: reported as one line, exit code 2."""


class RunFailure(Exception):
    """A run that failed for a reason outside the arguments (disk full, numbers overflowed): one line, exit 1."""


# ---------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="easyref", description="EasyRef: group image reference for SDXL.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_convert(sub)
    from .train.command import add_train_parser

    add_train_parser(sub)
    _add_bench(sub)
    return parser


def _add_bench(sub) -> None:
    from .bench.command import add_bench_parsers
    from .shapes.command import add_shapes_parser

    p = sub.add_parser("bench", help="benchmarks of reference-conditioned generation",
                       description="MRBench-style benchmarks: `run`/`score`/`convert` for real models, "
                       "`shapes` for the miniature one on the synthetic shapes world.")
    bench_sub = p.add_subparsers(dest="bench_command", required=True)
    add_bench_parsers(bench_sub)
    add_shapes_parser(bench_sub)


def _add_generate(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="generate images from reference images and a prompt",
        description="Generate images that keep what the reference images share, steered by the prompt. "
        "With no --base/--mllm/--adapter the bundled default model is used: a tiny EasyRef trained on the synthetic "
        "shapes world (64 px; it keeps the references' subject about half the time, not yet the asked place).",
    )
    p.add_argument("--ref", action="append", default=[], metavar="IMAGE", help="a reference image (repeatable)")
    p.add_argument("--refs-dir", type=Path, help="use every image file in this folder (sorted by name)")
    p.add_argument("--prompt", required=True, help="text prompt")
    p.add_argument("--negative-prompt", help="negative text prompt (default: the checkpoint's)")
    p.add_argument("--out", type=Path, required=True, help="output PNG (with --num-images N: OUT_0.png ...); existing outputs are replaced, "
                   "a name that is one of the references is refused")
    p.add_argument("--base", help="SDXL folder or hub id ('default': the bundled model's, with its Qwen2-VL)")
    p.add_argument("--mllm", help="Qwen2-VL-Instruct folder or hub id (default: the checkpoint's)")
    p.add_argument("--adapter", help="EasyRef checkpoint folder (ours or the authors' release)")
    p.add_argument("--scale", type=float, default=1.0, help="reference strength, 0 to 10 (default 1.0)")
    p.add_argument("--steps", type=int, default=30, help="denoising steps, 1 to 1000 (default 30)")
    p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale, 0 to 100 (default 5.0)")
    p.add_argument("--seed", type=int, help="random seed, 0 to 2^63-1 (default: random, recorded in the PNG)")
    p.add_argument("--num-images", type=int, default=1, help="images to generate, 1 to 16 (default 1)")
    p.add_argument("--height", type=int, help="output height in px (multiple of 8, at most 4096; default: the model's)")
    p.add_argument("--width", type=int, help="output width in px (multiple of 8, at most 4096; default: the model's)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=DTYPES, help="default: float16 on GPU, float32 on CPU")
    p.add_argument("--grid", action="store_true", help="also write OUT_grid.png: references on top, outputs below")
    p.set_defaults(func=cmd_generate)


def _add_convert(sub) -> None:
    p = sub.add_parser(
        "convert",
        help="convert the authors' release checkpoint to an easyref checkpoint folder",
        description="Convert the authors' release file (model.safetensors, or a .bin/.pt read with "
        "weights_only=True) into easyref_config.json + easyref.safetensors.",
    )
    p.add_argument("src", type=Path, help="release file or folder holding model.safetensors")
    p.add_argument("dst", type=Path, help="output folder")
    p.add_argument("--mllm", default="Qwen/Qwen2-VL-2B-Instruct", help="MLLM the checkpoint was trained on")
    p.set_defaults(func=cmd_convert)


# ---------------------------------------------------------------------------- generate
def cmd_generate(args) -> int:
    _check_generate_args(args)
    paths = reference_paths(args.ref, args.refs_dir)
    outputs = planned_outputs(args.out, args.num_images, args.grid)
    check_outputs(outputs, inputs=paths)
    references = [load_image(p) for p in paths]
    pipe, sources = load_pipeline(args)
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little") % 2**31
    result = _generate(pipe, references, args, seed)
    params = {
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt or pipe.easyref_config.negative_prompt,
        "references": [str(p) for p in paths],
        "scale": args.scale,
        "steps": args.steps,
        "guidance": args.guidance,
        "seed": seed,
        **sources,
    }
    written = write_outputs(result.images, references, args.out, params, args.grid)
    for path in written:
        logger.info("wrote %s", path)
    return 0


def _generate(pipe, references, args, seed: int):
    import torch

    from .pipeline import NonFiniteOutputError

    generator = torch.Generator("cpu").manual_seed(seed)
    try:
        return pipe(
            references,
            args.prompt,
            negative_prompt=args.negative_prompt,
            scale=args.scale,
            num_images_per_prompt=args.num_images,
            guidance_scale=args.guidance,
            num_inference_steps=args.steps,
            generator=generator,
            height=args.height,
            width=args.width,
        )
    except ValueError as err:
        raise UserError(str(err)) from None
    except NonFiniteOutputError as err:
        raise RunFailure(str(err)) from None


# Bounds checked before anything loads. They keep one command within a machine's memory (a 100 kB
# prompt or 10^6 images would otherwise run until the kernel kills it) and are far above real use.
MAX_STEPS = 1000  # SDXL's scheduler has 1000 training timesteps
MAX_IMAGES = 16
MAX_SIDE = 4096
MAX_PIXELS = 2048 * 2048  # one image
MAX_BATCH_PIXELS = 16 * 1024 * 1024  # all images of one call
MAX_GUIDANCE = 100.0
MAX_SCALE = 10.0
MAX_SEED = 2**63 - 1
MAX_REFERENCES = 64  # the largest max_references a checkpoint may declare
# A cheap bound before any tokenizer loads; the exact limit (MAX_PROMPT_TOKENS) is checked on tokens.
MAX_PROMPT_CHARS = 16 * 1024


def _check_generate_args(args) -> None:
    from .config import MAX_PROMPT_TOKENS

    if args.out.suffix.lower() != ".png":
        raise UserError(f"--out must end in .png, got {args.out}")
    _check_range("--steps", args.steps, 1, MAX_STEPS)
    _check_range("--num-images", args.num_images, 1, MAX_IMAGES)
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and (value < 8 or value % 8 or value > MAX_SIDE):
            raise UserError(f"--{name} must be a multiple of 8 between 8 and {MAX_SIDE}, got {value}")
    if args.height and args.width:  # with one side given the other is the model's default, known only once loaded
        pixels = args.height * args.width
        if pixels > MAX_PIXELS:
            raise UserError(f"--height x --width is {pixels} pixels; at most {MAX_PIXELS} (2048 x 2048) are allowed")
        if pixels * args.num_images > MAX_BATCH_PIXELS:
            raise UserError(
                f"--num-images {args.num_images} at {args.height} x {args.width} is {pixels * args.num_images} "
                f"pixels; at most {MAX_BATCH_PIXELS} per command"
            )
    _check_finite_range("--guidance", args.guidance, 0.0, MAX_GUIDANCE)
    _check_finite_range("--scale", args.scale, 0.0, MAX_SCALE)
    if args.seed is not None:
        _check_range("--seed", args.seed, 0, MAX_SEED)
    for flag, text in (("--prompt", args.prompt), ("--negative-prompt", args.negative_prompt)):
        if text is not None and len(text) > MAX_PROMPT_CHARS:
            raise UserError(
                f"{flag} is {len(text)} characters long; at most {MAX_PROMPT_CHARS} characters "
                f"({MAX_PROMPT_TOKENS} tokens) are read"
            )
    if (args.mllm or args.adapter) and not args.base:
        raise UserError("--base is required when --mllm or --adapter is given")


def _check_range(flag: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise UserError(f"{flag} must be between {low} and {high}, got {value}")


def _check_finite_range(flag: str, value: float, low: float, high: float) -> None:
    if not math.isfinite(value) or not low <= value <= high:
        raise UserError(f"{flag} must be a finite number between {low:g} and {high:g}, got {value}")


def reference_paths(refs: list[str], refs_dir: Path | None) -> list[Path]:
    paths = [Path(r) for r in refs]
    if refs_dir is not None:
        if not refs_dir.is_dir():
            raise UserError(f"--refs-dir {refs_dir} is not a folder")
        paths += sorted(p for p in refs_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise UserError("no reference images: give --ref IMAGE (repeatable) or --refs-dir DIR")
    if len(paths) > MAX_REFERENCES:
        raise UserError(f"{len(paths)} reference images given; at most {MAX_REFERENCES} are accepted")
    return paths


def load_image(path: Path) -> Image.Image:
    """A reference through the library's one decoding rule; every way a file can be unusable is a UserError."""
    from .images import ImageFileError, open_image

    try:
        return open_image(path)
    except ImageFileError as err:
        raise UserError(str(err)) from None


def resolve_device(name: str, dtype_name: str):
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown --device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but no CUDA GPU is available")
    if dtype_name == "auto":
        dtype_name = "float16" if device.type == "cuda" else "float32"
    return device, getattr(torch, dtype_name)


def load_pipeline(args):
    from .checkpoint import CheckpointError
    from .pipeline import EasyRefPipeline

    device, dtype = resolve_device(args.device, args.dtype)
    if args.base and args.base != "default":
        base, mllm, adapter = args.base, args.mllm, args.adapter
        _check_local(base, "--base")
    else:  # the bundled default model; `--base default --adapter X` puts another adapter on its parts
        from .default_model import BUNDLED_NOTICE, UNTRAINED_NOTICE, bundled_model_dir, default_model_dir

        folder = default_model_dir()
        base, mllm = str(folder / "sdxl"), args.mllm or str(folder / "qwen2vl")
        adapter = args.adapter or str(folder / "adapter")
        if not args.adapter:
            logger.warning(BUNDLED_NOTICE if folder == bundled_model_dir() else UNTRAINED_NOTICE)
    if adapter:
        _check_local(adapter, "--adapter")
    try:
        pipe = EasyRefPipeline.from_pretrained(base, mllm=mllm, adapter=adapter, dtype=dtype)
    except CheckpointError as err:
        raise UserError(str(err)) from None
    except OSError as err:  # a folder that is not a model, or a hub id that cannot be reached
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot load the model: {first_line}") from None
    pipe.to(device)
    sources = {"base": base, "mllm": mllm or pipe.easyref_config.mllm, "adapter": adapter}
    return pipe, sources


def _check_local(value: str, flag: str) -> None:
    """A value that looks like a path must exist (hub ids are 'owner/name' and are passed through)."""
    path = Path(value)
    looks_local = value.startswith((".", "/", "~")) or path.exists() or value.count("/") != 1
    if looks_local and not path.expanduser().exists():
        raise UserError(f"{flag} {value}: no such file or folder")


# ---------------------------------------------------------------------------- outputs
# Outputs that exist are replaced, as diffusers' `image.save` and ImageMagick do; a path that is one
# of the inputs (by name, symlink or hard link) is refused before any work, whichever derived name hits it.
def output_paths(out: Path, count: int) -> list[Path]:
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(count)]


def grid_path(out: Path) -> Path:
    return out.with_name(f"{out.stem}_grid{out.suffix}")


def planned_outputs(out: Path, count: int, grid: bool) -> list[Path]:
    return output_paths(out, count) + ([grid_path(out)] if grid else [])


def check_outputs(outputs: list[Path], inputs: list[Path]) -> None:
    """Refuse, up front, outputs that would replace an input or cannot be written at all."""
    for path in outputs:
        for source in inputs:
            if _same_file(path, source):
                raise UserError(f"output {path} would overwrite the reference {source}; choose another --out")
        if path.is_dir():
            raise UserError(f"output {path} is a folder; --out needs a file name ending in .png")
    _check_writable_folder(outputs[0].parent)


def _same_file(a: Path, b: Path) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return a.exists() and b.exists() and a.samefile(b)
    except OSError:
        return False


def _check_writable_folder(folder: Path) -> None:
    """The output folder, or the nearest existing folder above it (created later), must take a new file."""
    existing = folder if str(folder) else Path(".")
    while not existing.exists():
        if existing.is_symlink():
            raise UserError(f"output folder {existing} is a broken symlink")
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"cannot write under {folder}: {existing} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".easyref-probe.", suffix=".tmp", dir=existing)
    except OSError as err:
        raise UserError(f"cannot write to the folder {existing} ({describe_os_error(err)})") from None
    os.close(fd)
    os.unlink(probe)


def write_outputs(images, references, out: Path, params: dict, grid: bool) -> list[Path]:
    """All outputs or none: every file is written to a temporary name first, then all are renamed."""
    planned = [(image, path, {**params, "index": i, "width": image.width, "height": image.height})
               for i, (image, path) in enumerate(zip(images, output_paths(out, len(images))))]
    if grid:
        planned.append((contact_sheet(references, images), grid_path(out), params))
    staged: list[tuple[str, Path]] = []
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        for image, path, info in planned:
            staged.append((_stage_png(image, path, info), path))
        for tmp, path in staged:
            os.replace(tmp, path)
    except OSError as err:
        raise RunFailure(f"no image was written: {describe_os_error(err)}") from None
    finally:
        for tmp, _ in staged:
            Path(tmp).unlink(missing_ok=True)
    return [path for _, path, _ in planned]


def save_png(image: Image.Image, path: Path, params: dict) -> None:
    tmp = _stage_png(image, path, params)
    try:
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _stage_png(image: Image.Image, path: Path, params: dict) -> str:
    """Write a PNG with its settings as text metadata to a unique temporary name beside `path`."""
    info = PngImagePlugin.PngInfo()
    info.add_text("easyref", json.dumps(params, sort_keys=True))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            image.save(handle, format="PNG", pnginfo=info)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; outputs get ordinary permissions
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return tmp


def contact_sheet(references, outputs, cell: int | None = None) -> Image.Image:
    """References in the top row, generated images in the bottom row, all as square cells."""
    cell = cell or max(im.width for im in outputs)
    cols = max(len(references), len(outputs))
    sheet = Image.new("RGB", (cols * cell, 2 * cell), "white")
    for row, images in enumerate((references, outputs)):
        for col, image in enumerate(images):
            thumb = to_rgb(image)
            thumb.thumbnail((cell, cell))
            sheet.paste(thumb, (col * cell + (cell - thumb.width) // 2, row * cell + (cell - thumb.height) // 2))
    return sheet


# ---------------------------------------------------------------------------- convert
def cmd_convert(args) -> int:
    from .checkpoint import CheckpointError
    from .release import convert_release, log_ignored

    if not args.src.exists():
        raise UserError(f"{args.src}: no such file or folder")
    try:
        config, ignored = convert_release(args.src, args.dst, mllm=args.mllm)
    except CheckpointError as err:
        raise UserError(str(err)) from None
    log_ignored(ignored)
    logger.info(
        "wrote %s (tokens %d, LoRA rank %d, finetuned trunk: %s)",
        args.dst,
        config.num_reference_tokens,
        config.lora_rank,
        "yes" if config.has_trunk else "no",
    )
    return 0


# ---------------------------------------------------------------------------- main
def _quiet_libraries() -> None:
    import diffusers
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="easyref: %(message)s")
    _quiet_libraries()
    try:
        return args.func(args)
    except UserError as err:
        print(f"easyref: error: {err}", file=sys.stderr)
        return 2
    except RunFailure as err:
        print(f"easyref: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
