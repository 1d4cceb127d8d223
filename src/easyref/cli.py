"""`easyref` command line: generate, train, convert, bench.

    easyref generate --ref a.png --ref b.png --prompt "..." --out out.png
    easyref train --config stage1 --set data=pairs.json data_root=images
    easyref convert RELEASE_DIR_OR_FILE OUT_DIR
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path

from PIL import Image, PngImagePlugin, UnidentifiedImageError

logger = logging.getLogger("easyref")

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
DTYPES = ("auto", "float32", "float16", "bfloat16")


class UserError(Exception):
    """A mistake in what the user asked for: reported as one line, exit code 2."""


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
    p.add_argument("--out", type=Path, required=True, help="output PNG (with --num-images N: OUT_0.png ...)")
    p.add_argument("--base", help="SDXL folder or hub id ('default': the bundled model's, with its Qwen2-VL)")
    p.add_argument("--mllm", help="Qwen2-VL-Instruct folder or hub id (default: the checkpoint's)")
    p.add_argument("--adapter", help="EasyRef checkpoint folder (ours or the authors' release)")
    p.add_argument("--scale", type=float, default=1.0, help="reference strength (default 1.0)")
    p.add_argument("--steps", type=int, default=30, help="denoising steps (default 30)")
    p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale (default 5.0)")
    p.add_argument("--seed", type=int, help="random seed (default: random, recorded in the PNG)")
    p.add_argument("--num-images", type=int, default=1, help="images to generate (default 1)")
    p.add_argument("--height", type=int, help="output height in px (multiple of 8; default: the model's)")
    p.add_argument("--width", type=int, help="output width in px (multiple of 8; default: the model's)")
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
    references = [load_image(p) for p in paths]
    pipe, sources = load_pipeline(args)
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little") % 2**31
    import torch

    generator = torch.Generator("cpu").manual_seed(seed)
    try:
        result = pipe(
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


def _check_generate_args(args) -> None:
    if args.out.suffix.lower() != ".png":
        raise UserError(f"--out must end in .png, got {args.out}")
    for name in ("steps", "num_images"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and (value < 8 or value % 8):
            raise UserError(f"--{name} must be a positive multiple of 8, got {value}")
    if args.scale < 0:
        raise UserError("--scale must be >= 0")
    if (args.mllm or args.adapter) and not args.base:
        raise UserError("--base is required when --mllm or --adapter is given")


def reference_paths(refs: list[str], refs_dir: Path | None) -> list[Path]:
    paths = [Path(r) for r in refs]
    if refs_dir is not None:
        if not refs_dir.is_dir():
            raise UserError(f"--refs-dir {refs_dir} is not a folder")
        paths += sorted(p for p in refs_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise UserError("no reference images: give --ref IMAGE (repeatable) or --refs-dir DIR")
    return paths


def load_image(path: Path) -> Image.Image:
    """Open and fully decode an image; every way a file can be unusable is a UserError."""
    if not path.is_file():
        raise UserError(f"reference image not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()
                return im.copy()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UserError(f"{path} is too large (decompression bomb guard: > {Image.MAX_IMAGE_PIXELS} pixels)") from None
    except UnidentifiedImageError:
        raise UserError(f"{path} is not an image PIL can read") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise UserError(f"{path} is damaged or truncated ({err})") from None


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
def output_paths(out: Path, count: int) -> list[Path]:
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(count)]


def write_outputs(images, references, out: Path, params: dict, grid: bool) -> list[Path]:
    """Every file is written to a temporary name first and renamed, so no partial PNG is ever left."""
    out.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for index, (image, path) in enumerate(zip(images, output_paths(out, len(images)))):
        save_png(image, path, {**params, "index": index, "width": image.width, "height": image.height})
        written.append(path)
    if grid:
        path = out.with_name(f"{out.stem}_grid{out.suffix}")
        save_png(contact_sheet(references, images), path, params)
        written.append(path)
    return written


def save_png(image: Image.Image, path: Path, params: dict) -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("easyref", json.dumps(params, sort_keys=True))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        image.save(tmp, format="PNG", pnginfo=info)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get ordinary permissions
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def contact_sheet(references, outputs, cell: int | None = None) -> Image.Image:
    """References in the top row, generated images in the bottom row, all as square cells."""
    cell = cell or max(im.width for im in outputs)
    cols = max(len(references), len(outputs))
    sheet = Image.new("RGB", (cols * cell, 2 * cell), "white")
    for row, images in enumerate((references, outputs)):
        for col, image in enumerate(images):
            thumb = image.convert("RGB")
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


if __name__ == "__main__":
    raise SystemExit(main())
