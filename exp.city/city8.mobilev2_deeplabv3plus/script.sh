#!/usr/bin/env bash
# Cityscapes 1/8, MobileNet-v2 student, MGD: train (torchrun, NGPUS processes, default 8 or the GPUs there are, 1 on CPU) then evaluate. Extra arguments are config overrides.
PUBLISHED_NGPUS=8 exec bash "$(dirname "$0")/../../tools/run_experiment.sh" "$(dirname "$0")" "$@"
