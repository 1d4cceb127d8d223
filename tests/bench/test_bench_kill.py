"""kill -9 at random points of `easyref bench run`, resumed until done: the very same run folder.

An uninterrupted run and a run killed (SIGKILL, no cleanup of any kind) a few times and resumed must
end with the same files, the same pixels, one record line per image and no temporary file left.
The kill points are drawn from a seeded generator: right after run.json appears (the lock and the
first writes), and when k images exist, k random, mostly inside a group, plus a random few ms.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny_models import save_tiny_clip, save_tiny_dino

SEED = int(os.environ.get("EASYREF_KILL_SEED", "20240611"))  # another seed: other kill points
GROUP_IMAGES = {"g1": 2 * 2, "g2": 1 * 2}  # prompts x samples
TOTAL = sum(GROUP_IMAGES.values())
PROCESS_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def metric_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("metric_models")
    return {"clip": save_tiny_clip(root / "clip"), "dino": save_tiny_dino(root / "dino")}


@pytest.fixture(scope="module")
def adapter(tiny_dirs, tmp_path_factory):
    """A saved EasyRef checkpoint with random (visible) adapter weights."""
    import torch
    from conftest import randomize_adapter, tiny_config
    from diffusers import StableDiffusionXLPipeline

    from easyref import EasyRefPipeline, ReferenceEncoder

    torch.manual_seed(0)
    encoder = ReferenceEncoder.from_pretrained(tiny_dirs["qwen"], tiny_config(tiny_dirs["qwen"])).eval()
    pipe = EasyRefPipeline.from_components(StableDiffusionXLPipeline.from_pretrained(tiny_dirs["sdxl"]), encoder)
    randomize_adapter(pipe.unet, 0)
    return pipe.save_adapter(tmp_path_factory.mktemp("easyref") / "adapter")


@pytest.fixture
def manifest(tmp_path):
    root = tmp_path / "bench"
    (root / "img").mkdir(parents=True)
    for i, colour in enumerate(["red", "blue", "green"]):
        Image.new("RGB", (40, 40), colour).save(root / "img" / f"{i}.png")
    lines = [
        {"id": "g1", "references": ["img/0.png", "img/1.png"], "prompts": ["a red thing", "a blue thing"]},
        {"id": "g2", "references": ["img/2.png"], "target": "img/0.png", "prompt": "a green thing"},
    ]
    path = root / "m.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def command(manifest: Path, out: Path, tiny_dirs, metric_dirs, adapter) -> list[str]:
    return [
        sys.executable,
        "-m",
        "easyref",
        "bench",
        "run",
        "--manifest",
        str(manifest),
        "--method",
        "easyref",
        "--base",
        str(tiny_dirs["sdxl"]),
        "--mllm",
        str(tiny_dirs["qwen"]),
        "--adapter",
        str(adapter),
        "--steps",
        "2",
        "--height",
        "64",
        "--width",
        "64",
        "--samples",
        "2",
        "--device",
        "cpu",
        "--out",
        str(out),
        "--clip",
        str(metric_dirs["clip"]),
        "--dino",
        str(metric_dirs["dino"]),
    ]


def environment() -> dict:
    # one thread each: the same arithmetic in every process, and two processes fit two cores
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
    }


def start(args) -> subprocess.Popen:
    return subprocess.Popen(args, env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def images_in(out: Path) -> int:
    return len(list((out / "images").glob("*/p*-s*.png"))) if (out / "images").is_dir() else 0


def kill_when(process: subprocess.Popen, ready, extra_s: float) -> bool:
    """SIGKILL `process` `extra_s` after `ready()` holds; False if it finished first."""
    deadline = time.monotonic() + PROCESS_TIMEOUT_S
    while not ready():
        if process.poll() is not None:
            return False
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.005)
    time.sleep(extra_s)
    if process.poll() is not None:
        return False
    process.send_signal(signal.SIGKILL)
    process.wait(PROCESS_TIMEOUT_S)
    return True


def files(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())


def test_killed_and_resumed_runs_end_bit_identical(manifest, tmp_path, tiny_dirs, metric_dirs, adapter):
    rng = random.Random(SEED)
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    reference = start(command(manifest, whole, tiny_dirs, metric_dirs, adapter))  # runs beside the killed ones

    # kill points: just after run.json appears, then at k images (k drawn, at least one inside g1)
    points = [("run.json", lambda: (killed / "run.json").is_file())]
    for k in sorted(rng.sample(range(1, TOTAL), 2)):
        points.append((f"{k} images", lambda k=k: images_in(killed) >= k))
    landed = []
    for name, ready in points:
        process = start(command(manifest, killed, tiny_dirs, metric_dirs, adapter))
        if kill_when(process, ready, rng.uniform(0.0, 0.05)):
            landed.append((name, images_in(killed)))
        else:
            assert process.returncode == 0, process.stderr.read().decode()[-2000:]
    finish = subprocess.run(
        command(manifest, killed, tiny_dirs, metric_dirs, adapter),
        env=environment(),
        capture_output=True,
        timeout=PROCESS_TIMEOUT_S,
    )
    assert finish.returncode == 0, finish.stderr.decode()[-2000:]
    assert reference.wait(PROCESS_TIMEOUT_S) == 0, reference.stderr.read().decode()[-2000:]
    assert len(landed) >= 2, landed  # the test is about kills: most must land before the run ends
    print("kill points landed (name, images then):", landed)

    # the same files, no temporary file anywhere, the same pixels
    assert files(killed) == files(whole)
    assert not [f for f in files(killed) if f.endswith(".tmp")]
    pngs = [f for f in files(whole) if f.endswith(".png")]
    assert len(pngs) == TOTAL + len(GROUP_IMAGES)  # the images and one sheet per group
    for name in pngs:
        assert np.array_equal(np.asarray(Image.open(whole / name)), np.asarray(Image.open(killed / name))), name

    # one whole record line per image, and the same scores
    lines = (killed / "records-r0w1.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert len(lines) == TOTAL and len({r["key"] for r in records}) == TOTAL
    whole_records = {r["key"]: r for r in map(json.loads, (whole / "records-r0w1.jsonl").read_text().splitlines())}
    assert {r["key"]: r for r in records} == whole_records
    assert json.loads((killed / "summary.json").read_text()) == json.loads((whole / "summary.json").read_text())
