"""A fast, quiet command line: usage errors are found before torch, diffusers or transformers are
imported (asserted on imports, not on wall time), argparse's mistakes are one line too, the libraries
say nothing unless -v (configured when imported, not imported to be configured), and a normal run
with the bundled model neither chatters nor touches the network."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import warnings

import pytest
from conftest import shape_image

from easyref import cli
from easyref.devices import gpu_driver_present

HEAVY = ("torch", "diffusers", "transformers", "accelerate", "gradio")

# main() on argv, then which heavy modules are imported at the moment the error was reported
PROBE = f"""
import json, sys
from easyref.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exit:
    code = exit.code
print(json.dumps({{"code": code, "heavy": [m for m in {HEAVY!r} if m in sys.modules]}}))
"""


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fast")
    shape_image("red").save(folder / "ref.png")
    return folder / "ref.png"


def free_port() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


def usage_errors(ref):
    data = ref.with_name("pairs.json")
    data.write_text("[]")
    generate = ["generate", "--prompt", "x", "--ref", str(ref), "--out", str(ref.with_name("o.png"))]
    return {
        "missing reference": (
            ["generate", "--prompt", "x", "--ref", "nope.png", "--out", "o.png"],
            "nope.png: file not found",
        ),
        "bad flag value": ([*generate, "--steps", "abc"], "invalid int value: 'abc'"),
        "bound violated": ([*generate, "--guidance", "nan"], "--guidance must be a finite number"),
        "unknown scheduler": ([*generate, "--scheduler", "heun"], "argument --scheduler: invalid choice: 'heun'"),
        "out overwrites a reference": ([*generate[:-1], str(ref)], "would overwrite the reference"),
        "no prompt": (["generate", "--ref", str(ref), "--out", "o.png"], "--prompt is required"),
        # a prompt typed in Latin-1: the byte 0xe9 reaches Python as a lone surrogate
        "prompt not UTF-8": ([*generate[:2], "a caf\udce9 star", *generate[3:]], "not valid UTF-8 text (byte 0xe9)"),
        "name too long": ([*generate[:-1], str(ref.with_name("a" * 300 + ".png"))], "file name too long"),
        # a name can carry a newline or a terminal escape: the error stays one line, the escape inert
        "control characters": ([*generate[:4], "nope\neasyref: wrote x.png\x1b[2J", *generate[5:]], "nope\\neasyref"),
        "folder name too long": ([*generate[:-2], "--refs-dir", "b" * 300, *generate[-2:]], "file name too long"),
        "missing --from-metadata": (["generate", "--from-metadata", "nope.png"], "file not found"),
        "info of a non-model": (["info", str(ref.parent)], "is not a model folder"),
        "no command": ([], "required: command"),
        "train: no such config": (["train", "--config", "nope.yaml"], "config file nope.yaml does not exist"),
        "train: unknown setting": (
            ["train", "--config", "example-stage1", "--set", "colour=1"],
            "unknown setting 'colour'",
        ),
        "train: no data file": (
            ["train", "--config", "example-stage1", "--set", "data=nope.json"],
            "nope.json: data file not found",
        ),
        "train: no data root": (
            ["train", "--config", "example-stage1", "--set", f"data={data}", "data_root=nope"],
            "data_root nope does not exist",
        ),
        "convert: no such release": (["convert", "nope", "out"], "nope: no such file or folder"),
        "convert: not a release": (["convert", str(ref.parent), "out"], "not an EasyRef checkpoint"),
        "bench run: no base": (
            ["bench", "run", "--manifest", "m.jsonl", "--method", "sdxl", "--out", "o"],
            "--method sdxl needs --base",
        ),
        "bench run: no manifest": (
            ["bench", "run", "--manifest", "m.jsonl", "--method", "easyref", "--out", "o"],
            "no such file m.jsonl",
        ),
        "no such adapter": ([*generate, "--adapter", "nowhere"], "--adapter nowhere: no such file or folder"),
        "no such base": ([*generate, "--base", "nowhere"], "--base nowhere: no such file or folder"),
        "serve: no such adapter": (
            ["serve", "--port", free_port(), "--adapter", "nowhere"],
            "--adapter nowhere: no such",
        ),
        "unknown device": ([*generate, "--device", "tpu9"], "unknown device 'tpu9'"),
        "cuda without a GPU": ([*generate, "--device", "cuda"], "no CUDA GPU is available"),
        "bench run: unknown device": (
            ["bench", "run", "--manifest", "m.jsonl", "--method", "easyref", "--out", "o", "--device", "tpu9"],
            "unknown device 'tpu9'",
        ),
        "bench shapes: unknown method": (
            ["bench", "shapes", "--preset", "smoke", "--methods", "median"],
            "unknown method 'median'",
        ),
        "bench shapes: no models": (["bench", "shapes", "--models-dir", str(ref.parent)], "no model-METHOD-sSEED/"),
        # the old default started the `cpu` preset, hours of training: now the line names each preset's cost
        "bench shapes: no preset": (["bench", "shapes"], "needs --preset"),
        # what the model's config and tokenizer files decide: before its weights (and torch) load
        "control token in the prompt": ([*generate[:2], "a star <|image_pad|>", *generate[3:]], "'<|image_pad|>'"),
        "end-of-turn token in the prompt": ([*generate[:2], "a star<|im_end|>", *generate[3:]], "'<|im_end|>'"),
        "more references than the model takes": (
            [*generate, *["--ref", str(ref)] * 28],
            "29 reference images given; this model takes at most 28",
        ),
        "a record whose prompt holds a control token": (
            ["generate", "--from-metadata", str(_record(ref, "a star <|vision_start|>"))],
            "--prompt contains the MLLM control token '<|vision_start|>'",
        ),
    }


def _record(ref, prompt: str):
    """A PNG carrying an `easyref` record (as `generate` writes it) of `ref` and `prompt`."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    record = {"version": "0.1.0", "prompt": prompt, "references": [str(ref)], "scale": 1.0, "steps": 1}
    info = PngInfo()
    info.add_text("easyref", json.dumps({**record, "guidance": 5.0, "seed": 0, "num_images": 1}))
    path = ref.with_name("recorded.png")
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


