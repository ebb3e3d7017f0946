#!/usr/bin/env bash
# The one check to run on an NVIDIA machine (a desktop GPU or a Jetson), from any directory:
#   bash scripts/gpu_check.sh            # results in $OUT (default outputs/gpu_check)
#
# It uses the existing .venv (run `make setup` first, with DEPTHVLM_TORCH pointing at a CUDA build of
# torch; a .venv that already imports torch keeps it: on a Jetson, bring JetPack's), or, without one,
# the machine's python3 with its own CUDA torch (PY=... to choose). DEPTHVLM_WHEELS=DIR: wheels to add
# (pip --no-index --no-deps into $OUT/deps) when that python's transformers is older than 5.18 or it
# has no pytest; nothing is downloaded.
# TensorRT is optional (NVIDIA's tensorrt wheel, or JetPack's python3-libnvinfer visible to the .venv);
# ONNX Runtime's CUDA provider is optional too (onnxruntime-gpu). This project's device machine has a
# CUDA torch, the CPU onnxruntime and no TensorRT: there the ONNX Runtime CUDA and TensorRT tests skip
# (saying why) and the bench measures torch alone.
#
# Steps: the machine (nvidia-smi -L; python, torch, CUDA, onnxruntime providers, tensorrt versions);
# the DepthVLM-4B configuration stage by stage (scripts/gpu_bench_4b.py, random bf16 weights: 640x480
# at fx 525 (1102 image tokens) and 1344x992 at fx 1000, eager vs CUDA graphs vs torch.compile, a
# torch.profiler pass over one 1102-token frame (device time per stage, host syncs, the SDPA kernels
# that ran), two cameras batched vs in turn, GPU vs CPU preprocessing; under 8 minutes; what the
# budget leaves out is named in its notes) -> $OUT/gpu_bench_4b.json;
# test/test_gpu.py, each test's measurements appended to $OUT/gpu_report.jsonl; on a CUDA GPU,
# `depthvlm bench` of the shipped model on cuda (torch, + onnxruntime with its CUDA provider, + a
# TensorRT fp32 engine built here when tensorrt imports) -> $OUT/bench_cuda.json; `depthvlm bench
# --compile graphs` of the shipped model at 640x480 fx 525 (graph breaks, host syncs per frame, eager
# beside it) -> $OUT/bench_cuda_graphs.json; a short summary.
# GPU_BENCH_4B=0 skips the 4B stage-by-stage bench (for a short device lease).
# Without a CUDA GPU it stops after the (skipped) tests: "no CUDA GPU: nothing to check".
# Exit status: 0 when the tests pass and the bench runs; otherwise the first failure's.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=$(command -v python3 || true); fi
fi
if [ -z "$PY" ] || ! "$PY" -c 'import torch' 2>/dev/null; then
  echo "gpu_check: no python with torch (make setup with DEPTHVLM_TORCH=<a CUDA torch>, or PY=...)" >&2
  exit 2
