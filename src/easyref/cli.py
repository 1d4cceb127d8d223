"""`easyref` command line: generate, info, train, convert, bench.

    easyref generate --ref a.png --ref b.png --prompt "..." --out out.png
    easyref generate --from-metadata out.png --out again.png
    easyref serve [--port 7860]          (a web page; needs the `ui` extra)
    easyref info [MODEL]
    easyref train --config stage1 --set data=pairs.json data_root=images
    easyref convert RELEASE_DIR_OR_FILE OUT_DIR
    easyref --version

Building the parser and checking arguments and files import the standard library and PIL only:
torch, diffusers and transformers (seconds to import) load after a command's checks have passed,
so a mistake is reported at once.
"""

from __future__ import annotations

import argparse
import errno
import importlib.abc
import importlib.util
import json
import logging
import os
import re
import signal
import sys
import tempfile
import unicodedata
import warnings
from pathlib import Path

from PIL import Image

from .devices import DTYPE_NAMES
from .errors import RunFailure, UserError, one_line
from .generation import (
    GENERATE_DEFAULTS,
    MODEL_FLAGS,
    SCHEDULERS,
    check_generate_args,
    check_request_fits_model,
    check_text,
    file_sha256,
    generation_record,
    planned_outputs,
    run_pipeline,
    warn_about_dtype,
    warn_about_limits,
    write_outputs,
)
from .limits import MAX_REFERENCES, check_range
from .safe_io import describe_os_error

logger = logging.getLogger("easyref")

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
DTYPES = DTYPE_NAMES


