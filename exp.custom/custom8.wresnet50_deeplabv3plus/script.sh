#!/usr/bin/env bash
# Your own data 1/8, wide teacher: train (torchrun, NGPUS processes, default 4 or the GPUs there are, 1 on CPU) then evaluate. Extra arguments are config overrides.
PUBLISHED_NGPUS=4 exec bash "$(dirname "$0")/../../tools/run_experiment.sh" "$(dirname "$0")" "$@"
