# slidepipe: two commands on a fresh machine.
#   make demo   builds .venv, generates a small synthetic cohort and runs the pipeline on it
#   make test   builds .venv and runs the whole test suite (slow tests included)

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench system-deps clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch/torchvision: a matching pair (torchvision from PyPI must match torch exactly)
	$(BIN)/pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

# libturbojpeg (used by wsidicomizer to write DICOM-WSI test slides); installed when root.
system-deps:
	@if ! ldconfig -p | grep -q libturbojpeg; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get update -qq && apt-get install -y -qq libturbojpeg0) >/dev/null; \
	  else echo "note: libturbojpeg is missing; DICOM-WSI tests will be skipped"; fi; \
	fi

demo: $(STAMP)
	$(BIN)/slidepipe demo --out demo-output

test: $(STAMP) system-deps
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python benchmarks/tiling.py
	$(BIN)/python benchmarks/read.py

clean:
	rm -rf $(VENV) demo-output .pytest_cache .ruff_cache
