"""`easyref bench run | score | convert`: MRBench-style evaluation of real models.

easyref bench convert folders GROUPS_DIR OUT.jsonl           # one folder per group + prompts.txt
easyref bench convert coco captions_val2017.json val2017/ OUT.jsonl --limit 1000
easyref bench run --manifest M.jsonl --method easyref --adapter CKPT --out runs/er   # CKPT names its base, MLLM
easyref bench run --manifest M.jsonl --method ip-adapter-mean --base SDXL --out runs/ipa-mean
easyref bench score --manifest M.jsonl --images OTHER_TOOL_OUT --out runs/other
easyref bench table runs/er runs/ipa-mean runs/other                # the methods side by side
accelerate launch -m easyref bench run ...                    # one share of the groups per process
"""

from __future__ import annotations

import errno
import logging
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger("easyref")


def add_bench_parsers(bench_sub) -> None:
    _add_run(bench_sub)
    _add_score(bench_sub)
    _add_table(bench_sub)
    _add_convert(bench_sub)


def _add_manifest_args(p) -> None:
    p.add_argument("--manifest", type=Path, required=True, help="JSON Lines of groups (see README: MRBench format)")
    p.add_argument("--root", type=Path, help="folder the manifest's paths are relative to (default: its folder)")
    p.add_argument("--allow-outside-root", action="store_true", help="let manifest paths leave --root")
    p.add_argument("--split", choices=("held-in", "held-out"), help="only this split")
    p.add_argument("--limit", type=int, help="only the first N groups (after --split)")
    p.add_argument("--out", type=Path, required=True, help="run folder (created; an existing one is resumed)")


def _add_metric_args(p) -> None:
    from . import DEFAULT_CLIP, DEFAULT_DINO

    p.add_argument(
        "--clip", default=DEFAULT_CLIP, help=f"CLIP model folder or hub id for CLIP-I/CLIP-T (default {DEFAULT_CLIP})"
    )
    p.add_argument(
        "--dino", default=DEFAULT_DINO, help=f"DINO model folder or hub id for DINO-I (default {DEFAULT_DINO})"
    )
    p.add_argument("--device", help="cuda, cpu, ... (default: this process's accelerator)")


def _add_run(bench_sub) -> None:
    from . import DEFAULT_IP_ADAPTER, DEFAULT_IP_ADAPTER_SUBFOLDER, DEFAULT_IP_ADAPTER_WEIGHTS, METHOD_NAMES

    p = bench_sub.add_parser(
        "run",
        help="generate and score a manifest's groups with one method",
        description="Generate one image per prompt and sample for every group with one method, score it "
        "(CLIP-I, CLIP-T, DINO-I; also against the target when a group has one) and write records, contact "
        "sheets and summary.{md,csv,json} into --out. Resumable: run the same command again after a crash. "
        "Under `accelerate launch` each process takes its share of the groups.",
    )
    _add_manifest_args(p)
    p.add_argument("--method", choices=METHOD_NAMES, required=True)
    p.add_argument(
        "--base",
        help="SDXL folder, hub id or `default`; required but for easyref, where the adapter "
        "names its own (default: the adapter's, or with no adapter the bundled model)",
    )
    p.add_argument("--mllm", help="easyref: Qwen2-VL folder or hub id (default: the adapter's)")
    p.add_argument("--adapter", help="easyref: EasyRef checkpoint (ours, the release's file or zongzhuofan/EasyRef)")
    p.add_argument(
        "--ip-adapter",
        default=DEFAULT_IP_ADAPTER,
        help=f"ip-adapter-*: folder or hub id (default {DEFAULT_IP_ADAPTER})",
    )
    p.add_argument("--ip-adapter-subfolder", default=DEFAULT_IP_ADAPTER_SUBFOLDER)
    p.add_argument("--ip-adapter-weights", default=DEFAULT_IP_ADAPTER_WEIGHTS)
    p.add_argument("--scale", type=float, default=1.0, help="reference attention scale (easyref, ip-adapter-*)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument(
        "--seed", type=int, default=0, help="base seed; each image's seed also depends on its group, prompt and sample"
    )
    p.add_argument("--samples", type=int, default=1, help="images per prompt (default 1)")
    p.add_argument("--negative-prompt", help="the same for every method (default: the EasyRef release's)")
    p.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto")
    p.add_argument("--no-score", action="store_true", help="generate only (score later with `bench score`)")
    _add_metric_args(p)
    p.set_defaults(func=cmd_run)


