"""`easyref bench shapes`: the miniature MRBench on the synthetic shapes world, from nothing."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

logger = logging.getLogger("easyref")

# the presets' times on 2 cores (the Makefile's bench-shapes comment has the breakdown)
PRESET_HELP = ("training and scoring sizes: smoke (a check of the whole chain, under 30 s from nothing; "
               "tiny models, 2 groups x 2 steps per cell), cpu (the default: about 2 h 15 min from nothing, "
               "35 min with a finished demo-model build as --work, 10 min of it scoring), "
               "gpu (sized for one GPU), full")


def add_shapes_parser(bench_sub) -> None:
    p = bench_sub.add_parser(
        "shapes",
        help="miniature MRBench: EasyRef vs mean vs concat on the synthetic shapes world",
        description="Train (unless --models-dir has them) and evaluate EasyRef and the two tuning-free "
        "baselines on the shapes world: identity, attribute and prompt accuracy and similarity, read by the "
        "bundled oracle, by distractors and by number of references. Writes summary.md, summary.json, "
        "items.jsonl, by_references.png and example sheets into --out.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=Path("runs/bench-shapes"), help="output folder (default runs/bench-shapes)")
    p.add_argument("--preset", default="cpu", help=PRESET_HELP)
    p.add_argument("--models-dir", type=Path, help="evaluate existing model-easyref/, model-mean/, model-concat/ folders here")
    p.add_argument("--groups", type=int, help="groups per cell (default: the preset's; 64, smoke 2)")
    p.add_argument("--steps", type=int, help="denoising steps (default: the preset's; 30, smoke 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, help="training folder to create or reuse (default OUT/work); "
                   "a finished demo-model build's work folder skips straight to the baselines")
    p.set_defaults(func=cmd_shapes)


def cmd_shapes(args) -> int:
    from ..cli import UserError
    from .bench import EVAL_SIZES, METHODS, evaluate_methods, run
    from .demo_model import PRESETS

    if args.preset not in PRESETS:
        raise UserError(f"--preset must be one of {', '.join(sorted(PRESETS))}, got {args.preset!r}")
    if (args.groups is not None and args.groups < 1) or (args.steps is not None and args.steps < 1):
        raise UserError("--groups and --steps must be >= 1")
    groups = args.groups or EVAL_SIZES[args.preset][0]
    steps = args.steps or EVAL_SIZES[args.preset][1]
    if args.models_dir:
        folders = {m: args.models_dir / f"model-{m}" for m in METHODS}
        missing = [str(f) for f in folders.values() if not (f / "adapter").is_dir()]
        if missing:
            raise UserError(f"--models-dir: no model folder {missing[0]} (expected model-easyref/, model-mean/, model-concat/)")
        evaluate_methods(folders, args.out, groups=groups, steps=steps, seed=args.seed)
    else:
        run(args.out, preset=args.preset, groups=groups, steps=steps, work=args.work, seed=args.seed)
    logger.info("wrote %s", args.out / "summary.md")
    print((args.out / "summary.md").read_text(), end="")
    return 0
