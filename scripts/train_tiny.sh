#!/usr/bin/env bash
# Reproduce the shipped depthvlm-tiny: generate data, teach the model to point (bind phase, then eleven readout
# phases, all with the grounding losses of depthvlm_ros/training/grounding.py), finish with a short stage 1 for depth,
# then store the result (float16 weights) in depthvlm_ros/models/depthvlm-tiny/; measure it with
# scripts/eval_tiny.sh.
# Usage: scripts/train_tiny.sh [WORKDIR]   (default build/tiny; the model card says how long it took)
# A step already done in WORKDIR (its data, or a phase's final folder) is not done again; a phase that was
# interrupted continues from its newest checkpoint. Training runs through Accelerate, so on a machine with a GPU
# the same script trains there (DEVICE_ARGS, e.g. larger batches, are passed to every phase).
#
# The phases start from the weights shipped before this recipe (issue 13's model, commit 6a00fc8, recreated by
# its own recipe in that commit's scripts/train_tiny.sh); START_MODEL=DIR starts from another folder.
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-build/tiny}
D=${DEPTHVLM:-.venv/bin/depthvlm}
PY=${PYTHON:-.venv/bin/python}
read -r -a EXTRA <<< "${DEVICE_ARGS:-}"
mkdir -p "$W"
# Focal lengths 0.25x-4x of a 60-degree lens at 320 px (277.1 px): 69.3-1108.5 px. Questions weighted toward
# the kinds that must find the named object (--qa-mix binding), 6 per frame; every frame has its object mask.
training_frames() {  # NAME SEED [N FX_MIN FX_MAX]: N training frames (10,000, 0.25x-4x) in W/NAME, unless there
  [ -f "$W/$1/info.json" ] || $D generate --out "$W/$1" --n "${3:-10000}" --seed "$2" --kind mixed --size 320x240 \
    --fx-min "${4:-69.3}" --fx-max "${5:-1108.5}" --qa-mix binding --qa-per-frame 6 --workers 2
}
training_frames train 1
[ -f "$W/val/info.json" ] || $D generate --out "$W/val" --n 64 --seed 7 --kind mixed --size 320x240
[ -f "$W/probe/info.json" ] || $D generate --out "$W/probe" --n 64 --seed 9 --kind mixed --size 320x240 \
  --qa-mix binding
[ -f "$W/qa-val/info.json" ] || $D generate --out "$W/qa-val" --n 100 --seed 11 --kind mixed --size 320x240
START=${START_MODEL:-$W/start}
if [ -z "${START_MODEL:-}" ] && [ ! -f "$W/start/model.safetensors" ]; then
  mkdir -p "$W/start"
  git archive 6a00fc8 depthvlm_ros/models/depthvlm-tiny | tar -x -C "$W/start" --strip-components=3
fi
phase() {  # NAME ARGS...: run a phase unless its final folder exists; resume it if it has checkpoints
  local name=$1
  shift
  [ -f "$W/$name/final/config.json" ] && return 0
  local resume=()
  compgen -G "$W/$name/checkpoint-*/trainer_state.json" > /dev/null && resume=(--resume)
  $D train --out "$W/$name" "$@" "${resume[@]}" "${EXTRA[@]}"
}
GROUND=(--mirror-qa --hop-weight 1 --hop-heads 1.1,1.2 --pointer-heads 2.2,2.3,3.2,3.3 --position-weight 1
        --position-layer 2 --coord-weight 3 --coord-sigma 15 --probe-data "$W/probe")
# Bind: every grounding loss at full weight; the run stops at step 1500 unless the pointer heads are on the
# named object for at least 35 % of the probe's answer points (exit 4: rethink before spending more).
phase bind --stage 0 --init "$START" --data "$W/train" --steps 3000 --batch-size 8 --lr 3e-4 --warmup-steps 100 \
  --qa-fraction 0.875 --seed 3 --freeze model.visual.pos_embed --pointer-weight 1 "${GROUND[@]}" \
  --probe-every 500 --gate "pointer>=0.35@1500" --eval-data "$W/val" --eval-every 1000 --eval-limit 32 \
  --save-every 500
