#!/usr/bin/env bash
# Prints the README's quality table: R@1/20 and MRR (± standard errors) of each model on the
# chitchat test split and the Synthetic-Persona-Chat test split (conversations never used in
# training or in choosing the recipe). Needs `make data`, and `make finetuned` for the
# fine-tuned rows (runs/). Models that share an encoder share one encoding pass.
set -euo pipefail
cd "$(dirname "$0")/.."
# Zero-shot bi-encoder, head-only heads, the fine-tuned bi, m = 16 and m = 64 runs (same budget;
# the m = 64 run is the previous default), and the default (that run continued for 630 more
# steps: `make default-model`).
models=(models/minilm-bi models/poly-m16 models/poly-m64)
# Only finished runs (steps_done = the recipe's steps).
finished() {
  python3 -c 'import json, re, sys; s = json.load(open(sys.argv[1])); sys.exit(s["steps_done"] != int(re.search(r"steps (\d+)", s["recipe"]).group(1)))' "$1/train_state.json" 2>/dev/null
}
for m in runs/ft-bi runs/ft-poly-m16 runs/ft-poly-m64; do
  if finished "$m"; then models+=("$m"); fi
done
models+=(models/default)
bin=./target/release/polyrank
mkdir -p runs/eval
out=runs/eval/table.jsonl
: > "$out"
for data in data/dialogues/chitchat-test20.jsonl data/dialogues/spc-test20.txt; do
  [ -f "$data" ] || continue
  $bin eval --data "$data" --model "${models[@]}" --json >> "$out"
done
python3 scripts/quality_table.py "$out"
