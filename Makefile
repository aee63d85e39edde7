# The two set-up commands of a fresh machine (see README): `make demo` and `make test`.
# Each installs what it needs into the current Python environment first. The editable install compiles
# the CUDA extension of csrc/ when torch is a CUDA build and nvcc is found (about 5 minutes on 2 cores;
# PREFIX_KERNELS_SKIP_CUDA_BUILD=1 skips it, MAX_JOBS / NVCC_THREADS / TORCH_CUDA_ARCH_LIST tune it).
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install install-test demo test lint report bench

install:
	$(PIP) install -q torch==2.14.1 numpy==2.4.6 ninja==1.13.2 transformers==5.24.0
	$(PIP) install -q --no-build-isolation -e .

install-test:
	$(PIP) install -q -r requirements-test.txt
	$(PIP) install -q --no-build-isolation -e .

demo: install
	$(PYTHON) -m prefix_kernels demo

lint:
	$(PYTHON) -m ruff check .

test: install-test
	$(PYTHON) -m ruff check .
	$(PYTHON) -m pytest -q -n 2

report: install
	env -u TRITON_INTERPRET $(PYTHON) -m prefix_kernels report

bench: install
	$(PYTHON) -m prefix_kernels bench

# On a GPU machine with no package registry: validate and measure in one budgeted run, installing nothing
# (see README, "On a GPU"). GPU_CHECK_OUT: the folder for its files; GPU_CHECK_BUDGET: seconds.
GPU_CHECK_OUT ?= gpu-check-out
GPU_CHECK_BUDGET ?= 480
.PHONY: gpu-check
gpu-check:
	$(PYTHON) -m prefix_kernels gpu-check --out $(GPU_CHECK_OUT) --budget-s $(GPU_CHECK_BUDGET)
