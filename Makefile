# convit-ssl: `make demo` runs the main job, `make test` the whole suite, `make test-fast` all but the slow tests.
# Both create .venv when it is missing and install everything into it; reruns are quick.

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

# torch and torchvision must be a matching pair; vissl 0.1.6 and classy-vision 0.7.0 pin
# versions that cannot install on Python 3.11, so they go in with --no-deps and setup.cfg
# declares what they really need at run time. classy-vision goes in after vissl because
# vissl's wheel bundles an older copy that breaks on current torchvision.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

# The throwaway SLURM cluster of tests/slurm needs Debian's slurm and munge (installed when root, as in CI).
SLURM_PACKAGES := slurmctld slurmd slurm-client munge

.PHONY: install slurm-packages demo test test-fast bench gpu-check clean

install: $(STAMP)

$(STAMP): setup.cfg setup.py Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install $(TORCH_PINS)
	$(PIP) install --no-deps vissl==0.1.6
	$(PIP) install --no-deps --force-reinstall classy-vision==0.7.0
	$(PIP) install -e ".[test]"
	touch $(STAMP)

demo: install
	$(PY) -m convit_ssl demo

slurm-packages:
	@if [ "$$(id -u)" = 0 ] && ! command -v slurmctld >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SLURM_PACKAGES); fi

test: install slurm-packages
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

bench: install
	$(PY) benchmarks/throughput.py

# `make gpu-check WHEELS=folder` on a bare machine with one NVIDIA GPU and Python 3.12 with torch and timm, no
# network: a virtual environment that sees those two, the other packages from the wheels in WHEELS (the list
# is in benchmarks/gpu_check.py), then parity, torch.compile, DINO and throughput checks (at most 8 minutes).
WHEELS ?= .whl
GPU_PYTHON ?= python3
GPU_VENV := build/gpu-venv
GPU_CHECK_OUT ?= benchmarks/results/gpu_check.json

gpu-check:
	@test -d "$(WHEELS)" || { echo "gpu-check: no wheel folder $(WHEELS): pass WHEELS=folder (see benchmarks/gpu_check.py)"; exit 2; }
	test -x $(GPU_VENV)/bin/python || $(GPU_PYTHON) -m venv --system-site-packages $(GPU_VENV)
	$(GPU_VENV)/bin/python -m pip --disable-pip-version-check -q install --no-index --no-deps $(WHEELS)/*.whl
	PYTHONPATH=$(CURDIR) $(GPU_VENV)/bin/python benchmarks/gpu_check.py --device cuda --out $(GPU_CHECK_OUT)

clean:
	rm -rf $(VENV) build *.egg-info
