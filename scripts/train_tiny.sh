#!/usr/bin/env bash
# Reproduce the shipped depthvlm-tiny: generate data, train stages 0 -> 1 -> 2, then store the result
# (float16 weights) in depthvlm_ros/models/depthvlm-tiny/; measure it with scripts/eval_tiny.sh.
# Usage: scripts/train_tiny.sh [WORKDIR]   (default build/tiny; about 60 min on 2 CPU cores)
# A step already done in WORKDIR (its data, or a stage's final folder) is not done again. Training runs
# through Accelerate, so on a machine with a GPU the same script trains there (data generated there too).
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-build/tiny}
D=${DEPTHVLM:-.venv/bin/depthvlm}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$W"
# Focal lengths 0.25x-4x of a 60-degree lens at 320 px (277.1 px): 69.3-1108.5 px.
[ -f "$W/train/info.json" ] || $D generate --out "$W/train" --n 10000 --seed 1 --kind mixed --size 320x240 \
  --fx-min 69.3 --fx-max 1108.5 --workers 2
[ -f "$W/val/info.json" ] || $D generate --out "$W/val" --n 64 --seed 7 --kind mixed --size 320x240
[ -f "$W/stage0/final/config.json" ] || $D train --stage 0 --init-tiny --data "$W/train" --out "$W/stage0" \
  --steps 6500 --batch-size 8 --lr 1e-3 --warmup-steps 100 --qa-fraction 0.875 --seed 0 --eval-data "$W/val" \
  --eval-every 1000 --eval-limit 32 --save-every 500 --freeze model.visual.pos_embed
[ -f "$W/stage1/final/config.json" ] || $D train --stage 1 --init "$W/stage0/final" --data "$W/train" \
  --out "$W/stage1" --steps 300 --batch-size 8 --lr 5e-4 --warmup-steps 20 --seed 1 --eval-data "$W/val" \
  --eval-every 300 --eval-limit 32 --save-every 300
[ -f "$W/stage2/final/config.json" ] || $D train --stage 2 --init "$W/stage1/final" --data "$W/train" \
  --out "$W/stage2" --steps 800 --batch-size 8 --lr 3e-4 --warmup-steps 50 --qa-fraction 0.75 --seed 2 \
  --eval-data "$W/val" --eval-every 500 --eval-limit 32 --save-every 500
echo "trained: $W/stage2/final"
$PY -m depthvlm_ros.training.tiny package "$W/stage2/final" depthvlm_ros/models/depthvlm-tiny
