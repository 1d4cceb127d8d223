# `make demo`: set up .venv from nothing and generate with the bundled default model.
# `make test`: the same set-up, then the whole offline test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU machine gets the CPU wheel of torch; a bare `torch` would pull a multi-GB CUDA build.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)

.PHONY: setup demo test bench train-demo clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $@

demo: setup
	$(BIN)/easyref generate --refs-dir examples/refs --prompt "a red circle on a blue background" \
		--out outputs/demo.png --grid --seed 0

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
