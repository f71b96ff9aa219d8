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

# System packages, installed with apt when root and missing: libturbojpeg (wsidicomizer writes
# the DICOM-WSI test slides with it) and Chromium with its driver (the HTML export's browser
# test). Without them those tests are skipped, saying why.
APT_PACKAGES := $(if $(shell ldconfig -p | grep libturbojpeg),,libturbojpeg0) \
                $(if $(shell command -v chromium),,chromium) \
                $(if $(shell command -v chromedriver),,chromium-driver)
system-deps:
	@if [ -n "$(strip $(APT_PACKAGES))" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      $(strip $(APT_PACKAGES))) >/dev/null || echo "note: apt could not install $(strip $(APT_PACKAGES))"; \
	  else echo "note: $(strip $(APT_PACKAGES)) missing; the tests that need them will be skipped"; fi; \
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