def _add_score(bench_sub) -> None:
    p = bench_sub.add_parser(
        "score",
        help="score images generated elsewhere (or re-score a run with other metric models)",
        description="Score images laid out as IMAGES/<group id>/p<prompt>-s<sample>.png (the layout "
        "`bench run` writes) against a manifest; writes records and summary.{md,csv,json} into --out.",
    )
    _add_manifest_args(p)
    p.add_argument("--images", type=Path, required=True, help="folder of <group id>/p<prompt>-s<sample>.png")
    p.add_argument("--method-name", default="external", help="label for the summary's method column")
    _add_metric_args(p)
    p.set_defaults(func=cmd_score)


def _add_table(bench_sub) -> None:
    p = bench_sub.add_parser(
        "table",
        help="one table of several runs (methods side by side, per split)",
        description="Merge the records of several run folders into the paper's table.",
    )
    p.add_argument("runs", type=Path, nargs="+", help="run folders written by `bench run` or `bench score`")
    p.add_argument("--out", type=Path, help="also write the table here (.md; a .csv beside it)")
    p.set_defaults(func=cmd_table)


def _add_convert(bench_sub) -> None:
    p = bench_sub.add_parser(
        "convert",
        help="build a manifest from a folder of groups or from COCO captions",
        description="Write an MRBench-format manifest (JSON Lines).",
    )
    kinds = p.add_subparsers(dest="kind", required=True)
    folders = kinds.add_parser(
        "folders",
        help="one folder per group (images, optional target.*, prompts.txt); optionally under held-in/ and held-out/",
    )
    folders.add_argument("root", type=Path)
    folders.add_argument("out", type=Path)
    folders.add_argument("--split", choices=("held-in", "held-out"), default="held-in")
    folders.add_argument("--domain")
    coco = kinds.add_parser("coco", help="single-reference mode: each image is the reference, its caption the prompt")
    coco.add_argument("captions", type=Path, help="captions_val2017.json")
    coco.add_argument("images", type=Path, help="the images folder (val2017/)")
    coco.add_argument("out", type=Path)
    coco.add_argument("--limit", type=int)
    coco.add_argument("--captions-per-image", type=int, default=1)
    p.set_defaults(func=cmd_convert)


# ---------------------------------------------------------------------- limits and errors
# Checked before anything loads; the bounds of `easyref generate` (cli.py), and one of the bench's own:
# 10^6 samples per prompt would plan 10^6 images before the first one is made.
MAX_SAMPLES = 100


def _failure(message: str) -> Exception:
    """An error that is not the user's (disk full, numbers overflowed): one line, exit 1."""
    from ..errors import RunFailure

    return RunFailure(message)


# paths the user gave or can fix (permissions, a file where a folder belongs ...): exit 2; the rest
# (a full disk, an I/O error) is not their mistake: exit 1
_USER_ERRNOS = frozenset(
    {
        errno.EACCES,
        errno.EPERM,
        errno.EROFS,
        errno.ENOTDIR,
        errno.EISDIR,
        errno.EEXIST,
        errno.ENAMETOOLONG,
        errno.ENOENT,
        errno.ELOOP,
    }
)


def _os_error(err: OSError) -> Exception:
    from ..errors import UserError
    from ..safe_io import describe_os_error

    if err.errno in _USER_ERRNOS:
        return UserError(describe_os_error(err))
    return _failure(describe_os_error(err))


@contextmanager
def _one_line_errors(generating: bool = False):
    """The bench modules' one-line errors as the command line's: a user's mistake exits 2, the rest 1."""
    from ..errors import UserError
    from ..images import ImageFileError
    from ..safe_io import UnsafePathError
    from .manifest import ManifestError
    from .runner import RunError
    from .sources import SourceError

    try:
        yield
    except ManifestError as err:
        raise UserError(err.one_line()) from None
    except (RunError, ImageFileError, UnsafePathError, SourceError) as err:
        raise UserError(" ".join(str(err).split())) from None
    except OSError as err:
        failure = _os_error(err)
        if generating:  # the images made so far are kept: say so
            failure = type(failure)(f"{failure}; run the same command again to resume where it stopped")
        raise failure from None
    except ValueError as err:
        if not generating:
            raise
        # what the method refused although the up-front checks passed (its own rules): one line
        raise UserError(f"generation refused: {_first_line(err)}") from None
    except RuntimeError as err:
        if type(err).__name__ != "NonFiniteOutputError":
            raise
        raise _failure(_first_line(err)) from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _check_device(name: str | None) -> None:
    from ..devices import DeviceError, check_device_name
    from ..errors import UserError

    try:
        check_device_name(name)
    except DeviceError as err:
        raise UserError(f"--device: {err}") from None


