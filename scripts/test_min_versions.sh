#!/usr/bin/env bash
# The model-core tests (strict loading, checkpoint parity, metric scale, export + ONNX Runtime parity)
# with exactly the minimum versions setup.py declares for transformers, tokenizers and safetensors.
# They are installed into an overlay (.venv/min-versions, put first on PYTHONPATH), so everything else
# is the main environment's. torch is not lowered: the only CPU torch wheel here is 2.13 (setup.py's
# torch floor is the one transformers itself checks at import).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OVERLAY=.venv/min-versions
# "name==version" for each floor in setup.py's install_requires
pins=$("$PY" - <<'EOF'
import re
from pathlib import Path

text = Path("setup.py").read_text()
print(" ".join(f"{name}=={version}" for name, version in
                re.findall(r'"(transformers|tokenizers|safetensors)>=([0-9.]+)', text)))
EOF
)
[ "$(wc -w <<<"$pins")" -eq 3 ] || { echo "test_min_versions: expected 3 floors in setup.py, found: $pins" >&2; exit 2; }
if [ "$(cat "$OVERLAY/.pins" 2>/dev/null)" != "$pins" ]; then
  echo "test_min_versions: installing $pins into $OVERLAY"
  rm -rf "$OVERLAY"
  # shellcheck disable=SC2086
  "$PY" -m pip --disable-pip-version-check -q install --no-deps --target "$OVERLAY" $pins
  echo "$pins" > "$OVERLAY/.pins"
fi
echo "test_min_versions: model-core tests with $pins"
PYTHONPATH="$PWD/$OVERLAY${PYTHONPATH:+:$PYTHONPATH}" DEPTHVLM_EXPECT_VERSIONS="$pins" \
  "$PY" -m pytest -m model_core -p no:cacheprovider "$@"
