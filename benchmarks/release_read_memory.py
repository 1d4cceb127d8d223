"""Peak memory of importing a release file: ours (reads only what it keeps) vs reading the whole file.

Run (from the repository root):

    .venv/bin/python benchmarks/release_read_memory.py                 # 2 GiB stand-in, ~1 min
    .venv/bin/python benchmarks/release_read_memory.py --frozen-gib 8

The authors' release file holds their whole training module: the adapter and the finetuned trunk, and
also the frozen base UNet and the language-model head, which the import drops. This writes a release
file in their layout from the tiny model plus one frozen stand-in tensor of `--frozen-gib` GiB (the
part the import drops), as safetensors and as a torch `.bin`, then reads each in a fresh process: with
`easyref.release.read_checkpoint`, and whole (`safetensors.torch.load_file` with every tensor touched;
`torch.load(weights_only=True)`), as a loader that does not skip would.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
import _common  # noqa: E402

READERS = {
    "ours (read_checkpoint)": "from easyref.release import read_checkpoint; read_checkpoint(PATH)",
    "whole file": (
        "import torch; from safetensors.torch import load_file; p = PATH\n"
        "t = load_file(p) if p.endswith('.safetensors') else torch.load(p, weights_only=True)\n"
        "[v.sum() for v in t.values()]"
    ),
}
# VmHWM, the peak of this process image: ru_maxrss would carry the parent's peak across fork and exec
MEASURE = (
    "import time; start = time.perf_counter()\n{code}\n"
    "peak = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]\n"
    "print(time.perf_counter() - start, int(peak) * 1024)"
)


def write_release(folder: Path, frozen_gib: float) -> dict[str, Path]:
    """The tiny model's release state dict plus the frozen stand-in, as .safetensors and .bin files."""
    from model_checks import TINY_SETTINGS, to_release_state_dict
    from safetensors.torch import save_file

    from easyref import EasyRefPipeline
    from easyref.tiny import save_tiny_qwen2vl, save_tiny_sdxl

    pipe = EasyRefPipeline.from_pretrained(
        save_tiny_sdxl(folder / "sdxl"), mllm=save_tiny_qwen2vl(folder / "qwen"), config_overrides=TINY_SETTINGS
    )
    tensors = to_release_state_dict(pipe)
    tensors["unet.frozen_stand_in.weight"] = torch.ones(int(frozen_gib * 2**28))  # float32: 4 bytes each
    files = {"safetensors": folder / "st" / "model.safetensors", "bin": folder / "bin" / "model.bin"}
    for path in files.values():
        path.parent.mkdir()
    save_file(tensors, str(files["safetensors"]))
    torch.save(tensors, files["bin"])
    return files


def read_in_fresh_process(code: str, path: Path) -> tuple[float, int]:
    script = MEASURE.format(code=code.replace("PATH", repr(str(path))))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    seconds, peak = out.stdout.split()[-2:]
    return float(seconds), int(peak)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--frozen-gib", type=float, default=2.0, help="size of the part the import drops")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    _common.setup_logging(args.verbose)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind, path in write_release(Path(tmp), args.frozen_gib).items():
            results = {name: read_in_fresh_process(code, path) for name, code in READERS.items()}
            (t_ours, m_ours), (t_whole, m_whole) = results.values()
            rows.append(
                [kind, f"{t_ours:.2f}", f"{t_whole:.2f}", _common.fmt_bytes(m_ours), _common.fmt_bytes(m_whole)]
                + [f"{m_whole / m_ours:.1f}x"]
            )
    print(f"### Reading a release file with a {args.frozen_gib:g} GiB part the import drops\n")
    print(f"{_common.machine_line(torch.device('cpu'))}; peak = the reading process's VmHWM (peak RSS)\n")
    headers = ["file", "ours s", "whole file s", "ours peak", "whole file peak", "whole/ours peak"]
    print(_common.markdown_table(headers, rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
