#!/usr/bin/env bash
# Prints the README's held-out table: R@1/20 and MRR of each model on the chitchat test split
# (whole dialogues never used in training) and on Synthetic-Persona-Chat (ConvAI2 format).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=./target/release/polyrank
printf "| model | chitchat R@1/20 | chitchat MRR | SPC R@1/20 | SPC MRR |\n|---|---|---|---|---|\n"
for m in minilm-bi poly-untrained-m64 poly-m16 poly-m64; do
  a=$($bin eval --model models/$m --data data/dialogues/chitchat-test20.jsonl --json)
  if [ -f data/dialogues/spc-test20.txt ]; then b=$($bin eval --model models/$m --data data/dialogues/spc-test20.txt --json); else b='{"r_at_1":null,"mrr":null}'; fi
  python3 - "$m" "$a" "$b" <<'PY'
import json, sys
m, a, b = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
f = lambda x: "n/a" if x is None else f"{x:.4f}"
print(f"| {m} | {f(a['r_at_1'])} | {f(a['mrr'])} | {f(b['r_at_1'])} | {f(b['mrr'])} |")
PY
done
