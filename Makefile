# Two set-up commands (README): `make demo` runs the default study, `make test` runs the tests.
# Both create .venv on first use. Where a torch is already importable by python3 (a CUDA box),
# the venv sees it (--system-site-packages) and keeps it; otherwise the CPU wheel torch==2.13.0
# is installed first, so pip never pulls a multi-GB CUDA build on a laptop or CI.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.proxy-installed

.PHONY: install demo test test-fast bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
		echo "using the torch already installed for $(PYTHON)"; \
		$(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		$(PYTHON) -m venv $(VENV); \
	fi
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	@if [ "$$(uname -s)" = "Linux" ] && ! $(PY) -c "import triton" 2>/dev/null; then \
		$(PY) -m pip install -q --disable-pip-version-check triton==3.7.1; fi
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/proxy-demo

test: $(STAMP)
	$(PY) -m pytest -q -n 2 tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -n 2 -m "not slow" tests

bench: $(STAMP)
	$(PY) -m benchmarks.trainer_speed

clean:
	rm -rf $(VENV) runs
