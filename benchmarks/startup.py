"""How long `easyref` takes to refuse a mistaken command.

Each case runs as its own process (`python -m easyref ...`), as a user would type it; the table gives
the median wall time of --repeats runs. Usage errors should come back before
torch (about 1.5 s to import here) or diffusers load.

    .venv/bin/python benchmarks/startup.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image


def cases(folder: Path) -> dict[str, list[str]]:
    ref = folder / "ref.png"
    Image.new("RGB", (32, 32), "red").save(ref)
    generate = ["generate", "--prompt", "x", "--ref", str(ref), "--out", str(folder / "o.png")]
    return {
        "--help": ["--help"],
        "missing reference": ["generate", "--prompt", "x", "--ref", "nope.png", "--out", "o.png"],
        "bad --steps": [*generate, "--steps", "0"],
        "no such --adapter": [*generate, "--adapter", "nowhere"],
        "no such --base": [*generate, "--base", "nowhere"],
        "--device cuda, no GPU": [*generate, "--device", "cuda"],
        "train: unknown setting": ["train", "--config", "example-stage1", "--set", "colour=1"],
        "python -c 'import torch' (for scale)": None,
    }


def run(argv: list[str] | None) -> tuple[float, int]:
    command = [sys.executable, "-c", "import torch"] if argv is None else [sys.executable, "-m", "easyref", *argv]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    return time.perf_counter() - started, result.returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        table = []
        for name, argv in cases(Path(tmp)).items():
            runs = [run(argv) for _ in range(args.repeats)]
            table.append((name, statistics.median(r[0] for r in runs), runs[0][1]))
    print(f"python {sys.version.split()[0]}; median of {args.repeats} runs per case\n")
    print("| case | exit code | wall s |")
    print("|---|---|---|")
    for name, seconds, code in table:
        print(f"| {name} | {code} | {seconds:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