folders() {  # NAME...: DATA=(--data W/NAME ...), the training sets a phase reads
  DATA=()
  for d in "$@"; do DATA+=(--data "$W/$d"); done
}
# Readout: the pointer's weight lowered; the spatial answers scored on 200 held-out questions every 1000 steps.
readout() {  # NAME FROM STEPS SEED LR [QA_FRACTION [DATA...]]: a readout phase from FROM's end, on W/DATA (train)
  folders "${@:7}"
  [ ${#DATA[@]} -gt 0 ] || folders train
  phase "$1" --stage 0 --init "$W/$2/final" "${DATA[@]}" --steps "$3" --batch-size 8 --lr "$5" \
    --warmup-steps 50 --qa-fraction "${6:-0.875}" --seed "$4" --freeze model.visual.pos_embed --pointer-weight 0.3 \
    "${GROUND[@]}" --probe-every 1000 --eval-qa-data "$W/qa-val" --eval-qa-every 1000 --eval-qa-limit 200 \
    --eval-data "$W/val" --eval-every 1000 --eval-limit 32 --save-every 500
}
readout readout bind 3000 4 2e-4
readout_more() { readout "$1" "$2" "$3" "$4" 1e-4 "${@:5}"; }  # NAME FROM STEPS SEED [QA_FRACTION [DATA]], lr 1e-4
# Readout, continued (issue 26, second session): from readout's end at half its learning rate, another 3000
# steps (eval-qa on the same 200 questions: 40 -> 55 -> 62 % grounded at steps 1000 / 2000 / 3000), then 2000
# more from there (71 / 70 %).
readout_more readout2 readout 3000 6
readout_more readout3 readout2 2000 7
# Third session: readout4 = 3000 more steps from readout3 (eval-qa 70 -> 72 -> 79 %), then readout5 = 2000 steps
# on questions that name only labels unique in the view (82 / 83 % on the regenerated held-out questions). In the
# shipped run, the phases up to readout4 trained on questions generated before that fix (two grey buildings in
# view could be asked about) and readout5 on the same frames regenerated with it (build/tiny/train-u); a fresh
# run of this script generates the fixed questions once and uses them in every phase.
readout_more readout4 readout3 3000 8
readout_more readout5 readout4 2000 9
# Fourth session: readout6 = 3000 more steps (eval-qa 79 -> 85 -> 86 %), then readout7 = 2000 steps with a
# quarter of the batch depth-only samples (qa-fraction 0.75; 84 / 85 %, val δ1 0.870 / 0.865).
readout_more readout6 readout5 3000 12
readout_more readout7 readout6 2000 13 0.75
# Fifth session: new frames instead of more steps on the same ones (the seed-1 frames had been drawn about 17 times
# each): readout8 = 2000 steps on 10,000 frames of seed 21, readout9 = 2000 steps on 10,000 of seed 22 (eval-qa
# 80 / 86 % and 87 / 85 % grounded at steps 1000 / 2000), both as readout7.
training_frames train-21 21
training_frames train-22 22
readout_more readout8 readout7 2000 15 0.75 train-21
readout_more readout9 readout8 2000 16 0.75 train-22
# Finish: the depth head alone (stage 1), so that depth gets the last word, on all 30,000 frames: 300 head steps,
# 1200 more at a lower rate, and a 300-step tail at 1e-4 (val δ1 0.855 -> 0.865 -> 0.865).
finish() {  # NAME FROM STEPS LR SEED [DATA...]: a stage-1 phase on W/DATA (train, train-21, train-22)
  folders "${@:6}"
  [ ${#DATA[@]} -gt 0 ] || folders train train-21 train-22
  phase "$1" --stage 1 --init "$W/$2/final" "${DATA[@]}" --steps "$3" --batch-size 8 --lr "$4" --warmup-steps 20 \
    --seed "$5" --eval-data "$W/val" --eval-every 300 --eval-limit 32 --save-every 300
}
finish depth readout9 300 5e-4 5
finish depth2 depth 1200 3e-4 10
finish depth3 depth2 300 1e-4 11
# Seventh session: long lenses in the readout too. depth3 still measured indoor-xtele (4x-5x, outside the
# 0.25x-4x above) under the starting model, and head-only finishes on long lenses traded it against indoor δ1.
# train-24: 10,000 frames at 0.25x-5x; train-23: 5,000 at 2x-5x only. Two readout phases on them, the finish
# on all five sets, then a 300-step tail on the three ordinary-lens sets. The shipped run started readout10 from
# the file shipped at commit 400c885 (depth3 stored in float16), placed at W/depth3/final.
training_frames train-24 24 10000 69.3 1385.5
training_frames train-23 23 5000 554.2 1385.5
readout_more readout10 depth3 2000 25 0.75 train-24 train-23
readout_more readout11 readout10 2000 26 0.75 train-24 train-23
FIVE=(train train-21 train-22 train-23 train-24)
finish depth4 readout11 300 5e-4 5 "${FIVE[@]}"
finish depth5 depth4 1200 3e-4 10 "${FIVE[@]}"
finish depth6 depth5 300 1e-4 11 "${FIVE[@]}"
finish depth7 depth6 300 1e-4 12 train train-21 train-22
FINAL=depth7
echo "trained: $W/$FINAL/final"
$PY -m depthvlm_ros.training.tiny package "$W/$FINAL/final" depthvlm_ros/models/depthvlm-tiny
