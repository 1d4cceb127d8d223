"""`easyref` CLI: end to end with the bundled default model, and every user mistake -> exit 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import shape_image
from PIL import Image

from easyref.cli import main


@pytest.fixture
def env(tmp_path):
    refs = tmp_path / "refs"
    refs.mkdir()
    for i, color in enumerate(("red", "red", "red")):
        shape_image(color, ("white", "gray", "yellow")[i]).save(refs / f"{i}.png")
    return tmp_path


def generate(env, *extra):
    out = env / "out" / "image.png"
    argv = ["generate", "--prompt", "a red circle", "--out", str(out), "--steps", "2", "--seed", "3", *extra]
    return main(argv), out


def test_generate_end_to_end_with_metadata_and_grid(env, caplog):
    refs = sorted(str(p) for p in (env / "refs").iterdir())
    with caplog.at_level("WARNING"):
        code, out = generate(env, "--ref", refs[0], "--refs-dir", str(env / "refs"), "--grid", "--num-images", "2")
    assert code == 0
    assert "bundled default model" in caplog.text
    outputs = [out.with_name("image_0.png"), out.with_name("image_1.png")]
    for index, path in enumerate(outputs):
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            params = json.loads(image.text["easyref"])
            assert image.size == (params["width"], params["height"])
        assert params["prompt"] == "a red circle" and params["seed"] == 3 and params["index"] == index
        assert params["steps"] == 2 and params["scale"] == 1.0 and len(params["references"]) == 4
    with Image.open(out.with_name("image_grid.png")) as grid:
        assert grid.height == 2 * outputs_size(outputs[0]) and grid.width == 4 * outputs_size(outputs[0])
    assert sorted(p.name for p in out.parent.iterdir()) == ["image_0.png", "image_1.png", "image_grid.png"]


def test_explain_writes_the_reference_maps_and_leaves_the_image_unchanged(env):
    ref = str(env / "refs" / "0.png")
    _, out = generate(env, "--ref", ref, "--refs-dir", str(env / "refs"))
    plain = Image.open(out).convert("RGB")
    code, out = generate(env, "--ref", ref, "--refs-dir", str(env / "refs"), "--explain")
    assert code == 0
    # the maps come from a pass of their own: the image is the one made without them, to the bit
    assert Image.open(out).convert("RGB").tobytes() == plain.tobytes()
    with Image.open(out.with_name("image_explain.png")) as sheet:
        sheet.verify()
    with Image.open(out.with_name("image_explain.png")) as sheet:
        assert sheet.width == 4 * 256 and json.loads(sheet.text["easyref"])["explain"] is True


def outputs_size(path):
    with Image.open(path) as image:
        return image.width


def test_same_seed_same_image(env):
    ref = str(env / "refs" / "0.png")
    _, out = generate(env, "--ref", ref)
    first = Image.open(out).tobytes()
    _, out = generate(env, "--ref", ref)
    assert Image.open(out).tobytes() == first


def _bad_inputs(env):
    text = env / "notes.png"
    text.write_text("not an image")
    truncated = env / "truncated.png"
    data = (env / "refs" / "0.png").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    empty = env / "empty"
    empty.mkdir()
    many = env / "many"
    many.mkdir()
    for i in range(29):
        shape_image("red", size=(20, 20)).save(many / f"{i:02d}.png")
    mismatched = env / "mismatched"
    return {
        "missing": (["--ref", str(env / "nope.png")], "not found"),
        "not an image": (["--ref", str(text)], "not an image"),
        "truncated": (["--ref", str(truncated)], "damaged or truncated"),
        "zero refs": (["--refs-dir", str(empty)], "no reference images"),
        "too many": (["--refs-dir", str(many)], "at most 28"),
        "bad size": (["--ref", str(env / "refs" / "0.png"), "--height", "30"], "multiple of 8"),
        "missing adapter": (
            ["--ref", str(env / "refs" / "0.png"), "--base", "default", "--adapter", str(mismatched)],
            "no such file or folder",
        ),
    }


@pytest.mark.parametrize(
    "case", ["missing", "not an image", "truncated", "zero refs", "too many", "bad size", "missing adapter"]
)
def test_user_mistakes_exit_2_one_line_no_output(env, capsys, case):
    argv, message = _bad_inputs(env)[case]
    code, out = generate(env, *argv)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert message in err and len(err.splitlines()) == 1 and err.startswith("easyref: error:")
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_decompression_bomb(env, capsys, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # a 60x44 reference is then a "bomb" to PIL too
    code, out = generate(env, "--ref", str(env / "refs" / "0.png"))
    assert code == 2 and "images may be at most" in capsys.readouterr().err
    assert not out.exists()


def test_checkpoint_that_does_not_fit_the_base(env, capsys, make_pipeline, tiny_dirs):
    adapter = env / "adapter"
    make_pipeline().save_adapter(adapter)
    config = json.loads((adapter / "easyref_config.json").read_text())
    config["cross_attention_dim"] = 2048
    (adapter / "easyref_config.json").write_text(json.dumps(config))
    code, out = generate(
        env,
        "--ref",
        str(env / "refs" / "0.png"),
        "--base",
        str(tiny_dirs["sdxl"]),
        "--mllm",
        str(tiny_dirs["qwen"]),
        "--adapter",
        str(adapter),
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and "does not fit" in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_base_that_is_not_a_model(env, capsys):
    not_a_model = env / "empty_model"
    not_a_model.mkdir()
    code, out = generate(env, "--ref", str(env / "refs" / "0.png"), "--base", str(not_a_model))
    err = capsys.readouterr().err.strip()
    assert code == 2 and "no model_index.json in this folder" in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_convert_bad_source(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "missing"), str(tmp_path / "dst")]) == 2
    (tmp_path / "model.safetensors").write_bytes(b"junk")
    assert main(["convert", str(tmp_path), str(tmp_path / "dst")]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and "no such file" in errors[0] and "cannot read" in errors[1]
    assert not (tmp_path / "dst" / "easyref.safetensors").exists()


def test_help_of_the_installed_command():
    for argv in (["--help"], ["generate", "--help"], ["convert", "--help"], ["train", "--help"]):
        result = subprocess.run([sys.executable, "-m", "easyref.cli", *argv], capture_output=True, text=True)
        assert result.returncode == 0 and "usage: easyref" in result.stdout
        if argv[0] == "generate":
            assert "--scheduler {default,euler,euler-ancestral,dpm++2m,ddim,unipc}" in result.stdout


def test_a_copy_without_the_bundled_model_says_so_in_one_line(env, monkeypatch, capsys):
    """A package installed without its weights cannot make the default model: one line, exit 2, and the
    named-model path still works."""
    from easyref import bundled

    monkeypatch.setattr(bundled, "BUNDLED_DIR", env / "nowhere")
    code, out = generate(env, "--refs-dir", str(env / "refs"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not out.exists()
    assert len(err) == 1 and "no bundled model" in err[0] and "--base/--mllm/--adapter" in err[0]
