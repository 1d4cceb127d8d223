"""The README's commands run as written; the examples in `--help` parse.

Every `easyref ...` command in the README's bash blocks and inline code is collected. Each one's flags
must exist on its subcommand (synopsis lines included). The concrete ones (no `[...]`, `a|b`, `...` or
CAPITALISED placeholders) are then run in README order, in a fresh folder holding the files they name
(`a.jpg`, `M.jsonl`, `my_groups/` ...) and with `HF_HUB_OFFLINE=1` over a Hugging Face cache that holds
tiny random models under the real hub ids, so `zongzhuofan/EasyRef` and the bench's default IP-Adapter,
CLIP and DINO resolve as they would after `hf download`. The one change made to a command: on a machine
without CUDA, `--device cuda` becomes `--device cpu` and `--dtype float16` `--dtype float32`.
A concrete command this test does not run must be listed in NOT_RUN with the reason.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import shape_image
from fake_hub import build_hub

from easyref.cli import build_parser, main

README = Path(__file__).resolve().parents[1] / "README.md"
SYNOPSIS = re.compile(r"\[|\||\.\.\.$|\b[A-Z][A-Z0-9_]+\b")  # [optional], a|b, more..., PLACEHOLDER

# concrete commands that are not run here, and why (each must still be in the README)
NOT_RUN = {
    "easyref train --config example-stage1": "the three example stages take 35 s; `make train-demo` runs them and tests/test_train.py trains them",
    "easyref train --config example-stage2": "as above",
    "easyref train --config example-stage3": "as above",
    "easyref generate --adapter runs/example-stage3/final --ref a.png --ref b.png --prompt ... --out out.png": "needs the example stages above",
    "easyref generate --adapter runs/example-stage1/final --ref runs/example-data/images/000_0.png --prompt "
    "a red circle on a black background --out generated.png": "the trainer's printed command: tests/test_resolve.py trains a stage and runs what it prints",
    "easyref train --config stage1 --set data=data/pairs.json data_root=data output_dir=runs/stage1": "the real recipes: they need a dataset and the real SDXL and Qwen2-VL",
    "easyref train --config stage2 --set data=data/faces.json data_root=data init_from=runs/stage1/final": "as above",
    "easyref train --config my_stage3.yaml --resume latest": "as above, and a run to resume",
    "easyref serve": "a server that runs until stopped: tests/test_serve.py starts it and drives its page",
    "easyref serve --adapter zongzhuofan/EasyRef --device cuda --port 8080 --out-dir outputs/served": "as above",
}


# ---------------------------------------------------------------------- reading the README
def readme_commands(text: str) -> list[list[str]]:
    """The shell commands of the bash blocks (continuations joined, comments dropped) and of inline
    code spans that start with `easyref` or `time easyref`, in the order they appear."""
    found: list[tuple[int, list[str]]] = []
    for block in re.finditer(r"```bash\n(.*?)```", text, re.S):
        for line in block.group(1).replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                found.append((block.start(), words))
    for span in re.finditer(r"`((?:time )?easyref [^`]+)`", text):
        words = shlex.split(span.group(1))
        if _has_flag_with_value(words):  # else a name in a sentence: `easyref train`, `easyref generate --adapter`
            found.append((span.start(), words))
    return [words for _, words in sorted(found, key=lambda item: item[0])]


def _has_flag_with_value(words: list[str]) -> bool:
    return any(w.startswith("--") and not nxt.startswith("-") for w, nxt in zip(words, words[1:]))


def easyref_argv(words: list[str]) -> list[str] | None:
    """The easyref arguments of a command line (`easyref ...`, `time easyref ...`, `accelerate launch ... -m
    easyref ...`), up to a shell redirection; None for other programs."""
    if words[:1] == ["time"]:
        words = words[1:]
    if words[:1] == ["easyref"]:
        argv = words[1:]
    elif words[:2] == ["accelerate", "launch"] and "easyref" in words:
        argv = words[words.index("easyref") + 1 :]
    else:
        return None
    return argv[: argv.index(">")] if ">" in argv else argv


def is_synopsis(argv: list[str]) -> bool:
    """A command shape rather than a command; a prompt written as "..." is a prompt."""
    return any(
        SYNOPSIS.search(word) for i, word in enumerate(argv) if not (word == "..." and argv[i - 1] == "--prompt")
    )


def key(argv: list[str]) -> str:
    return " ".join(["easyref", *argv])


def subparser(argv: list[str]):
    """The argparse parser of the (sub)command `argv` names, and the rest of argv."""
    parser = build_parser()
    while True:
        actions = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
        names = [w for w in argv if not w.startswith("-")]
        if not actions or not names or names[0] not in actions[0].choices:
            return parser
        parser = actions[0].choices[names[0]]
        argv = argv[argv.index(names[0]) + 1 :]


@pytest.fixture(scope="module")
def commands() -> list[list[str]]:
    return [argv for words in readme_commands(README.read_text()) if (argv := easyref_argv(words)) is not None]


def test_the_readme_has_commands_to_check(commands):
    assert len(commands) > 30
    assert ["convert", "zongzhuofan/EasyRef", "./easyref-sdxl"] in commands  # continuation lines joined, comments
    assert ["generate", "--prompt", "star", "--ref", "nope.png", "--out", "o.png"] in commands  # `time easyref ...`


def test_every_flag_in_the_readme_exists(commands):
    """Synopsis lines too: `[--base SDXL]` must name a real flag of its subcommand."""
    for argv in commands:
        parser = subparser(argv)
        known = {s for action in parser._actions for s in action.option_strings} | {"-v", "-vv", "--verbose"}
        flags = {w.strip("[]").split("=")[0] for w in argv if w.strip("[").startswith("-")}
        flags = {f for f in flags if f not in ("-", "...") and not f.startswith("-m")}
        assert flags <= known, f"{key(argv)}: {sorted(flags - known)} not options of `{parser.prog}`"


def test_every_concrete_command_parses(commands):
    for argv in commands:
        if not is_synopsis(argv):
            try:
                build_parser().parse_args(argv)
            except SystemExit as stop:  # `--version` prints and stops with 0
                if stop.code != 0:
                    pytest.fail(f"the README's `{key(argv)}` does not parse")


def help_commands() -> list[list[str]]:
    """The example commands of every `--help` (epilogs), `a && b` split in two."""
    found, parsers = [], [build_parser()]
    while parsers:
        parser = parsers.pop()
        for action in parser._actions:
            if action.__class__.__name__ == "_SubParsersAction":
                parsers.extend(action.choices.values())
        for line in parser.format_help().splitlines():
            for part in line.split("&&"):
                if part.strip().startswith(("easyref ", "accelerate launch ")):  # not prose ("the model's")
                    argv = easyref_argv(shlex.split(part, comments=True))
                    if argv is not None:
                        found.append(argv)
    return found


def test_every_command_in_the_help_parses_and_names_real_flags():
    examples = help_commands()
    assert ["train", "--config", "example-stage1"] in examples
    test_every_flag_in_the_readme_exists(examples)
    test_every_concrete_command_parses(examples)


def test_commands_not_run_are_still_in_the_readme(commands):
    concrete = {key(argv) for argv in commands if not is_synopsis(argv)}
    assert set(NOT_RUN) <= concrete, sorted(set(NOT_RUN) - concrete)


# ---------------------------------------------------------------------- running them
@pytest.fixture(scope="module")
def hub_cache(tiny_dirs, tmp_path_factory):
    return build_hub(tmp_path_factory.mktemp("hub"), tmp_path_factory.mktemp("scratch"), tiny_dirs, metrics=True)


@pytest.fixture
def workdir(tmp_path, monkeypatch, hub_cache):
    """A fresh folder with what the commands name, offline over the fake hub."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.chdir(tmp_path)
    shutil.copytree(README.parent / "examples", tmp_path / "examples")  # the demo groups the README uses
    for i, name in enumerate(("a", "b")):
        for suffix in (".png", ".jpg"):
            shape_image(("red", "blue")[i]).convert("RGB").save(tmp_path / f"{name}{suffix}")
    (tmp_path / "M.jsonl").write_text(
        json.dumps(
            {
                "id": "g1",
                "split": "held-out",
                "references": ["a.jpg", "b.jpg"],
                "target": "a.png",
                "prompts": ["a thing"],
            }
        )
        + "\n"
    )
    group = tmp_path / "my_groups" / "g1"
    group.mkdir(parents=True)
    for name in ("a.png", "b.png"):
        shutil.copy(tmp_path / name, group / name)
    (group / "prompts.txt").write_text("a thing\n")
    (tmp_path / "val2017").mkdir()
    shutil.copy(tmp_path / "a.jpg", tmp_path / "val2017" / "000000000001.jpg")
    (tmp_path / "captions_val2017.json").write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "000000000001.jpg"}],
                "annotations": [{"image_id": 1, "caption": "a red thing"}],
            }
        )
    )
    return tmp_path


