"""The GPU suite is ready for a lent device: its whole chain runs here on the CPU with tiny sizes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_suite_runs_every_section_in_smoke_mode(tmp_path):
    result = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), "--smoke", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    report = (tmp_path / "gpu_suite.md").read_text()
    sections = [line for line in report.splitlines() if line.startswith("## ")]
    assert len(sections) == 4 and "FAILED" not in report, report
    assert report.count("max abs diff") == 2 and "EasyRef/plain" in report
