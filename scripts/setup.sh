#!/usr/bin/env bash
# Creates or updates .venv at the repo root, idempotently; installs the few Debian packages needed.
#   DEPTHVLM_TORCH   pip requirement for torch (default torch==2.13.0, the CPU wheel here).
#                    A .venv that already imports torch keeps it (GPU/Jetson users bring their own).
#   PYTHON           interpreter to build the venv with (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${DEPTHVLM_TORCH:-torch==2.13.0}
STAMP=$VENV/.setup-stamp
want=$(cat setup.py scripts/setup.sh scripts/build_msgs.sh msg/depthvlm_msgs/CMakeLists.txt msg/depthvlm_msgs/msg/* msg/depthvlm_msgs/srv/* msg/depthvlm_msgs/action/* \
  | sha256sum | cut -c1-16)

# Debian packages: open3d needs libusb at import time; the interface build needs cmake and a compiler.
missing=()
ldconfig -p 2>/dev/null | grep -q 'libusb-1.0.so.0' || missing+=(libusb-1.0-0)
command -v cmake >/dev/null || missing+=(cmake)
command -v g++ >/dev/null || missing+=(build-essential)
"$PYTHON" -c 'import sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_path("include"), "Python.h")))' \
  || missing+=(python3-dev)
"$PYTHON" -c 'import ensurepip' 2>/dev/null || missing+=(python3-venv)
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && "$VENV/bin/python" -c "import depthvlm_ros, torch, rclpy, accelerate, depthvlm_msgs.msg, depthvlm_msgs.srv, depthvlm_msgs.action, visualization_msgs.msg, tritonclient.grpc; import platform; platform.machine() != 'x86_64' or __import__('pytriton.triton')" 2>/dev/null; then
  exit 0  # up to date
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "setup: installing $TORCH_SPEC"
  $PIP install "$TORCH_SPEC"
fi
echo "setup: installing depthvlm_ros and its Python dependencies into $VENV"
$PIP install -e ".[dev,ros,ros-build,serve,train]"
# PyTriton (depthvlm serve) without its numpy<2 pin: see the "serve" extra in setup.py. Its wheel is
# built for x86_64 Linux; elsewhere `depthvlm serve` says it is missing (backend triton still works).
if [ "$(uname -m)" = "x86_64" ]; then
  $PIP install --no-deps "nvidia-pytriton==0.7.0"
fi
echo "setup: building the depthvlm_msgs interfaces into $VENV"
bash scripts/build_msgs.sh "$VENV"
echo "$want" > "$STAMP"
echo "setup: ready ($VENV)"
