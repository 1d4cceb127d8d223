"""One generation request, as every front end makes it (`easyref generate`, `easyref serve`): its
checks, the run, the record written into each PNG, and the outputs, written all or none.

Only the standard library and PIL at import: torch and the model libraries load inside the calls.
"""

from __future__ import annotations

import hashlib
import logging
import os
from contextlib import contextmanager
from pathlib import Path

from .errors import RunFailure, UserError
from .images import contact_sheet, stage_png
from .limits import (
    MAX_BATCH_PIXELS,
    MAX_GUIDANCE,
    MAX_IMAGES,
    MAX_PIXELS,
    MAX_PROMPT_CHARS,
    MAX_SCALE,
    MAX_SEED,
    MAX_SIDE,
    MAX_STEPS,
    check_finite_range,
    check_range,
)
from .safe_io import describe_os_error

logger = logging.getLogger("easyref")

GENERATE_DEFAULTS = {
    "scale": 1.0,
    "steps": 30,
    "guidance": 5.0,
    "num_images": 1,
    "device": "auto",
    "dtype": "auto",
    "scheduler": "default",
}
# `generate --scheduler` and the page's choice -> diffusers' class, made from the model's own scheduler's
# config for one run (`default`: the model's own, as its files configure it), diffusers' defaults filling
# what that config leaves out. DPM++ 2M is DPMSolverMultistepScheduler as it comes (`dpmsolver++`, second
# order, lower order on the last steps of a short run): what diffusers recommends for guided sampling.
SCHEDULERS = {
    "default": None,
    "euler": "EulerDiscreteScheduler",
    "euler-ancestral": "EulerAncestralDiscreteScheduler",
    "dpm++2m": "DPMSolverMultistepScheduler",
    "ddim": "DDIMScheduler",
    "unipc": "UniPCMultistepScheduler",
}


def run_pipeline(pipe, references, args, seed: int, **pipeline_kwargs):
    """One generation with `generate`'s settings; `pipeline_kwargs` go to diffusers (a step callback)."""
    import torch

    from .pipeline import NonFiniteOutputError

    generator = torch.Generator("cpu").manual_seed(seed)
    try:
        with scheduler_swapped(pipe, args.scheduler):
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
                return_reference_maps=args.explain,
                **pipeline_kwargs,
            )
    except ValueError as err:
        raise UserError(str(err)) from None
    except NonFiniteOutputError as err:
        raise RunFailure(str(err)) from None


@contextmanager
def scheduler_swapped(pipe, name: str):
    """The pipeline with the scheduler `name` (a key of SCHEDULERS) for the block, the model's own back
    afterwards: a long-lived pipeline (the page's) runs each request with the one it asks for."""
    own = pipe.scheduler
    chosen = make_scheduler(name, own)
    if chosen is None:
        yield
        return
    pipe.scheduler = chosen
    try:
        yield
    finally:
        pipe.scheduler = own


def make_scheduler(name: str, own):
    """The scheduler `name` asks for, made from the config of `own` (the model's) as diffusers swaps them;
    None where that is `own` itself (`default`, or a choice of its own class)."""
    check_scheduler(name)
    if SCHEDULERS[name] in (None, type(own).__name__):
        return None
    import diffusers

    return getattr(diffusers, SCHEDULERS[name]).from_config(own.config)


def check_scheduler(name) -> None:
    if name not in SCHEDULERS:
        raise UserError(f"--scheduler must be one of {', '.join(SCHEDULERS)}, got {name!r}")


def check_generate_args(args) -> None:
    from .config import MAX_PROMPT_TOKENS

    if args.prompt is None:
        raise UserError("--prompt is required (or --from-metadata PNG, to take it from an image easyref made)")
    if args.out is None:
        raise UserError("--out is required (the output PNG)")
    if args.out.suffix.lower() != ".png":
        raise UserError(f"--out must end in .png, got {args.out}")
    check_range("--steps", args.steps, 1, MAX_STEPS)
    check_range("--num-images", args.num_images, 1, MAX_IMAGES)
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
    check_finite_range("--guidance", args.guidance, 0.0, MAX_GUIDANCE)
    check_finite_range("--scale", args.scale, 0.0, MAX_SCALE)
    check_scheduler(args.scheduler)
    if args.seed is not None:
        check_range("--seed", args.seed, 0, MAX_SEED)
    for flag, text in (("--prompt", args.prompt), ("--negative-prompt", args.negative_prompt)):
        if text is not None and len(text) > MAX_PROMPT_CHARS:
            raise UserError(
                f"{flag} is {len(text)} characters long; at most {MAX_PROMPT_CHARS} characters "
                f"({MAX_PROMPT_TOKENS} tokens) are read"
            )
        if text is not None:
            check_text(flag, text)