# ---------------------------------------------------------------------------- parser
class Parser(argparse.ArgumentParser):
    """argparse with the house rule for mistakes: one `easyref: error:` line and exit code 2 (argparse
    itself prints the whole usage block first); subcommands' parsers are of this class too."""

    def error(self, message: str):
        self.exit(2, f"easyref: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__  # the package is imported already: no torch, no metadata scan
    from .train.command import add_train_parser

    parser = Parser(prog="easyref", description="EasyRef: group image reference for SDXL.")
    parser.add_argument("--version", action="version", version=f"easyref {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_serve(sub)
    _add_info(sub)
    _add_convert(sub)
    add_train_parser(sub)
    _add_bench(sub)
    _add_verbose(parser)
    return parser


VERBOSE_HELP = "-v: also show the libraries' warnings and loading bars (hidden by default); -vv: their info lines too"


def _add_verbose(parser: argparse.ArgumentParser, top: bool = True) -> None:
    """-v/--verbose before or after the subcommand: the subcommands' copies default to SUPPRESS so that
    they do not reset a -v given before them."""
    parser.add_argument("-v", "--verbose", action="count", help=VERBOSE_HELP, default=0 if top else argparse.SUPPRESS)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in {id(c): c for c in action.choices.values()}.values():  # aliases share a parser
                _add_verbose(child, top=False)


def _add_bench(sub) -> None:
    from .bench.command import add_bench_parsers
    from .bench.shapes_command import add_shapes_parser

    p = sub.add_parser(
        "bench",
        help="benchmarks of reference-conditioned generation",
        description="MRBench-style benchmarks: `run`/`score`/`convert` for real models, "
        "`shapes` for the miniature one on the synthetic shapes world.",
    )
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
    # Settings default to None here and get their defaults in `_settle_defaults`: with --from-metadata
    # a flag that was given overrides the record, and one that was not takes the record's value.
    p.add_argument("--ref", action="append", default=[], metavar="IMAGE", help="a reference image (repeatable)")
    p.add_argument("--refs-dir", type=Path, help="use every image file in this folder (sorted by name)")
    p.add_argument("--prompt", help="text prompt (required, unless --from-metadata gives it)")
    p.add_argument("--negative-prompt", help="negative text prompt (default: the checkpoint's)")
    p.add_argument(
        "--out",
        type=Path,
        help="output PNG (with --num-images N: OUT_0.png ...); existing outputs are "
        "replaced, a name that is one of the references is refused (required, unless --from-metadata: "
        "default SOURCE-regen.png beside it)",
    )
    p.add_argument(
        "--from-metadata",
        type=Path,
        metavar="PNG",
        help="regenerate the image of a PNG this command wrote, from the settings, references and model "
        "recorded in it (the same pixels on the same machine and versions); flags given override them",
    )
    add_model_options(p)
    p.add_argument("--scale", type=float, help="reference strength, 0 to 10 (default 1.0)")
    p.add_argument("--steps", type=int, help="denoising steps, 1 to 1000 (default 30)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale, 0 to 100 (default 5.0)")
    p.add_argument("--seed", type=int, help="random seed, 0 to 2^63-1 (default: random, recorded in the PNG)")
    p.add_argument("--num-images", type=int, help="images to generate, 1 to 16 (default 1)")
    p.add_argument("--height", type=int, help="output height in px (multiple of 8, at most 4096; default: the model's)")
    p.add_argument("--width", type=int, help="output width in px (multiple of 8, at most 4096; default: the model's)")
    p.add_argument(
        "--scheduler",
        choices=list(SCHEDULERS),
        help="the sampler: the model's own (default), or diffusers' Euler, Euler ancestral, DPM++ 2M, DDIM or "
        "UniPC made from its config (recorded in the PNG)",
    )
    add_device_options(p)
    p.add_argument("--grid", action="store_true", help="also write OUT_grid.png: references on top, outputs below")
    p.add_argument(
        "--explain",
        action="store_true",
        help="also write OUT_explain.png: each reference with where the reference tokens looked "
        "in it, and its share of their attention",
    )
    p.set_defaults(func=cmd_generate)


def add_model_options(p) -> None:
    p.add_argument(
        "--base",
        help="SDXL folder or hub id (default: the adapter's; 'default': the bundled model's, with its Qwen2-VL)",
    )
    p.add_argument("--mllm", help="Qwen2-VL-Instruct folder or hub id (default: the checkpoint's)")
    p.add_argument(
        "--adapter",
        help="EasyRef checkpoint: a folder of ours, the authors' release file or folder, "
        "or a hub id (zongzhuofan/EasyRef); alone, it brings the base and MLLM it records",
    )


def add_device_options(p) -> None:
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument(
        "--dtype", choices=DTYPES, help="default: bfloat16 on a GPU (float16 where it lacks bfloat16), float32 on CPU"
    )


def _add_serve(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="a web page for generation (gradio; pip install 'easyref[ui]')",
        description="Serve a web page: drop reference images, type a prompt, generate, and see what the reference "
        "tokens took from each reference. One generation runs at a time; later requests wait in a queue that "
        "shows their place, and a cancelled one stops at its next step. Each image downloads as the same PNG, "
        "settings recorded, that `generate` writes. The page serves only the files its requests made (their "
        "images and explain sheets, linked into a private temporary folder) and the examples row's images: "
        "nothing else under --out-dir, whatever else is put there. Needs the `ui` extra: pip install 'easyref[ui]'.",
    )
    add_model_options(p)
    add_device_options(p)
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: every network)",
    )
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    p.add_argument(
        "--out-dir",
        type=Path,
        help="keep every generated PNG here, a folder per request (default: a temporary folder, "
        "removed when the server stops)",
    )
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    if importlib.util.find_spec("gradio") is None:
        raise UserError("easyref serve needs gradio: pip install 'easyref[ui]' (or pip install -e '.[ui]' in a clone)")
    check_range("--port", args.port, 1, 65535)
    _check_port_free(args.host, args.port)
    if args.out_dir is not None:
        _check_writable_folder(args.out_dir)
    args.device = args.device or GENERATE_DEFAULTS["device"]
    args.dtype = args.dtype or GENERATE_DEFAULTS["dtype"]
    # SIGTERM stops a server as Ctrl+C does, from the first moment: while the model loads, exit 0. SIGINT is
    # set too: a process started in the background by a script inherits it ignored
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _raise_keyboard_interrupt)
    try:
        pipe, parts = load_pipeline(args)  # a wrong model name is one line before gradio loads
        from .serve import serve

        return serve(pipe, parts, args)
    except KeyboardInterrupt:  # before the page was up (serve handles it from then on)
        logger.info("stopped before serving")
        return 0


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def _check_port_free(host: str, port: int) -> None:
    """Before the model loads: a taken port or an address this machine does not have is one line."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise UserError(f"--host {host!r} is not an address or name this machine can resolve") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no conflict
        try:
            probe.bind(address)
        except OSError as err:
            raise UserError(
                f"cannot listen on {host}:{port} ({describe_os_error(err)}); choose another --port or --host"
            ) from None


def _add_info(sub) -> None:
    p = sub.add_parser(
        "info",
        help="what a model folder is: parts, trained size, vocabulary, parameters, files",
        description="Describe a model without loading it: the bundled default model (no MODEL, or `default`), "
        "a folder holding sdxl/ + qwen2vl/ + adapter/, an EasyRef adapter folder, an SDXL folder or a Qwen2-VL "
        "folder (or the hub id of one in the local Hugging Face cache). Parameter counts come from the "
        "safetensors headers.",
    )
    p.add_argument("model", nargs="?", metavar="MODEL", help="default: the bundled model")
    p.set_defaults(func=cmd_info)


def cmd_info(args) -> int:
    from .info import NotAModelError, describe

    try:
        lines = describe(args.model)
    except NotAModelError as err:
        raise UserError(str(err)) from None
    print("\n".join(lines))
    return 0


def _add_convert(sub) -> None:
    from .release import RELEASE_BASE, RELEASE_MLLM, RELEASE_REPO

    p = sub.add_parser(
        "convert",
        help="convert the authors' release checkpoint to an easyref checkpoint folder",
        description="Convert the authors' release file (model.safetensors, or a .bin/.pt read with "
        "weights_only=True) into easyref_config.json + easyref.safetensors.",
    )
    p.add_argument("src", help=f"release file, folder holding model.safetensors, or hub id ({RELEASE_REPO})")
    p.add_argument("dst", type=Path, help="output folder")
    p.add_argument(
        "--base",
        default=RELEASE_BASE,
        help="SDXL base the checkpoint was trained on, recorded in the output (default: %(default)s)",
    )
    p.add_argument(
        "--mllm",
        default=RELEASE_MLLM,
        help="MLLM the checkpoint was trained on, recorded in the output (default: %(default)s)",
    )
    p.add_argument(
        "--no-negative",
        dest="negative",
        action="store_false",
        help="do not compute the negative branch now (by default it is, where the MLLM is on this machine, on "
        "--device/--dtype, and stored beside the weights, so that generating skips that MLLM pass)",
    )
    add_device_options(p)
    p.set_defaults(func=cmd_convert)


# ---------------------------------------------------------------------------- generate
def cmd_generate(args) -> int:
    record = read_record(args.from_metadata) if args.from_metadata is not None else None
    if record is not None:
        apply_record(args, record)
    _settle_defaults(args)
    check_generate_args(args)
    paths = reference_paths(args.ref, args.refs_dir)
    keep = getattr(args, "keep_index", None)  # --from-metadata of image i of a batch: make the batch, keep i
    outputs = planned_outputs(args.out, args.num_images if keep is None else 1, args.grid, args.explain)
    if record is not None:
        _check_not_the_source(outputs, args.from_metadata)
    check_outputs(outputs, inputs=paths)
    references = load_images(paths)  # every header within the bounds before the first image decodes
    if record is not None:
        _warn_if_references_changed(args, record, paths)
    pipe, parts = load_pipeline(args, references=len(paths))
    sources = parts.names()
    pipe.set_progress_bar_config(disable=None)  # tqdm's own rule: the denoising bar on a terminal, not in logs
    warn_about_limits(pipe, args, sources)
    warn_about_dtype(pipe)
    if record is not None:
        _warn_if_changed(record, sources, args.from_metadata)
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little") % 2**31
    result = run_pipeline(pipe, references, args, seed)
    images, indices = list(result.images), list(range(len(result.images)))
    if keep is not None:
        images, indices = [images[keep]], [keep]
    params = generation_record(args, pipe, parts, paths, seed)
    explained = None
    if args.explain:
        from .explain import explain_sheet

        explained = explain_sheet(references, result.reference_maps[0])
    written = write_outputs(images, references, args.out, params, args.grid, indices, explained)
    for path in written:
        logger.info("wrote %s", path)
    return 0


def _settle_defaults(args) -> None:
    for key, value in GENERATE_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


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


def load_images(paths: list[Path]) -> list[Image.Image]:
    """The references as one group (`images.open_images`: every size checked before any decoding)."""
    from .images import ImageFileError, open_images

    try:
        return open_images(paths)
    except ImageFileError as err:
        raise UserError(str(err)) from None


def resolve_device(args):
    from .devices import DeviceError, resolve_device_dtype

    try:
        return resolve_device_dtype(args.device, args.dtype)
    except DeviceError as err:
        raise UserError(f"{_device_label(args, '--device/--dtype')}: {err}") from None


def _device_label(args, flag: str = "--device") -> str:
    """Who named the device: a record (say so, and how to make it here instead) or the flag."""
    if getattr(args, "device_from_record", False):
        return f"{args.from_metadata} was made on device {args.device} (add --device cpu to make it here)"
    return flag


def load_pipeline(args, references: int | None = None):
    """Resolve --base/--mllm/--adapter, then load; every way a name or checkpoint can be wrong is one line.
    `references`: the group's size, checked with --prompt against the model's files before its weights load
    (`generation.check_request_fits_model`: seconds for the bundled model, minutes for a real one)."""
    parts = resolve_model(args)
    if references is not None:
        check_request_fits_model(parts, args.prompt, references)
    return load_model(args, parts)


def resolve_model(args):
    """--base/--mllm/--adapter as `easyref.resolve.Parts` (what is not given comes from the adapter's config,
    else the bundled model), and the device's name: checked before torch and diffusers load."""
    from .checkpoint import CheckpointError
    from .devices import DeviceError, check_device_name
    from .resolve import CLI_LABELS, ResolveError, resolve_parts

    try:
        check_device_name(args.device)
        return resolve_parts(args.base, args.mllm, args.adapter, labels=CLI_LABELS)
    except (ResolveError, CheckpointError) as err:
        raise UserError(str(err)) from None
    except DeviceError as err:
        raise UserError(f"{_device_label(args)}: {err}") from None


