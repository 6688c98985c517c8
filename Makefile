# The two commands a newcomer needs:  make demo   and   make test
# Both create .venv/ in the repo and install everything on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ellm_installed

.PHONY: demo test test-gpu test-sanitize bench clean

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

# The fake CUDA driver (tests/fakecuda/): a test-only stand-in for
# libcuda.so.1 that runs the CUDA backend over host memory. It is compiled
# against the same cuda.h as the backend; without cuda.h there is no CUDA
# backend to test and the rule makes nothing (its tests skip).
CUDA_INCLUDE ?= $(firstword $(wildcard $(CUDA_HOME)/include/cuda.h /usr/local/cuda/include/cuda.h))
FAKECUDA := build/fakecuda/libfakecuda.so
$(FAKECUDA): tests/fakecuda/fakecuda.cpp
	@if [ -n "$(CUDA_INCLUDE)" ]; then mkdir -p $(dir $@) && \
	  g++ -std=c++17 -O1 -g -Wall -Wextra -shared -fPIC -I$(dir $(CUDA_INCLUDE)) $< -o $@ -lpthread; \
	else echo "ellm_alloc: no cuda.h, the fake CUDA driver is not built"; fi

test: $(STAMP) $(FAKECUDA)
	$(BIN)/python -m pytest -q tests

# The core under AddressSanitizer + UndefinedBehaviorSanitizer (the C-level
# owner-lifetime checks and stress test, then the pool, arena, KV and thread
# tests from Python with the sanitized library), and the stress test under
# ThreadSanitizer.
# Python itself is not built with ASan, so its runtime must be loaded first
# (LD_PRELOAD) for the sanitized library to load at all; ELLM_ALLOC_LIB makes
# ellm_alloc/_native.py load that library instead of the installed one.
# LeakSanitizer reports CPython's, torch's and OpenSSL's never-freed
# process-lifetime allocations: tests/sanitize/lsan.supp suppresses them, and
# says why; the library's own leaks are checked by the stress test, where
# nothing else allocates.
SAN_DIR := build-sanitize
SAN_FLAGS := -std=c++17 -O1 -g -fno-omit-frame-pointer -fno-sanitize-recover=undefined
SAN_SRC := $(wildcard csrc/*)
SAN_TESTS := tests/test_pool_owners.py tests/test_arena_stateful.py tests/test_bad_input.py \
	tests/test_c_abi_bad_input.py tests/test_faults.py tests/test_threads.py tests/test_streams.py \
	tests/test_fork.py tests/test_byte_tensor.py tests/test_kv_balloon.py tests/test_kv_straddling.py \
	tests/test_kv_threads.py tests/test_kv_contiguous.py tests/test_kv_bad_input.py tests/test_zero_chunk.py \
	tests/test_swap_space.py tests/test_kv_swap_table.py tests/test_kv_demotion.py

$(SAN_DIR)/libellm_alloc_core.so: $(SAN_SRC)
	@mkdir -p $(SAN_DIR)
	g++ $(SAN_FLAGS) -fsanitize=address,undefined -shared -fPIC -fvisibility=hidden -x c++ csrc/allocator.cu \
	  -o $@ -ldl -lpthread
$(SAN_DIR)/kv_stress_asan: $(SAN_SRC) tests/csrc/kv_stress.cpp
	@mkdir -p $(SAN_DIR)
	g++ $(SAN_FLAGS) -fsanitize=address,undefined -x c++ csrc/allocator.cu -x none tests/csrc/kv_stress.cpp \
	  -o $@ -ldl -lpthread
$(SAN_DIR)/kv_stress_tsan: $(SAN_SRC) tests/csrc/kv_stress.cpp
	@mkdir -p $(SAN_DIR)
	g++ $(SAN_FLAGS) -fsanitize=thread -x c++ csrc/allocator.cu -x none tests/csrc/kv_stress.cpp \
	  -o $@ -ldl -lpthread

# Linked against the sanitized library above: no second ASan build of the core.
$(SAN_DIR)/owner_lifetime: tests/csrc/owner_lifetime.cpp $(SAN_DIR)/libellm_alloc_core.so
	g++ $(SAN_FLAGS) -fsanitize=address,undefined tests/csrc/owner_lifetime.cpp -o $@ \
	  -L$(SAN_DIR) -lellm_alloc_core -Wl,-rpath,'$$ORIGIN' -lpthread

SAN_ENV := LD_PRELOAD="$$(g++ -print-file-name=libasan.so) $$(g++ -print-file-name=libubsan.so)" \
	  ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 LSAN_OPTIONS=suppressions=tests/sanitize/lsan.supp \
	  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 ELLM_ALLOC_LIB=$(SAN_DIR)/libellm_alloc_core.so

test-sanitize: $(STAMP) $(SAN_DIR)/libellm_alloc_core.so $(SAN_DIR)/kv_stress_asan $(SAN_DIR)/kv_stress_tsan \
	$(SAN_DIR)/owner_lifetime
	$(SAN_DIR)/owner_lifetime
	$(SAN_DIR)/kv_stress_asan 5
	TSAN_OPTIONS=halt_on_error=1 $(SAN_DIR)/kv_stress_tsan 5
	$(SAN_ENV) $(BIN)/python -c "import ellm_alloc._native as N; \
	  assert N.LIB_PATH.endswith('$(SAN_DIR)/libellm_alloc_core.so'), N.LIB_PATH"
	$(SAN_ENV) ELLM_STATEFUL_EXAMPLES=40 $(BIN)/python -m pytest -q -p no:cacheprovider $(SAN_TESTS)

test-gpu: $(STAMP)
	$(BIN)/python -m pytest -q tests/gpu

bench: $(STAMP)
	@for t in benchmarks/traces/*.trace; do $(BIN)/python -m ellm_alloc.bench replay $$t; done
	$(BIN)/python -m ellm_alloc.bench hotpath

clean:
	rm -rf build $(SAN_DIR) $(VENV) *.egg-info
