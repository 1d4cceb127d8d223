"""`easyref train`: run one training stage from a recipe or config file."""

from __future__ import annotations

import argparse
import logging

logger = logging.getLogger("easyref")

EPILOG = """\
recipes: stage1, stage2, stage3 (the paper's; see `easyref train --show-recipe stage1`), or a YAML/JSON file.
         example-stage1..3: minutes on a CPU with the bundled tiny model and the example data.
relative paths in a config are taken from the folder you run in.
examples:
  easyref train --write-example-data runs/example-data && easyref train --config example-stage1
  easyref train --config stage1 --set data=data/pairs.json data_root=data
  easyref train --config stage2 --set init_from=runs/stage1/final
  easyref train --config stage2 --set replicate_release=true   # each step as the release was trained
  easyref train --config my_stage3.yaml --resume latest
  accelerate launch --num_processes 8 -m easyref train --config stage3
"""


def add_train_parser(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train one EasyRef stage (1 alignment, 2 single-reference, 3 multi-reference)",
        description="Train one stage of EasyRef's progressive recipe with accelerate. Each stage writes "
        "OUTPUT_DIR/checkpoint-N (full training state + an inference checkpoint in N/model) and "
        "OUTPUT_DIR/final, which `easyref generate --adapter` loads and the next stage's init_from takes.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="recipe name (stage1/stage2/stage3) or YAML/JSON config file")
    p.add_argument(
        "--set",
        dest="overrides",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="override settings (model.KEY=VALUE: a setting of the model mapping); repeatable",
    )
    p.add_argument("--output-dir", help="where checkpoints and logs go (overrides the config's output_dir)")
    p.add_argument("--max-steps", type=int, help="optimizer steps to reach (overrides max_steps)")
    p.add_argument("--resume", metavar="latest|DIR", help="continue exactly from a checkpoint of this run")
    p.add_argument(
        "--allow-outside-root",
        action="store_true",
        help="let data paths leave data_root (absolute, .., symlinks out); = --set allow_outside_root=true",
    )
    p.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is present")
    p.add_argument(
        "--write-example-data", metavar="DIR", help="write a small synthetic dataset (all three formats) and exit"
    )
    p.add_argument(
        "--show-recipe", metavar="NAME", help="print a shipped recipe (stage1/2/3, deepspeed_zero2) and exit"
    )
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    """Every user mistake is one `easyref: error:` line and exit code 2; a failed write (disk full) is exit code 1.
    The config is read and checked before torch, diffusers or transformers are imported, so a mistake in it
    is reported at once."""
    from ..errors import UserError

    if args.write_example_data:
        return _write_example_data(args.write_example_data)
    if args.show_recipe:
        return _show_recipe(args.show_recipe)
    if not args.config:
        raise UserError("--config is required (a recipe name such as stage1 or example-stage1, or a YAML/JSON file)")
    final = _run(_load(args), args)
    logger.info("done: %s", final)
    return 0


def _write_example_data(folder: str) -> int:
    from ..errors import RunFailure, UserError
    from .example import write_example_data

    try:
        paths = write_example_data(folder, size=64)
    except ValueError as err:  # a file in the way, a symlink in the folder
        raise UserError(_one_line(err)) from None
    except OSError as err:
        from ..safe_io import describe_os_error

        raise RunFailure(describe_os_error(err)) from None
    logger.info("wrote %s", ", ".join(str(p) for p in paths.values()))
    return 0


def _show_recipe(name: str) -> int:
    from ..errors import UserError
    from .config import RECIPES

    known = sorted(p.stem for p in RECIPES.glob("*.yaml"))
    if name not in known:  # a name, never a path out of the recipes folder
        raise UserError(f"no recipe {name!r} (known: {', '.join(known)})")
    print((RECIPES / f"{name}.yaml").read_text(), end="")
    return 0


def _load(args):
    from ..errors import UserError
    from .config import check_paths, load_config, parse_overrides

    try:
        overrides = parse_overrides(args.overrides)
        if args.output_dir:
            overrides["output_dir"] = args.output_dir
        if args.max_steps is not None:
            overrides["max_steps"] = args.max_steps
        if args.allow_outside_root:
            overrides["allow_outside_root"] = True
        config = load_config(args.config, overrides)
        check_paths(config)
        return config
    except (ValueError, FileNotFoundError) as err:  # ConfigError is a ValueError
        raise UserError(_one_line(err)) from None


def _one_line(err: BaseException) -> str:
    """The first line of a message, whitespace collapsed (libraries put whole tracebacks in some)."""
    lines = str(err).strip().splitlines()
    return " ".join(lines[0].split()) if lines else type(err).__name__


def _run(config, args):
    from ..checkpoint import CheckpointError
    from ..errors import RunFailure, UserError
    from ..safe_io import LockedError
    from .trainer import OutputWriteError, Trainer

    try:
        return Trainer(config, resume=args.resume, cpu=True if args.cpu else None).train()
    except OutputWriteError as err:  # not the user's input: the disk (full, quota, permissions) -> exit 1
        raise RunFailure(_one_line(err)) from None
    except (CheckpointError, FileNotFoundError, LockedError) as err:
        raise UserError(_one_line(err)) from None
    except ValueError as err:  # data errors, unsafe paths and settings that do not fit the data
        raise UserError(_one_line(err)) from None
    except OSError as err:  # a model folder or hub id that cannot be loaded
        raise UserError(f"cannot load a model: {_one_line(err)}") from None
