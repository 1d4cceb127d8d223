"""`easyref bench run / score / convert / table` against bad input: one line, exit 2, nothing touched.

Each class of mistake an adversarial tester found has its cases here:
1. images that do not decode (truncated PNG/JPEG, text named .png) - refused before any model loads;
2. prompts holding the MLLM's control tokens (or too long) - refused before the first image;
3. two commands on one run folder (the lock), stale temporary files of a killed run;
4. a half-finished group resumes to the very pixels of an uninterrupted run;
5. symlinks planted in a run folder - never written through;
6. deeply nested / torn JSON in manifests, captions files and run.json;
7. metric models from a hub that cannot be reached - one line at once, not a minute of retries.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny_models import save_tiny_clip, save_tiny_dino

from easyref.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

UP_FRONT_S = 5.0  # refused before any model loads: manifest + image checks only


@pytest.fixture(scope="module")
def metric_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("metric_models")
    return {"clip": save_tiny_clip(root / "clip"), "dino": save_tiny_dino(root / "dino")}


@pytest.fixture
def bench(tmp_path):
    """A manifest folder: two groups of small PNGs, and broken images beside them."""
    root = tmp_path / "bench"
    (root / "img").mkdir(parents=True)
    for i, colour in enumerate(["red", "blue", "green", "yellow"]):
        Image.new("RGB", (40, 40), colour).save(root / "img" / f"{i}.png")
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 48, 3), dtype=np.uint8))
    for fmt in ("png", "jpg"):
        noise.save(root / "img" / f"full.{fmt}")
        data = (root / "img" / f"full.{fmt}").read_bytes()
        (root / "img" / f"truncated.{fmt}").write_bytes(data[: len(data) // 2])
    (root / "img" / "text.png").write_text("not an image\n")
    write_manifest(
        root / "m.jsonl",
        [
            {
                "id": "g1",
                "references": ["img/0.png", "img/1.png"],
                "target": "img/2.png",
                "prompts": ["a red thing", "a blue thing"],
            },
            {"id": "g2", "references": ["img/3.png"], "prompt": "a yellow thing"},
        ],
    )
    return root


def write_manifest(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def run_args(manifest: Path, out: Path, tiny_dirs, metric_dirs, method: str = "sdxl", *extra) -> list[str]:
    args = [
        "bench",
        "run",
        "--manifest",
        str(manifest),
        "--method",
        method,
        "--base",
        str(tiny_dirs["sdxl"]),
        "--steps",
        "2",
        "--height",
        "32",
        "--width",
        "32",
        "--device",
        "cpu",
        "--out",
        str(out),
        "--clip",
        str(metric_dirs["clip"]),
        "--dino",
        str(metric_dirs["dino"]),
        *extra,
    ]
    if method == "easyref":
        args += ["--mllm", str(tiny_dirs["qwen"])]
    return args


def cli(args, capsys) -> tuple[int, list[str], float]:
    capsys.readouterr()
    start = time.perf_counter()
    code = main([str(a) for a in args])
    seconds = time.perf_counter() - start
    return code, capsys.readouterr().err.strip().splitlines(), seconds


@pytest.fixture
def no_models(monkeypatch):
    """Fail the test if a generation method or the metric models start loading."""
    import easyref.bench.methods as methods
    from easyref.bench.metrics import FeatureModels

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded although the input should have been refused up front")

    monkeypatch.setattr(methods, "load_method", refuse)
    monkeypatch.setattr(FeatureModels, "from_pretrained", classmethod(refuse))


def assert_refused(code, lines, seconds, phrase):
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("easyref: error: "), lines
    assert phrase in lines[0], lines
    assert "Traceback" not in lines[0]
    assert seconds < UP_FRONT_S, seconds


# ---------------------------------------------------------------------- 1 and 6: refused before any model loads
MANIFEST_CASES = {
    "truncated-png-reference": (
        [{"id": "a", "references": ["img/truncated.png"], "prompt": "x"}],
        "truncated.png is damaged or truncated",
    ),
    "truncated-jpeg-target": (
        [{"id": "a", "references": ["img/0.png"], "target": "img/truncated.jpg", "prompt": "x"}],
        "truncated.jpg is damaged or truncated",
    ),
    "text-named-png": ([{"id": "a", "references": ["img/text.png"], "prompt": "x"}], "text.png is not an image"),
    "folder-as-reference": ([{"id": "a", "references": ["img"], "prompt": "x"}], "is a folder"),
    "deeply-nested-line": (['{"id": "a", "references": ' + "[" * 100_000 + "]" * 100_000 + "}"], "nested too deeply"),
    "ids-sharing-a-folder": (
        [
            {"id": "A", "references": ["img/0.png"], "prompt": "x"},
            {"id": "a", "references": ["img/1.png"], "prompt": "y"},
        ],
        "would share the folder",
    ),
}


@pytest.mark.parametrize("case", sorted(MANIFEST_CASES))
def test_bad_manifests_are_refused_before_any_model_loads(
    case, bench, tmp_path, tiny_dirs, metric_dirs, capsys, no_models
):
    records, phrase = MANIFEST_CASES[case]
    manifest = write_manifest(bench / "bad.jsonl", records)
    before = hashes(bench)
    out = tmp_path / "out"
    code, lines, seconds = cli(run_args(manifest, out, tiny_dirs, metric_dirs), capsys)
    assert_refused(code, lines, seconds, phrase)
    assert hashes(bench) == before and not out.exists()


def test_pixel_bombs_and_oversized_groups_are_refused_before_any_model_loads(
    bench, tmp_path, tiny_dirs, metric_dirs, capsys, no_models, monkeypatch
):
    from test_image_bounds import bomb_png

    from easyref import limits

    (bench / "img" / "bomb.png").write_bytes(bomb_png())  # 10 kB declaring 9000 x 9000
    records = [{"id": "a", "references": ["img/0.png", "img/bomb.png"], "prompt": "x"}]
    manifest = write_manifest(bench / "bomb.jsonl", records)
    code, lines, seconds = cli(run_args(manifest, tmp_path / "out", tiny_dirs, metric_dirs), capsys)
    assert_refused(code, lines, seconds, "bomb.png is 9000 x 9000 = 81.0 M pixels; images may be at most 50.0 M")
    monkeypatch.setattr(limits, "MAX_GROUP_PIXELS", 3000)  # each 40 x 40 reference is 1600 pixels
    records = [{"id": "b", "references": ["img/0.png", "img/1.png"], "prompt": "x"}]
    manifest = write_manifest(bench / "group.jsonl", records)
    code, lines, seconds = cli(run_args(manifest, tmp_path / "out", tiny_dirs, metric_dirs), capsys)
    assert_refused(code, lines, seconds, "the 2 references hold 3200 pixels in all")
    assert not (tmp_path / "out").exists()


def test_a_manifest_that_is_a_pipe_is_refused_not_waited_on(bench, tmp_path, tiny_dirs, metric_dirs, capsys, no_models):
    import os

    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    code, lines, seconds = cli(run_args(fifo, tmp_path / "out", tiny_dirs, metric_dirs), capsys)
    assert_refused(code, lines, seconds, "not a regular file")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "content, phrase",
    [
        ('{"method": {"method": "sdxl", "base": "x', "is not valid JSON"),  # torn
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ("[1, 2]", "not a run description"),
        (b"\xff\xfe\x00garbage", "is not valid JSON"),
    ],
)
def test_a_damaged_run_json_is_refused_and_kept(
    content, phrase, bench, tmp_path, tiny_dirs, metric_dirs, capsys, no_models
):
    out = tmp_path / "out"
    out.mkdir()
    run_json = out / "run.json"
    run_json.write_bytes(content if isinstance(content, bytes) else content.encode())
    before = hashes(out)
    code, lines, seconds = cli(run_args(bench / "m.jsonl", out, tiny_dirs, metric_dirs), capsys)
    assert_refused(code, lines, seconds, phrase)
    assert hashes(out) == before and sorted(p.name for p in out.iterdir()) == ["run.json"]


def test_other_settings_are_refused_before_the_method_loads(bench, tmp_path, tiny_dirs, metric_dirs, capsys):
    out = tmp_path / "out"
    assert main(run_args(bench / "m.jsonl", out, tiny_dirs, metric_dirs, "sdxl", "--no-score")) == 0
    before = hashes(out)
    import easyref.bench.methods as methods

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(methods, "load_method", lambda *a, **k: pytest.fail("loaded the method"))
        code, lines, seconds = cli(
            run_args(bench / "m.jsonl", out, tiny_dirs, metric_dirs, "sdxl", "--no-score", "--steps", "3"), capsys
        )
    assert_refused(code, lines, seconds, "different settings")
    assert hashes(out) == before


def test_a_folder_that_is_not_a_run_is_not_written_into(bench, tiny_dirs, metric_dirs, capsys, no_models):
    before = hashes(bench)
    code, lines, seconds = cli(run_args(bench / "m.jsonl", bench / "img", tiny_dirs, metric_dirs), capsys)
    assert_refused(code, lines, seconds, "not a bench run's")
    assert hashes(bench) == before and not (bench / "img" / ".easyref.lock").exists()


# ---------------------------------------------------------------------- 2: prompts the MLLM cannot read as text
@pytest.mark.parametrize(
    "prompt, reference, phrase",
    [
        ("a cat <|image_pad|> on a beach", "img/1.png", "prompt 1 contains the MLLM control token '<|image_pad|>'"),
        ("<|vision_start|>", "img/1.png", "prompt 1 contains the MLLM control token '<|vision_start|>'"),
        ("cat " * 3000, "img/1.png", "prompt 1 is 12000 tokens long; at most 1024 are allowed"),
        ("a thin thing", "img/thin.png", "reference 0 (1 x 400 px): absolute aspect ratio must be smaller than 200"),
    ],
)
def test_groups_the_mllm_cannot_read_are_refused_before_generating(
    prompt, reference, phrase, bench, tmp_path, tiny_dirs, metric_dirs, capsys, monkeypatch
):
    from easyref.bench.methods import EasyRefMethod
    from easyref.bench.metrics import FeatureModels

    monkeypatch.setattr(EasyRefMethod, "generate", lambda *a, **k: pytest.fail("generated despite a bad group"))
    monkeypatch.setattr(FeatureModels, "from_pretrained", classmethod(lambda *a, **k: pytest.fail("loaded metrics")))
    Image.new("RGB", (1, 400), "red").save(bench / "img" / "thin.png")
    manifest = write_manifest(
        bench / "tokens.jsonl",
        [
            {"id": "fine", "references": ["img/0.png"], "prompt": "a red thing"},
            {"id": "bad", "references": [reference], "prompts": ["a blue thing", prompt]},
        ],
    )
    before, out = hashes(bench), tmp_path / "out"
    code, lines, _ = cli(run_args(manifest, out, tiny_dirs, metric_dirs, "easyref"), capsys)
    assert code == 2 and lines[-1].startswith("easyref: error: "), lines
    assert f"group 'bad' {phrase}" in lines[-1], lines
    assert not any("Traceback" in line for line in lines)
    assert hashes(bench) == before
    assert not out.exists()  # the folder the lock created is gone again: nothing was written


def test_the_refusal_uses_the_generate_wording(tiny_dirs):
    from transformers import AutoTokenizer

    from easyref.prompting import check_prompt

    with pytest.raises(ValueError) as err:
        check_prompt("<|image_pad|>", AutoTokenizer.from_pretrained(tiny_dirs["qwen"]), "group 'bad' prompt 1")
    assert str(err.value) == "group 'bad' prompt 1 contains the MLLM control token '<|image_pad|>'; remove it"


# ---------------------------------------------------------------------- 3: one command per run folder; stale temps
def test_a_second_command_on_a_locked_run_folder_is_refused(bench, tmp_path, tiny_dirs, metric_dirs, capsys, no_models):
    from easyref.safe_io import RunLock

    out = tmp_path / "out"
    with RunLock(out):  # another process holding the folder (flock is per open file, so this is "another")
        before = hashes(out)
        code, lines, seconds = cli(run_args(bench / "m.jsonl", out, tiny_dirs, metric_dirs), capsys)
        assert_refused(code, lines, seconds, "another easyref process is using the run folder")
        score = [
            "bench",
            "score",
            "--manifest",
            bench / "m.jsonl",
            "--images",
            bench / "img",
            "--out",
            out,
            "--clip",
            metric_dirs["clip"],
            "--dino",
            metric_dirs["dino"],
            "--device",
            "cpu",
        ]
        (bench / "img" / "g1").mkdir()
        Image.new("RGB", (32, 32)).save(bench / "img" / "g1" / "p00-s00.png")
        code, lines, seconds = cli(score, capsys)
        assert_refused(code, lines, seconds, "another easyref process is using the run folder")
        assert hashes(out) == before


def test_stale_temporary_files_of_a_killed_run_are_removed(bench, tmp_path, tiny_dirs, metric_dirs, capsys):
    out = tmp_path / "out"
    args = run_args(bench / "m.jsonl", out, tiny_dirs, metric_dirs, "sdxl", "--no-score")
    assert main(args) == 0
    stale = [
        out / ".run.json.k1f2.tmp",
        out / ".summary.md.tmp",
        out / "sheets" / ".g1.png.tmp",
        out / "images" / "g1" / ".p00-s00.png.x7y.tmp",
        out / "images" / "g1" / ".p01-s00.png.tmp",
    ]
    for path in stale:
        path.write_bytes(b"half a file")
    (out / "images" / "g1" / "p01-s00.png").unlink()  # the image that was being written
    (out / "sheets" / "g2.png").unlink()  # killed after g2's last record, before its sheet
    assert main(args) == 0
    assert not any(p.exists() for p in stale)
    assert not list(out.rglob("*.tmp")) and (out / "images" / "g1" / "p01-s00.png").is_file()
    assert (out / "sheets" / "g2.png").is_file()


def test_temporary_names_are_unique_per_write(tmp_path, monkeypatch):
    """Two processes writing the same file never share a temporary name (as `.g00.png.tmp` did)."""
    import os

    from easyref.bench.runner import save_image

    seen = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (seen.append(Path(src).name), real_replace(src, dst)))
    for _ in range(3):
        save_image(Image.new("RGB", (4, 4)), tmp_path / "sheets" / "g00.png", tmp_path)
    assert len(set(seen)) == 3 and all(n.startswith(".g00.png.") and n.endswith(".tmp") for n in seen)


# ---------------------------------------------------------------------- 4: resuming a half-finished group
class KilledAfter:
    """Delegates to a method and dies after `images` images, as a killed job would."""

    def __init__(self, method, images: int):
        self.method, self.left, self.name = method, images, method.name

    def describe(self):
        return self.method.describe()

    def generate(self, references, prompts, seeds, settings):
        if self.left <= 0:
            raise KeyboardInterrupt
        images = self.method.generate(references, prompts, seeds, settings)
        self.left -= len(images)
        return images


@pytest.fixture(scope="module")
def sdxl_method(tiny_dirs):
    from easyref.bench.methods import load_method

    return load_method("sdxl", base=tiny_dirs["sdxl"], device="cpu")


@pytest.mark.parametrize("killed_after", [1, 3])
def test_a_half_finished_group_resumes_to_the_same_pixels(killed_after, bench, tmp_path, sdxl_method):
    from easyref.bench.manifest import load_manifest
    from easyref.bench.methods import GenerationSettings
    from easyref.bench.runner import read_records, run_bench

    settings = GenerationSettings(steps=2, guidance=3.0, height=32, width=32, seed=3)
    items = load_manifest(bench / "m.jsonl")[:1]  # g1: 2 prompts x 3 samples = one group of 6 images
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    run_bench(items, sdxl_method, settings, whole, samples=3, progress=False)
    with pytest.raises(KeyboardInterrupt):
        run_bench(items, KilledAfter(sdxl_method, killed_after), settings, resumed, samples=3, progress=False)
    assert len(read_records(resumed)) == killed_after
    assert run_bench(items, sdxl_method, settings, resumed, samples=3, progress=False) == 6 - killed_after
    images = sorted(p.relative_to(whole) for p in whole.rglob("*.png"))
    assert images == sorted(p.relative_to(resumed) for p in resumed.rglob("*.png")) and len(images) == 7
    for name in images:
        assert np.array_equal(np.asarray(Image.open(whole / name)), np.asarray(Image.open(resumed / name))), name


# ---------------------------------------------------------------------- 5: symlinks planted in a run folder
@pytest.mark.parametrize(
    "planted",
    [
        "records-r0w1.jsonl",
        "images/g1/p00-s00.png",
        "images/g2",
        "images",
        "sheets/g1.png",
        "sheets",
        "run.json",
        "summary.md",
        "summary.json",
    ],
)
def test_symlinks_in_the_run_folder_are_never_written_through(
    planted, bench, tmp_path, tiny_dirs, metric_dirs, capsys, no_models
):
    victim = tmp_path / "victim"
    victim.mkdir() if "." not in Path(planted).name else victim.write_text("precious\n")
    out = tmp_path / "out"
    link = out / planted
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(victim)
    before = hashes(tmp_path / "victim") if victim.is_dir() else victim.read_text()
    code, lines, seconds = cli(run_args(bench / "m.jsonl", out, tiny_dirs, metric_dirs), capsys)
    assert_refused(code, lines, seconds, "is a symlink")
    assert str(link) in lines[0]
    assert (hashes(victim) if victim.is_dir() else victim.read_text()) == before


def test_a_symlink_planted_mid_run_is_refused_at_the_write(bench, tmp_path, sdxl_method):
    from easyref.bench.manifest import load_manifest
    from easyref.bench.methods import GenerationSettings
    from easyref.bench.runner import run_bench
    from easyref.safe_io import UnsafePathError

    settings = GenerationSettings(steps=2, guidance=3.0, height=32, width=32)
    out, victim = tmp_path / "out", tmp_path / "victim.jsonl"
    victim.write_text("precious\n")
    out.mkdir()
    (out / "records-r0w1.jsonl").symlink_to(victim)
    with pytest.raises(UnsafePathError, match="is a symlink"):
        run_bench(load_manifest(bench / "m.jsonl")[:1], sdxl_method, settings, out, progress=False)
    assert victim.read_text() == "precious\n"


# ---------------------------------------------------------------------- 6: nested JSON in convert; torn records
@pytest.mark.parametrize(
    "captions, phrase",
    [
        ('{"images": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
        ('{"images": [{"id": 1, "file_name": "0.png"}], "annotations": [', "is not valid JSON"),
        ("[1, 2]", "not a COCO captions file"),
    ],
)
def test_bad_captions_files_are_one_line_errors(captions, phrase, bench, tmp_path, capsys):
    path = tmp_path / "captions.json"
    path.write_text(captions)
    before = hashes(bench)
    code, lines, seconds = cli(["bench", "convert", "coco", path, bench / "img", tmp_path / "m.jsonl"], capsys)
    assert_refused(code, lines, seconds, phrase)
    assert hashes(bench) == before and not (tmp_path / "m.jsonl").exists()


def test_convert_never_overwrites_its_input(bench, tmp_path, capsys):
    captions = tmp_path / "captions.json"
    captions.write_text(
        json.dumps(
            {"images": [{"id": 1, "file_name": "0.png"}], "annotations": [{"image_id": 1, "caption": "a red square"}]}
        )
    )
    before = captions.read_bytes()
    code, lines, seconds = cli(["bench", "convert", "coco", captions, bench / "img", captions], capsys)
    assert_refused(code, lines, seconds, "is one of the inputs")
    assert captions.read_bytes() == before


def test_garbage_records_lines_are_skipped_not_fatal(bench, tmp_path, tiny_dirs, metric_dirs, capsys):
    out = tmp_path / "out"
    args = run_args(bench / "m.jsonl", out, tiny_dirs, metric_dirs, "sdxl", "--no-score")
    assert main(args) == 0
    records = out / "records-r0w1.jsonl"
    good = records.read_text()
    with open(records, "a") as f:
        f.write('{"key": 5}\n[1]\n' + "[" * 50_000 + "]" * 50_000 + "\n")
        outside = {"key": "x", "image": "/etc/passwd", "item": "g1", "split": "held-in", "method": "m"}
        f.write(json.dumps(outside) + "\n")
        f.write('{"key": "g2\\t0\\t0", "ima')  # torn by a kill
    assert main(args) == 0  # nothing to make; the torn last line is cut
    assert records.read_text().startswith(good) and records.read_text().endswith("}\n")
    code, lines, _ = cli(["bench", "table", out], capsys)
    assert code == 0 and lines == []


# ---------------------------------------------------------------------- 7: metric models without the network
def test_a_hub_id_fails_at_once_when_offline(bench, tmp_path, tiny_dirs, metric_dirs, capsys, monkeypatch, no_models):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    score = [
        "bench",
        "score",
        "--manifest",
        bench / "m.jsonl",
        "--images",
        bench / "img",
        "--out",
        tmp_path / "s",
        "--clip",
        "openai/clip-vit-large-patch14",
        "--dino",
        metric_dirs["dino"],
        "--device",
        "cpu",
    ]
    (bench / "img" / "g1").mkdir()
    Image.new("RGB", (32, 32)).save(bench / "img" / "g1" / "p00-s00.png")
    code, lines, seconds = cli(score, capsys)
    assert_refused(code, lines, seconds, "--clip openai/clip-vit-large-patch14: not in the local Hugging Face cache")
    assert "HF_HUB_OFFLINE" in lines[0] and not (tmp_path / "s").exists()


def test_a_hub_id_fails_at_once_when_the_hub_cannot_be_reached(
    bench, tmp_path, tiny_dirs, metric_dirs, capsys, monkeypatch, no_models
):
    from huggingface_hub import constants

    import easyref.resolve as resolve

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: refused at once
    monkeypatch.setattr(resolve, "_probe_result", {})
    out = tmp_path / "out"
    code, lines, seconds = cli(
        run_args(bench / "m.jsonl", out, tiny_dirs, metric_dirs, "sdxl", "--dino", "facebook/dino-vits16"), capsys
    )
    assert_refused(code, lines, seconds, "--dino facebook/dino-vits16: not in the local Hugging Face cache")
    assert "http://127.0.0.1:9 cannot be reached" in lines[0] and not out.exists()


@pytest.mark.parametrize("flag", ["--clip", "--dino", "--base"])
def test_a_missing_or_wrong_model_folder_fails_before_anything_loads(
    flag, bench, tmp_path, tiny_dirs, metric_dirs, capsys, no_models
):
    for value, phrase in ((tmp_path / "nope", "no such file or folder"), (bench / "img", "not the model folder")):
        code, lines, seconds = cli(
            run_args(bench / "m.jsonl", tmp_path / "out", tiny_dirs, metric_dirs, "sdxl", flag, value), capsys
        )
        assert_refused(code, lines, seconds, f"{flag} {value}: ")
        assert phrase in lines[0] and not (tmp_path / "out").exists()


def test_a_local_metric_folder_never_touches_the_network(metric_dirs, monkeypatch):
    from huggingface_hub import constants

    import easyref.bench.sources as sources
    import easyref.resolve as resolve

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(resolve, "_probe", lambda endpoint: pytest.fail("probed the hub for a local folder"))
    monkeypatch.setattr(resolve, "_probe_result", {})
    source = sources.check_source(metric_dirs["clip"], "--clip")
    assert source.local and source.offline_ok


# ---------------------------------------------------------------------- numbers and devices
@pytest.mark.parametrize(
    "extra, phrase",
    [
        (["--steps", "0"], "--steps must be between 1 and 1000"),
        (["--samples", "1000000000"], "--samples must be between 1 and 100"),
        (["--height", "63"], "--height must be a multiple of 8"),
        (["--guidance", "nan"], "--guidance must be a finite number between 0 and 100"),
        (["--scale", "-1"], "--scale must be a finite number between 0 and 10"),
        (["--seed", "-1"], "--seed must be between 0 and"),
        (["--height", "4096", "--width", "4096"], "pixels; at most 4194304"),
        (["--device", "nonsense"], "unknown device 'nonsense'"),
        (["--limit", "0"], "--limit must be >= 1"),
    ],
)
def test_bad_numbers_are_refused_up_front(extra, phrase, bench, tmp_path, tiny_dirs, metric_dirs, capsys, no_models):
    code, lines, seconds = cli(
        run_args(bench / "m.jsonl", tmp_path / "out", tiny_dirs, metric_dirs, "sdxl", *extra), capsys
    )
    assert_refused(code, lines, seconds, phrase)
    assert not (tmp_path / "out").exists()


def test_score_refuses_a_truncated_image_before_loading_metrics(bench, tmp_path, metric_dirs, capsys, no_models):
    images = tmp_path / "images"
    (images / "g1").mkdir(parents=True)
    Image.new("RGB", (32, 32), "red").save(images / "g1" / "p00-s00.png")
    (images / "g1" / "p01-s00.png").write_bytes((bench / "img" / "truncated.png").read_bytes())
    before = hashes(images)
    code, lines, seconds = cli(
        [
            "bench",
            "score",
            "--manifest",
            bench / "m.jsonl",
            "--images",
            images,
            "--out",
            tmp_path / "s",
            "--clip",
            metric_dirs["clip"],
            "--dino",
            metric_dirs["dino"],
        ],
        capsys,
    )
    assert_refused(code, lines, seconds, "p01-s00.png is damaged or truncated")
    assert hashes(images) == before and not (tmp_path / "s").exists()


# ---------------------------------------------------------------------- 1: references as generate and training see them
def test_references_and_sheets_use_the_one_decoding_rule(tmp_path, sdxl_method):
    """16-bit grey is scaled (not clipped to white), transparency lands on white, EXIF turns are applied."""
    from easyref.bench.manifest import load_manifest
    from easyref.bench.methods import GenerationSettings
    from easyref.bench.runner import SHEET_TILE, run_bench

    root = tmp_path / "refs"
    root.mkdir()
    Image.new("I;16", (40, 40), 20000).save(root / "grey16.png")  # 20000 / 257 = 78 in 8 bits
    Image.new("RGBA", (40, 40), (255, 0, 0, 0)).save(root / "clear.png")  # transparent red: white
    turned = Image.new("RGB", (40, 20), "blue")
    exif = turned.getexif()
    exif[0x0112] = 6  # stored sideways: upright it is 20 wide, 40 high
    turned.save(root / "turned.png", exif=exif)
    write_manifest(
        root / "m.jsonl", [{"id": "g", "references": ["grey16.png", "clear.png", "turned.png"], "prompt": "x"}]
    )
    out = tmp_path / "out"
    settings = GenerationSettings(steps=1, guidance=1.0, height=32, width=32)
    run_bench(load_manifest(root / "m.jsonl"), sdxl_method, settings, out, progress=False)
    sheet = np.asarray(Image.open(out / "sheets" / "g.png"))
    mid = SHEET_TILE // 2  # each image is centred in its cell
    assert tuple(sheet[mid, mid]) == (78, 78, 78)
    assert tuple(sheet[mid, SHEET_TILE + mid]) == (255, 255, 255)
    turned_x = 2 * SHEET_TILE + mid
    assert tuple(sheet[mid + 15, turned_x]) == (0, 0, 255)  # inside the upright 20 x 40 image
    assert tuple(sheet[mid, turned_x + 15]) == (255, 255, 255)  # beside it: the sheet's background