def load_model(args, parts):
    """The resolved parts' weights on the asked device and dtype (torch, diffusers and transformers load here)."""
    from .checkpoint import CheckpointError, negative_store_for

    device, dtype = resolve_device(args)
    from .pipeline import EasyRefPipeline

    if parts.bundled_adapter:
        from .bundled import NOTICE

        logger.warning(NOTICE)
    try:
        pipe = EasyRefPipeline.from_parts(parts, dtype=dtype)
    except CheckpointError as err:
        raise UserError(str(err)) from None
    except (OSError, ValueError) as err:  # a folder that holds part of a model, a class its library lacks
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot load the model: {first_line}") from None
    pipe.negative_store = negative_store_for(parts)  # the negative branch stored with the adapter
    pipe.to(device)  # channels-last too where that is the CPU's fast layout (`pipeline.prefer_fast_layout`)
    return pipe, parts


def _check_local(value: str, flag: str, kind: str = "model") -> str:
    """The local path a flag's value names (`default`, a folder or file, a cached or downloaded hub id),
    or a UserError before anything loads."""
    from .resolve import ResolveError, resolve

    try:
        return resolve(value, kind, label=f"{flag} {value}".strip()).path
    except ResolveError as err:
        raise UserError(str(err)) from None


# ---------------------------------------------------------------------------- records (PNG metadata)
# The `easyref` text chunk of every PNG holds what made it; `--from-metadata` makes it again. One torch
# generator draws the noise of the whole batch, so image i of --num-images N depends on N: the record
# keeps num_images and index, and regenerating image i makes the batch again and keeps image i.
RECORD_TYPES = {
    "version": str,
    "prompt": str,
    "negative_prompt": str,
    "references": list,
    "scale": (int, float),
    "steps": int,
    "guidance": (int, float),
    "scheduler": str,
    "seed": int,
    "num_images": int,
    "index": int,
    "height": int,
    "width": int,
    "device": str,
    "dtype": str,
    "model": dict,
    "grid": bool,
    "explain": bool,
    "versions": dict,
    "reference_sha256": list,
}
SHA256 = re.compile(r"[0-9a-f]{64}")
RECORD_REQUIRED = ("version", "prompt", "references", "scale", "steps", "guidance", "seed", "num_images")
RECORDED_SETTINGS = (
    "prompt",
    "negative_prompt",
    "scale",
    "steps",
    "guidance",
    "scheduler",  # a record written before it existed: the model's own (`default`), as then
    "seed",
    "num_images",
    "height",
    "width",
    "device",
    "dtype",
)


