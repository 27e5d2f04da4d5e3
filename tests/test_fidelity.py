"""The published setting computes the published update: the arithmetic of the published train.py (each loss
a per-GPU value, all-reduced and divided by the world size, then DDP-averaged gradients, SGD at lr x GPUs)
written out by hand, against the project's step; 1 process against 4 on the command-line path; and the
keys the `setting` switch decides."""
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from easydict import EasyDict

from furnace.config import SETTINGS, new_config, resolve
from furnace.distributed import convert_sync_batchnorm
from furnace.engine import param_groups
from furnace.methods.base import per_gpu_mean
from furnace.methods.supervised import supervised_step
from trainkit import EXP, ROOT, clean_env, driver_command, load, make_teacher, overrides

PUBLISHED_GPUS, GPU_BATCH = 4, 2
LR_PER_GPU, WD, MOMENTUM = 0.0025, 1e-4, 0.9          # the published VOC ResNet-18 student
STEPS = 2


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 3, 1))


def tiny_batches():
    """STEPS labeled batches of 8 images whose label maps have very different numbers of ignored pixels per
    pair of images, so that per-GPU means and a global mean give different updates."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(STEPS):
        x = torch.randn(8, 3, 6, 6, generator=g)
        y = torch.randint(0, 3, (8, 6, 6), generator=g)
        y[0::4, :5] = 255    # GPU 0 (images 0 and 4): 12 valid pixels of 72
        y[2::4, :, :1] = 255  # GPU 2 (images 2 and 6): 60 valid pixels
        out.append((x, y))
    return out


def published_update_by_hand():
    """The weights after STEPS published steps, from the published arithmetic: on GPU g, loss_g = CE mean over
    its 2 images' valid pixels; all_reduce(SUM) / W is not differentiable, so GPU g back-propagates loss_g / W
    (SyncBatchNorm: through the statistics of all 8 images); DDP averages over the W GPUs; SGD at
    lr_used = 0.0025 x W with weight decay 1e-4 on conv weights, momentum 0.9 (PyTorch's formula)."""
    net = tiny_net()
    W = PUBLISHED_GPUS
    lr_used = LR_PER_GPU * W
    buffers = {}
    for x, y in tiny_batches():
        logits = net(x)  # train-mode BatchNorm over the whole global batch = SyncBatchNorm over the GPUs
        # GPU g holds images g and g + 4 (the project deals a global batch to its processes in turn)
        per_gpu = [F.cross_entropy(logits[g::W], y[g::W], ignore_index=255) for g in range(W)]
        local = [l / W for l in per_gpu]          # what each GPU back-propagates
        grads = torch.autograd.grad(sum(local), list(net.parameters()))  # sum over GPUs of their gradients
        with torch.no_grad():
            for (name, p), grad in zip(net.named_parameters(), grads):
                d = grad / W                       # DDP: the average over GPUs
                if p.dim() > 1:
                    d = d + WD * p
                buffers[name] = d.clone() if name not in buffers else MOMENTUM * buffers[name] + d
                p -= lr_used * buffers[name]
    return {k: v.detach() for k, v in net.state_dict().items()}


def project_config(**changes) -> EasyDict:
    C = new_config("voc", str(EXP / "config.py"))
    C.update(num_classes=3, class_names=["a", "b", "c"], lr=LR_PER_GPU, weight_decay=WD * PUBLISHED_GPUS,
             batch_size=8, setting="published")
    C.update(changes)
    return resolve(C)


def project_steps(net: nn.Module, C: EasyDict, rank: int = 0, world: int = 1) -> dict:
    """STEPS of the project's supervised step and optimiser on this process's share of each batch."""
    model = nn.parallel.DistributedDataParallel(net) if world > 1 else net
    optimizer = torch.optim.SGD(param_groups(net, C.weight_decay), lr=C.lr, momentum=C.momentum, fused=True)
    for x, y in tiny_batches():
        batch = {"x_l": x[rank::world], "y_l": y[rank::world]}  # as the engine's sampler deals them
        loss, _ = supervised_step(model, batch, C, torch.device("cpu"), world)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _worker(rank, world, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        net = convert_sync_batchnorm(tiny_net(), torch.device("cpu"))
        state = project_steps(net, project_config(), rank, world)
        if rank == 0:
            torch.save(state, out_file)
    finally:
        dist.destroy_process_group()


def assert_close(got: dict, want: dict, rtol: float = 1e-5):
    for k, w in want.items():
        if w.is_floating_point():
            err = (got[k] - w).abs().max().item()
            assert err <= rtol * w.abs().max().item() + 1e-8, f"{k}: max |diff| {err:.3g}"


def test_published_sgd_update_by_hand_equals_the_published_setting(tmp_path):
    """The hand-computed published update equals the project's step with setting='published' (lr 0.0025,
    weight decay 4e-4, per-GPU loss scope) in 1 process and in 2 gloo processes; the global loss scope
    (setting='fast'), on these unevenly ignored labels, does not."""
    want = published_update_by_hand()
    one = project_steps(tiny_net(), project_config())
    assert_close(one, want)
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "two.pt")), nprocs=2, join=True)
    assert_close(torch.load(tmp_path / "two.pt"), want)
    global_scope = project_steps(tiny_net(), project_config(loss_scope="global"))
    assert max((global_scope[k] - want[k]).abs().max().item() for k in want if want[k].is_floating_point()) > 1e-4


