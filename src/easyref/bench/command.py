"""`easyref bench run | score | convert`: MRBench-style evaluation of real models.

    easyref bench convert folders GROUPS_DIR OUT.jsonl           # one folder per group + prompts.txt
    easyref bench convert coco captions_val2017.json val2017/ OUT.jsonl --limit 1000
    easyref bench run --manifest M.jsonl --method easyref --base SDXL --mllm QWEN --adapter CKPT --out runs/er
    easyref bench run --manifest M.jsonl --method ip-adapter-mean --base SDXL --out runs/ipa-mean
    easyref bench score --manifest M.jsonl --images OTHER_TOOL_OUT --out runs/other
    easyref bench table runs/er runs/ipa-mean runs/other                # the methods side by side
    accelerate launch -m easyref bench run ...                    # one share of the groups per process
"""

from __future__ import annotations

import argparse
import logging
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

    p.add_argument("--clip", default=DEFAULT_CLIP, help=f"CLIP model folder or hub id for CLIP-I/CLIP-T (default {DEFAULT_CLIP})")
    p.add_argument("--dino", default=DEFAULT_DINO, help=f"DINO model folder or hub id for DINO-I (default {DEFAULT_DINO})")
    p.add_argument("--device", help="cuda, cpu, ... (default: this process's accelerator)")


def _add_run(bench_sub) -> None:
    from . import DEFAULT_IP_ADAPTER, DEFAULT_IP_ADAPTER_SUBFOLDER, DEFAULT_IP_ADAPTER_WEIGHTS, METHOD_NAMES

    p = bench_sub.add_parser(
        "run", help="generate and score a manifest's groups with one method",
        description="Generate one image per prompt and sample for every group with one method, score it "
        "(CLIP-I, CLIP-T, DINO-I; also against the target when a group has one) and write records, contact "
        "sheets and summary.{md,csv,json} into --out. Resumable: run the same command again after a crash. "
        "Under `accelerate launch` each process takes its share of the groups.",
    )
    _add_manifest_args(p)
    p.add_argument("--method", choices=METHOD_NAMES, required=True)
    p.add_argument("--base", required=True, help="SDXL folder or hub id")
    p.add_argument("--mllm", help="easyref: Qwen2-VL folder or hub id (default: the adapter's config)")
    p.add_argument("--adapter", help="easyref: EasyRef checkpoint (ours or the release's)")
    p.add_argument("--ip-adapter", default=DEFAULT_IP_ADAPTER, help=f"ip-adapter-*: folder or hub id (default {DEFAULT_IP_ADAPTER})")
    p.add_argument("--ip-adapter-subfolder", default=DEFAULT_IP_ADAPTER_SUBFOLDER)
    p.add_argument("--ip-adapter-weights", default=DEFAULT_IP_ADAPTER_WEIGHTS)
    p.add_argument("--scale", type=float, default=1.0, help="reference attention scale (easyref, ip-adapter-*)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--seed", type=int, default=0, help="base seed; each image's seed also depends on its group, prompt and sample")
    p.add_argument("--samples", type=int, default=1, help="images per prompt (default 1)")
    p.add_argument("--negative-prompt", help="the same for every method (default: the EasyRef release's)")
    p.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto")
    p.add_argument("--no-score", action="store_true", help="generate only (score later with `bench score`)")
    _add_metric_args(p)
    p.set_defaults(func=cmd_run)


def _add_score(bench_sub) -> None:
    p = bench_sub.add_parser(
        "score", help="score images generated elsewhere (or re-score a run with other metric models)",
        description="Score images laid out as IMAGES/<group id>/p<prompt>-s<sample>.png (the layout "
        "`bench run` writes) against a manifest; writes records and summary.{md,csv,json} into --out.",
    )
    _add_manifest_args(p)
    p.add_argument("--images", type=Path, required=True, help="folder of <group id>/p<prompt>-s<sample>.png")
    p.add_argument("--method-name", default="external", help="label for the summary's method column")
    _add_metric_args(p)
    p.set_defaults(func=cmd_score)


def _add_table(bench_sub) -> None:
    p = bench_sub.add_parser("table", help="one table of several runs (methods side by side, per split)",
                             description="Merge the records of several run folders into the paper's table.")
    p.add_argument("runs", type=Path, nargs="+", help="run folders written by `bench run` or `bench score`")
    p.add_argument("--out", type=Path, help="also write the table here (.md; a .csv beside it)")
    p.set_defaults(func=cmd_table)


def _add_convert(bench_sub) -> None:
    p = bench_sub.add_parser("convert", help="build a manifest from a folder of groups or from COCO captions",
                             description="Write an MRBench-format manifest (JSON Lines).")
    kinds = p.add_subparsers(dest="kind", required=True)
    folders = kinds.add_parser("folders", help="one folder per group (images, optional target.*, prompts.txt); "
                               "optionally under held-in/ and held-out/")
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


