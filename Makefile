# Two set-up commands (README): `make demo` runs the default study, `make test` runs the tests.
# Both create .venv on first use. Where a torch is already importable by python3 (a CUDA box),
# the venv sees it (--system-site-packages) and keeps it. Otherwise torch==$(TORCH_VERSION) is
# installed first: on Linux without an NVIDIA GPU the CPU build from $(TORCH_CPU_INDEX) (pip's
# default index would pull a multi-GB CUDA build), falling back within seconds to the plain
# package where that index cannot be reached (a mirror, an offline wheel folder, this CI).
# Override on the command line, e.g. `make install TORCH_CPU_INDEX=` to skip the CPU index.
PYTHON          ?= python3
VENV            ?= .venv
PY              := $(VENV)/bin/python
STAMP           := $(VENV)/.proxy-installed
TORCH_VERSION   ?= 2.13.0
TRITON_VERSION  ?= 3.7.1
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
PIP             := $(PY) -m pip install -q --disable-pip-version-check

.PHONY: install torch demo lint test test-fast test-pins bench reproduce clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
		echo "using the torch already installed for $(PYTHON)"; \
		$(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		$(PYTHON) -m venv $(VENV); \
	fi
	$(PIP) --upgrade pip
	@$(PY) -c "import torch" 2>/dev/null || $(MAKE) --no-print-directory torch
	@if [ "$$(uname -s)" = "Linux" ] && ! $(PY) -c "import triton" 2>/dev/null; then \
		$(PIP) triton==$(TRITON_VERSION); fi
	$(PIP) -e '.[dev]'
	@touch $(STAMP)

# torch alone, into an existing venv: the CPU build where Linux has no NVIDIA GPU
torch:
	@if [ "$$(uname -s)" = "Linux" ] && [ -n "$(TORCH_CPU_INDEX)" ] \
	    && ! [ -e /proc/driver/nvidia/version ] && ! nvidia-smi -L >/dev/null 2>&1; then \
		echo "no NVIDIA GPU: torch $(TORCH_VERSION) CPU build from $(TORCH_CPU_INDEX)"; \
		$(PIP) --timeout 10 --retries 0 --index-url $(TORCH_CPU_INDEX) "torch==$(TORCH_VERSION)+cpu" 2>/dev/null \
		|| { echo "$(TORCH_CPU_INDEX) not reachable: torch $(TORCH_VERSION) from the default index"; \
		     $(PIP) "torch==$(TORCH_VERSION)"; }; \
	else \
		$(PIP) "torch==$(TORCH_VERSION)"; \
	fi

demo: $(STAMP)
	$(VENV)/bin/proxy-demo

# what CI runs first (.ci/run): ruff (lint, import order, format at 120 columns) and mypy on proxy/
lint: $(STAMP)
	$(VENV)/bin/ruff check proxy benchmarks experiments tests
	$(VENV)/bin/ruff format --check proxy benchmarks experiments tests
	$(VENV)/bin/mypy

test: $(STAMP)
	$(PY) -m pytest -q -n 2 tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -n 2 -m "not slow" tests

# The device image's pins (torch 2.11 / triton 3.6, older than the project's): the kernel tests
# under the Triton interpreter and the device scripts' dry runs (science queue, device check) in a
# second venv. Run before stopping whenever a kernel, the science run or the device check changed.
PINS_VENV    ?= .venv-pins
PINS_TORCH   ?= 2.11.0
PINS_TRITON  ?= 3.6.0
test-pins:
	@test -x $(PINS_VENV)/bin/python || $(PYTHON) -m venv $(PINS_VENV)
	@$(PINS_VENV)/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$(PINS_TORCH)')" \
		2>/dev/null || $(MAKE) --no-print-directory torch VENV=$(PINS_VENV) TORCH_VERSION=$(PINS_TORCH)
	@# triton 3.6's interpreter reads a scalar with int() of a 1-element array, which numpy 2.4 refuses
	$(PINS_VENV)/bin/python -m pip install -q --disable-pip-version-check "triton==$(PINS_TRITON)" "numpy<2.4" -e '.[dev]'
	$(PINS_VENV)/bin/python -c "import torch, triton; print('pins: torch', torch.__version__, 'triton', triton.__version__)"
	$(PINS_VENV)/bin/python -m pytest -q -n 2 -p no:cacheprovider tests/kernels tests/benchmarks

bench: $(STAMP)
	$(PY) -m benchmarks.trainer_speed

# Do the committed study results still come out of today's code? The cheapest job of each results
# table, re-run and compared (experiments/reproduce.py); REPRODUCE_BUDGET: seconds of their committed
# wall time (the quick ones first). Writes experiments/reproduction.md.
REPRODUCE_BUDGET ?= 1500
reproduce: $(STAMP)
	$(PY) experiments/reproduce.py --budget $(REPRODUCE_BUDGET)

clean:
	rm -rf $(VENV) $(PINS_VENV) runs
