#!/usr/bin/env bash
# Downloads into ./.whl (git-ignored) the wheels of the pure-Python packages the project needs beyond what a
# CUDA image with PyTorch usually holds: easydict and tensorboardX, at the versions of this machine's .venv
# (requirements.txt otherwise). tools/gpu_check.sh installs them on a GPU machine that cannot reach the
# registry. Run it where pip works; bring .whl along to the GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
specs=()
for name in easydict tensorboardX; do
    version=$("$PY" -m pip show "$name" 2>/dev/null | sed -n 's/^Version: //p' || true)
    specs+=("$name${version:+==$version}")
done
rm -rf .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "${WHEEL_PYTHON:-3.12}" \
    --implementation py --abi none --platform any -d .whl "${specs[@]}"
ls .whl
