#!/usr/bin/env bash
# Launch one experiment folder: train with torchrun (resuming what was finished), then evaluate.
# Usage: bash tools/run_experiment.sh EXP_DIR [--cfg FILE] [key=value ...]
# Environment: NGPUS (processes per node, default 1), NNODES (1), NODE_RANK (0), MASTER_ADDR (127.0.0.1),
#              MASTER_PORT (29500), EVAL_EPOCHS (checkpoints to evaluate, default: the last one).
# Start over by deleting the experiment's output folder (<exp>/output/<method>).
set -euo pipefail
EXP_DIR="$(cd "$1" && pwd)"; shift
cd "$EXP_DIR"
LAUNCH=(torchrun --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" --nproc_per_node="${NGPUS:-1}"
        --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${MASTER_PORT:-29500}")
"${LAUNCH[@]}" train.py --resume "$@"
"${LAUNCH[@]}" eval.py ${EVAL_EPOCHS:+-e "$EVAL_EPOCHS"} "$@"