def read_record(path: Path) -> dict:
    """The `easyref` record of a PNG that `easyref generate` wrote; one UserError for each way it can be unusable."""
    flag = f"--from-metadata {path}"
    if not path.exists():
        raise UserError(f"{flag}: file not found")
    if not path.is_file():  # a folder, or a FIFO that would block
        raise UserError(f"{flag}: not a regular file")
    try:
        with Image.open(path) as image:
            text = image.info.get("easyref")  # written before the pixels: no decoding needed
    except ValueError as err:
        if "too large" in str(err).lower() or "too much memory" in str(err).lower():  # PIL's text-chunk bounds
            raise UserError(f"{flag}: its text chunks are larger than PIL reads ({err}); not a record") from None
        raise UserError(f"{flag}: not an image PIL can read") from None
    except (OSError, SyntaxError, Image.DecompressionBombError):
        raise UserError(f"{flag}: not an image PIL can read") from None
    if not isinstance(text, str):
        raise UserError(f"{flag}: no easyref record in it (not a PNG written by `easyref generate`)")
    try:
        record = json.loads(text)
    except (ValueError, RecursionError):
        record = None
    if not isinstance(record, dict):
        raise UserError(f"{flag}: its easyref record is not a JSON object (damaged)")
    _check_record(record, flag)
    return record


