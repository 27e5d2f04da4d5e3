#!/usr/bin/env bash
# The first run on a machine with one CUDA GPU: CUDA tests, one training step per method (crop 512, batch
# 8 + 8, bf16 and fp16), the benchmark at that size, loader and evaluation speed, peak memory; one table at
# the end (tools/gpu_check.py). The timeout keeps the whole check under 8 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
timeout 470 python tools/gpu_check.py --json "${GPU_CHECK_JSON:-${OUT:-/tmp}/gpu_check.json}" "$@"
