"""`easyref train` against bad input: one `easyref: error:` line, exit code 2 (1 for a full disk), no input
touched, no `final/` from a run that must fail, nothing written through a symlink, never a hang."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_run import TINY_RUN, write_config

from easyref.cli import main
from easyref.images import open_image
from easyref.train import data as train_data
from easyref.train.data import DataError, DataSettings, Skipped, TrainDataset, TrainSample
from easyref.train.example import write_example_data
from easyref.train.trainer import Trainer, skip_verdict
from easyref.train.validation import load_validation_references

pytestmark = pytest.mark.usefixtures("one_thread")

MARKER = "easyref-pwned-marker"


# ---------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def example(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_example_data(root, subjects=4, per_subject=3, size=48)  # 12 records
    return root


def settings(tiny_dirs, data_root: Path, out: Path, **overrides) -> dict:
    values = dict(
        stage=1,
        base=str(tiny_dirs["sdxl"]),
        mllm=str(tiny_dirs["qwen"]),
        output_dir=str(out),
        data=str(data_root / "pairs.json"),
        data_root=str(data_root),
        **TINY_RUN,
    )
    values.update(overrides)
    return values


def snapshot(*folders: Path) -> dict[str, str]:
    """Every file under the folders with its content hash (symlinks by target), to prove nothing changed."""
    out = {}
    for folder in folders:
        for path in sorted([folder, *folder.rglob("*")]):
            if path.is_symlink():
                out[str(path)] = "-> " + os.readlink(path)
            elif path.is_file():
                out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def train(capsys, *argv) -> tuple[int, str]:
    code = main(["train", *map(str, argv)])
    return code, capsys.readouterr().err


def one_error(err: str, phrase: str) -> str:
    """Exactly one `easyref: error:` line, the last one written, holding `phrase`; no traceback."""
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("easyref: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], lines[-5:]
    assert phrase in errors[0], errors[0]
    assert "Traceback" not in err
    return errors[0]


def copy_data(example: Path, dest: Path) -> Path:
    shutil.copytree(example, dest)
    return dest


@pytest.fixture(scope="module")
def base_run(tiny_dirs, example, tmp_path_factory):
    """A finished 2-step stage-1 run (checkpoint-0000002 + final), copied by the tests that resume it."""
    work = tmp_path_factory.mktemp("base")
    cfg = write_config(work / "cfg.yaml", settings(tiny_dirs, example, work / "run"))
    assert main(["train", "--config", str(cfg)]) == 0
    return work / "run"


def resume_copy(base_run: Path, tiny_dirs, example, tmp_path: Path, **overrides) -> tuple[Path, Path]:
    out = tmp_path / "run"
    shutil.copytree(base_run, out, symlinks=True)
    cfg = write_config(tmp_path / "cfg.yaml", settings(tiny_dirs, example, out, max_steps=3, **overrides))
    return out, cfg


@contextmanager
def deadline(seconds: int):
    """A hang (a blocking open of a FIFO) becomes a test failure instead of a stuck suite."""

    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: it hangs")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ---------------------------------------------------------------------- 1. one image-decoding rule
def _awkward_images(folder: Path) -> list[Path]:
    folder.mkdir()
    rgba = Image.new("RGBA", (24, 24), (10, 200, 30, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))  # transparent: white under the shared rule, black under .convert("RGB")
    sixteen = Image.fromarray(np.full((24, 24), 128 * 257, dtype=np.uint16))  # clipped to white by PIL alone
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    paths = []
    for name, image, kwargs in (("rgba.png", rgba, {}), ("i16.png", sixteen, {}), ("rot.jpg", stored, {"exif": exif})):
        image.save(folder / name, **kwargs)
        paths.append(folder / name)
    return paths


def test_trainer_and_validation_decode_with_the_shared_rule(tmp_path):
    paths = _awkward_images(tmp_path / "img")
    assert train_data.open_image is open_image and not hasattr(train_data, "_high_depth_to_l")
    validation = load_validation_references([str(p) for p in paths])
    dataset = TrainDataset(
        [{"target": p.name} for p in paths],
        tmp_path / "img",
        DataSettings(
            resolution=16, bucket_stride=8, crop="center", image_drop_rate=0, text_drop_rate=0, both_drop_rate=0
        ),
    )
    for index, (path, image) in enumerate(zip(paths, validation)):
        expected = np.asarray(open_image(path))
        assert np.array_equal(np.asarray(image), expected), path.name
        assert dataset[(0, index)].time_ids[:2].tolist() == [expected.shape[0], expected.shape[1]]
    assert np.asarray(validation[0])[0, 0].tolist() == [255, 255, 255]  # transparency composited on white
    assert abs(int(np.asarray(validation[1])[5, 5, 0]) - 128) <= 1  # 16-bit scaled, not clipped
    assert validation[2].size == (20, 40)  # EXIF orientation applied


@pytest.mark.parametrize("kind, phrase", [("truncated", "damaged or truncated"), ("text", "not an image")])
def test_bad_validation_reference_is_one_line_before_models_load(
    tiny_dirs, example, tmp_path, capsys, monkeypatch, kind, phrase
):
    ref = tmp_path / "ref.png"
    good = (example / "images" / "000_0.png").read_bytes()
    ref.write_bytes(good[: len(good) // 2] if kind == "truncated" else b"hello")
    monkeypatch.setattr("easyref.train.trainer.load_stage_models", _no_models)
    cfg = write_config(
        tmp_path / "cfg.yaml",
        settings(tiny_dirs, example, tmp_path / "run", validation_every=1, validation_references=[str(ref)]),
    )
    code, err = train(capsys, "--config", cfg)
    assert code == 2
    one_error(err, f"validation_references: {ref} ")
    assert phrase in err and not (tmp_path / "run").exists()


def _no_models(config):
    raise AssertionError("the models were loaded before a check that needs none of them")


def test_pixel_bombs_are_bad_images_skipped_with_the_reason(tmp_path, monkeypatch):
    """A 10 kB PNG declaring 9000 x 9000: refused from its header, as a target or as a reference."""
    from test_image_bounds import bomb_png

    from easyref import limits
    from easyref.images import ImageFileError

    root = tmp_path / "data"
    root.mkdir()
    (root / "bomb.png").write_bytes(bomb_png())
    for i in range(3):
        Image.new("RGB", (100, 100), (60 * i, 0, 0)).save(root / f"ref{i}.png")
    no_drop = dict(resolution=16, bucket_stride=8, image_drop_rate=0, text_drop_rate=0, both_drop_rate=0)
    bound = "9000 x 9000 = 81.0 M pixels; images may be at most 50.0 M pixels each"
    target = TrainDataset([{"target": "bomb.png"}], root, DataSettings(**no_drop))[(0, 0)]
    assert isinstance(target, Skipped) and target.path.endswith("bomb.png") and target.reason == bound
    with pytest.raises(DataError, match=r"bomb\.png \(record index 0\): 9000 x 9000 = 81\.0 M pixels"):
        TrainDataset([{"target": "bomb.png"}], root, DataSettings(**no_drop), strict=True)[(0, 0)]
    group = [{"target": "ref0.png", "image_file": ["ref0.png", "ref1.png", "ref2.png"]}]
    stage3 = TrainDataset(
        [{**group[0], "image_file": ["ref0.png", "bomb.png"]}], root, DataSettings(stage=3, **no_drop)
    )
    reference = stage3[(0, 0)]
    assert isinstance(reference, Skipped) and reference.path.endswith("bomb.png")
    assert reference.reason == bound.replace("images may", "references may")
    monkeypatch.setattr(limits, "MAX_GROUP_PIXELS", 25_000)  # each reference is 10 000 pixels
    over = TrainDataset(group, root, DataSettings(stage=3, **no_drop))[(0, 0)]
    assert isinstance(over, Skipped) and over.reason.startswith("the 3 references hold 30000 pixels in all")
    with pytest.raises(ImageFileError, match="bomb.png is 9000 x 9000"):
        load_validation_references([str(root / "ref0.png"), str(root / "bomb.png")])


# ---------------------------------------------------------------------- 2. skipped samples
def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def test_training_on_nothing_fails_without_final(tiny_dirs, example, tmp_path, capsys):
    data = copy_data(example, tmp_path / "data")
    for image in (data / "images").glob("*.png"):
        _truncate(image)
    before = snapshot(data)
    cfg = write_config(tmp_path / "cfg.yaml", settings(tiny_dirs, data, tmp_path / "run", max_steps=6))
    code, err = train(capsys, "--config", cfg)
    assert code == 2
    line = one_error(err, "too many samples skipped")
    assert "damaged or truncated" in line and "max_skip_fraction" in line
    assert not (tmp_path / "run" / "final").exists() and not list((tmp_path / "run").glob("checkpoint-*"))
    assert snapshot(data) == before


def test_unreadable_stage3_references_fail_without_final(tiny_dirs, example, base_run, tmp_path, capsys):
    data = copy_data(example, tmp_path / "data")
    groups = [json.loads(line) for line in (data / "groups.jsonl").read_text().splitlines()]
    for group in groups[1:]:  # 11 of 12 groups name references that are gone; every target stays readable
        group["image_file"] = [f"gone/{Path(ref).name}" for ref in group["image_file"]]
    (data / "broken.jsonl").write_text("".join(json.dumps(g) + "\n" for g in groups))
    before = snapshot(data)
    values = settings(
        tiny_dirs,
        data,
        tmp_path / "run",
        stage=3,
        init_from=str(base_run / "final"),
        data=str(data / "broken.jsonl"),
        batch_size=1,
        image_drop_rate=0.0,
        both_drop_rate=0.0,
        max_steps=12,
    )
    code, err = train(capsys, "--config", write_config(tmp_path / "cfg.yaml", values))
    assert code == 2
    one_error(err, "too many samples skipped")
    assert "file not found" in err and not (tmp_path / "run" / "final").exists()
    assert snapshot(data) == before


def test_a_few_skips_pass_and_every_epoch_is_summarised(tiny_dirs, example, tmp_path, capsys, caplog):
    data = copy_data(example, tmp_path / "data")
    (data / "images" / "001_1.png").unlink()  # 1 of 12 = 8.3% < 10%
    cfg = write_config(tmp_path / "cfg.yaml", settings(tiny_dirs, data, tmp_path / "run", max_steps=7))
    with caplog.at_level(logging.INFO):
        code, err = train(capsys, "--config", cfg)  # epoch 0 = 6 steps, then 1 step into epoch 1
    assert code == 0, err
    assert "epoch 0: 1 samples skipped of 12 (8.3%; max_skip_fraction 0.1); first: " in caplog.text
    assert "001_1.png: file not found" in caplog.text
    assert "epoch 1 (first 2 of 12 samples): 0 samples skipped of 2" in caplog.text  # the loop ended mid-epoch
    assert (tmp_path / "run" / "final").is_dir()


def test_max_skip_fraction_1_never_stops_and_logs_no_fake_loss(tiny_dirs, example, tmp_path, capsys):
    data = copy_data(example, tmp_path / "data")
    for image in (data / "images").glob("*.png"):
        _truncate(image)
    cfg = write_config(tmp_path / "cfg.yaml", settings(tiny_dirs, data, tmp_path / "run", max_skip_fraction=1.0))
    code, err = train(capsys, "--config", cfg)
    assert code == 0, err
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert losses == [None, None]  # nothing was trained: no loss, not a perfect 0.0


def test_max_skip_fraction_0_stops_at_the_first_skip(tiny_dirs, example, tmp_path, capsys):
    data = copy_data(example, tmp_path / "data")
    (data / "images" / "001_1.png").unlink()
    cfg = write_config(
        tmp_path / "cfg.yaml", settings(tiny_dirs, data, tmp_path / "run", max_steps=6, max_skip_fraction=0)
    )
    code, err = train(capsys, "--config", cfg)
    assert code == 2
    one_error(err, "more than max_skip_fraction 0 of the epoch")
    assert not (tmp_path / "run" / "final").exists()


@pytest.mark.parametrize("value", ["-0.1", "1.5", "abc", ".nan", "[0.1]"])
def test_max_skip_fraction_is_validated(tiny_dirs, example, tmp_path, capsys, value):
    cfg = write_config(tmp_path / "cfg.yaml", settings(tiny_dirs, example, tmp_path / "run"))
    code, err = train(capsys, "--config", cfg, "--set", f"max_skip_fraction={value}")
    assert code == 2
    one_error(err, "max_skip_fraction must be")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "skipped, seen, size, fraction, window, finished, stops",
    [
        (2, 2, 12, 0.1, 12, False, True),  # 2 > 1.2: the epoch cannot end below 10%
        (1, 6, 12, 0.1, 12, False, False),
        (1, 12, 12, 0.1, 12, True, False),  # 8.3% at the epoch's end
        (16, 16, 1000, 0.1, 16, False, True),  # every one of the first 16 failed
        (15, 15, 1000, 0.1, 16, False, False),  # not yet judged
        (2, 2, 1000, 0.1, 16, True, True),  # the run ended: all it saw failed
        (5, 20, 1000, 0.1, 16, True, True),  # ended mid-epoch with 25% of 20 skipped
        (5, 20, 1000, 0.1, 16, False, False),  # ... judged only at the end
        (999, 999, 1000, 1.0, 16, True, False),  # 1 = never stop
        (1, 5, 1000, 0.0, 16, False, True),  # 0 = the first skip stops
    ],
)
def test_skip_verdict(skipped, seen, size, fraction, window, finished, stops):
    assert bool(skip_verdict(skipped, seen, size, fraction, window, finished)) == stops


def test_fail_on_bad_data_with_workers_is_one_line(tiny_dirs, example, tmp_path, capsys):
    data = copy_data(example, tmp_path / "data")
    for image in (data / "images").glob("*.png"):
        _truncate(image)
    cfg = write_config(
        tmp_path / "cfg.yaml", settings(tiny_dirs, data, tmp_path / "run", num_workers=2, fail_on_bad_data=True)
    )
    code, err = train(capsys, "--config", cfg)
    assert code == 2
    one_error(err, "fail_on_bad_data is set")
    assert not (tmp_path / "run" / "final").exists()


# ---------------------------------------------------------------------- 3. never a hang
def test_fifo_image_with_keep_aspect_does_not_hang(tiny_dirs, example, tmp_path):
    data = copy_data(example, tmp_path / "data")
    fifo = data / "images" / "002_0.png"
    fifo.unlink()
    os.mkfifo(fifo)
    cfg = write_config(
        tmp_path / "cfg.yaml", settings(tiny_dirs, data, tmp_path / "run", keep_aspect=True, max_steps=6)
    )
    command = [sys.executable, "-m", "easyref", "train", "--config", str(cfg)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail("easyref train hangs on a FIFO in data_root")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "002_0.png: not a regular file" in result.stderr  # skipped with its reason, in the epoch summary
    assert (tmp_path / "run" / "final").is_dir()


@pytest.mark.parametrize("which", ["data", "config", "validation"])
def test_fifo_inputs_are_refused_at_once(tiny_dirs, example, tmp_path, capsys, monkeypatch, which):
    fifo = tmp_path / {"data": "pairs.json", "config": "cfg.yaml", "validation": "ref.png"}[which]
    os.mkfifo(fifo)
    monkeypatch.setattr("easyref.train.trainer.load_stage_models", _no_models)
    values = settings(tiny_dirs, example, tmp_path / "run")
    if which == "data":
        values["data"] = str(fifo)
    if which == "validation":
        values.update(validation_every=1, validation_references=[str(fifo)])
    cfg = fifo if which == "config" else write_config(tmp_path / "real.yaml", values)
    with deadline(60):
        code, err = train(capsys, "--config", cfg)
    assert code == 2
    one_error(err, "not a regular file")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------- 4. symlinks
@pytest.mark.parametrize("name", ["train_config.yaml", "metrics.jsonl", "final", "checkpoint-0000002", "validation"])
def test_resume_refuses_symlinks_planted_in_the_run_folder(tiny_dirs, example, base_run, tmp_path, capsys, name):
    out, cfg = resume_copy(
        base_run,
        tiny_dirs,
        example,
        tmp_path,
        validation_every=1,
        validation_references=[str(example / "images" / "000_0.png")],
        validation_steps=1,
    )
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    (victim / "validation").mkdir()
    target = out / name
    if target.is_dir():
        shutil.move(str(target), str(victim / name))  # the folder's content moves with it, behind the link
    else:
        target.unlink(missing_ok=True)
    link_to = victim / name if (victim / name).exists() else victim / "precious.txt"
    target.symlink_to(link_to, target_is_directory=link_to.is_dir())
    before = snapshot(victim, out, example)
    code, err = train(capsys, "--config", cfg, "--resume", "latest")
    assert code == 2
    one_error(err, f"{target} is a symlink")
    assert snapshot(victim, out, example) == before


def test_a_symlink_planted_during_the_run_is_refused(tiny_dirs, example, tmp_path, capsys, monkeypatch):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    out = tmp_path / "run"
    original = Trainer._after_step

    def plant_after_step_1(self, meter, progress):
        if self.state.step == 1:
            (out / "metrics.jsonl").unlink(missing_ok=True)
            (out / "metrics.jsonl").symlink_to(victim)
        original(self, meter, progress)

    monkeypatch.setattr(Trainer, "_after_step", plant_after_step_1)
    cfg = write_config(tmp_path / "cfg.yaml", settings(tiny_dirs, example, out, max_steps=3))
    code, err = train(capsys, "--config", cfg)
    assert code == 2
    one_error(err, "metrics.jsonl is a symlink")
    assert victim.read_text() == "keep me" and not (out / "final").exists()


def test_a_symlink_swapped_into_the_data_after_start_up_is_refused_at_open(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir(), outside.mkdir()
    Image.new("RGB", (20, 20), "red").save(root / "inside.png")
    Image.new("RGB", (20, 20), "blue").save(outside / "secret.png")
    (root / "link.png").symlink_to(root / "inside.png")
    no_drop = dict(resolution=16, bucket_stride=8, image_drop_rate=0, text_drop_rate=0, both_drop_rate=0)
    dataset = TrainDataset([{"target": "link.png"}], root, DataSettings(**no_drop))  # checked here: inside
    strict = TrainDataset([{"target": "link.png"}], root, DataSettings(**no_drop), strict=True)
    allowed = TrainDataset([{"target": "link.png"}], root, DataSettings(**no_drop), allow_outside_root=True)
    aspect = TrainDataset([{"target": "link.png"}], root, DataSettings(**no_drop, keep_aspect=True))
    assert isinstance(dataset[(0, 0)], TrainSample)
    (root / "link.png").unlink()
    (root / "link.png").symlink_to(outside / "secret.png")  # swapped after start-up
    skipped = dataset[(1, 0)]
    assert isinstance(skipped, Skipped) and "leads outside the data root" in skipped.reason
    assert aspect.size_of(0) is None  # the header read for buckets goes through the same check
    with pytest.raises(DataError, match="leads outside the data root"):
        strict[(0, 0)]
    assert isinstance(allowed[(0, 0)], TrainSample)  # allow_outside_root: the user's choice


# ---------------------------------------------------------------------- 5. temps, suggested options, disk, poison
def test_temp_files_of_a_killed_run_are_removed(tiny_dirs, example, base_run, tmp_path, capsys):
    out, cfg = resume_copy(base_run, tiny_dirs, example, tmp_path)
    (out / ".final.tmp").mkdir()
    (out / ".final.tmp" / "easyref.safetensors").write_bytes(b"half")
    (out / ".checkpoint-0000003.tmp").mkdir()
    (out / "final" / ".easyref.safetensors.abc123.tmp").write_bytes(b"half")
    (out / "checkpoint-0000002" / "model" / ".easyref.safetensors.xyz.tmp").write_bytes(b"half")
    code, err = train(capsys, "--config", cfg, "--resume", "latest")
    assert code == 0, err
    assert [p for p in out.rglob("*") if p.name.endswith(".tmp")] == []
    assert (out / "final" / "easyref.safetensors").is_file() and (out / "checkpoint-0000003").is_dir()


def test_a_run_killed_while_writing_final_is_finished_by_resume(tiny_dirs, example, base_run, tmp_path, capsys):
    out, cfg = resume_copy(base_run, tiny_dirs, example, tmp_path)
    shutil.rmtree(out / "final")
    checkpoint = snapshot(out / "checkpoint-0000002")
    code, err = train(capsys, "--config", cfg, "--resume", "latest", "--max-steps", "2")
    assert code == 0, err
    assert (out / "final" / "easyref.safetensors").is_file()
    assert snapshot(out / "checkpoint-0000002") == checkpoint  # not rewritten: nothing was trained


def test_an_interrupted_final_write_leaves_no_final(tiny_dirs, example, tmp_path, capsys, monkeypatch):
    class Killed(BaseException):
        pass

    import easyref.train.trainer as trainer_module

    real, calls = trainer_module.save_checkpoint, []

    def die_in_final(directory, *args):
        calls.append(directory)
        if len(calls) == 1:  # the checkpoint's model/ first, then the inference checkpoint final/
            return real(directory, *args)
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "easyref.safetensors").write_bytes(b"half a file")
        raise Killed

    monkeypatch.setattr(trainer_module, "save_checkpoint", die_in_final)
    out = tmp_path / "run"
    with pytest.raises(Killed):
        main(["train", "--config", str(write_config(tmp_path / "cfg.yaml", settings(tiny_dirs, example, out)))])
    assert not (out / "final").exists() and not [p for p in out.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("how", ["flag", "set"])
def test_the_suggested_allow_outside_root_option_exists(tiny_dirs, example, tmp_path, capsys, how):
    records = [{"target": str(example / "images" / f"00{i}_0.png"), "text": "x"} for i in range(2)]
    (tmp_path / "abs.json").write_text(json.dumps(records))
    (tmp_path / "root").mkdir()
    cfg = write_config(
        tmp_path / "cfg.yaml",
        settings(tiny_dirs, tmp_path / "root", tmp_path / "run", data=str(tmp_path / "abs.json"), max_steps=1),
    )
    code, err = train(capsys, "--config", cfg)
    assert code == 2
    line = one_error(err, "escapes the data root")
    assert "--allow-outside-root" in line and "allow_outside_root: true" in line
    extra = ["--allow-outside-root"] if how == "flag" else ["--set", "allow_outside_root=true"]
    code, err = train(capsys, "--config", cfg, *extra)
    assert code == 0, err
    assert (tmp_path / "run" / "final").is_dir()


@pytest.mark.parametrize(
    "error", [OSError(errno.ENOSPC, "No space left on device"), RuntimeError("basic_ios::clear: iostream error")]
)
def test_disk_full_is_one_line_exit_1(tiny_dirs, example, tmp_path, capsys, monkeypatch, error):
    def full(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"partial")
        raise error

    monkeypatch.setattr(torch, "save", full)
    out = tmp_path / "run"
    before = snapshot(example)
    code, err = train(capsys, "--config", write_config(tmp_path / "cfg.yaml", settings(tiny_dirs, example, out)))
    assert code == 1
    one_error(err, "no space left on the device writing")
    assert "basic_ios" not in err
    assert not (out / "final").exists() and not list(out.glob("checkpoint-*"))
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert snapshot(example) == before


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


@pytest.mark.parametrize(
    "name, poison, phrase",
    [
        ("rng-0.pt", "evil", "holds objects other than tensors"),
        ("random_states_0.pkl", "evil", "holds objects other than tensors"),
        ("optimizer.pt", "truncated", "damaged"),
        ("scheduler.pt", "garbage", "damaged"),
        ("trainer_state.json", "nested", "nested too deeply"),
        ("trainer_state.json", "wrong", "not a trainer state"),
    ],
)
def test_poisoned_checkpoint_files_are_refused_on_resume(
    tiny_dirs, example, base_run, tmp_path, capsys, monkeypatch, name, poison, phrase
):
    monkeypatch.chdir(tmp_path)
    out, cfg = resume_copy(base_run, tiny_dirs, example, tmp_path)
    path = out / "checkpoint-0000002" / name
    if poison == "evil":
        torch.save({"python": _Evil(), "torch": torch.zeros(1)}, path)
    elif poison == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    elif poison == "garbage":
        path.write_bytes(os.urandom(512))
    elif poison == "nested":
        path.write_text("[" * 50000 + "]" * 50000)
    else:
        path.write_text(json.dumps({"state": {"step": "two"}, "config": {}}))
    monkeypatch.setattr("easyref.train.trainer.load_stage_models", _no_models)
    before = snapshot(out)
    code, err = train(capsys, "--config", cfg, "--resume", "latest")
    assert code == 2
    one_error(err, phrase)
    assert name in err and not (tmp_path / MARKER).exists()
    assert snapshot(out) == before


def test_resume_past_max_steps_is_refused(tiny_dirs, example, base_run, tmp_path, capsys, monkeypatch):
    out, cfg = resume_copy(base_run, tiny_dirs, example, tmp_path)
    monkeypatch.setattr("easyref.train.trainer.load_stage_models", _no_models)
    before = snapshot(out)
    code, err = train(capsys, "--config", cfg, "--resume", "latest", "--max-steps", "1")
    assert code == 2
    one_error(err, "past max_steps 1")
    assert snapshot(out) == before


# ---------------------------------------------------------------------- 6. nesting
@pytest.mark.parametrize("where", ["data.json", "data.jsonl", "config.json", "config.yaml", "--set"])
def test_deeply_nested_input_is_one_line(tiny_dirs, example, tmp_path, capsys, where):
    deep = "[" * 100000 + "]" * 100000
    values = settings(tiny_dirs, example, tmp_path / "run")
    extra = []
    if where == "data.json":
        (tmp_path / "deep.json").write_text(deep)
        values["data"] = str(tmp_path / "deep.json")
    elif where == "data.jsonl":
        (tmp_path / "deep.jsonl").write_text(json.dumps({"target": "x.png"}) + "\n" + '{"target": ' + deep + "}\n")
        values["data"] = str(tmp_path / "deep.jsonl")
    elif where == "--set":
        extra = ["--set", f"validation_references={deep[:60000]}"]
    cfg = write_config(tmp_path / "cfg.yaml", values)
    if where == "config.json":
        cfg = tmp_path / "cfg.json"
        cfg.write_text('{"stage": ' + deep + "}")
    elif where == "config.yaml":
        cfg.write_text("stage: " + deep + "\n")
    code, err = train(capsys, "--config", cfg, *extra)
    assert code == 2
    one_error(err, "nested too deeply")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------- more user mistakes
@pytest.mark.parametrize(
    "overrides, phrase",
    [
        (["output_dir=AFILE"], "exists and is not a folder"),
        (["data_root=NOWHERE"], "does not exist"),
        (["data_root=AFILE"], "is not a folder"),
        (["data=DATADIR"], "is a folder, not a data file"),
        (["learning_rate=abc"], "learning_rate must be a finite number"),
        (["max_steps=2.5"], "max_steps must be an integer"),
        (["attention_mode=sideways"], "attention_mode must be one of official, bidirectional"),
        (["lora_rank=["], "not valid YAML"),
        (["model.base=elsewhere"], "model.base: not a model setting a run chooses"),
        (["model.lora_rank=4"], "model.lora_rank: set lora_rank at the top level"),
        (["model.instruction=no placeholder"], "instruction must contain the placeholder '{prompt}'"),
        (["model=[1, 2]"], "model must be a mapping of settings"),
        (["stage=2", "init_from=RUN/final"], "is inside output_dir"),  # its final/ would be replaced
    ],
)
def test_more_bad_settings_fail_before_the_models(tiny_dirs, example, tmp_path, capsys, monkeypatch, overrides, phrase):
    (tmp_path / "afile").write_text("mine")
    (tmp_path / "datadir.json").mkdir()
    names = {
        "AFILE": tmp_path / "afile",
        "NOWHERE": tmp_path / "nowhere",
        "DATADIR": tmp_path / "datadir.json",
        "RUN": tmp_path / "run",
    }
    for key, path in names.items():
        overrides = [o.replace(key, str(path)) for o in overrides]
    monkeypatch.setattr("easyref.train.trainer.load_stage_models", _no_models)
    cfg = write_config(tmp_path / "cfg.yaml", settings(tiny_dirs, example, tmp_path / "run"))
    code, err = train(capsys, "--config", cfg, "--set", *overrides)
    assert code == 2
    one_error(err, phrase)
    assert (tmp_path / "afile").read_text() == "mine" and not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "face, phrase",
    [
        ([[4, 4, 2, 20, 0.9]], "is empty"),  # the authors' script's form (a list of boxes)
        ([[4, 4, 20]], "face box must be 4 numbers"),
        ([[[4, 4, 20, 20, "sure"]]], "face box must be 4 numbers"),  # their README's form
        ([], "'face' must be a list of boxes"),
    ],
)
def test_a_malformed_face_record_is_one_line_naming_it(tiny_dirs, example, tmp_path, capsys, monkeypatch, face, phrase):
    good = {"face": [[4, 4, 20, 20, 0.9]], "text": ["x"], "target": "a.png"}
    data = tmp_path / "faces.json"
    data.write_text(json.dumps([good, {**good, "face": [[[4, 4, 20, 20]]]}, {**good, "face": face}]))
    monkeypatch.setattr("easyref.train.trainer.load_stage_models", _no_models)
    cfg = write_config(tmp_path / "cfg.yaml", settings(tiny_dirs, example, tmp_path / "run", data=str(data)))
    code, err = train(capsys, "--config", cfg)
    assert code == 2
    assert "faces.json record 3: " in one_error(err, phrase)  # records 1 and 2, one of each form, pass
    assert not (tmp_path / "run").exists()


def test_write_example_data_never_overwrites_other_files(tmp_path, capsys):
    folder = tmp_path / "data"
    assert main(["train", "--write-example-data", str(folder)]) == 0
    assert main(["train", "--write-example-data", str(folder)]) == 0  # the same data again: nothing changes
    (folder / "pairs.json").write_text("[]  # the user's own")
    code, err = train(capsys, "--write-example-data", folder)
    assert code == 2
    one_error(err, "refusing to overwrite")
    assert (folder / "pairs.json").read_text() == "[]  # the user's own"


def test_show_recipe_takes_names_not_paths(capsys):
    code, err = train(capsys, "--show-recipe", "../config")
    assert code == 2
    one_error(err, "no recipe '../config'")