def _check_record(record: dict, flag: str) -> None:
    missing = [key for key in RECORD_REQUIRED if key not in record]
    if missing:
        raise UserError(
            f"{flag}: the record lacks {', '.join(missing)} (written by an easyref before "
            "--from-metadata existed?); give the settings as flags instead"
        )
    for key, kind in RECORD_TYPES.items():
        value = record.get(key)
        if value is not None and (not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool)):
            raise UserError(f"{flag}: the record's {key} is not a {_kind_name(kind)} (damaged)")
    if not all(_plain_text(r) and r for r in record["references"]):
        raise UserError(f"{flag}: the record's references are not file names (damaged)")
    digests = record.get("reference_sha256")
    well_formed = digests is None or all(isinstance(d, str) and SHA256.fullmatch(d) for d in digests)
    if not well_formed or (digests is not None and len(digests) != len(record["references"])):
        raise UserError(f"{flag}: the record's reference_sha256 is not one digest per reference (damaged)")
    for key in ("prompt", "negative_prompt"):
        if isinstance(record.get(key), str):
            check_text(f"{flag}: the record's {key}", record[key])
    if not all(v is None or _plain_text(v) for v in (record.get("model") or {}).values()):
        raise UserError(f"{flag}: the record's model names are not text (damaged)")
    if record.get("device") is not None and not _plain_text(record["device"]):
        raise UserError(f"{flag}: the record's device is not a device name (damaged)")
    index = record.get("index")
    if index is not None and not 0 <= index < record["num_images"]:
        raise UserError(f"{flag}: the record's index {index} is not one of its {record['num_images']} images (damaged)")
    if record.get("scheduler") is not None and record["scheduler"] not in SCHEDULERS:
        raise UserError(
            f"{flag}: the record's scheduler {record['scheduler']!r} is not one of {', '.join(SCHEDULERS)} (damaged)"
        )
    if record.get("dtype") is not None and record["dtype"] not in DTYPES:
        raise UserError(f"{flag}: the record's dtype {record['dtype']!r} is not one of {', '.join(DTYPES)} (damaged)")


def _plain_text(value) -> bool:
    """Text that can name a file on one line: no control characters (a newline, a terminal escape), no
    NUL, no lone surrogates (which no file system name encodes to)."""
    return isinstance(value, str) and not any(unicodedata.category(c) in ("Cc", "Cs") for c in value)


def _kind_name(kind) -> str:
    return {str: "text", list: "list", int: "whole number", dict: "mapping", bool: "true/false"}.get(kind, "number")


def apply_record(args, record: dict) -> None:
    """The record fills what the command line did not give (flags given win)."""
    given = {key for key in RECORDED_SETTINGS if getattr(args, key) is not None}
    for key in RECORDED_SETTINGS:
        if key not in given and record.get(key) is not None:
            setattr(args, key, record[key])
    if not args.ref and args.refs_dir is None:
        args.ref = list(record["references"])
    model = record.get("model") or {}
    for flag in MODEL_FLAGS:
        if getattr(args, flag) is None:
            setattr(args, flag, model.get(flag))
    if args.out is None:
        args.out = args.from_metadata.with_name(f"{args.from_metadata.stem}-regen.png")
    args.grid = args.grid or bool(record.get("grid"))
    args.explain = args.explain or bool(record.get("explain"))
    index = record.get("index")
    # one image of a batch: the batch again (its noise is drawn as one), then that image alone
    args.keep_index = index if index is not None and "num_images" not in given and args.num_images > 1 else None
    args.device_from_record = "device" not in given and record.get("device") is not None