def check_text(flag: str, text: str) -> None:
    """Text a tokenizer can read: Python hands undecodable command-line bytes over as lone surrogates
    (a prompt typed in Latin-1, say), and a JSON record or request can hold them or NUL too."""
    bad = next((c for c in text if "\ud800" <= c <= "\udfff" or c == "\0"), None)
    if bad == "\0":
        raise UserError(f"{flag} holds a NUL character")
    if bad is not None:
        byte = f" (byte 0x{ord(bad) - 0xDC00:02x})" if 0xDC80 <= ord(bad) <= 0xDCFF else ""
        raise UserError(f"{flag} is not valid UTF-8 text{byte}; is the terminal set to UTF-8 (e.g. LANG=C.UTF-8)?")


# ---------------------------------------------------------------------------- checks on the model's files
# What the model's small files decide (the adapter's config, the MLLM's tokenizer files) is checked before
# its weights load: seconds for the bundled model, minutes for a real one. The pipeline checks the same
# rules again (`EasyRefPipeline.check_inputs`, `prompting.check_prompt`): the Python API relies on them.
# The special-token fields of a tokenizer_config.json (`extra_special_tokens`: transformers 5's name).
SPECIAL_TOKEN_FIELDS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "pad_token",
    "additional_special_tokens",
    "extra_special_tokens",
)


def check_request_fits_model(parts, prompt: str, reference_count: int) -> None:
    """The group size and the prompt against the resolved model's files, without torch or transformers."""
    limit = max_references(parts)
    if reference_count > limit:
        raise UserError(
            f"{reference_count} reference images given; this model takes at most {limit} "
            "(max_references in its adapter's config)"
        )
    check_prompt_tokens("--prompt", prompt, Path(parts.mllm.path))


def max_references(parts) -> int:
    """The adapter's `max_references`; an adapter without our config (the release's file, or none: a
    reference path from random weights) gets the default that loading it gives it."""
    from .checkpoint import CheckpointError, is_easyref_checkpoint, read_config
    from .config import EasyRefConfig

    if parts.adapter is None or not is_easyref_checkpoint(parts.adapter.path):
        return EasyRefConfig.max_references
    try:
        return read_config(parts.adapter.path).max_references
    except CheckpointError as err:
        raise UserError(str(err)) from None


def check_prompt_tokens(flag: str, prompt: str, mllm: Path) -> None:
    """`prompting.check_prompt`'s rule, on the MLLM's tokenizer files: none of its control tokens (read as
    structure: `<|image_pad|>` would be an image slot without an image), at most MAX_PROMPT_TOKENS tokens.
    A folder whose tokenizer the `tokenizers` library cannot read is left to the pipeline's check."""
    from .config import MAX_PROMPT_TOKENS

    tokenizer = _file_tokenizer(mllm)
    if tokenizer is None:
        return
    found = sorted(t for t in control_tokens(tokenizer, mllm) if t and t in prompt)
    if found:
        raise UserError(f"{flag} contains the MLLM control token {found[0]!r}; remove it")
    count = len(tokenizer.encode(prompt, add_special_tokens=False).ids)
    if count > MAX_PROMPT_TOKENS:
        raise UserError(f"{flag} is {count} tokens long; at most {MAX_PROMPT_TOKENS} are allowed")


def _file_tokenizer(mllm: Path):
    """The MLLM's `tokenizer.json` through the `tokenizers` library (the fast tokenizer transformers builds
    from the same file, without importing transformers); None where there is none or it cannot be read."""
    path = mllm / "tokenizer.json"
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception:  # the library raises plain Exceptions; the loader will report the file in its own words
        logger.debug("cannot read %s ahead of loading", path, exc_info=True)
        return None


def control_tokens(tokenizer, mllm: Path) -> set[str]:
    """What the files make control tokens: tokenizer.json's added tokens and the special tokens
    tokenizer_config.json declares (`prompting.special_token_strings` of the tokenizer transformers loads)."""
    return {t.content for t in tokenizer.get_added_tokens_decoder().values()} | _configured_tokens(mllm)


def _configured_tokens(mllm: Path) -> set[str]:
    """The special tokens `tokenizer_config.json` declares (transformers adds them as control tokens on load)."""
    from .safe_io import JSONFileError, load_json

    try:
        config = load_json(mllm / "tokenizer_config.json", "tokenizer config")
    except JSONFileError:
        return set()
    if not isinstance(config, dict):
        return set()
    declared = [config.get(field) for field in SPECIAL_TOKEN_FIELDS]
    added = config.get("added_tokens_decoder")
    declared += list(added.values()) if isinstance(added, dict) else []
    return set(_token_strings(declared))