def _as_run_here(argv: list[str]) -> list[str]:
    import torch

    if torch.cuda.is_available():
        return argv
    swap = {("--device", "cuda"): "cpu", ("--dtype", "float16"): "float32"}
    return [swap.get((argv[i - 1], w), w) if i else w for i, w in enumerate(argv)]


def _prepare(argv: list[str], folder: Path) -> None:
    """What a person would have beside the command: images made by another tool for `bench score`."""
    if argv[:2] == ["bench", "score"]:
        images = Path(argv[argv.index("--images") + 1])
        if not images.exists():
            shutil.copytree(folder / "runs" / "easyref" / "images", folder / images)


@pytest.mark.usefixtures("one_thread")
def test_the_readme_commands_run_as_written(commands, workdir, capsys):
    ran, failed = [], []
    for argv in commands:
        if is_synopsis(argv) or key(argv) in NOT_RUN or argv[:1] == ["bench"] and "shapes" in argv:
            continue
        _prepare(argv, workdir)
        try:
            code = main(_as_run_here(argv))
        except SystemExit as stop:  # argparse's own ending: `--version`
            code = stop.code
        expected = 2 if any("nope" in w for w in argv) else 0  # the README's examples of usage errors
        err = capsys.readouterr().err
        (ran if code == expected else failed).append(key(argv) + ("" if code == expected else f" -> {code}: {err}"))
    assert not failed, failed
    assert len(ran) >= 12, ran
    assert (workdir / "runs" / "table.md").is_file() and (workdir / "easyref-sdxl" / "easyref_config.json").is_file()