def _check_run_args(args) -> None:
    """The settings, with the bounds and words of `easyref generate`."""
    from ..errors import UserError
    from ..limits import (
        MAX_GUIDANCE,
        MAX_PIXELS,
        MAX_PROMPT_CHARS,
        MAX_SCALE,
        MAX_SEED,
        MAX_SIDE,
        MAX_STEPS,
        check_finite_range,
        check_range,
    )

    if args.base is None and args.method != "easyref":
        raise UserError(f"--method {args.method} needs --base (an SDXL folder, hub id or `default`)")
    check_range("--steps", args.steps, 1, MAX_STEPS)
    check_range("--samples", args.samples, 1, MAX_SAMPLES)
    for flag, value in (("--height", args.height), ("--width", args.width)):
        if value is not None and (value % 8 or not 8 <= value <= MAX_SIDE):
            raise UserError(f"{flag} must be a multiple of 8 between 8 and {MAX_SIDE}, got {value}")
    if args.height and args.width and args.height * args.width > MAX_PIXELS:
        raise UserError(
            f"--height x --width is {args.height * args.width} pixels; at most {MAX_PIXELS} (2048 x 2048) are allowed"
        )
    check_finite_range("--guidance", args.guidance, 0.0, MAX_GUIDANCE)
    check_finite_range("--scale", args.scale, 0.0, MAX_SCALE)
    check_range("--seed", args.seed, 0, MAX_SEED)
    if args.negative_prompt is not None and len(args.negative_prompt) > MAX_PROMPT_CHARS:
        raise UserError(
            f"--negative-prompt is {len(args.negative_prompt)} characters long; "
            f"at most {MAX_PROMPT_CHARS} characters are read"
        )
    _check_device(args.device)


# ---------------------------------------------------------------------- commands
def _load_items(args):
    from ..errors import UserError
    from .manifest import ManifestError, check_images, load_manifest

    if args.limit is not None and args.limit < 1:
        raise UserError("--limit must be >= 1")
    try:
        items = load_manifest(args.manifest, root=args.root, allow_outside_root=args.allow_outside_root)
    except FileNotFoundError:
        raise UserError(f"--manifest: no such file {args.manifest}") from None
    except ManifestError as err:
        raise UserError(err.one_line()) from None
    if args.split:
        items = [i for i in items if i.split == args.split]
    if args.limit is not None:
        items = items[: args.limit]
    if not items:
        raise UserError(f"no groups in {args.manifest}" + (f" with split {args.split}" if args.split else ""))
    with _one_line_errors():
        check_images(items, args.manifest)  # the images of the groups to be used: before any model loads
    return items


def _check_sources(args, scoring: bool) -> dict:
    """Every model name of this command, resolved before any loads (`easyref.resolve`: `default`, a
    folder, or a hub id; one that is neither cached nor reachable fails here at once, not after a
    minute of retries)."""
    from ..checkpoint import CheckpointError
    from ..errors import UserError
    from ..resolve import CLI_LABELS, resolve_parts
    from .sources import check_source

    sources = {}
    with _one_line_errors():
        if getattr(args, "method", None) is not None:  # `bench run`; `bench score` has no models to make images
            if args.method == "easyref":  # the base and MLLM the adapter records, unless given
                try:
                    sources["parts"] = resolve_parts(args.base, args.mllm, args.adapter, labels=CLI_LABELS)
                except CheckpointError as err:  # the adapter's config, read for the names it records
                    raise UserError(str(err)) from None
            else:
                sources["base"] = check_source(args.base, "--base", kind="base")
            if args.method.startswith("ip-adapter"):
                weights = "/".join(x for x in (args.ip_adapter_subfolder, args.ip_adapter_weights) if x)
                sources["ip_adapter"] = check_source(args.ip_adapter, "--ip-adapter", probe=weights)
        if scoring:
            sources["clip"] = check_source(args.clip, "--clip")
            sources["dino"] = check_source(args.dino, "--dino")
    return sources


def _scorer(args, state, sources: dict):
    from ..errors import UserError
    from .metrics import FeatureModels

    clip, dino = sources["clip"], sources["dino"]
    # folders and cached hub snapshots load from their paths: no update checks, nothing to retry
    offline = {"local_files_only": True} if clip.offline_ok and dino.offline_ok else {}
    try:
        return FeatureModels.from_pretrained(
            clip=clip.path, dino=dino.path, device=args.device or state.device, **offline
        )
    except Exception as err:  # a folder that is not the model: OSError, ValueError, KeyError ... one line
        raise UserError(
            f"could not load the metric models (--clip {args.clip}, --dino {args.dino}): {_first_line(err)}"
        ) from None


