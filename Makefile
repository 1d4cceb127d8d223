# `make demo`: set up .venv from nothing and generate with the bundled default model.
# `make test`: the same set-up, then the whole offline test suite; `make test-fast` leaves out the slow tests.
# Times below: a nearly idle 2-core CPU machine, 2 torch threads. With another job holding a core, torch's
# two threads slow down many times over (the smoke build took 114 s instead of 10 s).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU machine gets the CPU wheel of torch; a bare `torch` would pull a multi-GB CUDA build.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)

.PHONY: setup demo demo-pick serve test test-fast bench train-demo bundled-model bench-shapes clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[dev,ui]"
	touch $@

# The demo: three references of one held-out subject, drawn without them (--scale 0) and with them, same prompt and
# seed; then the subject among two distractors in every reference, with the explain sheet. `python -m
# easyref.shapes.data DIR` writes the groups (examples/subject, examples/distractors) and prints these prompts.
# Once set up: about 20 s for the three (timed); from nothing about 1 min plus the package downloads.
demo: setup
	$(BIN)/easyref generate --refs-dir examples/subject --prompt "an object on a gray background, at the bottom right" \
		--scale 0 --out outputs/demo-without.png --grid --seed 0 --num-images 4
	$(BIN)/easyref generate --refs-dir examples/subject --prompt "an object on a gray background, at the bottom right" \
		--out outputs/demo-with.png --grid --seed 0 --num-images 4
	$(BIN)/easyref generate --refs-dir examples/distractors --prompt "an object on a black background, at the top right" \
		--out outputs/demo-distractors.png --grid --explain --seed 0 --num-images 4

# The miniature's limit: a pick group (two subjects in every reference, examples/pick) under its two prompts, each
# naming one; the bundled model blends the two (README, "What the bundled model cannot do")
demo-pick: setup
	$(BIN)/easyref generate --refs-dir examples/pick --prompt "a star on a white background, at the bottom right" \
		--out outputs/demo-star.png --grid --seed 0 --num-images 4
	$(BIN)/easyref generate --refs-dir examples/pick --prompt "a square on a white background, at the bottom right" \
		--out outputs/demo-square.png --grid --seed 0 --num-images 4

# the web page (`easyref serve`) with the bundled model, on http://127.0.0.1:7860; Ctrl+C stops
serve: setup
	$(BIN)/easyref serve

# build a shapes-world EasyRef from nothing into runs/bundled-model (the `cpu` recipe; an earlier build in runs/ is
# continued). About 1 h 45 min on 2 cores: the bundled VAE reused, a 3-level base 10,000 steps x 0.42 s, MLLM
# 750 s, stages 1-3 1,351 s (timed). It is the model of benchmarks/RESULTS.md 5f, which drew the subject right
# less often than the bundled one, so it is not copied over it; to ship a build:
#   rm -rf src/easyref/assets/bundled_model && cp -r runs/bundled-model src/easyref/assets/bundled_model
bundled-model: setup
	$(BIN)/python -m easyref.shapes.build runs/bundled-model --preset cpu --work runs/bundled-model.work

# the miniature MRBench (EasyRef, EasyRef bidirectional, mean, concat; two training seeds each) from nothing;
# reuses a bundled-model build if present, and goes on where a stopped one stopped. After `make bundled-model` about
# 2 h 10 min on 2 cores: seven more stage-3 runs (EasyRef-style 9 min, mean/concat 14 min each) and scoring
# (16 cells x 64 groups x 30 steps, 5.8 min per model), estimated from timed parts; without it about 4 h.
# `easyref bench shapes --preset smoke` checks the same chain with tiny models in 36 s from nothing
bench-shapes: setup
	$(BIN)/easyref bench shapes --preset cpu --out runs/bench-shapes --work runs/bundled-model.work

# the import contracts and ruff's checks (pyproject.toml), then the whole offline suite: about 5 min 35 s once set up (323 s of
# pytest wall time, the browser tests of `easyref serve` included), timed 2026-12-08, 6 min 42 s from a fresh clone; on the same machine that day the
# suite before the web page's hardening took 305 s of pytest (4 min 05 s in all when it was first timed)
test: setup
	$(BIN)/lint-imports --no-cache
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest

# the inner loop, the contracts, ruff and the suite less the tests marked slow in tests/conftest.py: 90 s once set up
test-fast: setup
	$(BIN)/lint-imports --no-cache
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -m "not slow"

# the three training stages on the bundled tiny model and synthetic data (35 s once set up)
train-demo: setup
	$(BIN)/easyref train --write-example-data runs/example-data
	$(BIN)/easyref train --config example-stage1
	$(BIN)/easyref train --config example-stage2
	$(BIN)/easyref train --config example-stage3
	$(BIN)/easyref generate --base default --adapter runs/example-stage3/final \
		--ref runs/example-data/images/000_0.png --ref runs/example-data/images/000_1.png \
		--prompt "an object on a white background" --out outputs/train-demo.png --grid --seed 0

bench: setup
	$(BIN)/python benchmarks/encode_scaling.py
	$(BIN)/python benchmarks/overhead.py
	$(BIN)/python benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) outputs runs