def _token_strings(values) -> list[str]:
    """Token strings from a config's values: a string, an AddedToken mapping (`content`), or a list of them."""
    items = [item for value in values for item in (value if isinstance(value, list) else [value])]
    return [item if isinstance(item, str) else item["content"] for item in items if _is_token(item)]


def _is_token(item) -> bool:
    return isinstance(item, str) or (isinstance(item, dict) and isinstance(item.get("content"), str))


# What a low-precision dtype costs on a CPU without fast kernels for it (`devices.cpu_has_fast_kernels`), measured
# after the fast path (channels-last convolutions, float32 decode) by `benchmarks/cpu_dtype.py`: float16 on a
# 2-core AVX-512 CPU without AVX-512-FP16, mid-size UNet at 256 px, per UNet call against float32 NCHW: 3.75
# times the CPU time on one thread, 2.1 times on two (a busy machine). Without channels-last it is 3.75 times
# at 64 px already and its VAE decode 143 times. bfloat16 on a CPU without AVX-512 takes the same fallback
# kernels. Where the kernels exist (bfloat16 with AVX-512) bfloat16 takes 0.45 of float32's time: no warning.
SLOW_DTYPE_COST = "a denoising step takes 2 to 4 times as long as in float32"


def warn_about_dtype(pipe) -> None:
    """One warning line where the pipeline's dtype is slower than float32 on its device: bfloat16 or float16
    on a CPU that has no fast (oneDNN) convolution kernels for it. Where it has them (bfloat16 with AVX-512),
    bfloat16 is faster than float32 and nothing is said."""
    from .devices import cpu_has_fast_kernels, is_low_precision

    device, dtype = pipe._execution_device, pipe.unet.dtype
    if device.type != "cpu" or not is_low_precision(dtype) or cpu_has_fast_kernels(dtype):
        return
    name = str(dtype).removeprefix("torch.")
    logger.warning(
        "--dtype %s is slower than float32 on this CPU (it has no fast %s kernels: %s); use --dtype float32",
        name,
        name,
        SLOW_DTYPE_COST,
    )


def warn_about_limits(pipe, args, sources: dict) -> None:
    """One warning line per thing the model will not follow, before it draws something else instead."""
    bundled = _uses_bundled_base(sources)
    for text in (args.prompt, args.negative_prompt):
        if text:
            _warn_about_words(pipe, text, bundled)
    if bundled:
        _warn_about_bundled_limits(pipe, args)


def _warn_about_words(pipe, text: str, bundled: bool) -> None:
    """Words the text encoders' tokenizers do not know (the bundled model's are word-level: 35 words),
    and the part of a prompt past what they read (diffusers says so only as a library warning)."""
    unknown, longest, limit = [], 0, None
    for tokenizer in (pipe.tokenizer, pipe.tokenizer_2):
        if tokenizer is None:
            continue
        try:
            encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        except (NotImplementedError, TypeError, ValueError):  # a slow tokenizer has no offsets: skip the check
            continue
        unk = tokenizer.unk_token_id
        unknown += [text[a:b] for t, (a, b) in zip(encoding["input_ids"], encoding["offset_mapping"]) if t == unk]
        longest, limit = max(longest, len(encoding["input_ids"])), tokenizer.model_max_length - 2  # start, end
    if unknown:
        words = ", ".join(repr(w) for w in dict.fromkeys(unknown))
        where = "; `easyref info` lists the words it knows" if bundled else ""
        logger.warning("the model's text encoders do not know %s (read as unknown tokens)%s", words, where)
    if limit is not None and longest > limit:
        logger.warning("%r is %d tokens long; the text encoders read the first %d", _short(text), longest, limit)


def _short(text: str, length: int = 60) -> str:
    return text if len(text) <= length else text[: length - 3] + "..."


def _uses_bundled_base(sources: dict) -> bool:
    from .bundled import is_bundled

    base = sources.get("base") if isinstance(sources, dict) else None
    if base is None:
        return False
    return str(base) == "default" or is_bundled(str(base))