def _method(args, device):
    """The method by name; its model names resolve as `_check_sources` already checked them."""
    from ..errors import UserError
    from .methods import load_method

    dtype = None if args.dtype == "auto" else args.dtype
    options = {"base": args.base, "device": device, "dtype": dtype}
    if args.method == "easyref":
        options.update(mllm=args.mllm, adapter=args.adapter, scale=args.scale)
    elif args.method.startswith("ip-adapter"):
        options.update(
            ip_adapter=args.ip_adapter,
            subfolder=args.ip_adapter_subfolder,
            weight_name=args.ip_adapter_weights,
            scale=args.scale,
        )
    try:
        return load_method(args.method, **options)
    except Exception as err:  # a folder that is not the model: OSError, ValueError, KeyError ... one line
        raise UserError(f"could not load {args.method}: {_first_line(err)}") from None


def _check_groups(method, items, manifest) -> None:
    """What the method would refuse mid-run (the MLLM's control tokens in a prompt, too many
    references), refused before the first image: the rules and words of `easyref generate`."""
    from ..errors import UserError
    from .manifest import image_size
    from .methods import check_group

    for item in items:
        try:
            sizes = [image_size(p) for p in item.references]
            check_group(method, sizes, item.prompts, f"group {item.id!r}")
        except ValueError as err:
            raise UserError(f"manifest {manifest}: {_first_line(err)}") from None


def _settings(args):
    from ..config import DEFAULT_NEGATIVE_PROMPT
    from .methods import GenerationSettings

    negative = DEFAULT_NEGATIVE_PROMPT if args.negative_prompt is None else args.negative_prompt
    return GenerationSettings(
        steps=args.steps,
        guidance=args.guidance,
        height=args.height,
        width=args.width,
        seed=args.seed,
        negative_prompt=negative,
    )


@contextmanager
def _locked_run_folder(out: Path, main_process: bool):
    """Hold the run folder for the whole command (the main process; the others follow its barrier).

    A second command on the same folder is refused at once (exit 2: two commands writing one folder is
    the user's mistake to fix). Temporary files a killed run left are removed under the lock. A folder
    this command created is removed again if it fails before writing anything but the lock.
    """
    from ..errors import UserError
    from ..safe_io import LockedError, RunLock, UnsafePathError
    from .runner import clean_run_temps

    if not main_process:
        yield
        return
    created = [p for p in (out, *out.parents) if not p.exists()]
    lock = RunLock(out, "run folder")
    try:
        lock.__enter__()
    except LockedError as err:
        raise UserError(f"{err}; wait for it to finish, or use another --out") from None
    except UnsafePathError as err:
        raise UserError(str(err)) from None
    except OSError as err:
        raise UserError(f"cannot use --out {out}: {_first_line(_os_error(err))}") from None
    try:
        clean_run_temps(out)
        yield
    except BaseException:
        if created:
            _remove_if_untouched(out, created)
        raise
    finally:
        lock.__exit__(None, None, None)


def _remove_if_untouched(out: Path, created: list[Path]) -> None:
    from ..safe_io import LOCK_NAME

    try:
        if {p.name for p in out.iterdir()} <= {LOCK_NAME}:
            (out / LOCK_NAME).unlink(missing_ok=True)
            for folder in created:  # innermost first
                folder.rmdir()
    except OSError:
        pass  # someone else put something there meanwhile: leave it


def cmd_run(args) -> int:
    from .runner import (
        check_item_names,
        check_run_folder,
        check_run_header,
        check_run_paths,
        plan,
        run_bench,
        settings_header,
        shard,
        start_run,
    )

    # the settings, the manifest and the model names first: a mistake in them is reported before torch loads
    _check_run_args(args)
    items = _load_items(args)
    sources = _check_sources(args, scoring=not args.no_score)
    from accelerate import PartialState

    state = PartialState(cpu=args.device == "cpu")  # `--device cpu` under torchrun: gloo on the CPU
    settings = _settings(args)
    out, rank, world = args.out, state.process_index, state.num_processes
    with _one_line_errors():
        check_item_names(items)
        check_run_folder(out)
        units = [u for units in shard(plan(items, args.samples, settings.seed), rank, world) for u in units]
        check_run_paths(out, units, rank, world)
        # a damaged run.json, or one of other settings, is refused before anything loads
        check_run_header(out, settings_header(None, settings, args.manifest, args.samples))
    with _locked_run_folder(out, state.is_main_process):
        method = _method(args, args.device or state.device)
        _check_groups(method, items, args.manifest)
        scorer = None if args.no_score else _scorer(args, state, sources)
        with _one_line_errors():
            start_run(out, settings_header(method, settings, args.manifest, args.samples), state.is_main_process)
        state.wait_for_everyone()
        with _one_line_errors(generating=True):
            made = run_bench(
                items, method, settings, out, args.samples, scorer, rank, world, progress=state.is_local_main_process
            )
        logger.info("process %d made %d images", rank, made)
        return _finish(out, state, scored=scorer is not None)