@pytest.mark.parametrize(
    "case",
    [
        "missing reference",
        "bad flag value",
        "bound violated",
        "unknown scheduler",
        "out overwrites a reference",
        "no prompt",
        "prompt not UTF-8",
        "name too long",
        "control characters",
        "folder name too long",
        "missing --from-metadata",
        "info of a non-model",
        "no command",
        "train: no such config",
        "train: unknown setting",
        "train: no data file",
        "train: no data root",
        "convert: no such release",
        "convert: not a release",
        "bench run: no base",
        "bench run: no manifest",
        "no such adapter",
        "no such base",
        "serve: no such adapter",
        "unknown device",
        pytest.param(
            "cuda without a GPU", marks=pytest.mark.skipif(gpu_driver_present(), reason="a GPU driver is here")
        ),
        "bench run: unknown device",
        "bench shapes: unknown method",
        "bench shapes: no models",
        "bench shapes: no preset",
        "control token in the prompt",
        "end-of-turn token in the prompt",
        "more references than the model takes",
        "a record whose prompt holds a control token",
    ],
)
def test_usage_errors_come_before_the_heavy_imports(ref, case):
    argv, phrase = usage_errors(ref)[case]
    result = subprocess.run(
        [sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=60, cwd=ref.parent
    )
    report = json.loads(result.stdout)
    assert report == {"code": 2, "heavy": []}, (report, result.stderr)
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("easyref: error:") and phrase in err, err


def test_bench_shapes_without_a_preset_names_each_and_its_cost(ref):
    result = subprocess.run(
        [sys.executable, "-m", "easyref", "bench", "shapes"], capture_output=True, text=True, timeout=60, cwd=ref.parent
    )
    err = result.stderr.strip()
    assert result.returncode == 2 and len(err.splitlines()) == 1 and err.startswith("easyref: error:"), err
    for preset, cost in (("smoke", "36 s"), ("cpu", "4 h"), ("gpu", "one GPU"), ("full", "for a GPU")):
        assert f"{preset} (" in err and cost in err, (preset, err)
    assert not (ref.parent / "runs").exists()  # nothing was started


# `--version` from a subprocess, its report on stderr (stdout carries the version line)
VERSION_PROBE = f"""
import json, sys
from easyref.cli import main
try:
    code = main(["--version"])
except SystemExit as exit:
    code = exit.code
print(json.dumps({{"code": code, "heavy": [m for m in {HEAVY!r} if m in sys.modules]}}), file=sys.stderr)
"""


def test_version_is_the_installed_packages_and_imports_nothing_heavy(ref):
    from importlib.metadata import version

    result = subprocess.run(
        [sys.executable, "-c", VERSION_PROBE], capture_output=True, text=True, timeout=60, cwd=ref.parent
    )
    assert json.loads(result.stderr) == {"code": 0, "heavy": []}, result.stderr
    assert result.stdout == f"easyref {version('easyref')}\n"
    # and as a user types it, before or instead of a subcommand
    for argv in (["--version"], ["--version", "generate"]):
        typed = subprocess.run([sys.executable, "-m", "easyref", *argv], capture_output=True, text=True, timeout=60)
        assert (typed.returncode, typed.stdout, typed.stderr) == (0, result.stdout, "")


def test_python_dash_m_easyref_usage_error(ref):
    result = subprocess.run(
        [sys.executable, "-m", "easyref", "generate", "--prompt", "x", "--ref", "nope.png", "--out", "o.png"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ref.parent,
    )
    assert result.returncode == 2 and result.stderr == "easyref: error: nope.png: file not found\n"


@pytest.mark.parametrize(
    "argv, level",
    [
        (["generate", "--prompt", "x"], 0),
        (["-v", "generate", "--prompt", "x"], 1),
        (["generate", "--prompt", "x", "-v"], 1),
        (["generate", "-vv", "--prompt", "x"], 2),
        (["-vv", "bench", "convert", "folders", "a", "b"], 2),
        (["bench", "convert", "folders", "a", "b", "-v"], 1),
        (["info", "--verbose"], 1),
    ],
)
def test_verbose_before_or_after_the_subcommand(argv, level):
    assert cli.build_parser().parse_args(argv).verbose == level


def test_verbose_turns_the_libraries_up_again():
    import diffusers
    import transformers

    try:
        cli.configure_output(2)
        assert transformers.utils.logging.get_verbosity() == logging.INFO
        assert diffusers.utils.logging.is_progress_bar_enabled()
        cli.configure_output(1)
        assert diffusers.utils.logging.get_verbosity() == logging.WARNING
    finally:
        cli.configure_output(0)
    assert transformers.utils.logging.get_verbosity() == logging.ERROR


def test_library_warnings_hidden_unless_verbose():
    for verbose, expected in ((0, ["from easyref"]), (1, ["from a library", "from easyref"])):
        with warnings.catch_warnings(record=True) as caught:
            cli.configure_output(verbose)
            warnings.warn_explicit("from a library", UserWarning, "x.py", 1, module="diffusers.schedulers")
            warnings.warn_explicit("from easyref", UserWarning, "y.py", 1, module="easyref.pipeline")
        assert [str(w.message) for w in caught] == expected


# a normal run: socket use is recorded (and refused), stderr is read line by line, and the libraries'
# settings are read after it
QUIET_RUN = """
import json, socket, sys
tried = []
def refuse(*args, **kwargs):
    tried.append(repr(args[:2]))
    raise OSError("no network in this test")
socket.socket.connect = refuse
socket.getaddrinfo = refuse
from easyref.cli import main
code = main(sys.argv[1:])
# configured when the run imported them (main imports neither): quiet, no loading bars
from diffusers.utils import logging as d
from transformers.utils import logging as t
libraries = [t.get_verbosity(), t.is_progress_bar_enabled(), d.get_verbosity(), d.is_progress_bar_enabled()]
print(json.dumps({"code": code, "tried": tried, "libraries": libraries}))
"""


def test_a_normal_run_is_quiet_and_offline(ref, tmp_path):
    argv = [
        "generate",
        "--ref",
        str(ref),
        "--prompt",
        "an object on a white background, at the top left",
        "--out",
        str(tmp_path / "o.png"),
        "--steps",
        "1",
        "--seed",
        "0",
        "--grid",
    ]
    result = subprocess.run(
        [sys.executable, "-c", QUIET_RUN, *argv], capture_output=True, text=True, timeout=300, env=_env()
    )
    report = json.loads(result.stdout)
    quiet = [logging.ERROR, False, logging.ERROR, False]
    assert report == {"code": 0, "tried": [], "libraries": quiet}, (report, result.stderr)
    lines = result.stderr.splitlines()
    assert all(line.startswith("easyref: ") for line in lines), result.stderr  # no library line, no bar
    assert len(lines) == len(set(lines)) == 3, result.stderr  # the bundled-model notice, two `wrote` lines


def _env() -> dict:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith(("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"))}