def _warn_about_bundled_limits(pipe, args) -> None:
    """The bundled model saw 64 px images of the shapes world only: other sizes and backgrounds come out
    as what it knows (a blue background is drawn in one of its four background colours)."""
    import re

    from .bundled import trained_world
    from .pipeline import default_size

    side = default_size(pipe)
    height, width = args.height or side, args.width or side
    if (height, width) != (side, side):
        logger.warning(
            "the bundled model was trained at %d x %d px only; at %d x %d px (width x height) it draws "
            "outside what it learned",
            side,
            side,
            width,
            height,
        )
    backgrounds = trained_world()["backgrounds"]
    asked = [w for w in re.findall(r"(\w+)\s+background", args.prompt) if w not in backgrounds]
    if asked:
        logger.warning(
            "the bundled model knows the backgrounds %s only; %s will come out as one of them",
            ", ".join(backgrounds),
            ", ".join(f"'{w} background'" for w in dict.fromkeys(asked)),
        )


MODEL_FLAGS = ("base", "mllm", "adapter")


def generation_record(args, pipe, parts, paths: list[Path], seed: int) -> dict:
    """Everything `--from-metadata` needs to make the same pixels again, and what they came from."""
    from .info import package_version, package_versions

    negative = pipe.easyref_config.negative_prompt if args.negative_prompt is None else args.negative_prompt
    return {
        "version": package_version("easyref"),
        "versions": package_versions(),
        "prompt": args.prompt,
        "negative_prompt": negative,
        "references": [os.path.abspath(p) for p in paths],  # absolute: the record works from any folder
        "reference_sha256": [file_sha256(p) for p in paths],  # --from-metadata says when one has changed
        "scale": args.scale,
        "steps": args.steps,
        "guidance": args.guidance,
        "scheduler": args.scheduler,  # a name of SCHEDULERS: `default`, the model's own, is the model's to say
        "seed": seed,
        "num_images": args.num_images,
        "device": str(pipe.device),
        "dtype": str(pipe.dtype).removeprefix("torch."),
        "model": {flag: _recorded_name(getattr(args, flag)) for flag in MODEL_FLAGS},  # as asked: regenerates
        "sources": parts.names(),  # as resolved by load_pipeline: what the pixels came from
        "resolved": parts.record(),  # and where they were on this machine (absolute paths, hub commits)
    }


def file_sha256(path: Path) -> str:
    """The hex digest of a file's bytes, read in chunks (a reference may be a large photo)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _recorded_name(value: str | None) -> str | None:
    """A model flag as given, a local path made absolute (a hub id or `default` stays a name)."""
    if value is None:
        return None
    try:
        path = Path(value).expanduser()
        return str(path.absolute()) if path.exists() else value
    except (OSError, RuntimeError, ValueError):  # a name that cannot be a local path (an unknown ~user)
        return value


# Outputs that exist are replaced, as diffusers' `image.save` and ImageMagick do (`cli.check_outputs`
# refuses, before any work, a derived name that is one of the inputs).
def output_paths(out: Path, count: int) -> list[Path]:
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(count)]


def grid_path(out: Path) -> Path:
    return out.with_name(f"{out.stem}_grid{out.suffix}")


def explain_path(out: Path) -> Path:
    return out.with_name(f"{out.stem}_explain{out.suffix}")


def planned_outputs(out: Path, count: int, grid: bool, explain: bool = False) -> list[Path]:
    return output_paths(out, count) + ([grid_path(out)] if grid else []) + ([explain_path(out)] if explain else [])


def write_outputs(
    images, references, out: Path, params: dict, grid: bool, indices: list[int] | None = None, explained=None
) -> list[Path]:
    """All outputs or none: every file is written to a temporary name first, then all are renamed.

    `indices`: each image's place in its batch (recorded: regenerating image i makes the batch again).
    `explained`: the reference-attention sheet, written as OUT_explain.png.
    """
    indices = list(range(len(images))) if indices is None else indices
    planned = [
        (image, path, {**params, "index": i, "width": image.width, "height": image.height})
        for i, image, path in zip(indices, images, output_paths(out, len(images)))
    ]
    if grid:
        size = {"width": images[0].width, "height": images[0].height}
        sheet = {**params, **size, "grid": True}
        if len(indices) == 1 and params.get("num_images", 1) > 1:
            sheet["index"] = indices[0]  # the sheet of one image of a batch (--from-metadata of image i)
        planned.append((contact_sheet(references, images), grid_path(out), sheet))
    if explained is not None:
        planned.append((explained, explain_path(out), {**params, "explain": True}))
    staged: list[tuple[str, Path]] = []
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        for image, path, info in planned:
            staged.append((stage_png(image, path, info), path))
        for tmp, path in staged:
            os.replace(tmp, path)
    except OSError as err:
        raise RunFailure(f"no image was written: {describe_os_error(err)}") from None
    finally:
        for tmp, _ in staged:
            Path(tmp).unlink(missing_ok=True)
    return [path for _, path, _ in planned]
