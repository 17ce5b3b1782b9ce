# The two commands of the README. Each one sets up .venv on first use, then runs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION := 2.13.0
# Where the pinned torch comes from. Empty: pip's own configuration (on our CI machines, a local CPU wheel).
# Elsewhere on Linux, PyPI's torch is a CUDA build; TORCH_INDEX=https://download.pytorch.org/whl/cpu gets the CPU one.
TORCH_INDEX ?=
STAMP := $(VENV)/.gptforge-installed

.PHONY: demo test install clean llama-cpp

demo: $(STAMP)
	$(VENV)/bin/gptforge demo $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

install: $(STAMP)

# A Python that already imports torch (say a CUDA build) lends it to the venv through
# --system-site-packages, so it is used and never replaced. Otherwise the CPU wheel is pinned
# and installed first: an unpinned `torch` requirement would pull several GB of CUDA packages.
$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "gptforge needs Python >= 3.11, this is " + sys.version.split()[0]'
	@if [ ! -x $(PY) ]; then \
		if $(PYTHON) -c 'import torch' >/dev/null 2>&1; then \
			echo "using the torch of $(PYTHON) (not replaced)"; \
			$(PYTHON) -m venv --system-site-packages $(VENV); \
		else \
			$(PYTHON) -m venv $(VENV); \
		fi; \
	fi
	@if $(PY) -c 'import torch' >/dev/null 2>&1; then \
		$(PY) -c 'import torch; print("torch", torch.__version__, "already present: kept")'; \
	else \
		$(PY) -m pip install --quiet "torch==$(TORCH_VERSION)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)); \
	fi
	$(PY) -m pip install --quiet -e ".[corpus,test,eval]"
	@touch $@

# llama.cpp for the GGUF parity tests and the llama.cpp column of benchmarks/decode_llamacpp.py: llama-cpp-python
# compiles it from source (about 10 minutes on 2 cores; needs a C++ compiler and cmake). Not part of `make test`,
# whose llama.cpp tests skip with the reason until this has run.
llama-cpp: $(STAMP)
	$(PY) -m pip install -e ".[llama]"

clean:
	rm -rf $(VENV) runs .pytest_cache
