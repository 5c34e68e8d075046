#!/usr/bin/env bash
# Prints the README's held-out table: R@1/20 and MRR of each model on the chitchat test split
# (whole dialogues never used in training) and on Synthetic-Persona-Chat (ConvAI2 format).
# The four models share the MiniLM encoder, so each data set is encoded once.
set -euo pipefail
cd "$(dirname "$0")/.."
models=(models/minilm-bi models/poly-untrained-m64 models/poly-m16 models/poly-m64)
bin=./target/release/polyrank
for data in data/dialogues/chitchat-test20.jsonl data/dialogues/spc-test20.txt; do
  [ -f "$data" ] || continue
  echo "### $(basename "$data")"
  echo
  $bin eval --data "$data" --model "${models[@]}"
  echo
done
