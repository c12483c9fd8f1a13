# azfilter: `make test` and `make demo` do all the set-up they need on a fresh Debian machine.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(VENV)/bin/pip
STAMP   = $(VENV)/.azfilter-installed

# The editable install rebuilds the compiled kernels on import with the venv's meson, ninja and
# cython: they must be on PATH for every target that runs Python.
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: install system-deps demo test bench bench-cli bench-opencl lint clean

# PoCL (CPU OpenCL runtime) so that the OpenCL backend runs without a GPU. Installed only when
# we are root and no OpenCL driver is registered; otherwise the OpenCL tests skip (never in CI).
system-deps:
	@if [ ! -d /etc/OpenCL/vendors ] || [ -z "$$(ls /etc/OpenCL/vendors 2>/dev/null)" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing PoCL (CPU OpenCL runtime)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pocl-opencl-icd ocl-icd-libopencl1 >/dev/null; \
	  else echo "note: no OpenCL driver registered; OpenCL tests will be skipped (apt-get install pocl-opencl-icd)"; fi; \
	fi

# CYTHON=absolute path: the build records it, so the editable install's rebuild on import works
# without the venv on PATH.
$(STAMP): pyproject.toml meson.build kernels/meson.build
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "meson-python>=0.18" "meson>=1.2" ninja "cython>=3.0" numpy
	CYTHON="$(abspath $(VENV))/bin/cython" $(PIP) install -q --no-build-isolation -e ".[test,plot]"
	touch $(STAMP)

install: $(STAMP)

demo: system-deps install
	$(VENV)/bin/python examples/make_demo_data.py demo-output/data
	bash examples/demo.sh demo-output

test: system-deps install
	$(PY) -m pytest -q tests

# Engine side by side with pyFAI (Pilatus 1M, Eiger 4M): the README's CPU table.
bench: install
	$(PY) bench/bench_engine.py
	$(PY) bench/bench_engine.py --backend python --detectors Pilatus1M

# The whole command against pyFAI-integrate: one frame cold start, a 200-frame Eiger 4M stack,
# 100 Pilatus 1M CBF files (to text files and to one .h5).
bench-cli: install
	$(PY) bench/bench_cli.py

# OpenCL backend against pyFAI's OpenCL (meant for a GPU; --quick runs on PoCL).
bench-opencl: install
	$(PY) bench/bench_opencl.py

lint: install
	$(VENV)/bin/ruff check azfilter tests bench examples

clean:
	rm -rf build $(VENV) demo-output
