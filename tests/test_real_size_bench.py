"""benchmarks/real_size.py: its whole chain (build, release, `easyref convert`, a measured `easyref generate` in a
child process) at the small setting, and the before / after table it prints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "real_size.py"
sys.path.insert(0, str(SCRIPT.parent))
import real_size  # noqa: E402

# every phase of the table, by the start of its label, in the order generate runs them
PHASES = [
    "load (",
    "vision tower, reference 1",
    "vision tower, reference 2",
    "MLLM (",
    "negative branch (",
    "text encoders (",
    "UNet step 1",
    "VAE decode",
    "other (",
    "total",
]


def run_script(*args: str) -> str:
    result = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def table_rows(text: str, header: str) -> dict[str, list[str]]:
    """The rows of the Markdown table whose header starts with `header`, by their first cell."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {header}"))
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def test_the_small_setting_builds_once_and_measures_every_phase(tmp_path):
    models = tmp_path / "models"
    out = run_script("--config", "small", "--models", str(models), "--size", "64", "--steps", "1", "--refs", "2")
    phases = table_rows(out, "phase")
    for phase in PHASES:
        row = next((cells for label, cells in phases.items() if label.startswith(phase)), None)
        assert row is not None, f"no row for {phase!r} in\n{out}"
        calls, seconds, others_cpu, rss_after, file_mapped, peak = row
        assert float(seconds) >= 0 and float(others_cpu) >= 0 and rss_after.endswith("B") and peak.endswith("B"), row
    assert "load peak" in out and "RSS kept after load" in out and "peaks: VmHWM reset per phase" in out, out
    built = table_rows(out, "folder")
    assert [cells[0] for cells in built.values()] == ["now"] * 4, built
    assert json.loads((models / "adapter" / "easyref_config.json").read_text())["lora_rank"] == 4
    # a second look finds every folder complete and builds nothing
    records = real_size.ensure_built(models, real_size.SPECS["small"])
    assert all(record["reused"] for record in records.values()), records


def test_a_folder_without_its_marker_is_built_again_with_what_depends_on_it(tmp_path, monkeypatch):
    """A killed build leaves no marker (it is written last): that folder is redone, and the adapter made from it."""
    built = []

    def fake_build(name):
        def build(folder, *args):
            built.append(name)
            (folder / "weights").write_text(name)
            return {}

        return build

    monkeypatch.setattr(real_size, "BUILDS", {name: fake_build(name) for name in ("sdxl", "qwen2vl")})
    monkeypatch.setattr(real_size, "build_adapter", fake_build("adapter"))
    spec = real_size.SPECS["small"]
    real_size.ensure_built(tmp_path, spec)
    assert built == ["sdxl", "qwen2vl", "adapter"]
    (tmp_path / "qwen2vl" / real_size.MARKER).unlink()
    built.clear()
    records = real_size.ensure_built(tmp_path, spec)
    assert built == ["qwen2vl", "adapter"] and records["sdxl"]["reused"], built
    built.clear()
    real_size.ensure_built(tmp_path, real_size.SPECS["real"])  # folders of another size are not reused
    assert built == ["sdxl", "qwen2vl", "adapter"]


def test_before_and_after_side_by_side_with_ratios_and_a_stopped_run():
    def run(name, load_s, unet_s, stopped=False):
        rows = [
            {"label": real_size.LOAD, "seconds": load_s, "rss_after": 10 * 2**30, "peak": 11 * 2**30},
            {"label": "UNet step 1", "seconds": unet_s, "rss_after": 12 * 2**30, "peak": 13 * 2**30},
        ]
        end = None if stopped else {"seconds": load_s + unet_s, "rss_after": 12 * 2**30, "peak": 13 * 2**30}
        meta = {"easyref": f"/{name}/easyref", "rss_start": 2**30, "exact_peaks": True, "missing": []}
        open_phase = {"label": "VAE decode"} if stopped else None
        return {"rows": rows, "nested": [], "open": open_phase, "meta": meta, "end": end, "name": name}

    before, after = run("before", 40.0, 60.0), run("after", 20.0, 60.0, stopped=True)
    for r in (before, after):
        r.update(src="?", digest="0123", code=0 if r is before else -9, stopped=r is after, busy=None, started="now")
    rows = table_rows(real_size.side_by_side_table(before, after), "phase")
    assert rows[real_size.LOAD][:3] == ["40.0", "20.0", "0.50x"], rows
    assert rows["total"][:2] == ["100.0", ""], rows  # the stopped run has no total
    notes = "\n".join(real_size.run_notes(after))
    assert "load peak 11.00 GiB / RSS kept after load 10.00 GiB = **1.10x**" in notes, notes
    assert "stopped after the --timeout" in notes and "`VAE decode`" in notes, notes
