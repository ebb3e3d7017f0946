#!/usr/bin/env bash
# Reproduce the shipped depthvlm-tiny: generate data, train stages 0 -> 1 -> 2, then store the result
# (float16 weights) in depthvlm_ros/models/depthvlm-tiny/; measure it with scripts/eval_tiny.sh.
# Usage: scripts/train_tiny.sh [WORKDIR]   (default build/tiny; about 75 min on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-build/tiny}
D=${DEPTHVLM:-.venv/bin/depthvlm}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$W"
[ -f "$W/train/info.json" ] || $D generate --out "$W/train" --n 6000 --seed 1 --kind mixed --size 320x240 --workers 2
[ -f "$W/val/info.json" ] || $D generate --out "$W/val" --n 64 --seed 7 --kind mixed --size 320x240
$D train --stage 0 --init-tiny --data "$W/train" --out "$W/stage0" --steps 5000 --batch-size 8 --lr 1e-3 \
  --warmup-steps 100 --qa-fraction 0.5 --seed 0 --eval-data "$W/val" --eval-every 500 --eval-limit 32 --save-every 500
$D train --stage 1 --init "$W/stage0/final" --data "$W/train" --out "$W/stage1" --steps 300 --batch-size 8 --lr 5e-4 \
  --warmup-steps 20 --seed 1 --eval-data "$W/val" --eval-every 400 --eval-limit 32 --save-every 400
$D train --stage 2 --init "$W/stage1/final" --data "$W/train" --out "$W/stage2" --steps 1500 --batch-size 8 --lr 5e-4 \
  --warmup-steps 50 --qa-fraction 0.75 --seed 2 --eval-data "$W/val" --eval-every 500 --eval-limit 32 --save-every 500
echo "trained: $W/stage2/final"
$PY -m depthvlm_ros.training.tiny package "$W/stage2/final" depthvlm_ros/models/depthvlm-tiny
