#!/usr/bin/env bash
# From a fresh clone: set up .venv, generate the toy dataset, and run the whole MGD pipeline on it
# (CPS teachers -> MGD student and supervised baseline -> evaluation, table and figures in img/).
# Re-running resumes: finished stages are skipped. Arguments go to tools/toy_pipeline.py.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/tools/setup_env.sh"
cd "$ROOT"
start=$(date +%s)
if [ ! -f DATA/toy/pascal_voc/lists/val.txt ]; then
    python tools/make_toy_data.py --out DATA/toy --seed 0
fi
python tools/toy_pipeline.py "$@"
echo "quickstart wall time: $(( $(date +%s) - start )) s (after set-up)"
