"""Size invariants of the shapes presets (not timings), and the `slow` list `make test-fast` relies on."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import SLOW_TESTS

from easyref.bench.shapes import CELLS, DEFAULT_SEEDS, EVAL_SIZES, METHODS
from easyref.shapes.build import PRESETS


def test_every_preset_has_scoring_sizes():
    assert set(EVAL_SIZES) == set(PRESETS)
    assert all(groups >= 1 and steps >= 1 for groups, steps in EVAL_SIZES.values())


def test_the_smoke_preset_stays_small_in_training_and_scoring():
    """`bench shapes --preset smoke` is a check of the whole chain that has to finish in about a minute on
    2 cores. Scoring used to keep the full 64 groups x 30 steps per cell (57,600 image-steps, over
    10 minutes); training is a handful of steps per phase."""
    recipe = PRESETS["smoke"]
    groups, steps = EVAL_SIZES["smoke"]
    runs = len(METHODS) * len(DEFAULT_SEEDS)  # each method's stage 3 once per training seed
    assert runs * len(CELLS) * groups * steps <= 300  # denoised image-steps over the whole evaluation
    assert recipe.groups <= 64 and recipe.batch_size <= 4
    pretraining = recipe.vae_steps + recipe.base_steps + recipe.mllm_steps + recipe.vision_steps
    stages = sum(recipe.stage_steps) + (runs - 1) * recipe.stage_steps[2]  # every other stage 3 too
    assert pretraining + stages <= 40
    # the other presets are the real ones: the smoke sizes must not leak into them
    assert all(EVAL_SIZES[name] == (64, 30) for name in PRESETS if name != "smoke")


def test_cells_are_the_sixteen_distinct_settings():
    assert len(CELLS) == len(set(CELLS)) == 16


def test_every_test_marked_slow_still_exists():
    """A renamed test would silently drop out of the list and make `make test-fast` slow again."""
    here = Path(__file__).parent
    for name in sorted(SLOW_TESTS):
        file, function = name.split("::")
        (path,) = here.rglob(file)  # test files are named once across tests/ and its folders
        assert re.search(rf"^def {function}\(", path.read_text(), re.M), (
            f"{name} (in tests/conftest.py SLOW_TESTS) no longer exists"
        )