def readme_python_blocks(text: str) -> list[str]:
    return [m.group(1) for m in re.finditer(r"```python\n(.*?)```", text, re.S)]


@pytest.mark.usefixtures("one_thread")
def test_the_readme_python_blocks_run_as_written(workdir):
    """Each block alone, as pasted into a fresh interpreter in a folder with the README's files; the hub ids
    read the offline cache of tiny models, and GPU lines are guarded in the block itself."""
    blocks = readme_python_blocks(README.read_text())
    assert len(blocks) >= 2
    for number, block in enumerate(blocks, 1):
        exec(compile(block, f"README.md, python block {number}", "exec"), {"__name__": "__main__"})
    assert (workdir / "subject.png").is_file() and (workdir / "portrait.png").is_file()


def test_the_readme_redirect_writes_the_deepspeed_config(tmp_path):
    line = next(w for w in readme_commands(README.read_text()) if ">" in w and "deepspeed_zero2" in w[-1])
    bin_dir = Path(sys.executable).parent
    result = subprocess.run(
        ["bash", "-c", shlex.join(line[:-2]) + " > " + shlex.quote(line[-1])],
        cwd=tmp_path,
        env={"PATH": f"{bin_dir}:/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "deepspeed" in (tmp_path / line[-1]).read_text().lower()
