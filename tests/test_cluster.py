"""Clusters: SLURM's variables become the launch of tools/run_experiment.sh (furnace/run.py slurm_launch), and a
real 2-node run on this machine, started as an sbatch job starts it (script.sh -> srun -> one run_experiment.sh
per node -> torchrun --nnodes=2 on 127.0.0.1), computes what 2 processes on one node and 1 process compute.

srun is a stand-in here (no SLURM on this machine): a script that starts its command once per node, in
parallel, with the variables srun sets for a task (SLURM_STEP_ID, SLURM_NODEID, SLURM_PROCID, ...).

1 vs N processes: in float32, on the toy data with batch 2 (1 image per process), 1 and 2 processes end
their first step with visibly different weights. These runs go through the same command line in float64
(tests/fp64site: every train.py process computes in float64, nothing else changes), where 1 and 2 processes
agree to 1e-8 of the largest weight: the float32 difference is rounding (the sum of two per-process
gradients against one gradient over both images, amplified by from-scratch BatchNorm on tiny batches),
not a difference between what 1 and N processes compute; a real one would stay in float64."""
import json
import os
import socket
import stat
import subprocess

import pytest
import torch

from furnace.run import first_host, slurm_launch
from trainkit import EXP, ROOT, clean_env, load, overrides

pytestmark = pytest.mark.usefixtures("one_thread")

FAKE_SRUN = """#!/usr/bin/env bash
# stand-in for SLURM's srun: the command once per node of the job, here, with the variables of a task
echo "$@" > "$FAKE_SRUN_LOG"
while [[ "$1" == -* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NNODES; i++)); do
  SLURM_STEP_ID=0 SLURM_NODEID=$i SLURM_PROCID=$i SLURM_LOCALID=0 SLURM_STEP_NUM_NODES=$SLURM_NNODES \\
    SLURM_STEP_NUM_TASKS=$SLURM_NNODES SLURM_STEP_NODELIST=$SLURM_JOB_NODELIST "$@" & pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""


def test_slurm_variables_map_to_the_launch():
    assert [first_host(n) for n in ("gpu[07-09,12],cpu1", "node3,node4", "127.0.0.1", "a-b[003-004]")] == \
        ["gpu07", "node3", "127.0.0.1", "a-b003"]
    assert slurm_launch({}) == {} and slurm_launch({"SLURM_JOB_ID": "7", "SLURM_NNODES": "1"}) == {}
    job = {"SLURM_JOB_ID": "123456", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "gpu[07-08]"}
    # the batch script: run again through srun, one launcher per node
    assert slurm_launch(job) == {"NNODES": "2", "MASTER_ADDR": "gpu07", "MASTER_PORT": "32956",
                                 "RUN_EXPERIMENT_SRUN": "1"}
    task = dict(job, SLURM_STEP_ID="0", SLURM_STEP_NUM_NODES="2", SLURM_STEP_NUM_TASKS="2", SLURM_NODEID="1",
                SLURM_STEP_NODELIST="gpu[07-08]", SLURM_GPUS_ON_NODE="4")
    assert slurm_launch(task) == {"NNODES": "2", "MASTER_ADDR": "gpu07", "MASTER_PORT": "32956", "NODE_RANK": "1",
                                  "NGPUS": "4"}
    assert slurm_launch(dict(task, MASTER_PORT="1234", NGPUS="2"))["MASTER_PORT"] == "1234"  # set by hand: wins
    with pytest.raises(ValueError, match="--ntasks-per-node=1"):  # srun -n 8: 8 torchruns would collide
        slurm_launch(dict(task, SLURM_STEP_NUM_TASKS="8"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _script_sh(args, out, **env) -> subprocess.Popen:
    """bash script.sh ARGS output_dir=OUT in float64, started (the runs go side by side: their start-ups overlap)."""
    env = clean_env(TRAINKIT_FP64="1", EVAL_EPOCHS="", **env)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests" / "fp64site"), env["PYTHONPATH"]])
    return subprocess.Popen(["bash", str(EXP / "script.sh")] + args + [f"output_dir={out}"], env=env, cwd=str(ROOT),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _finished(proc: subprocess.Popen, out):
    stderr = proc.communicate(timeout=400)[1]
    assert proc.returncode == 0, stderr[-4000:]
    return load(out / "snapshot" / "last.pth")


def test_two_node_slurm_run_equals_two_processes_and_one_process(toy, tmp_path):
    """Supervised, crop 32, batch 2 (1 image per process; gpu_batch=1), 2 steps, validation after the epoch,
    float64: the 2-node run (sbatch-style, through srun, 1 process per node) equals the 2-process one-node run
    bit for bit (weights, optimiser, validation, evaluation) and the 1-process run to 1e-8."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "srun").chmod(stat.S_IRWXU)
    args = overrides(toy, "unused", method="supervised", epochs=1, iters_per_epoch=2, gpu_batch=1, val_every=1,
                     val_images=2)
    procs = {"nodes2": _script_sh(args, tmp_path / "nodes2", NGPUS="1", SLURM_JOB_ID="4242", SLURM_NNODES="2",
                                  SLURM_JOB_NODELIST="127.0.0.1", MASTER_PORT=str(_free_port()),
                                  FAKE_SRUN_LOG=str(tmp_path / "srun.log"),
                                  PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}"),
             "procs2": _script_sh(args, tmp_path / "procs2", NGPUS="2"),
             "procs1": _script_sh(args, tmp_path / "procs1", NGPUS="1")}
    two_nodes, two, one = (_finished(p, tmp_path / name) for name, p in procs.items())
    assert "--nodes=2 --ntasks=2 --ntasks-per-node=1" in (tmp_path / "srun.log").read_text()
    assert two_nodes["model"]["classifier.weight"].dtype == torch.float64  # the float64 instrumentation worked

    for key in ("model", "optimizer"):  # 2 nodes = 2 processes on one node, bit for bit
        a, b = (dict(_tensors(c[key])) for c in (two_nodes, two))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), key
    assert two_nodes["val"] == _without_seconds(two["val"], like=two_nodes["val"])
    results = [json.loads((tmp_path / d / "eval.json").read_text())[0] for d in ("nodes2", "procs2")]
    assert results[0]["miou"] == results[1]["miou"] and results[0]["iou"] == results[1]["iou"]
    assert not (tmp_path / "nodes2" / "train.lock").exists()  # rank 0 held it; node 1's process shared the folder

    biggest = max(v.abs().max().item() for v in one["model"].values() if v.is_floating_point())
    worst = max((one["model"][k] - two["model"][k]).abs().max().item()
                for k in one["model"] if one["model"][k].is_floating_point())
    assert worst <= 1e-8 * biggest, f"1 vs 2 processes in float64: {worst:.3g} (largest weight {biggest:.3g})"
    assert one["val"]["history"][0]["miou"] == pytest.approx(two["val"]["history"][0]["miou"], abs=1e-12)


def _tensors(obj, prefix=""):
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}.{k}")


def _without_seconds(val, like):
    """`val` with the timing of each validation taken from `like` (the only field that may differ)."""
    history = [dict(r, seconds=l["seconds"]) for r, l in zip(val["history"], like["history"])]
    return dict(val, history=history)