# ---------------------------------------------------------------------- commands
def _load_items(args):
    from ..cli import UserError
    from .manifest import ManifestError, load_manifest

    try:
        items = load_manifest(args.manifest, root=args.root, allow_outside_root=args.allow_outside_root)
    except FileNotFoundError:
        raise UserError(f"--manifest: no such file {args.manifest}") from None
    except ManifestError as err:
        raise UserError(str(err)) from None
    if args.split:
        items = [i for i in items if i.split == args.split]
    if args.limit is not None:
        if args.limit < 1:
            raise UserError("--limit must be >= 1")
        items = items[: args.limit]
    if not items:
        raise UserError(f"no groups in {args.manifest}" + (f" with split {args.split}" if args.split else ""))
    return items


def _scorer(args, state):
    from ..cli import UserError
    from .metrics import FeatureModels

    try:
        return FeatureModels.from_pretrained(clip=args.clip, dino=args.dino, device=args.device or state.device)
    except OSError as err:
        raise UserError(f"could not load the metric models (--clip {args.clip}, --dino {args.dino}): "
                        f"{str(err).splitlines()[0]}") from None


def _method(args, device):
    from ..cli import UserError
    from .methods import load_method

    dtype = None if args.dtype == "auto" else args.dtype
    options = {"base": args.base, "device": device, "dtype": dtype}
    if args.method == "easyref":
        options.update(mllm=args.mllm, adapter=args.adapter, scale=args.scale)
    elif args.method.startswith("ip-adapter"):
        options.update(ip_adapter=args.ip_adapter, subfolder=args.ip_adapter_subfolder,
                       weight_name=args.ip_adapter_weights, scale=args.scale)
    try:
        return load_method(args.method, **options)
    except (OSError, ValueError) as err:
        raise UserError(f"could not load {args.method}: {str(err).splitlines()[0]}") from None


def _settings(args):
    from ..cli import UserError
    from ..config import DEFAULT_NEGATIVE_PROMPT
    from .methods import GenerationSettings

    if args.steps < 1 or args.samples < 1:
        raise UserError("--steps and --samples must be >= 1")
    negative = DEFAULT_NEGATIVE_PROMPT if args.negative_prompt is None else args.negative_prompt
    return GenerationSettings(steps=args.steps, guidance=args.guidance, height=args.height, width=args.width,
                              seed=args.seed, negative_prompt=negative)


def cmd_run(args) -> int:
    from accelerate import PartialState

    from ..cli import UserError
    from .runner import RunError, run_bench, settings_header, start_run

    state = PartialState()
    items = _load_items(args)
    settings = _settings(args)
    method = _method(args, args.device or state.device)
    try:
        start_run(args.out, settings_header(method, settings, args.manifest, args.samples), state.is_main_process)
    except RunError as err:
        raise UserError(str(err)) from None
    state.wait_for_everyone()
    scorer = None if args.no_score else _scorer(args, state)
    made = run_bench(items, method, settings, args.out, args.samples, scorer, state.process_index,
                     state.num_processes, progress=state.is_local_main_process)
    logger.info("process %d made %d images", state.process_index, made)
    return _finish(args.out, state, scored=scorer is not None)


def cmd_score(args) -> int:
    from accelerate import PartialState

    from ..cli import UserError
    from .runner import RunError, score_folder

    state = PartialState()
    items = _load_items(args)
    if not args.images.is_dir():
        raise UserError(f"--images: no such folder {args.images}")
    scorer = _scorer(args, state)
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        score_folder(items, args.images, args.out, scorer, args.method_name, state.process_index,
                     state.num_processes, progress=state.is_local_main_process)
    except RunError as err:
        raise UserError(str(err)) from None
    return _finish(args.out, state, scored=True)


def _finish(out: Path, state, scored: bool) -> int:
    from .runner import write_summary

    state.wait_for_everyone()
    if state.is_main_process and scored:
        write_summary(out)
        print((out / "summary.md").read_text(), end="")
    return 0


def cmd_table(args) -> int:
    from ..cli import UserError
    from .runner import read_records, summarize, summary_tables

    records = []
    for run in args.runs:
        found = read_records(run) if run.is_dir() else {}
        if not found:
            raise UserError(f"{run}: no records (not a `bench run` folder, or nothing finished yet)")
        records.extend(found.values())
    markdown, table = summary_tables(summarize(records))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(markdown)
        args.out.with_suffix(".csv").write_text(table)
    print(markdown, end="")
    return 0


def cmd_convert(args) -> int:
    from ..cli import UserError
    from .manifest import ManifestError, manifest_from_coco, manifest_from_folders

    try:
        if args.kind == "folders":
            items = manifest_from_folders(args.root, out=args.out, split=args.split, domain=args.domain)
        else:
            items = manifest_from_coco(args.captions, args.images, out=args.out, limit=args.limit,
                                       captions_per_image=args.captions_per_image)
    except FileNotFoundError as err:
        raise UserError(f"no such file or folder: {err.filename}") from None
    except ManifestError as err:
        raise UserError(str(err)) from None
    logger.info("wrote %d groups to %s", len(items), args.out)
    return 0
