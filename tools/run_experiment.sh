#!/usr/bin/env bash
# Launch one experiment folder: train with torchrun (resuming what was finished), then evaluate.
# Usage: bash tools/run_experiment.sh EXP_DIR [--cfg FILE] [key=value ...]
# Environment: NGPUS (processes per node; default: script.sh's published count capped at the GPUs present, 1 on CPU), NNODES (1), NODE_RANK (0), MASTER_ADDR (127.0.0.1),
#              MASTER_PORT (one node: a free port; several nodes: 29500), EVAL_EPOCHS (checkpoints to evaluate,
#              default: the last one). In a SLURM job (sbatch, salloc) the launch variables come from SLURM's.
# Several nodes share the run's folder (a shared file system): only the run's rank 0 writes it.
# Each run identity has its own folder, <exp>/output/<method> for config.py's settings and
# <exp>/output/<method>-<overrides>-<hash> for a variant (furnace/run.py). Start over by deleting it.
set -euo pipefail
EXP_DIR="$(cd "$1" && pwd)"; shift
# --cfg paths are given relative to where the user is; make them absolute before moving into EXP_DIR.
ARGS=()
while (($#)); do
  if [[ "$1" == "--cfg" && $# -ge 2 ]]; then
    [[ -f "$2" ]] || { echo "run_experiment.sh: config override file not found: $2" >&2; exit 2; }
    ARGS+=(--cfg "$(cd "$(dirname "$2")" && pwd)/$(basename "$2")"); shift 2
  else
    ARGS+=("$1"); shift
  fi
done
set -- ${ARGS[@]+"${ARGS[@]}"}
if [[ -n "${SLURM_JOB_ID:-}" ]]; then
  # Inside a SLURM allocation: NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT (and NGPUS) from SLURM's variables
  # (furnace/run.py slurm_launch). In the batch script of a multi-node job, run this script again through
  # srun, once per node; each of those tasks is then one node's launcher.
  SLURM_ENV="$(python -m furnace.run --slurm-env)"
  eval "$SLURM_ENV"
  if [[ "${RUN_EXPERIMENT_SRUN:-}" == 1 ]]; then
    unset RUN_EXPERIMENT_SRUN
    echo "run_experiment.sh: SLURM job $SLURM_JOB_ID: srun, one launcher on each of $NNODES nodes (master $MASTER_ADDR:$MASTER_PORT)" >&2
    exec srun --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 \
      bash "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")" "$EXP_DIR" "$@"
  fi
fi
cd "$EXP_DIR"
if [[ -z "${NGPUS:-}" ]]; then
  # The published process count (script.sh's PUBLISHED_NGPUS), capped at the GPUs present; 1 without CUDA,
  # where more processes would only share the same cores.
  NGPUS=$(python -c "import torch; print(min(${PUBLISHED_NGPUS:-1}, torch.cuda.device_count()) or 1)")
  echo "run_experiment.sh: NGPUS=$NGPUS (set NGPUS to choose)" >&2
fi
if [[ -z "${MASTER_PORT:-}" && ( "$NGPUS" != 1 || "${NNODES:-1}" != 1 ) ]]; then
  # One node: a port nobody listens on, so that several experiments can run on one machine at once
  # (torchrun's fixed default, 29500, makes the second one fail). Several nodes must agree on the port.
  MASTER_PORT=29500
  [[ "${NNODES:-1}" == 1 ]] && MASTER_PORT=$(python -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
fi
# No orphans: every launch dies with this script (PR_SET_PDEATHSIG, furnace/run.py), and torchrun's workers,
# which it starts in sessions of their own, die with torchrun (furnace.engine.main arms the same signal).
# One process on one node needs no launcher at all.
DIE_WITH_ME=(python -m furnace.run --die-with-parent --)
if [[ "$NGPUS" == 1 && "${NNODES:-1}" == 1 ]]; then
  LAUNCH=("${DIE_WITH_ME[@]}" python)
else
  LAUNCH=("${DIE_WITH_ME[@]}" torchrun --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" --nproc_per_node="$NGPUS"
          --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="$MASTER_PORT")
fi
# The run's folder is <exp>/output/<run>, one per run identity (furnace/run.py); eval.py finds it from the
# same arguments. --resume continues the run of these settings, or starts it.
"${LAUNCH[@]}" train.py --resume "$@"
"${LAUNCH[@]}" eval.py ${EVAL_EPOCHS:+-e "$EVAL_EPOCHS"} "$@"
