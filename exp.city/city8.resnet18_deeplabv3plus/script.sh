#!/usr/bin/env bash
# Cityscapes 1/8, ResNet-18 student, MGD: train (torchrun, NGPUS processes, default 8) then evaluate. Extra arguments are config overrides.
NGPUS=${NGPUS:-8} exec bash "$(dirname "$0")/../../tools/run_experiment.sh" "$(dirname "$0")" "$@"
