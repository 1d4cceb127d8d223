# `make demo`: set up .venv from nothing and generate with the bundled default model.
# `make test`: the same set-up, then the whole offline test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU machine gets the CPU wheel of torch; a bare `torch` would pull a multi-GB CUDA build.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)

.PHONY: setup demo test bench clean

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

bench: setup
	$(BIN)/python benchmarks/encode_scaling.py
	$(BIN)/python benchmarks/overhead.py

clean:
	rm -rf $(VENV) outputs
