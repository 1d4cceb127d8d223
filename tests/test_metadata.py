"""PNG records that reproduce: what `easyref generate` writes into each PNG, and `--from-metadata`
making the same pixels again (CPU, the bundled tiny model, 2 steps)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import shape_image
from PIL import Image, PngImagePlugin

from easyref import cli
from easyref.cli import main


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """Two images of one batch (image 1's noise depends on the batch), references given by relative path."""
    root = tmp_path_factory.mktemp("metadata")
    refs = root / "refs"
    refs.mkdir()
    for i, back in enumerate(("white", "gray")):
        shape_image("red", back).save(refs / f"{i}.png")
    out = root / "out" / "image.png"
    argv = [
        "generate",
        "--refs-dir",
        str(refs),
        "--prompt",
        "an object on a white background, at the top left",
        "--out",
        str(out),
        "--steps",
        "2",
        "--seed",
        "5",
        "--num-images",
        "2",
        "--negative-prompt",
        "",
    ]
    assert main(argv) == 0
    return root, [out.with_name("image_0.png"), out.with_name("image_1.png")]


def record(path: Path) -> dict:
    with Image.open(path) as image:
        return json.loads(image.text["easyref"])


def pixels(path: Path) -> bytes:
    with Image.open(path) as image:
        return image.tobytes()


def test_the_record_holds_every_setting_the_model_and_the_versions(batch):
    root, images = batch
    params = record(images[1])
    assert params["prompt"] == "an object on a white background, at the top left"
    assert params["negative_prompt"] == ""  # as given: "" is not "the checkpoint's default"
    assert (params["seed"], params["steps"], params["scale"], params["guidance"]) == (5, 2, 1.0, 5.0)
    assert (params["num_images"], params["index"], params["width"], params["height"]) == (2, 1, 64, 64)
    assert (params["device"], params["dtype"]) == ("cpu", "float32")
    assert params["references"] == [str(root / "refs" / "0.png"), str(root / "refs" / "1.png")]
    assert all(Path(p).is_absolute() for p in params["references"])
    from importlib.metadata import version

    assert params["version"] == version("easyref") and params["versions"]["torch"] == version("torch")
    assert params["model"] == {"base": None, "mllm": None, "adapter": None}  # as asked: the bundled model
    assert params["sources"] and set(params["sources"]) >= {"base", "mllm", "adapter"}  # as load_pipeline resolved


def test_one_image_of_a_batch_is_made_again_bit_for_bit(batch, caplog):
    _, images = batch
    with caplog.at_level("WARNING"):
        assert main(["generate", "--from-metadata", str(images[1])]) == 0
    again = images[1].with_name("image_1-regen.png")  # the default --out, beside the source
    assert pixels(again) == pixels(images[1])
    assert record(again) == record(images[1])  # and its record makes it again too
    assert "may differ" not in caplog.text  # same versions, same model


def test_flags_given_override_the_record(batch, tmp_path):
    _, images = batch
    out = tmp_path / "one_step.png"
    assert main(["generate", "--from-metadata", str(images[0]), "--out", str(out), "--steps", "1"]) == 0
    params = record(out)
    assert params["steps"] == 1 and params["seed"] == 5 and params["index"] == 0
    assert pixels(out) != pixels(images[0])


def test_a_scheduler_is_recorded_and_made_again_and_an_older_record_reads_as_the_models_own(tmp_path):
    ref = tmp_path / "ref.png"
    shape_image("red", "white").save(ref)
    base = ["--ref", str(ref), "--prompt", "an object on a white background, at the top left", "--steps", "3"]
    base += ["--seed", "4"]
    own, ddim = tmp_path / "own.png", tmp_path / "ddim.png"
    assert main(["generate", *base, "--out", str(own)]) == 0
    assert main(["generate", *base, "--out", str(ddim), "--scheduler", "ddim"]) == 0
    assert (record(own)["scheduler"], record(ddim)["scheduler"]) == ("default", "ddim")
    assert pixels(ddim) != pixels(own)
    assert main(["generate", "--from-metadata", str(ddim)]) == 0  # the record's scheduler, bit for bit
    assert pixels(tmp_path / "ddim-regen.png") == pixels(ddim) and record(tmp_path / "ddim-regen.png") == record(ddim)
    back = tmp_path / "back.png"  # a flag overrides the record's scheduler as any other
    assert main(["generate", "--from-metadata", str(ddim), "--scheduler", "default", "--out", str(back)]) == 0
    assert pixels(back) == pixels(own) and record(back)["scheduler"] == "default"
    # a record written before `scheduler` was recorded: the model's own, as it was then
    older = {key: value for key, value in record(own).items() if key != "scheduler"}
    info = PngImagePlugin.PngInfo()
    info.add_text("easyref", json.dumps(older))
    with Image.open(own) as image:
        image.save(tmp_path / "older.png", pnginfo=info)
    assert main(["generate", "--from-metadata", str(tmp_path / "older.png")]) == 0
    assert pixels(tmp_path / "older-regen.png") == pixels(own)
    assert record(tmp_path / "older-regen.png")["scheduler"] == "default"


def _damaged(tmp_path: Path, text: str | None) -> Path:
    path = tmp_path / "source.png"
    info = PngImagePlugin.PngInfo()
    if text is not None:
        info.add_text("easyref", text)
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


GOOD = {
    "version": "0.1.0",
    "prompt": "x",
    "references": ["/nope.png"],
    "scale": 1.0,
    "steps": 2,
    "guidance": 5.0,
    "seed": 1,
    "num_images": 2,
    "index": 1,
}
BAD_RECORDS = {
    "no file": (None, "file not found"),
    "not a png record": ("", "not a JSON object"),
    "not an image": ("junk", "not an image PIL can read"),
    "no record": ("absent", "no easyref record"),
    "old record": (json.dumps({"prompt": "x", "seed": 1}), "the record lacks version"),
    "wrong type": (json.dumps({**GOOD, "steps": "2"}), "steps is not a whole number"),
    "bool as number": (json.dumps({**GOOD, "seed": True}), "seed is not a whole number"),
    "index out of range": (json.dumps({**GOOD, "index": 2}), "index 2 is not one of its 2 images"),
    "unknown dtype": (json.dumps({**GOOD, "dtype": "int8"}), "dtype 'int8'"),
    "unknown scheduler": (json.dumps({**GOOD, "scheduler": "heun"}), "scheduler 'heun' is not one of default, euler"),
    "nested": ("[" * 10_000 + "]" * 10_000, "not a JSON object"),
    "versions as text": (json.dumps({**GOOD, "versions": "torch 2.13"}), "versions is not a mapping"),
    "prompt not UTF-8": (json.dumps({**GOOD, "prompt": "a caf\udce9 star"}), "prompt is not valid UTF-8 text"),
    "lone surrogate": (json.dumps({**GOOD, "negative_prompt": "\ud800"}), "negative_prompt is not valid UTF-8"),
    "NUL in a reference": (json.dumps({**GOOD, "references": ["/a\u0000b.png"]}), "references are not file names"),
    "digest not hex": (json.dumps({**GOOD, "reference_sha256": ["xyz"]}), "reference_sha256 is not one digest"),
    "digest count": (json.dumps({**GOOD, "reference_sha256": ["0" * 64] * 2}), "reference_sha256 is not one digest"),
    "scale beyond floats": (json.dumps({**GOOD, "scale": 10**400}), "--scale must be a finite number"),
    "steps of 400 digits": (json.dumps({**GOOD, "steps": 10**400}), "got 10000000000000000000... (401 digits)"),
    "reference not UTF-8": (json.dumps({**GOOD, "references": ["/tmp/\ud800.png"]}), "references are not file"),
    "control characters": (json.dumps({**GOOD, "references": ["/a\nb\u001b[2J.png"]}), "references are not file"),
    "missing reference": (json.dumps(GOOD), "/nope.png: file not found"),
    "out is the source": (json.dumps(GOOD), "would overwrite --from-metadata"),
}


@pytest.mark.parametrize("case", list(BAD_RECORDS))
def test_unusable_records_are_one_line_before_any_model_loads(tmp_path, capsys, monkeypatch, case):
    monkeypatch.setattr(cli, "load_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))
    text, phrase = BAD_RECORDS[case]
    if case == "no file":
        source = tmp_path / "missing.png"
    elif case == "not an image":
        source = tmp_path / "junk.png"
        source.write_text(text)
    else:
        source = _damaged(tmp_path, None if text == "absent" else text)
    argv = ["generate", "--from-metadata", str(source)]
    if case == "out is the source":
        shape_image("red").save(tmp_path / "ref.png")
        argv += ["--ref", str(tmp_path / "ref.png"), "--out", str(source)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("easyref: error:") and phrase in err, err


def test_a_reference_changed_since_the_record_is_named(tmp_path, caplog):
    ref = tmp_path / "ref.png"
    shape_image("red", "white").save(ref)
    out = tmp_path / "image.png"
    base = ["--prompt", "an object on a white background, at the top left", "--steps", "1", "--seed", "2"]
    assert main(["generate", "--ref", str(ref), "--out", str(out), *base]) == 0
    assert len(record(out)["reference_sha256"]) == 1
    with caplog.at_level("WARNING"):
        assert main(["generate", "--from-metadata", str(out), "--out", str(tmp_path / "same.png")]) == 0
    assert "has changed" not in caplog.text
    shape_image("blue", "white").save(ref)  # the same name, other pixels
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert main(["generate", "--from-metadata", str(out), "--out", str(tmp_path / "other.png")]) == 0
    assert f"{ref} has changed since {out} was made" in caplog.text


def test_a_record_larger_than_pil_reads_is_one_line(tmp_path, capsys):
    info = PngImagePlugin.PngInfo()
    info.add_text("easyref", "x" * (2 * 1024 * 1024), zip=True)  # 2 MB that compress to a few kB
    Image.new("RGB", (8, 8)).save(tmp_path / "big.png", pnginfo=info)
    assert main(["generate", "--from-metadata", str(tmp_path / "big.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "text chunks are larger than PIL reads" in err, err
