# The two commands a newcomer needs:  make demo   and   make test
# Both create .venv/ in the repo and install everything on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ellm_installed

.PHONY: demo test test-gpu bench clean

# A torch already present (a GPU machine's CUDA build) is kept: the venv then
# sees the system site-packages. Otherwise the CPU build of torch is installed.
$(BIN)/python:
	@if $(PY) -c "import torch" 2>/dev/null; then \
	  echo "ellm_alloc: keeping the installed torch $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	  $(PY) -m venv --system-site-packages $(VENV); \
	else \
	  $(PY) -m venv $(VENV) && $(BIN)/pip install -q --upgrade pip && $(BIN)/pip install -q torch==2.13.0; \
	fi

$(STAMP): $(BIN)/python pyproject.toml CMakeLists.txt $(wildcard csrc/*)
	$(BIN)/pip install -q -e '.[test,hf]'
	@touch $@

demo: $(STAMP)
	$(BIN)/python -m ellm_alloc.demo

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

test-gpu: $(STAMP)
	$(BIN)/python -m pytest -q tests/gpu

bench: $(STAMP)
	@for t in benchmarks/traces/*.trace; do $(BIN)/python -m ellm_alloc.bench replay $$t; done
	$(BIN)/python -m ellm_alloc.bench hotpath

clean:
	rm -rf build $(VENV) *.egg-info
