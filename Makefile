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

# Devices (docs/devices.md): Debian 13's Python 3.13 on aarch64 (run under qemu, invoked explicitly) and
# on x86-64, each with the project's wheel and its `device` extra installed for that platform.
DEVICES := build/devices
DEVICE_TARGETS := aarch64-cp313 x86_64-cp313
DEBIAN_MIRROR ?= $(or $(shell sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1),http://deb.debian.org/debian)
# apt against Debian 13 in a private state folder: the host's sources and state stay untouched.
TRIXIE_APT = $(foreach o,Dir::Etc::sourcelist=$(abspath $(DEVICES))/apt/sources.list \
	Dir::Etc::sourceparts=$(abspath $(DEVICES))/apt/empty Dir::Etc::preferencesparts=$(abspath $(DEVICES))/apt/empty \
	Dir::State::Lists=$(abspath $(DEVICES))/apt/lists Dir::Cache=$(abspath $(DEVICES))/apt/cache APT::Sandbox::User=root,-o $(o))
DEVICE_SOURCES := pyproject.toml $(shell find vqt_edge device_runner exporters -type f ! -name '*.pyc' 2>/dev/null)

.PHONY: demo test install data devices clean lint web chromium

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

# Debian 13 root file systems, unpacked from Debian's packages without running anything in them.
$(DEVICES)/rootfs-%/.stamp:
	@command -v debootstrap >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq debootstrap; }
	$(SUDO) rm -rf $(@D) && mkdir -p $(DEVICES)
	$(SUDO) debootstrap --foreign --arch $* --variant=minbase --include=python3 trixie $(@D) $(DEBIAN_MIRROR) > $(@D).log
	$(if $(SUDO),$(SUDO) chown -R $$(id -u):$$(id -g) $(@D))
	for deb in $(@D)/var/cache/apt/archives/*.deb; do dpkg -x $$deb $(@D) || exit 1; done
	# qemu -L looks a path up in the root file system first: the host's /dev, /proc, /sys, /tmp must win.
	rm -rf $(@D)/dev $(@D)/proc $(@D)/sys $(@D)/tmp $(@D)/run $(@D)/var/cache/apt/archives/*.deb
	touch $@

# qemu 10 (Debian 13's qemu-user): bookworm's 7.2 segfaults importing onnxruntime's aarch64 wheel.
$(DEVICES)/qemu/.stamp:
	rm -rf $(DEVICES)/apt $(@D) && mkdir -p $(DEVICES)/apt/lists/partial $(DEVICES)/apt/cache/archives/partial $(DEVICES)/apt/empty
	echo 'deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $(DEBIAN_MIRROR) trixie main' > $(DEVICES)/apt/sources.list
	apt-get $(TRIXIE_APT) -qq update
	cd $(DEVICES)/apt && apt-get $(TRIXIE_APT) -qq download qemu-user
	dpkg -x $(DEVICES)/apt/qemu-user_*.deb $(@D)
	find $(@D)/usr/bin -type f ! -name qemu-aarch64 -delete && rm -rf $(DEVICES)/apt
	touch $@

# The project's own wheel and its `device` extra for the target's platform (a wrong marker fails here).
$(DEVICES)/%-cp313/.stamp: $(STAMP) $(DEVICE_SOURCES) tests/devices/python
	# setuptools reuses build/lib: a module removed from the sources would stay in the wheel
	rm -rf $(@D) $(DEVICES)/wheel build/lib build/bdist.* && $(BIN)/pip wheel -q --no-deps -w $(DEVICES)/wheel .
	$(BIN)/pip install -q --no-warn-conflicts --target $(@D)/site --platform manylinux_2_28_$* --platform manylinux2014_$* \
		--python-version 3.13 --implementation cp --abi cp313 --only-binary=:all: "$$(ls $(DEVICES)/wheel/*.whl)[device]" pytest
	mkdir -p $(@D)/bin && cp tests/devices/python $(@D)/bin/python
	touch $@

devices: $(DEVICES)/rootfs-arm64/.stamp $(DEVICES)/rootfs-amd64/.stamp $(DEVICES)/qemu/.stamp \
	$(foreach t,$(DEVICE_TARGETS),$(DEVICES)/$(t)/.stamp)

# Then Python 3.13 on x86-64 (native speed) runs the device tests (not test_memory_portable.py: the memory
# model's baseline was measured on Python 3.11, and 3.13 peaks ~8 MiB higher, docs/devices.md), and
# tests/test_devices.py runs both Python 3.13 targets, aarch64 under emulation, and compares them.
test: lint $(STOCK_STAMP) $(HF_STAMP) data web devices
	VQT_EDGE_REQUIRE_WEB=1 OMP_NUM_THREADS=2 $(BIN)/python -m pytest -q tests
	rm -rf $(BUNDLES) && $(BIN)/python -m tests.fixture_bundles $(BUNDLES)
	VQT_EDGE_TEST_BUNDLES=$(abspath $(BUNDLES)) OMP_NUM_THREADS=2 $(STOCK)/bin/python -m pytest -q \
		tests/test_device.py tests/test_portable.py tests/test_memory_portable.py tests/test_model_metadata.py
	VQT_EDGE_HF_BUNDLE=$(abspath $(BUNDLES))/tiny OMP_NUM_THREADS=2 $(HF)/bin/python -m pytest -q tests/test_hf_package.py
	VQT_EDGE_TEST_BUNDLES=$(abspath $(BUNDLES)) OMP_NUM_THREADS=2 $(DEVICES)/x86_64-cp313/bin/python -m pytest -q \
		tests/test_device.py tests/test_portable.py
	VQT_EDGE_TEST_BUNDLES=$(abspath $(BUNDLES)) VQT_EDGE_DEVICES=$(abspath $(DEVICES)) $(BIN)/python -m pytest -q \
		tests/test_devices.py

demo: $(STAMP) data
	$(BIN)/python examples/demo.py --out demo_out

clean:
	rm -rf $(VENV) $(STOCK) $(HF) $(BUNDLES) demo_out node_modules
	$(SUDO) rm -rf $(DEVICES)
