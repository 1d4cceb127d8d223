# `make demo`: set up .venv from nothing and generate with the bundled default model.
# `make test`: the same set-up, then the whole offline test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU machine gets the CPU wheel of torch; a bare `torch` would pull a multi-GB CUDA build.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)

.PHONY: setup demo test bench train-demo demo-model bench-shapes clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $@

demo: setup
	$(BIN)/easyref generate --refs-dir examples/refs --prompt "an object on a white background, at the top left" \
		--out outputs/demo.png --grid --seed 0 --num-images 4

# retrain the bundled default model from nothing (shapes world; about 2 h on 2 cores; an earlier build in runs/ is continued)
demo-model: setup
	$(BIN)/python -m easyref.shapes.demo_model runs/demo-model --preset cpu --work runs/demo-model.work
	rm -rf src/easyref/assets/default_model && cp -r runs/demo-model src/easyref/assets/default_model

# the miniature MRBench (EasyRef vs mean vs concat) from nothing; reuses a demo-model build if present
bench-shapes: setup
	$(BIN)/easyref bench shapes --preset cpu --out runs/bench-shapes --work runs/demo-model.work

test: setup
	$(BIN)/python -m pytest

# the three training stages on the bundled tiny model and synthetic data (about a minute on 2 cores)
train-demo: setup
	$(BIN)/easyref train --write-example-data runs/example-data
	$(BIN)/easyref train --config example-stage1
	$(BIN)/easyref train --config example-stage2
	$(BIN)/easyref train --config example-stage3
	$(BIN)/easyref generate --base default --adapter runs/example-stage3/final \
		--ref runs/example-data/images/000_0.png --ref runs/example-data/images/000_1.png \
		--prompt "a picture" --out outputs/train-demo.png --grid --seed 0

bench: setup
	$(BIN)/python benchmarks/encode_scaling.py
	$(BIN)/python benchmarks/overhead.py
	$(BIN)/python benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) outputs runs
