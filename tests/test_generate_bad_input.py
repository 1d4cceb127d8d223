"""`easyref generate` and `easyref convert` against hostile input: one stderr line, the right exit code,
no input touched, no partial output, and refusal before the model loads wherever it can be seen up front."""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import shape_image
from PIL import Image
from safetensors.torch import load_file, save_file

from easyref import cli
from easyref.bundled import bundled_model_dir
from easyref.images import open_image
from easyref.pipeline import EasyRefPipeline


@pytest.fixture
def env(tmp_path, monkeypatch):
    refs = tmp_path / "refs"
    refs.mkdir()
    for i, back in enumerate(("white", "gray")):
        shape_image("red", back).save(refs / f"ref_{i}.png")
    shape_image("red", "yellow").save(refs / "ref.png")
    shape_image("red", "gray").save(refs / "ref_grid.png")
    return tmp_path


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` with its content hash (symlinks by target), to prove nothing changed."""
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_symlink():
            out[str(path)] = "-> " + os.readlink(path)
        elif path.is_file():
            out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def run(capsys, *argv):
    code = cli.main(["generate", "--steps", "2", "--seed", "1", *argv])
    err = capsys.readouterr().err.strip()
    return code, err


def assert_one_line(err: str, phrase: str) -> None:
    """One error line, last, holding `phrase`; a denoising progress bar may stand before it, a traceback never."""
    lines = err.splitlines()
    assert lines and lines[-1].startswith("easyref: error:"), err
    assert sum("easyref: error" in line for line in lines) == 1 and "Traceback" not in err, err
    assert phrase in lines[-1], err


@pytest.fixture
def no_model_load(monkeypatch):
    """Refusals that must come before any model work: loading the pipeline fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was refused")

    monkeypatch.setattr(EasyRefPipeline, "from_pretrained", refuse)
    monkeypatch.setattr(EasyRefPipeline, "from_parts", refuse)  # what `easyref generate` loads through


# ------------------------------------------------------------------ class 1: data loss
def _collisions(env: Path):
    refs = env / "refs"
    os.symlink(refs / "ref.png", env / "link.png")
    os.link(refs / "ref_0.png", env / "hard.png")
    both = ["--ref", str(refs / "ref_0.png"), "--ref", str(refs / "ref_1.png"), "--ref", str(refs / "ref.png")]
    return {
        "out is a reference": [*both, "--out", str(refs / "ref_0.png")],
        "derived _0/_1 names": [*both, "--num-images", "2", "--out", str(refs / "ref.png")],
        "derived grid name": ["--ref", str(refs / "ref_grid.png"), "--grid", "--out", str(refs / "ref.png")],
        "symlink to a reference": [*both, "--out", str(env / "link.png")],
        "hard link of a reference": [*both, "--out", str(env / "hard.png")],
        "relative spelling": [*both, "--out", str(refs / ".." / "refs" / "ref_1.png")],
        "refs-dir member": ["--refs-dir", str(refs), "--grid", "--out", str(refs / "ref.png")],
    }


@pytest.mark.parametrize(
    "case",
    [
        "out is a reference",
        "derived _0/_1 names",
        "derived grid name",
        "symlink to a reference",
        "hard link of a reference",
        "relative spelling",
        "refs-dir member",
    ],
)
def test_output_that_is_an_input_is_refused_before_loading(env, capsys, no_model_load, case):
    argv = _collisions(env)[case]
    before = snapshot(env)
    code, err = run(capsys, "--prompt", "x", *argv)
    assert code == 2
    assert_one_line(err, "would overwrite the reference")
    assert snapshot(env) == before


def test_existing_output_is_replaced(env, capsys):
    out = env / "out.png"
    Image.new("RGB", (8, 8), "blue").save(out)
    code, err = run(capsys, "--prompt", "x", "--ref", str(env / "refs" / "ref.png"), "--out", str(out))
    assert code == 0, err
    with Image.open(out) as image:
        assert "easyref" in image.text  # ours now, not the blue square


# ------------------------------------------------------------------ class 2: unbounded inputs
BOUNDS = {
    "--num-images 1000": (["--num-images", "1000"], "--num-images must be between 1 and 16"),
    "--steps 0": (["--steps", "0"], "--steps must be between 1 and 1000"),
    "--steps 10^6": (["--steps", "1000000"], "--steps must be between 1 and 1000"),
    "--height huge": (["--height", "100000"], "--height must be a multiple of 8 between 8 and 4096"),
    "--width not /8": (["--width", "100"], "--width must be a multiple of 8"),
    "height x width": (["--height", "4096", "--width", "4096"], "pixels; at most"),
    "batch pixels": (["--height", "2048", "--width", "2048", "--num-images", "16"], "per command"),
    "--seed -1": (["--seed", "-1"], "--seed must be between 0 and"),
    "--seed 2^64": (["--seed", str(2**64)], "--seed must be between 0 and"),
    "--guidance inf": (["--guidance", "inf"], "--guidance must be a finite number"),
    "--guidance nan": (["--guidance", "nan"], "--guidance must be a finite number"),
    "--guidance -1": (["--guidance", "-1"], "--guidance must be a finite number between 0"),
    "--scale inf": (["--scale", "inf"], "--scale must be a finite number"),
    "--scale nan": (["--scale", "nan"], "--scale must be a finite number"),
    "100 kB prompt": (["--prompt", "a" * 100_000], "--prompt is 100000 characters long"),
    "100 kB negative": (["--negative-prompt", "b" * 100_000], "--negative-prompt is 100000 characters long"),
}


@pytest.mark.parametrize("case", list(BOUNDS))
def test_out_of_bounds_settings_refused_before_loading(env, capsys, no_model_load, case):
    extra, phrase = BOUNDS[case]
    start = time.perf_counter()
    code, err = run(
        capsys, "--prompt", "x", "--ref", str(env / "refs" / "ref.png"), "--out", str(env / "o.png"), *extra
    )
    assert code == 2
    assert_one_line(err, phrase)
    assert not (env / "o.png").exists()
    assert time.perf_counter() - start < 5


def test_prompt_over_the_token_limit_is_refused_with_the_limit(env, capsys):
    # under the character bound but over MAX_PROMPT_TOKENS: the tokenizer's count decides
    code, err = run(
        capsys, "--prompt", "ab " * 2000, "--ref", str(env / "refs" / "ref.png"), "--out", str(env / "o.png")
    )
    assert code == 2
    assert_one_line(err, "tokens long; at most 1024 are allowed")
    assert not (env / "o.png").exists()


def test_long_prompt_memory_is_bounded(env):
    """Under an address-space limit a regression (masks of L x L for a huge prompt) fails instead of killing
    the machine."""
    script = textwrap.dedent(
        f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (5 * 2**29, 5 * 2**29))  # 2.5 GiB: a normal run needs < 0.5 GiB resident
        from easyref.cli import main
        sys.exit(main(["generate", "--prompt", "a b " * 4000, "--ref", {str(env / "refs" / "ref.png")!r},
                       "--out", {str(env / "o.png")!r}, "--steps", "1"]))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "tokens long" in proc.stderr.strip().splitlines()[-1]


def _adapter_copy(env: Path) -> Path:
    adapter = env / "adapter"
    shutil.copytree(bundled_model_dir() / "adapter", adapter)
    return adapter


CONFIG_EDITS = {
    "has_trunk 'no'": ({"has_trunk": "no"}, "has_trunk must be true or false"),
    "size 112.0": ({"reference_image_size": 112.0}, "reference_image_size must be an integer"),
    "tokens true": ({"num_reference_tokens": True}, "num_reference_tokens must be an integer"),
    "tokens 10^9": ({"num_reference_tokens": 10**9}, "num_reference_tokens must be between 1 and 1024"),
    "negative size 10^6": ({"negative_image_size": 10**6}, "negative_image_size must be between"),
    "width 10^7": ({"mllm_hidden_size": 10**7}, "mllm_hidden_size must be between"),
    "extra field in template": ({"instruction": "{prompt} {__class__}"}, "may only use the field '{prompt}'"),
    "format spec in template": ({"instruction": "{prompt:>999999999}"}, "may only use the field '{prompt}'"),
    "no placeholder": ({"instruction": "hello"}, "placeholder '{prompt}'"),
    "unknown field": ({"surprise": 1}, "unknown EasyRefConfig fields: surprise"),
}


@pytest.mark.parametrize("case", list(CONFIG_EDITS))
def test_adapter_config_values_are_checked_strictly(env, capsys, case):
    adapter = _adapter_copy(env)
    edit, phrase = CONFIG_EDITS[case]
    path = adapter / "easyref_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
    before = snapshot(env)
    code, err = run(
        capsys,
        "--prompt",
        "x",
        "--ref",
        str(env / "refs" / "ref.png"),
        "--out",
        str(env / "o.png"),
        "--base",
        "default",
        "--adapter",
        str(adapter),
    )
    assert code == 2
    assert_one_line(err, phrase)
    assert snapshot(env) == before


def test_deeply_nested_config_is_one_line(env, capsys):
    adapter = _adapter_copy(env)
    (adapter / "easyref_config.json").write_text("[" * 100_000 + "]" * 100_000)
    code, err = run(
        capsys,
        "--prompt",
        "x",
        "--ref",
        str(env / "refs" / "ref.png"),
        "--out",
        str(env / "o.png"),
        "--base",
        "default",
        "--adapter",
        str(adapter),
    )
    assert code == 2
    assert_one_line(err, "nested too deeply")


# ------------------------------------------------------------------ class 3: silent garbage
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_adapter_tensor_is_refused_by_name(env, capsys, value):
    adapter = _adapter_copy(env)
    tensors = load_file(adapter / "easyref.safetensors")
    key = sorted(k for k in tensors if k.startswith("unet."))[0]
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = value
    save_file(tensors, adapter / "easyref.safetensors", metadata={"format": "easyref", "version": "1"})
    code, err = run(
        capsys,
        "--prompt",
        "x",
        "--ref",
        str(env / "refs" / "ref.png"),
        "--out",
        str(env / "o.png"),
        "--base",
        "default",
        "--adapter",
        str(adapter),
    )
    assert code == 2
    assert_one_line(err, f"tensor {key} holds NaN or Inf")
    assert not (env / "o.png").exists()


def test_overflowing_generation_fails_loudly_and_writes_nothing(env, capsys):
    # finite weights so large that the projection overflows: the latents go non-finite mid-run
    adapter = _adapter_copy(env)
    tensors = load_file(adapter / "easyref.safetensors")
    for key in tensors:
        if "encoder_hid_proj" in key and key.endswith("weight") and tensors[key].ndim == 2:
            tensors[key] = tensors[key] * 1e37
    save_file(tensors, adapter / "easyref.safetensors", metadata={"format": "easyref", "version": "1"})
    out = env / "o.png"
    code, err = run(
        capsys,
        "--prompt",
        "x",
        "--ref",
        str(env / "refs" / "ref.png"),
        "--out",
        str(out),
        "--base",
        "default",
        "--adapter",
        str(adapter),
        "--num-images",
        "2",
        "--grid",
    )
    assert code == 1
    assert_one_line(err, "NaN/Inf")
    assert not any(p.suffix == ".png" for p in env.iterdir())


# ------------------------------------------------------------------ class 4: wrong pixels
def _mode_cases(tmp: Path) -> dict[str, tuple[Path, tuple[int, int, int]]]:
    """One file per PIL mode holding a mid-grey (or a known colour); what RGB each must decode to."""
    grey16 = np.full((8, 8), 32896, dtype=np.uint16)  # 128 * 257
    cases = {}

    def add(name, image, suffix, expected, **save):
        path = tmp / f"{name}{suffix}"
        image.save(path, **save)
        cases[name] = (path, expected)

    add("1", Image.new("1", (8, 8), 1), ".png", (255, 255, 255))
    add("L", Image.new("L", (8, 8), 128), ".png", (128, 128, 128))
    add("P", Image.new("RGB", (8, 8), (200, 10, 10)).quantize(4), ".png", (200, 10, 10))
    add("RGB", Image.new("RGB", (8, 8), (10, 200, 10)), ".png", (10, 200, 10))
    add("RGBA transparent", Image.new("RGBA", (8, 8), (0, 0, 0, 0)), ".png", (255, 255, 255))
    add("RGBA opaque", Image.new("RGBA", (8, 8), (10, 10, 200, 255)), ".png", (10, 10, 200))
    add("LA transparent", Image.new("LA", (8, 8), (0, 0)), ".png", (255, 255, 255))
    add("I;16 png", Image.fromarray(grey16), ".png", (128, 128, 128))
    add("I;16 tiff", Image.fromarray(grey16), ".tif", (128, 128, 128))
    add("I 8-bit values", Image.new("I", (8, 8), 128), ".tif", (128, 128, 128))
    add("F", Image.new("F", (8, 8), 128.0), ".tif", (128, 128, 128))
    add("CMYK", Image.new("CMYK", (8, 8), (0, 0, 0, 0)), ".jpg", (255, 255, 255), quality=100)
    add("palette with transparency", Image.new("P", (8, 8), 0), ".png", (255, 255, 255), transparency=0)
    return cases


@pytest.mark.parametrize(
    "case",
    [
        "1",
        "L",
        "P",
        "RGB",
        "RGBA transparent",
        "RGBA opaque",
        "LA transparent",
        "I;16 png",
        "I;16 tiff",
        "I 8-bit values",
        "F",
        "CMYK",
        "palette with transparency",
    ],
)
def test_every_pil_mode_decodes_to_the_right_rgb(tmp_path, case):
    path, expected = _mode_cases(tmp_path)[case]
    image = open_image(path)
    assert image.mode == "RGB"
    mean = np.asarray(image, dtype=np.float64).reshape(-1, 3).mean(0)
    assert np.abs(mean - np.array(expected)).max() <= 3, (case, mean)


def test_generate_reads_16_bit_references_like_training(env):
    """The one decoding function: generate, training and the bench see the same pixels."""
    from easyref.bench import runner
    from easyref.train import data

    path = env / "grey16.png"
    Image.fromarray(np.full((16, 16), 32896, dtype=np.uint16)).save(path)
    seen = [
        np.asarray(cli.load_images([path])[0]),
        np.asarray(data.open_image(path)),
        np.asarray(runner.open_image(path)),
    ]
    for array in seen:
        assert np.array_equal(array, seen[0])
    assert abs(float(seen[0].mean()) - 128) <= 1  # not the clipped white


def test_contact_sheet_shows_references_upright(env, capsys):
    """A portrait stored sideways with EXIF orientation 6 appears upright in the grid, as the model saw it."""
    stored = Image.new("RGB", (64, 32), "white")
    stored.paste((255, 0, 0), (0, 0, 32, 32))  # red on the stored left = the upright top
    exif = Image.Exif()
    exif[0x0112] = 6
    path = env / "sideways.jpg"
    stored.save(path, exif=exif, quality=100)
    out = env / "o.png"
    code, err = run(capsys, "--prompt", "x", "--ref", str(path), "--out", str(out), "--grid")
    assert code == 0, err
    with Image.open(env / "o_grid.png") as grid:
        cell = grid.height // 2
        top = np.asarray(grid.crop((0, 0, cell, cell)).convert("RGB"), dtype=np.float64)
    # upright: 32 wide x 64 tall, centred in the cell; its upper half is red
    upper, lower = top[cell // 8 : cell // 2 - 2, cell // 2], top[cell // 2 + 2 : cell - cell // 8, cell // 2]
    assert upper[:, 0].mean() > 200 and upper[:, 1].mean() < 60
    assert lower.mean() > 200


# ------------------------------------------------------------------ class 5: outputs that cannot be written
def test_out_is_a_folder(env, capsys, no_model_load):
    folder = env / "folder.png"
    folder.mkdir()
    code, err = run(capsys, "--prompt", "x", "--ref", str(env / "refs" / "ref.png"), "--out", str(folder))
    assert code == 2
    assert_one_line(err, "is a folder")


def test_parent_is_a_file(env, capsys, no_model_load):
    (env / "file").write_text("x")
    code, err = run(
        capsys, "--prompt", "x", "--ref", str(env / "refs" / "ref.png"), "--out", str(env / "file" / "o.png")
    )
    assert code == 2
    assert_one_line(err, "is a file, not a folder")


def test_read_only_folder_is_refused_before_loading(env, capsys, no_model_load, monkeypatch):
    read_only = env / "ro"
    read_only.mkdir()
    os.chmod(read_only, 0o555)
    if os.getuid() == 0:  # root writes through permission bits: make the folder refuse as it would anyone else
        real_mkstemp = tempfile.mkstemp

        def refuse(*args, dir=None, **kwargs):
            if dir is not None and Path(dir) == read_only:
                raise PermissionError(errno.EACCES, "Permission denied", str(dir))
            return real_mkstemp(*args, dir=dir, **kwargs)

        monkeypatch.setattr(tempfile, "mkstemp", refuse)
    try:
        code, err = run(
            capsys, "--prompt", "x", "--ref", str(env / "refs" / "ref.png"), "--out", str(read_only / "sub" / "o.png")
        )
        assert code == 2
        assert_one_line(err, "permission denied")
        assert list(read_only.iterdir()) == []
    finally:
        os.chmod(read_only, 0o755)


def test_disk_full_writes_all_images_or_none(env, capsys, monkeypatch):
    real_save = Image.Image.save
    calls = []

    def full_after_one(self, fp, *args, **kwargs):
        calls.append(fp)
        if len(calls) >= 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", full_after_one)
    out = env / "out" / "o.png"
    code, err = run(
        capsys, "--prompt", "x", "--ref", str(env / "refs" / "ref.png"), "--out", str(out), "--num-images", "3"
    )
    assert code == 1
    assert_one_line(err, "no space left on the device")
    assert list(out.parent.iterdir()) == []  # neither finished images nor temporary files


# ------------------------------------------------------------------ classes 7-8: non-regular files, control tokens
def test_fifo_reference_is_refused_without_hanging(env):
    fifo = env / "pipe.png"
    os.mkfifo(fifo)
    proc = subprocess.run(
        [sys.executable, "-m", "easyref", "generate", "--prompt", "x", "--ref", str(fifo), "--out", str(env / "o.png")],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ),
    )
    assert proc.returncode == 2
    assert_one_line(proc.stderr.strip().splitlines()[-1], "not a regular file")


@pytest.mark.parametrize("token", ["<|image_pad|>", "<|vision_start|>", "<|im_end|>"])
def test_prompt_with_mllm_control_tokens_is_refused(env, capsys, no_model_load, token):
    """Read from the MLLM's tokenizer files before any weight loads (the pipeline checks it again)."""
    code, err = run(
        capsys, "--prompt", f"a red {token} star", "--ref", str(env / "refs" / "ref.png"), "--out", str(env / "o.png")
    )
    assert code == 2
    assert_one_line(err, f"--prompt contains the MLLM control token {token!r}")
    assert not (env / "o.png").exists()


def test_more_references_than_the_model_takes_are_refused_before_loading(env, capsys, no_model_load):
    """The bound is the adapter config's max_references (28 for the bundled model), not only the CLI's 64."""
    refs = ["--ref", str(env / "refs" / "ref.png")] * 29
    code, err = run(capsys, "--prompt", "a red star", *refs, "--out", str(env / "o.png"))
    assert code == 2
    assert_one_line(err, "29 reference images given; this model takes at most 28")
    with pytest.raises(AssertionError, match="the model was loaded"):  # 28 pass, on to the weights
        run(capsys, "--prompt", "a red star", *refs[:56], "--out", str(env / "o.png"))


def test_a_too_long_prompt_is_counted_on_the_tokenizer_files(env, capsys, no_model_load):
    """1025 tokens, far under the 16,384-character bound: counted on the MLLM's tokenizer before the weights
    (the bundled one has no merges: a letter is a token)."""
    code, err = run(capsys, "--prompt", "x" * 1025, "--ref", str(env / "refs" / "ref.png"), "--out", str(env / "o.png"))
    assert code == 2
    assert_one_line(err, "--prompt is 1025 tokens long; at most 1024 are allowed")


# ------------------------------------------------------------------ convert
def test_convert_refuses_to_overwrite_its_source_and_non_finite_weights(env, capsys):
    adapter = _adapter_copy(env)
    # our own weights file handed in as a "release" file, converted into its own folder
    before = snapshot(env)
    code = cli.main(["convert", str(adapter / "easyref.safetensors"), str(adapter)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert_one_line(err, "is the release file being converted")
    assert snapshot(env) == before


def test_convert_refuses_non_finite_release(env, capsys):
    tensors = {
        "image_proj_model.proj.0.weight": torch.zeros(8, 4),
        "image_proj_model.proj.2.weight": torch.zeros(4, 8),
        "mllm_final_layer.reference_tokens": torch.full((2, 4), math.nan),
    }
    src = env / "release.safetensors"
    save_file(tensors, src)
    code = cli.main(["convert", str(src), str(env / "converted")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert_one_line(err, "holds NaN or Inf")
    assert not (env / "converted").exists()


@pytest.mark.parametrize("where", ["under a file", "a file"])
def test_convert_checks_its_output_folder_before_reading_the_release(env, capsys, monkeypatch, where):
    from easyref import release

    monkeypatch.setattr(release, "convert_release", lambda *a, **k: pytest.fail("the release was read"))
    src = env / "release.safetensors"
    save_file({"image_proj_model.proj.0.weight": torch.zeros(2, 2)}, src)
    (env / "afile").write_text("not a folder")
    dst = env / "afile" / "sub" if where == "under a file" else env / "afile"
    assert cli.main(["convert", str(src), str(dst)]) == 2
    assert_one_line(capsys.readouterr().err.strip(), "is a file, not a folder")
    assert (env / "afile").read_text() == "not a folder"


def test_control_tokens_are_read_from_any_shape_of_tokenizer_config(tmp_path):
    """A config's token fields hold a string, an AddedToken mapping or lists of them; anything else (a
    hostile or damaged file) is skipped, never an exception. Without a tokenizer.json the check waits for
    the pipeline's (`prompting.check_prompt`)."""
    from easyref.generation import _token_strings, check_prompt_tokens

    assert _token_strings([None, 5, "<a>", {"content": "<b>"}, ["<c>", {"content": 3}, [1]], {"x": 1}]) == [
        "<a>",
        "<b>",
        "<c>",
    ]
    check_prompt_tokens("--prompt", "<|image_pad|>", tmp_path)  # no tokenizer files here: nothing to read


def test_the_tokenizer_files_say_what_the_loaded_tokenizer_says():
    """The early check (`tokenizers` on the files) finds the control tokens and counts the tokens the
    pipeline's own check (`prompting.check_prompt`, on transformers' tokenizer) finds and counts."""
    from transformers import AutoTokenizer

    from easyref.generation import _file_tokenizer, control_tokens
    from easyref.prompting import special_token_strings

    folder = bundled_model_dir() / "qwen2vl"
    early, loaded = _file_tokenizer(folder), AutoTokenizer.from_pretrained(folder)
    assert control_tokens(early, folder) == special_token_strings(loaded)
    for prompt in ("a star", " héllo  wörld\n\nx", "日本語", "a<|im_end|>b", "x" * 3000):
        count = len(early.encode(prompt, add_special_tokens=False).ids)
        assert count == len(loaded(prompt, add_special_tokens=False)["input_ids"]), prompt
