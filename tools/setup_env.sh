#!/usr/bin/env bash
# Creates .venv at the repository root if missing and installs the project into it.
# Sourced by quickstart.sh and test.sh; safe to run again (pip skips what is installed).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ ! -x "$ROOT/.venv/bin/python" ]; then
    python3 -m venv "$ROOT/.venv"
fi
PY="$ROOT/.venv/bin/python"
stamp="$ROOT/.venv/.installed-$(cat "$ROOT/requirements.txt" "$ROOT/pyproject.toml" | md5sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
    # torch first and pinned, so nothing below can pull a CUDA build
    "$PY" -m pip install -q --disable-pip-version-check torch==2.13.0
    "$PY" -m pip install -q --disable-pip-version-check -r "$ROOT/requirements.txt"
    "$PY" -m pip install -q --disable-pip-version-check --no-deps -e "$ROOT"
    touch "$stamp"
fi
export PATH="$ROOT/.venv/bin:$PATH"
export HF_HUB_OFFLINE=1
