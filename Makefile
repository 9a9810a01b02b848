# `make demo`: set up (virtualenv + pinned requirements + Fashion-MNIST) and run the demo.
# `make test`: set up and run the whole test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist
WORKDIR ?= workdirs/demo
# Tests run in 2 processes (pytest-xdist); CI machines have 2 cores.
TEST_WORKERS ?= 2

.PHONY: setup data demo smoke test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-test.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-test.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

# The demo data: Debian's dataset-fashion-mnist (MIT), offline-installable from the Debian mirror.
data:
	@if [ -f "$(FMNIST_DIR)/train-images-idx3-ubyte.gz" ]; then true; \
	elif command -v apt-get >/dev/null; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get install -y dataset-fashion-mnist || \
	  ( $$SUDO apt-get update && $$SUDO apt-get install -y dataset-fashion-mnist ); \
	else echo "Fashion-MNIST not found: install Debian's dataset-fashion-mnist, or set \
	PMSN_FASHION_MNIST_DIR to a folder of the IDX .gz files, or run the demo with \
	--config.data.source=tfds:fashion_mnist where the network allows." >&2; exit 1; fi

demo: setup data
	$(PY) -m pmsn_jax.main --config=configs/demo.py --workdir=$(WORKDIR)

smoke: setup data
	$(PY) -m pmsn_jax.main --config=configs/demo.py:smoke --workdir=workdirs/smoke

test: setup data
	$(PY) -m pytest -q -n $(TEST_WORKERS) --durations=15 tests

bench: setup data
	$(PY) benchmarks/train_step.py --config=configs/demo.py

clean:
	rm -rf $(VENV) workdirs
