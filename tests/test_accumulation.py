"""Gradient accumulation (accum_steps, furnace/engine.py): micro-batches hold whole published per-GPU groups and
the same images on any number of processes, so an accumulated run computes the same on 1 and 2 processes;
against the unaccumulated run it differs by BatchNorm alone (statistics per micro-batch), which the test
measures; bad values are refused by name before any work; train.log reports the peak memory."""
import re
import subprocess

import pytest
import torch

from furnace.sampling import micro_batches
from furnace.methods.base import per_gpu_mean
from trainkit import ROOT, clean_env, driver_command, load, overrides, train_in_process

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("batch,group,accum", [(8, 2, 2), (16, 2, 4), (8, 1, 2), (12, 2, 3), (16, 2, 2)])
def test_micro_batches_hold_whole_groups_and_the_same_images_on_any_process_count(batch, group, accum):
    groups = batch // group
    seen = {}
    for world in (w for w in (1, 2, 4) if groups % (w * accum) == 0):
        n = batch // world
        micro_sets = []
        for m in range(accum):
            ids = []
            for rank in range(world):  # the sampler: process r holds global images r, r + W, r + 2W, ...
                local = torch.arange(rank, batch, world)
                index = micro_batches(n, group, accum)[m]
                micro = local[index]
                # per_gpu_mean's groups in the micro-batch are whole global groups (global image i: group i mod G)
                per_group = []
                per_gpu_mean(lambda x: per_group.append(x) or torch.zeros(()), group, micro)
                assert all(len({int(i) % groups for i in g}) == 1 and len(g) == group for g in per_group)
                ids += micro.tolist()
            micro_sets.append(sorted(ids))
        assert sorted(sum(micro_sets, [])) == list(range(batch))  # every image exactly once per step
        seen[world] = micro_sets
    assert len(seen) >= 2 and all(s == seen[1] for s in seen.values()), seen  # same BatchNorm batches


def test_bad_accum_steps_is_refused_before_any_work(toy, tmp_path):
    with pytest.raises(ValueError, match=r"accum_steps=3 does not divide batch_size=4"):
        train_in_process(overrides(toy, tmp_path, method="supervised", batch_size=4, accum_steps=3))
    with pytest.raises(ValueError, match=r"accum_steps=2 must divide the 1 per-GPU groups of gpu_batch=2"):
        train_in_process(overrides(toy, tmp_path, method="supervised", batch_size=2, accum_steps=2))
    assert not (tmp_path / "snapshot").exists()


def test_accumulated_run_is_the_same_on_one_and_two_processes(toy, tmp_path):
    """Supervised, batch 4, accum_steps=2 (micro-batches of 2 images, gpu_batch=1), 3 steps in float64 (see
    test_reliability.py): 1 process equals 2 processes to 1e-8 of the largest weight. The unaccumulated run
    differs: BatchNorm normalises each micro-batch with its own statistics."""
    common = overrides(toy, tmp_path / "unused", method="supervised", batch_size=4, epochs=1, iters_per_epoch=3,
                       gpu_batch=1)
    runs = {1: [dict(out=str(tmp_path / "p1a2"), args=["accum_steps=2"], fp64=True),
                dict(out=str(tmp_path / "p1a1"), args=[], fp64=True)],
            2: [dict(out=str(tmp_path / "p2a2"), args=["accum_steps=2"], fp64=True)]}
    procs = {n: subprocess.Popen(driver_command(common, n, runs=r), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True, env=clean_env(), cwd=str(ROOT)) for n, r in runs.items()}
    for n, p in procs.items():
        output = p.communicate(timeout=500)[0]
        assert p.returncode == 0, f"{n} process(es):\n" + output[-4000:]
    one, two, plain = (load(tmp_path / d / "snapshot" / "last.pth") for d in ("p1a2", "p2a2", "p1a1"))

    def rel_diff(a, b):
        biggest = max(v.abs().max().item() for v in a["model"].values() if v.is_floating_point())
        return max((a["model"][k] - b["model"][k]).abs().max().item()
                   for k in a["model"] if a["model"][k].is_floating_point()) / biggest
    assert rel_diff(one, two) <= 1e-8
    assert one["config"]["accum_steps"] == 2 and rel_diff(one, plain) > 1e-6  # BatchNorm per micro-batch
    # BatchNorm counts its calls: two per step with accumulation
    tracked = [k for k in one["model"] if k.endswith("num_batches_tracked")]
    assert all(one["model"][k].item() == 2 * plain["model"][k].item() == 6 for k in tracked)
    log = (tmp_path / "p1a2" / "train.log").read_text()
    assert re.search(r"epoch 1/1 .* peak_mem=\d+MiB\(rss\)", log)


@pytest.mark.parametrize("loss_scope,gpu_batch,accum", [("per_gpu", 2, 2), ("per_gpu", 1, 4), ("global", 2, 2)])
def test_accumulated_gradient_is_the_unaccumulated_one_without_batchnorm(loss_scope, gpu_batch, accum):
    """Trainer._forward_backward on a network without BatchNorm (a 1x1 conv), float64: accum_steps micro-batches
    give the gradient and loss terms of one pass over the process batch. Per-GPU losses are exact; the global
    scope normalises each micro-batch over its own valid pixels, equal here since every pixel is valid."""
    from easydict import EasyDict
    from furnace.distributed import DistInfo
    from furnace.engine import Trainer
    from furnace.methods.supervised import supervised_step
    g = torch.Generator().manual_seed(0)
    batch = {"x_l": torch.randn(8, 3, 5, 5, generator=g, dtype=torch.float64),
             "y_l": torch.randint(0, 4, (8, 5, 5), generator=g)}
    grads, terms = [], []
    for steps in (1, accum):
        torch.manual_seed(0)
        net = torch.nn.Conv2d(3, 4, 1).double()
        trainer = object.__new__(Trainer)  # just what _forward_backward uses
        trainer.C = EasyDict(accum_steps=steps, gpu_batch=gpu_batch, loss_scope=loss_scope, amp="off", ohem=False,
                             sup_weight=1.0)
        trainer.info = DistInfo(0, 1, 0, torch.device("cpu"))
        trainer.optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
        trainer.scaler = torch.amp.GradScaler("cuda", enabled=False)
        trainer.snapshot_dir = "unused"
        trainer._step = lambda b: supervised_step(net, b, trainer.C, torch.device("cpu"), 1)
        terms.append(trainer._forward_backward(batch, 0))
        grads.append([p.grad.clone() for p in net.parameters()])
    assert terms[0]["sup"] == pytest.approx(terms[1]["sup"], rel=1e-6)  # logged in float32
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
