# Thin wrapper over CMake; see README.md. Variables: BUILD_DIR, BENCH_DIR, JOBS, CMAKE_ARGS,
# BENCH_ARGS (e.g. make bench BENCH_ARGS=--benchmark_min_time=0.001).
BUILD_DIR ?= build
BENCH_DIR ?= build-bench
JOBS ?= $(shell nproc 2>/dev/null || echo 2)
CMAKE_ARGS ?=
BENCH_ARGS ?=
CMAKE ?= cmake
CTEST ?= ctest
MAKEFLAGS += --no-print-directory

# The tour once examples/00_tour.cpp exists, the quickstart until then.
DEMO := $(if $(wildcard examples/00_tour.cpp),00_tour,01_quickstart)

.PHONY: all deps configure build test demo bench clean

all: test

deps:
	./scripts/ensure_deps.sh

configure: deps
	$(CMAKE) -S . -B $(BUILD_DIR) -DCMAKE_BUILD_TYPE=Release $(CMAKE_ARGS)

build: configure
	$(CMAKE) --build $(BUILD_DIR) -j $(JOBS)

test: build
	$(CTEST) --test-dir $(BUILD_DIR) --output-on-failure -j $(JOBS)

demo: configure
	$(CMAKE) --build $(BUILD_DIR) -j $(JOBS) --target ex_$(DEMO)
	./$(BUILD_DIR)/examples/$(DEMO)

bench: deps
	$(CMAKE) -S . -B $(BENCH_DIR) -DCMAKE_BUILD_TYPE=Release -DRETENTION_BUILD_BENCHMARKS=ON \
	  -DRETENTION_BUILD_TESTS=OFF -DRETENTION_BUILD_EXAMPLES=OFF -DRETENTION_BUILD_PYTHON=OFF $(CMAKE_ARGS)
	$(CMAKE) --build $(BENCH_DIR) -j $(JOBS)
	@set -e; found=0; for b in $(BENCH_DIR)/bench/bench_*; do \
	  [ -f "$$b" ] && [ -x "$$b" ] || continue; found=1; \
	  echo "== $$b"; "$$b" $(BENCH_ARGS); \
	done; [ $$found = 1 ] || echo "no benchmark programs (bench/bench_*.cpp) yet"

clean:
	rm -rf $(BUILD_DIR) $(BENCH_DIR)
