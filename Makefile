# Two entry points for a newcomer: `make demo` (the main job) and `make test`. Both build .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
FMNIST := /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test install data clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[cpu,export,plot,test,fleet]'
	touch $(STAMP)

install: $(STAMP)

# Fashion-MNIST, offline, from Debian's package (MIT license).
data:
	@test -d $(FMNIST) || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; }

test: $(STAMP) data
	OMP_NUM_THREADS=2 $(BIN)/python -m pytest -q tests

demo: $(STAMP) data
	$(BIN)/python examples/demo.py --out demo_out

clean:
	rm -rf $(VENV) demo_out
