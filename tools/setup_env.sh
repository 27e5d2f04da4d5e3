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
    # The installed packages take about 1.5 GiB (torch alone 0.75), and pip unpacks each wheel beside them
    # first: refuse before installing anything rather than fail halfway with "No space left on device".
    need_mib=2048
    for dir in "$ROOT" "${TMPDIR:-/tmp}"; do
        free_mib=$(( $(df -Pk "$dir" | awk 'NR==2 {print $4}') / 1024 ))
        if [ "$free_mib" -lt "$need_mib" ]; then
            echo "setup_env.sh: ${free_mib} MiB free on the file system of $dir; installing .venv needs about" \
                 "${need_mib} MiB there. Free some space (or point TMPDIR elsewhere) and run again." >&2
            exit 1
        fi
    done
    pip_install() { "$PY" -m pip install -q --disable-pip-version-check --no-cache-dir "$@"; }
    # torch first and pinned, so nothing below can pull a CUDA build
    pip_install torch==2.13.0
    pip_install -r "$ROOT/requirements.txt"
    pip_install --no-deps -e "$ROOT"
    touch "$stamp"
fi
export PATH="$ROOT/.venv/bin:$PATH"
export HF_HUB_OFFLINE=1
