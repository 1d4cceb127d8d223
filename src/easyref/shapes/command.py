"""`easyref bench shapes`: the miniature MRBench on the synthetic shapes world, from nothing."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

logger = logging.getLogger("easyref")


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
    p.add_argument("--preset", default="cpu", help="training recipe: smoke (minutes, a check), cpu (about 1.5 h on 2 cores), gpu, full")
    p.add_argument("--models-dir", type=Path, help="evaluate existing model-easyref/, model-mean/, model-concat/ folders here")
    p.add_argument("--groups", type=int, default=64, help="groups per cell (default 64)")
    p.add_argument("--steps", type=int, default=30, help="denoising steps (default 30)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, help="training folder to create or reuse (default OUT/work); "
                   "a finished demo-model build's work folder skips straight to the baselines")
    p.set_defaults(func=cmd_shapes)


def cmd_shapes(args) -> int:
    from ..cli import UserError
    from .bench import METHODS, evaluate_methods, run
    from .demo_model import PRESETS

    if args.preset not in PRESETS:
        raise UserError(f"--preset must be one of {', '.join(sorted(PRESETS))}, got {args.preset!r}")
    if args.groups < 1 or args.steps < 1:
        raise UserError("--groups and --steps must be >= 1")
    if args.models_dir:
        folders = {m: args.models_dir / f"model-{m}" for m in METHODS}
        missing = [str(f) for f in folders.values() if not (f / "adapter").is_dir()]
        if missing:
            raise UserError(f"--models-dir: no model folder {missing[0]} (expected model-easyref/, model-mean/, model-concat/)")
        evaluate_methods(folders, args.out, groups=args.groups, steps=args.steps, seed=args.seed)
    else:
        run(args.out, preset=args.preset, groups=args.groups, steps=args.steps, work=args.work, seed=args.seed)
    logger.info("wrote %s", args.out / "summary.md")
    print((args.out / "summary.md").read_text(), end="")
    return 0
