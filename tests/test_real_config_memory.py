"""The encoder at the real Qwen2-VL-2B config holds trunk + one layer (meta device, no weights)."""

from __future__ import annotations

import runpy
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "encoder_memory.py"


def test_real_config_encoder_memory_is_trunk_plus_one_layer(capsys):
    main = runpy.run_path(str(SCRIPT), run_name="encoder_memory")["main"]
    assert main([]) == 0  # non-zero when a measured count differs from the expected formula
    assert "**match**" in capsys.readouterr().out