def _warn_if_references_changed(args, record: dict, paths: list[Path]) -> None:
    """A recorded reference edited since (same name, other bytes) makes other pixels: say which."""
    digests = record.get("reference_sha256")
    if digests is None or [str(p) for p in paths] != list(record["references"]):
        return  # an older record, or references given on the command line
    for path, digest in zip(paths, digests):
        if file_sha256(path) != digest:
            logger.warning(
                "%s has changed since %s was made (its SHA-256 differs); the pixels will differ",
                path,
                args.from_metadata,
            )


def _check_not_the_source(outputs: list[Path], source: Path) -> None:
    for path in outputs:
        if _same_file(path, source):
            raise UserError(f"output {path} would overwrite --from-metadata {source}; choose another --out")


def _warn_if_changed(record: dict, sources, source: Path) -> None:
    """The same record on other versions or another model may not give the same pixels: say which changed."""
    from .info import environment

    now = environment()
    then = {"easyref": record.get("version"), **(record.get("versions") or {})}
    changed = [f"{k} {then.get(k)} -> {v}" for k, v in now.items() if then.get(k) != v]
    if changed:
        logger.warning("%s was made with other versions (%s); the pixels may differ", source, ", ".join(changed))
    resolved = json.loads(json.dumps(sources, default=str))
    if "sources" in record and record["sources"] != resolved:
        logger.warning(
            "%s was made with the model %s, now it is %s; the pixels may differ",
            source,
            json.dumps(record["sources"]),
            json.dumps(resolved),
        )


# ---------------------------------------------------------------------------- outputs
# A path that is one of the inputs (by name, symlink or hard link) is refused before any work,
# whichever derived name (OUT_0.png, OUT_grid.png, OUT_explain.png) hits it.
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


# ---------------------------------------------------------------------------- convert
def cmd_convert(args) -> int:
    """The release file, folder or hub id (`zongzhuofan/EasyRef`) -> our checkpoint folder recording
    the release's base and MLLM (`--base`/`--mllm` for a release trained on other ones)."""
    from .checkpoint import CheckpointError
    from .release import convert_release, log_ignored

    source = _check_local(str(args.src), "", kind="adapter")
    _check_writable_folder(args.dst)  # before the release is read (seconds to minutes)
    placed = resolve_device(args) if args.negative else None  # a device that is not here: one line, first
    try:
        config, ignored = convert_release(source, args.dst, mllm=args.mllm, base=args.base)
    except CheckpointError as err:
        raise UserError(str(err)) from None
    except OSError as err:  # the folder taken away or made unwritable since the check
        raise RunFailure(f"nothing was converted: {describe_os_error(err)}") from None
    log_ignored(ignored)
    logger.info(
        "wrote %s (tokens %d, LoRA rank %d, finetuned trunk: %s)",
        args.dst,
        config.num_reference_tokens,
        config.lora_rank,
        "yes" if config.has_trunk else "no",
    )
    if placed is not None:
        _store_converted_negative(args, *placed)
    return 0


def _store_converted_negative(args, device, dtype) -> None:
    """The converted model's negative branch, computed on the device and dtype `generate` would pick with the
    same --device/--dtype and stored beside its weights (`negative.safetensors`), so that generating skips an
    MLLM pass (78 s at real size on a CPU). The MLLM is read where it is on this machine, never downloaded for
    this; where it is not, or it cannot be loaded, one line says that the first generation computes it."""
    from .checkpoint import NEGATIVE_NAME, store_converted_negative
    from .resolve import ResolveError, resolve

    later = "the first generation computes and stores it"
    try:
        mllm = resolve(args.mllm, "mllm", label=f"--mllm {args.mllm}", local_files_only=True)
    except ResolveError as err:
        logger.info("negative branch not computed (%s); %s", err, later)
        return
    try:
        stored = store_converted_negative(args.dst, mllm.path, device, dtype)
    except (OSError, ValueError, RuntimeError) as err:  # the MLLM does not fit or load: generate will say so
        logger.info("negative branch not computed (%s); %s", one_line(str(err)), later)
        return
    if stored:
        logger.info("wrote %s (the negative branch, %s on %s)", args.dst / NEGATIVE_NAME, dtype, device.type)


