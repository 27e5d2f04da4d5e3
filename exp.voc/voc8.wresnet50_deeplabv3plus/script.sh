#!/usr/bin/env bash
# VOC 1/8, WRN-50-2 wide teacher, CPS: train (torchrun, NGPUS processes, default 4) then evaluate. Extra arguments are config overrides.
NGPUS=${NGPUS:-4} exec bash "$(dirname "$0")/../../tools/run_experiment.sh" "$(dirname "$0")" "$@"
