# The two set-up commands of a fresh machine (see README): `make demo` and `make test`.
#
# Each first installs what is missing from its pinned requirements (tools/ensure_requirements.py: pip runs only for
# packages that are absent, with its progress shown; on a machine that has them all, pip is not called), then builds
# the CUDA extension of csrc/ in place (tools/build_extension.py: an incremental ninja build in build/, and nothing
# compiled when csrc/, the flags and torch are unchanged). The package itself is not pip-installed: the targets run
# from this tree (`pip install --no-build-isolation -e .` installs it for use elsewhere, reusing the same build).
#
#   EXACT=1      install the pins over packages installed at other versions (by default those are kept)
#   OFFLINE=1    never call pip (a machine with no registry): list what is missing, go on without it
#   TORCH_CPU=1  a missing torch comes as the CPU build (about 200 MB instead of 3.2 GB of nvidia wheels; no CUDA
#                extension then)
# Build switches (environment): PREFIX_KERNELS_SKIP_CUDA_BUILD=1 skips the extension; `make demo` builds it only
# when a CUDA device is visible, unless PREFIX_KERNELS_CUDA_BUILD=1; MAX_JOBS, NVCC_THREADS, TORCH_CUDA_ARCH_LIST.
PYTHON ?= python3
REQUIRE := $(PYTHON) tools/ensure_requirements.py $(if $(filter 1,$(EXACT)),--exact) \
	$(if $(filter 1,$(OFFLINE)),--offline) $(if $(filter 1,$(TORCH_CPU)),--torch-cpu)
BUILD := $(PYTHON) tools/build_extension.py

.PHONY: install install-test build demo test lint report bench

install:
	$(REQUIRE) requirements.txt
	$(BUILD) --if-gpu

install-test:
	$(REQUIRE) requirements-test.txt
	$(BUILD)

build:
	$(BUILD)

demo: install
	$(PYTHON) -m prefix_kernels demo

lint:
	@if [ "$(OFFLINE)" = 1 ] && ! $(PYTHON) -m ruff --version >/dev/null 2>&1; then \
		echo "lint: ruff is not installed; skipped (OFFLINE=1)"; else $(PYTHON) -m ruff check .; fi

test: install-test lint
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
