#!/usr/bin/env bash
# Fine-tuning throughput on this machine by layers trained: pairs/s over STEPS steps of the
# default recipe's batches (256 pairs, contexts ≤ 128 tokens, candidates ≤ 48), with and
# without gradient caching. Prints a markdown table. Needs `make build model data`.
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${STEPS:-4}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "| layers trained | encoders | gradient caching | pairs/s |"
echo "|---|---|---|---|"
run() {
  local name=$1 enc=$2 gc=$3
  shift 3
  rm -rf "$tmp/out"
  ./target/release/polyrank train --base models/minilm-bi --out "$tmp/out" --n-codes 64 --init-std 0.01 \
    --data data/dialogues/train.jsonl --batch-size 256 --chunk-size 64 --grad-cache "$gc" \
    --max-context-tokens 128 --max-candidate-tokens 48 --max-steps 100 --stop-after "$steps" \
    --save-every 1000 --valid-every 1000 "$@" >/dev/null 2>&1
  python3 -c "import json,sys; s=json.load(open('$tmp/out/train_state.json')); print(f'| $name | $enc | $gc | {s[\"steps_done\"]*256/s[\"train_seconds\"]:.1f} |')"
}
run "top 1" shared false --train-layers 1
run "top 3" shared false --train-layers 3
run "all 6" shared false --train-layers all
run "all 6 + embeddings" shared false --train-layers all --train-embeddings
run "all 6" shared true --train-layers all
run "all 6 (the recipe, + last-turn negatives)" separate false --train-layers all --separate-encoders --context-negatives
run "all 6 (the recipe, bf16 matmuls: --precision bf16)" separate false --train-layers all --separate-encoders --context-negatives --precision bf16
