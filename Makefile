# Two entry points for a newcomer: `make demo` (the main job) and `make test`. Both build .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# A device with stock onnxruntime (current release), no onnxruntime-training, no torch: `make test`
# re-runs the device tests there on bundles .venv exported (the portable backend, docs/design.md section 9).
STOCK := .venv-stock
STOCK_STAMP := $(STOCK)/.installed-stamp
# The Hugging Face stack (optimum-onnx, transformers, stock onnxruntime, torch CPU): `make test` loads a
# `vqt-edge package --format hf` folder there as an app would (tests/test_hf_package.py, docs/deploy.md).
HF := .venv-hf
HF_STAMP := $(HF)/.installed-stamp
BUNDLES := build/test-bundles
FMNIST := /usr/share/datasets/fashion-mnist
# The browser page (docs/browser.md): onnxruntime-web from npm (package-lock.json), Debian's Chromium,
# and playwright in .venv driving that Chromium (it never downloads a browser).
NPM_STAMP := node_modules/.installed-stamp
WEB_STAMP := $(VENV)/.web-stamp
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test install data clean lint web chromium

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[cpu,export,plot,test,fleet,lint]'
	touch $(STAMP)

$(STOCK_STAMP): pyproject.toml
	$(PYTHON) -m venv $(STOCK)
	$(STOCK)/bin/pip install -q -e '.[device,test]'
	touch $(STOCK_STAMP)

$(HF_STAMP): pyproject.toml
	$(PYTHON) -m venv $(HF)
	$(HF)/bin/pip install -q -e '.[hf,test]'
	touch $(HF_STAMP)

install: $(STAMP)

$(NPM_STAMP): package.json package-lock.json
	npm ci --no-audit --no-fund --ignore-scripts
	touch $(NPM_STAMP)

chromium:
	@test -x /usr/bin/chromium || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium chromium-driver; }

$(WEB_STAMP): $(STAMP) pyproject.toml
	$(BIN)/pip install -q -e '.[browser]'
	touch $(WEB_STAMP)

web: $(NPM_STAMP) $(WEB_STAMP) chromium

# Fashion-MNIST, offline, from Debian's package (MIT license).
data:
	@test -d $(FMNIST) || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; }

# The layers (import-linter contracts in pyproject.toml), style and types, before any test runs.
lint: $(STAMP)
	$(BIN)/lint-imports
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint $(STOCK_STAMP) $(HF_STAMP) data web
	VQT_EDGE_REQUIRE_WEB=1 OMP_NUM_THREADS=2 $(BIN)/python -m pytest -q tests
	rm -rf $(BUNDLES) && $(BIN)/python -m tests.fixture_bundles $(BUNDLES)
	VQT_EDGE_TEST_BUNDLES=$(abspath $(BUNDLES)) OMP_NUM_THREADS=2 $(STOCK)/bin/python -m pytest -q \
		tests/test_device.py tests/test_portable.py tests/test_memory_portable.py tests/test_model_metadata.py
	VQT_EDGE_HF_BUNDLE=$(abspath $(BUNDLES))/tiny OMP_NUM_THREADS=2 $(HF)/bin/python -m pytest -q tests/test_hf_package.py

demo: $(STAMP) data
	$(BIN)/python examples/demo.py --out demo_out

clean:
	rm -rf $(VENV) $(STOCK) $(HF) $(BUNDLES) demo_out node_modules