fi
OUT=${OUT:-outputs/gpu_check}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c '
import importlib.util, sys
from importlib.metadata import version
major, minor = (int(v) for v in version("transformers").split(".")[:2])
sys.exit(not ((major, minor) >= (5, 18) and importlib.util.find_spec("pytest")))' 2>/dev/null; then
  if [ -n "${DEPTHVLM_WHEELS:-}" ]; then
    echo "gpu_check: adding the wheels in $DEPTHVLM_WHEELS (transformers older than 5.18, or no pytest)"
    "$PY" -m pip install -q --no-index --no-deps --target "$OUT/deps" "$DEPTHVLM_WHEELS"/*.whl
    export PYTHONPATH="$PYTHONPATH:$OUT/deps"
  else
    echo "gpu_check: this python needs transformers >= 5.18 and pytest (DEPTHVLM_WHEELS=DIR adds them)" >&2
  fi
fi
DEPTHVLM=("$PY" -m depthvlm_ros)
REPORT=$OUT/gpu_report.jsonl
BENCH=$OUT/bench_cuda.json
: > "$REPORT"
rm -f "$BENCH"
status=0

echo "== machine"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi -L || echo "nvidia-smi -L failed (on a Jetson, nvidia-smi may list nothing)"
else
  echo "nvidia-smi: not present"
fi
"$PY" - <<'EOF'
import platform
import sys

import torch

import depthvlm_ros

print(f"python {platform.python_version()} ({sys.executable}); depthvlm_ros {depthvlm_ros.__version__}")
print(f"torch {torch.__version__}, built for CUDA {torch.version.cuda}, cuda available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(i)
        print(f"  cuda:{i} {torch.cuda.get_device_name(i)} (compute capability {major}.{minor})")
try:
    import onnxruntime as ort

    print(f"onnxruntime {ort.__version__}, providers {', '.join(ort.get_available_providers())}")
except ImportError:
    print("onnxruntime: not installed")
try:
    import tensorrt

    print(f"tensorrt {tensorrt.__version__}")
except ImportError:
    print("tensorrt: not installed (optional)")
EOF

if [ "${GPU_BENCH_4B:-1}" = 0 ]; then
  echo "== DepthVLM-4B configuration: skipped (GPU_BENCH_4B=0)"
elif "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
  echo "== DepthVLM-4B configuration, stage by stage (scripts/gpu_bench_4b.py)"
  timeout 420 "$PY" scripts/gpu_bench_4b.py --budget-s 240 --out "$OUT/gpu_bench_4b.json" || status=$?
fi

echo "== GPU tests (test/test_gpu.py)"
DEPTHVLM_GPU_REPORT=$REPORT "$PY" -m pytest test/test_gpu.py -v -rs || status=$?

if ! "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
  echo "no CUDA GPU: nothing to check"
  exit "$status"
fi

echo "== bench (shipped model, cuda, 320x240 at fx 277.1)"
backends=torch
engine_args=()
if "$PY" -c 'import sys, onnxruntime as o; sys.exit("CUDAExecutionProvider" not in o.get_available_providers())' \
    2>/dev/null; then
  backends+=,onnxruntime  # its graph is exported on demand into the depthvlm cache
else
  echo "note: onnxruntime has no CUDAExecutionProvider here; benching without it (--device cuda refuses it)"
fi
if "$PY" -c 'import tensorrt' 2>/dev/null; then
  # The engine is built for the size the bench's camera reaches the model at (bench's default
  # --max-image-tokens), from an fp32 export of the shipped model, in a scratch folder.
  size=$("$PY" - <<'EOF'
from depthvlm_ros.geometry import DEFAULT_MAX_IMAGE_TOKENS, Intrinsics
from depthvlm_ros.model.default import default_model_dir
from depthvlm_ros.pipeline import RouteSettings, model_input_size
from depthvlm_ros.model.processing import ImageTextProcessor

processor = ImageTextProcessor.from_folder(default_model_dir()[0])
width, height = model_input_size(processor, Intrinsics.from_fx(320, 240, 277.1),
                                 RouteSettings(max_tokens=DEFAULT_MAX_IMAGE_TOKENS))
print(f"{width}x{height}")
EOF
)
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  graph=$work/shipped_${size}_fp32.onnx
  engine=$work/shipped_${size}_fp32.engine
  if "${DEPTHVLM[@]}" export --size "$size" --out "$graph" --check-images 1 \
      && "${DEPTHVLM[@]}" build-engine --onnx "$graph" --out "$engine"; then
    backends+=,tensorrt
    engine_args=(--engine "$engine")
  else
    echo "gpu_check: exporting or building the TensorRT engine at $size failed; benching without tensorrt" >&2
    [ "$status" -ne 0 ] || status=1
  fi
else
  echo "note: tensorrt does not import here; benching without it"
fi
"${DEPTHVLM[@]}" bench --backends "$backends" --device cuda --size 320x240 --fx 277.1 --runs 40 --json "$BENCH" \
  ${engine_args[@]+"${engine_args[@]}"} || { rc=$?; [ "$status" -ne 0 ] || status=$rc; }

echo "== bench --compile graphs (shipped model, cuda, 640x480 at fx 525): graph breaks, host syncs"
"${DEPTHVLM[@]}" bench --device cuda --compile graphs --size 640x480 --fx 525 --runs 20 \
  --json "$OUT/bench_cuda_graphs.json" || { rc=$?; [ "$status" -ne 0 ] || status=$rc; }

echo "== summary"
"$PY" - "$REPORT" "$BENCH" "$OUT/bench_cuda_graphs.json" "$OUT/gpu_bench_4b.json" <<'EOF'
import json
import sys
from pathlib import Path

report, bench, graphs, four_b = (Path(p) for p in sys.argv[1:5])
entries = [json.loads(line) for line in report.read_text().splitlines() if line.strip()]
print(f"tests that measured something: {len(entries)} ({report})")
if entries:
    print(f"GPU: {entries[0].get('gpu')}")
for e in entries:
    error = e.get("max_rel_error")
    parts = [f"max rel error {error:.2e}" if isinstance(error, (int, float)) else "max rel error -"]
    if "median_ms" in e:
        parts.append(f"{e['median_ms']:.2f} ms vs torch cuda {e['torch_cuda_ms']:.2f} ms (median of 20)")
    if "capability" in e:
        parts.append(f"compute capability {'.'.join(map(str, e['capability']))}: bf16 "
                     f"{'loads' if e.get('loaded') else 'refused'}")
    print(f"  {e['test']:<38} {', '.join(parts)}")
if bench.is_file():
    b = json.loads(bench.read_text())
    print(f"bench {b['model']} on {b['device']} ({b['dtype']}), input {b['input_size'][0]}x{b['input_size'][1]} -> "
          f"model grid {b['model_size'][0]}x{b['model_size'][1]}, {b['runs']} runs ({bench})")
    for name, entry in b["backends"].items():
        total = entry["stages"]["total"]
        speed = b.get("speedup_vs_torch", {}).get(name)
        versus = f", {speed:.2f}x torch" if speed is not None else ""
        print(f"  {name:<12} {total['median_ms']:.1f} ms median, p90 {total['p90_ms']:.1f} ms, "
              f"{entry['frames_per_s']:.1f} frames/s{versus}")
else:
    print("bench: no result")
if graphs.is_file():
    g = json.loads(graphs.read_text())
    c = g["compile"]
    print(f"bench --compile graphs: {c['graph_breaks']} graph breaks, depth within {c['depth_max_rel_vs_eager']:.1e} of "
          f"eager, {c['speedup_vs_eager']:.2f}x eager; host syncs per frame: "
          + ", ".join(f"{n} {e.get('host_syncs_per_frame')}" for n, e in g["backends"].items()))
if four_b.is_file():
    f = json.loads(four_b.read_text())
    for mode, per_camera in [("eager", f.get("eager", {})), *f.get("compiled", {}).items()]:
        for camera, entry in per_camera.items():
            print(f"4B {mode:<14} {camera:<16} {entry['median_ms']['total']:.1f} ms median total")
    if "profile_640x480_fx525" in f:
        print(f"4B profile (1102 tokens): {f['profile_640x480_fx525']}")
    for mode, entry in f.get("two_cameras", {}).items():
        print(f"4B two cameras ({mode}): batched {entry['frames_per_s_batched']} frames/s vs in turn "
              f"{entry['frames_per_s_in_turn']} ({entry['batched_over_in_turn']}x)")
    for line in f.get("notes", []):
        print(f"4B note: {line}")
EOF
exit "$status"