def test_per_gpu_mean_splits_tensors_and_pairs():
    a = torch.arange(8.0)
    pair = (torch.arange(8.0), 10 * torch.arange(8.0))
    got = per_gpu_mean(lambda x, p: x.sum() + p[0].max() + p[1].min(), 2, a, pair)
    want = sum(a[g::4].sum() + pair[0][g + 4] + pair[1][g] for g in range(4)) / 4  # group g: images g, g + 4
    assert torch.isclose(got, want)


def test_setting_decides_the_step_keys_and_explicit_keys_win():
    C = new_config("voc", str(EXP / "config.py"))
    published, fast = resolve(C), resolve(C, [("setting", "fast", "test")])
    assert {k: published[k] for k in SETTINGS["published"]} == dict(
        teacher_bn="train", teacher_labels="online", network_calls="separate", cutmix_overlap="toggle",
        loss_scope="per_gpu", amp="off")
    assert {k: fast[k] for k in SETTINGS["fast"]} == SETTINGS["fast"]
    mixed = resolve(C, [("setting", "fast", "test"), ("cutmix_overlap", "toggle", "test")])
    assert mixed.cutmix_overlap == "toggle" and mixed.loss_scope == "global"
    with pytest.raises(ValueError, match="setting='slow'"):
        resolve(C, [("setting", "slow", "test")])
    with pytest.raises(ValueError, match="gpu_batch=3"):
        resolve(C, [("gpu_batch", "3", "test")])


def test_experiment_configs_use_the_published_update():
    """Effective lr on the mean gradient and weight decay relative to it (README, "Learning rate")."""
    from furnace.config import load_experiment
    want = {"voc8.resnet18_deeplabv3plus": (0.0025, 4e-4), "voc8.mobilev2_deeplabv3plus": (0.0035, 4e-4),
            "voc8.resnet101_deeplabv3plus": (0.0025, 4e-4), "voc8.wresnet50_deeplabv3plus": (0.001, 4e-4),
            "city8.resnet18_deeplabv3plus": (0.0025, 8e-4), "city8.resnet101_deeplabv3plus": (0.0025, 8e-4),
            "city8.wresnet50_deeplabv3plus": (0.0025, 8e-4)}
    for name, (lr, wd) in want.items():
        C = load_experiment(ROOT / ("exp.voc" if name.startswith("voc") else "exp.city") / name)
        assert (C.lr, C.weight_decay, C.setting) == (lr, wd, "published"), name
        assert math.isclose(C.batch_size / C.gpu_batch, 4 if name.startswith("voc") else 8), name


def test_published_setting_one_process_equals_four(toy, tmp_path):
    """Command-line path, setting='published' (teachers in train mode, separate calls, per-GPU losses): one
    process over 8 images and 4 gloo processes over 2 images each give the same loss terms and the same
    gradient (the momentum buffer after the first SGD step is gradient + weight decay x weights) to 1e-5,
    one MGD step in float64 (float32 would add reassociation rounding, see test_reliability.py)."""
    import subprocess
    deep, wide = make_teacher(tmp_path / "deep.pth", seed=1), make_teacher(tmp_path / "wide.pth", seed=2)
    common = overrides(toy, tmp_path / "unused", batch_size=8, epochs=1, iters_per_epoch=1, method="mgd",
                       setting="published", teacher_deep=str(deep), teacher_wide=str(wide),
                       pixel_labeled_weight=1.0)
    procs = {n: subprocess.Popen(driver_command(common, n, runs=[dict(out=str(tmp_path / f"p{n}"), args=[], fp64=True)]),
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=clean_env(),
                                 cwd=str(ROOT)) for n in (1, 4)}
    outputs = {n: p.communicate(timeout=500)[0] for n, p in procs.items()}
    for n, p in procs.items():
        assert p.returncode == 0, f"{n} process(es):\n" + outputs[n][-4000:]
    one, four = (load(tmp_path / f"p{n}" / "snapshot" / "last.pth") for n in (1, 4))
    assert one["config"]["loss_scope"] == "per_gpu" and one["config"]["teacher_bn"] == "train"
    assert set(one["losses"]) == {"total", "sup", "pix_u", "pix_l", "semantic", "region"}
    for k, v in one["losses"].items():
        assert math.isclose(v, four["losses"][k], rel_tol=1e-5), (k, v, four["losses"][k])
    buf_one = [s["momentum_buffer"] for s in one["optimizer"]["state"].values()]
    buf_four = [s["momentum_buffer"] for s in four["optimizer"]["state"].values()]
    assert len(buf_one) == len(buf_four) > 0
    for a, b in zip(buf_one, buf_four):
        assert (a - b).abs().max() <= 1e-5 * a.abs().max() + 1e-12
    for k, a in one["model"].items():
        if a.is_floating_point():
            assert (a - four["model"][k]).abs().max() <= 1e-5 * a.abs().max() + 1e-12, k
