#!/usr/bin/env bash
# The first run on a machine with one CUDA GPU: CUDA tests, one training step per method (crop 512, batch
# 8 + 8, bf16 and fp16), the benchmark at that size, loader and evaluation speed, peak memory; one table at
# the end (tools/gpu_check.py). The timeout (GPU_CHECK_TIMEOUT, 470 s) keeps the whole check under 8
# minutes; the figures are saved after every stage (gpu_check.json and gpu_check.md in $GPU_CHECK_DIR, else
# $OUT, else /tmp), so a check stopped by the timeout still leaves, and prints, what it measured.
#
# The GPU machine's own python3 (with a CUDA torch) is used, or $PYTHON. Packages the project needs that it
# lacks (often easydict and tensorboardX) install from the wheels in ./.whl, if there are any: make them
# with `bash tools/gpu_wheels.sh` on a machine where pip reaches the registry and bring .whl along.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
DIR="${GPU_CHECK_DIR:-${OUT:-/tmp}}"
mkdir -p "$DIR"
missing=$("$PY" -c 'import importlib.util as u
print(" ".join(m for m in ("torch", "numpy", "cv2", "PIL", "tqdm", "easydict", "tensorboardX", "pytest")
               if u.find_spec(m) is None))')
if [ -n "$missing" ]; then
    if compgen -G ".whl/*.whl" >/dev/null; then
        echo "gpu_check: $PY lacks $missing; installing .whl/*.whl into /tmp/gpu_check_site"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/gpu_check_site .whl/*.whl
        export PYTHONPATH="/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "gpu_check: $PY lacks $missing and there is no .whl/ to install from:" \
             "run 'bash tools/gpu_wheels.sh' where pip works and bring .whl along" >&2
        exit 2
    fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
LIMIT="${GPU_CHECK_TIMEOUT:-470}"
status=0
timeout "$LIMIT" "$PY" tools/gpu_check.py --json "$DIR/gpu_check.json" "$@" || status=$?
if [ "$status" = 124 ] && [ -f "$DIR/gpu_check.md" ]; then
    echo "gpu_check: stopped after $LIMIT s; what it measured until then:"
    cat "$DIR/gpu_check.md"
fi
exit "$status"
