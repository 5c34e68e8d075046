#!/usr/bin/env bash
# Fine-tunes one model of the README's quality table (see `make finetuned`); resumable: when
# OUT already holds a checkpoint (train_state.json) the run goes on from it, so
# `nohup make default-model &` can be stopped and started again without losing work.
# Usage: scripts/train_finetuned.sh BASE OUT LOGIT_SCALE [extra polyrank train flags]
set -euo pipefail
cd "$(dirname "$0")/.."
base=$1 out=$2 scale=$3
shift 3
resume=()
[ -f "$out/train_state.json" ] && resume=(--resume)
mkdir -p "$out"
# Budget and recipe: the same for every model of the table. --grad-cache false: the whole
# batch's graph fits (5.3 GB resident at 256 pairs) and saves the extra forward pass (24.5 vs
# 17.6 pairs/s measured here); gradient caching is for machines where it does not fit.
./target/release/polyrank train --base "$base" --out "$out" --logit-scale "$scale" \
  --data data/dialogues/train.jsonl \
  --valid data/dialogues/valid20.jsonl --valid data/dialogues/spc-valid20.txt \
  --train-layers all --separate-encoders --context-negatives --batch-size 256 --chunk-size 64 --grad-cache false \
  --lr 3e-3 --lr-encoder "${FT_LR_ENCODER:-1e-4}" --warmup-steps 10 --clip-norm 1.0 --weight-decay 0.01 \
  --max-context-tokens 128 --max-candidate-tokens 48 \
  --max-steps "${FT_STEPS:-110}" --save-every 10 --valid-every "${FT_VALID_EVERY:-55}" --seed "${FT_SEED:-0}" \
  "${resume[@]}" "$@" 2>&1 | tee -a "$out/train.log"