def cmd_score(args) -> int:
    from ..errors import UserError
    from .manifest import image_problem
    from .runner import (
        check_item_names,
        check_run_folder,
        check_run_paths,
        discover_images,
        score_folder,
        shard,
        source_image,
    )

    _check_device(args.device)
    items = _load_items(args)
    if not args.images.is_dir():
        raise UserError(f"--images: no such folder {args.images}")
    from accelerate import PartialState

    state = PartialState(cpu=args.device == "cpu")  # `--device cpu` under torchrun: gloo on the CPU
    out, rank, world = args.out, state.process_index, state.num_processes
    with _one_line_errors():
        check_item_names(items)
        found = discover_images(items, args.images)
        mine = shard(found, rank, world)
        bad = [why for why in (image_problem(source_image(args.images, u)) for u in mine) if why]
        if bad:
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            raise UserError(f"--images: {bad[0]}{more}")
        check_run_folder(out)
        check_run_paths(out, mine, rank, world, sheets=False)
    sources = _check_sources(args, scoring=True)
    with _locked_run_folder(out, state.is_main_process):
        scorer = _scorer(args, state, sources)
        state.wait_for_everyone()
        with _one_line_errors():
            score_folder(
                items,
                args.images,
                out,
                scorer,
                args.method_name,
                rank,
                world,
                progress=state.is_local_main_process,
                found=found,
            )
        return _finish(out, state, scored=True)


def _finish(out: Path, state, scored: bool) -> int:
    from .runner import write_summary

    state.wait_for_everyone()
    if state.is_main_process and scored:
        with _one_line_errors():
            write_summary(out)
        print((out / "summary.md").read_text(), end="")
    return 0


def cmd_table(args) -> int:
    from ..errors import UserError
    from ..safe_io import atomic_write_text
    from .runner import read_records, summarize, summary_tables

    if args.out is not None:
        if args.out.suffix.lower() != ".md":
            raise UserError(f"--out must end in .md (a .csv is written beside it), got {args.out}")
        for path in (args.out, args.out.with_suffix(".csv")):
            if path.is_dir():
                raise UserError(f"--out: {path} is a folder; give a file name")
    records = []
    for run in args.runs:
        with _one_line_errors():
            found = read_records(run) if run.is_dir() else {}
        if not found:
            raise UserError(f"{run}: no records (not a `bench run` folder, or nothing finished yet)")
        records.extend(found.values())
    markdown, table = summary_tables(summarize(records))
    if args.out:
        with _one_line_errors():
            atomic_write_text(args.out, markdown)
            atomic_write_text(args.out.with_suffix(".csv"), table)
    print(markdown, end="")
    return 0


def cmd_convert(args) -> int:
    from ..errors import UserError
    from ..safe_io import UnsafePathError
    from .manifest import ManifestError, manifest_from_coco, manifest_from_folders

    if args.kind == "coco":
        if args.limit is not None and args.limit < 1:
            raise UserError("--limit must be >= 1")
        if args.captions_per_image < 1:
            raise UserError("--captions-per-image must be >= 1")
    try:
        if args.kind == "folders":
            items = manifest_from_folders(args.root, out=args.out, split=args.split, domain=args.domain)
        else:
            items = manifest_from_coco(
                args.captions, args.images, out=args.out, limit=args.limit, captions_per_image=args.captions_per_image
            )
    except FileNotFoundError as err:
        raise UserError(f"no such file or folder: {err.filename}") from None
    except ManifestError as err:
        raise UserError(err.one_line()) from None
    except UnsafePathError as err:
        raise UserError(str(err)) from None
    except OSError as err:  # writing OUT: a folder in the way, permissions, a full disk
        raise _os_error(err) from None
    logger.info("wrote %d group%s to %s", len(items), "" if len(items) == 1 else "s", args.out)
    return 0