# ---------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_output(args.verbose)
    try:
        return args.func(args)
    except UserError as err:
        print(f"easyref: error: {one_line(str(err))}", file=sys.stderr)
        return 2
    except RunFailure as err:
        print(f"easyref: error: {one_line(str(err))}", file=sys.stderr)
        return 1
    except OSError as err:
        if err.errno != errno.ENAMETOOLONG:
            raise
        # any path flag (--out, --refs-dir, --config, a model folder...): the system refuses the name itself
        print(f"easyref: error: {_too_long(err.filename)}", file=sys.stderr)
        return 2


def _too_long(name) -> str:
    name = os.fsdecode(name) if name is not None else "a path given"
    shown = name if len(name) <= 80 else f"{name[:60]}...{name[-12:]}"
    return f"file name too long: {shown} (a part of a path may hold at most 255 bytes)"


# ---------------------------------------------------------------------------- what reaches the terminal
def configure_output(verbose: int) -> None:
    """easyref's own lines always; the libraries' warnings and loading bars with -v, their info with -vv.

    Nothing is imported here: transformers and diffusers are configured the moment something imports
    them (`_after_import`), so a command that never loads a model never pays for them.
    """
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")  # loading a model must not report to the hub
    _configure_logging(verbose)
    _configure_warnings(verbose)
    for name in ("transformers.utils.logging", "diffusers.utils.logging"):
        _after_import(name, lambda module: _set_library_output(module, verbose))


class _Prefixed(logging.Formatter):
    """`easyref: message` for our lines; another library's lines (with -v) keep its name."""

    def format(self, record: logging.LogRecord) -> str:
        record.prefix = "easyref" if record.name.partition(".")[0] == "easyref" else record.name
        return super().format(record)


_HANDLER: logging.Handler | None = None  # ours, once main() has put it on the root logger


def _configure_logging(verbose: int) -> None:
    global _HANDLER
    root = logging.getLogger()
    if root.handlers and root.handlers != [_HANDLER]:
        return  # embedded (pytest, a notebook, accelerate): the host's handlers stand, and no line is doubled
    if not root.handlers:
        _HANDLER = logging.StreamHandler()  # sys.stderr as it is now
        _HANDLER.setFormatter(_Prefixed("%(prefix)s: %(message)s"))
        root.addHandler(_HANDLER)
    # our loggers at INFO; other libraries' propagating loggers (accelerate, huggingface_hub) with -v only
    root.setLevel({0: logging.ERROR, 1: logging.WARNING}.get(verbose, logging.INFO))
    logging.getLogger("easyref").setLevel(logging.INFO)


def _configure_warnings(verbose: int) -> None:
    if verbose:
        warnings.simplefilter("default")  # each library warning once per place, deprecations included
    else:  # libraries' warnings speak to their developers; a user sees easyref's own
        warnings.filterwarnings("ignore")
        warnings.filterwarnings("default", module=r"easyref(\.|$)")


def _set_library_output(module, verbose: int) -> None:
    """transformers' or diffusers' logging module: their log level, and their loading/download bars."""
    if verbose:
        module.set_verbosity_info() if verbose > 1 else module.set_verbosity_warning()
        module.enable_progress_bar()
    else:
        module.set_verbosity_error()
        module.disable_progress_bar()  # transformers' also turns off huggingface_hub's bars, as before


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs `hooks[name](module)` right after `name` is first imported, whoever imports it: a library can
    be configured without importing it before it is needed (seconds, for torch behind it)."""

    def __init__(self) -> None:
        self.hooks: dict = {}

    def find_spec(self, name, path=None, target=None):
        hook = self.hooks.pop(name, None)
        if hook is None:
            return None
        spec = importlib.util.find_spec(name)  # the other finders (this one has no hook for `name` now)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            try:
                hook(module)
            except Exception:  # configuring output must never break an import
                logger.debug("could not configure %s", name, exc_info=True)

        spec.loader.exec_module = exec_module  # this spec's own loader instance
        return spec


_AFTER_IMPORT = _AfterImport()


def _after_import(name: str, hook) -> None:
    module = sys.modules.get(name)
    if module is not None:
        hook(module)
        return
    _AFTER_IMPORT.hooks[name] = hook
    if _AFTER_IMPORT not in sys.meta_path:
        sys.meta_path.insert(0, _AFTER_IMPORT)


if __name__ == "__main__":
    raise SystemExit(main())
