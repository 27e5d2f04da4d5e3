"""Reliability of training on the toy data (CPU, fixed seeds): surviving kill -9, 1 vs N processes, refusing
bad input up front, stopping on non-finite values.

Kills use tests/trainkit.py as the training driver (it SIGKILLs itself at a chosen step, or halfway through
writing a checkpoint file), or an external SIGKILL at a random moment of a real train.py; the resumed runs
must end bit for bit where an uninterrupted run ends. All runs use one thread per process (bitwise
comparisons need the same arithmetic).
"""
import json
import math
import random
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from PIL import Image

from furnace.checkpoint import load_checkpoint, save_checkpoint
from furnace.config import collect_overrides, load_experiment, resolve
from furnace.data import DatasetError, read_label, read_list
from furnace.distributed import ProcessSyncBatchNorm, convert_sync_batchnorm
from furnace.engine import Trainer
from furnace.teachers import same_split
from furnace.evaluate import main as evaluate_main
from furnace.metrics import confusion_matrix
from furnace.models import build_segmentor
from trainkit import (EXP, NUM_CLASSES, PYTHON, ROOT, TORCHRUN, TOY_CLASSES, assert_bitwise_equal, clean_env,
                      driver_command, load, make_teacher, overrides, run_driver,
                      train_in_process)


pytestmark = pytest.mark.usefixtures("one_thread")  # fixtures one_thread and toy: tests/conftest.py


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    d = tmp_path_factory.mktemp("teachers")
    return str(make_teacher(d / "deep.pth", seed=1)), str(make_teacher(d / "wide.pth", seed=2))


def snapshot(out):
    return out / "snapshot"


def log_epochs(out):
    text = (out / "train.log").read_text() if (out / "train.log").exists() else ""
    return [e for e in range(1, 10) if f"epoch {e}/" in text]


# --------------------------------------------------------------------------------------------- kill -9
SUPERVISED_3X2 = dict(method="supervised", epochs=3, iters_per_epoch=2)


@pytest.fixture(scope="module")
def supervised_reference(toy, tmp_path_factory):
    """An uninterrupted supervised run, 3 epochs of 2 steps."""
    out = tmp_path_factory.mktemp("supervised_ref")
    train_in_process(overrides(toy, out, **SUPERVISED_3X2))
    return load(snapshot(out) / "last.pth")


@pytest.mark.parametrize("method", ["supervised", "cps", "mgd"])
def test_kill_mid_epoch_then_resume_matches_uninterrupted_run(toy, teachers, tmp_path, method):
    """2 epochs of 3 steps with last.pth every 2 iterations (save_every_iters=2: iterations 2 and 4, in the
    middle of epochs 1 and 2). SIGKILL as step 6 begins; --resume starts from iteration 4 (epoch 2, second
    step) and ends bit for bit where the uninterrupted run (no mid-epoch checkpoints) ends."""
    settings = dict(method=method, epochs=2, iters_per_epoch=3, teacher_deep=teachers[0], teacher_wide=teachers[1])
    train_in_process(overrides(toy, tmp_path / "ref", **settings, save_every_iters=0))
    argv = overrides(toy, tmp_path / "run", **settings, save_every_iters=2)

    killed = run_driver(argv, fault="kill-at-step:6")

    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert sorted(p.name for p in snapshot(tmp_path / "run").iterdir()) == ["epoch-1.pth", "last.pth"]
    last = load_checkpoint(str(snapshot(tmp_path / "run") / "last.pth"))
    assert (last["epoch"], last["iteration"]) == (1, 4)
    assert log_epochs(tmp_path / "run") == [1]

    assert train_in_process(["--resume"] + argv)["epochs"] == 2
    assert "resumed from" in (tmp_path / "run" / "train.log").read_text()
    assert "iteration 1 of epoch 2" in (tmp_path / "run" / "train.log").read_text()

    final, reference = load(snapshot(tmp_path / "run") / "last.pth"), load(snapshot(tmp_path / "ref") / "last.pth")
    assert assert_bitwise_equal(final, reference) > 0
    assert torch.equal(final["rng"], reference["rng"]) and final["iteration"] == reference["iteration"] == 6
    assert assert_bitwise_equal(load(snapshot(tmp_path / "run") / "epoch-1.pth"),
                                load(snapshot(tmp_path / "ref") / "epoch-1.pth")) > 0


def test_kill_during_checkpoint_write_keeps_the_previous_one(toy, supervised_reference, tmp_path):
    """SIGKILL halfway through writing last.pth at the end of epoch 2 (the 4th save: epoch-1, last, epoch-2,
    last): last.pth still holds epoch 1 intact, the partial file is a separate temporary, and --resume ends
    bit for bit where the uninterrupted run ends."""
    argv = overrides(toy, tmp_path, **SUPERVISED_3X2)

    killed = run_driver(argv, fault="kill-in-save:4")

    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    snap = snapshot(tmp_path)
    partial = [p for p in snap.iterdir() if p.name.startswith("last.pth.tmp.")]
    assert len(partial) == 1 and 0 < partial[0].stat().st_size < (snap / "last.pth").stat().st_size
    with pytest.raises(RuntimeError, match="corrupt"):
        load_checkpoint(str(partial[0]))
    last = load_checkpoint(str(snap / "last.pth"))
    assert last["epoch"] == 1
    assert_bitwise_equal(last, load(snap / "epoch-1.pth"))
    assert load(snap / "epoch-2.pth")["epoch"] == 2  # written completely before the crash

    train_in_process(["--resume"] + argv)

    assert not partial[0].exists() and "removed" in (tmp_path / "train.log").read_text()
    assert assert_bitwise_equal(load(snap / "last.pth"), supervised_reference) > 0


def test_kill_at_a_random_moment_then_resume(toy, supervised_reference, tmp_path):
    """The experiment's train.py, SIGKILLed from outside at a random moment after its first checkpoint."""
    seed = random.randrange(10 ** 6)
    argv = overrides(toy, tmp_path, **SUPERVISED_3X2)
    proc = subprocess.Popen([PYTHON, str(EXP / "train.py")] + argv, env=clean_env(), cwd=str(ROOT),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (snapshot(tmp_path) / "epoch-1.pth").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(random.Random(seed).uniform(0.0, 1.0))
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    last = snapshot(tmp_path) / "last.pth"  # absent if killed between writing epoch-1.pth and last.pth
    at_kill = load_checkpoint(str(last))["epoch"] if last.exists() else None
    partial = [p.name for p in snapshot(tmp_path).iterdir() if ".tmp." in p.name]
    where = (f"random seed {seed}: killed with last.pth at epoch {at_kill}, exit code {proc.returncode}, "
             f"log epochs {log_epochs(tmp_path)}, partial files {partial}")
    print(where)

    train_in_process(["--resume"] + argv)

    assert load(snapshot(tmp_path) / "last.pth")["epoch"] == 3, where
    assert assert_bitwise_equal(load(snapshot(tmp_path) / "last.pth"), supervised_reference) > 0, where


# ------------------------------------------------------------------------------------ non-finite values
def test_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(toy, tmp_path, monkeypatch):
    step, calls = Trainer._step, []

    def nan_at_step_4(self, batch):
        loss, terms = step(self, batch)
        calls.append(1)
        return (loss * float("nan"), terms) if len(calls) == 4 else (loss, terms)

    monkeypatch.setattr(Trainer, "_step", nan_at_step_4)
    with pytest.raises(FloatingPointError) as error:
        train_in_process(overrides(toy, tmp_path, **SUPERVISED_3X2))
    message = str(error.value)
    assert "non-finite loss at iteration 3 (epoch 2)" in message and "total=nan" in message
    assert f"last good checkpoint {snapshot(tmp_path) / 'last.pth'} is kept" in message
    assert sorted(p.name for p in snapshot(tmp_path).iterdir()) == ["epoch-1.pth", "last.pth"]
    last = load_checkpoint(str(snapshot(tmp_path) / "last.pth"))
    assert last["epoch"] == 1 and assert_bitwise_equal(last, load(snapshot(tmp_path) / "epoch-1.pth")) > 0
    assert log_epochs(tmp_path) == [1]


def test_exploding_lr_is_stopped_before_a_checkpoint(toy, tmp_path):
    """lr=1e30: the first update blows the weights up, the second step's loss is not finite."""
    with pytest.raises(FloatingPointError, match=r"non-finite loss at iteration 1 \(epoch 1\).*no checkpoint"):
        train_in_process(overrides(toy, tmp_path, method="supervised", lr=1e30))
    assert not snapshot(tmp_path).exists()


def test_non_finite_weights_are_never_saved(toy, tmp_path, monkeypatch):
    """An update that overflows on the last step of an epoch (the loss check cannot see it) must not replace
    last.pth."""
    sgd_step, calls = torch.optim.SGD.step, []

    def overflow_at_step_4(self, *args, **kwargs):
        out = sgd_step(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 4:  # the last step of epoch 2
            self.param_groups[0]["params"][0].data.fill_(float("inf"))
        return out

    monkeypatch.setattr(torch.optim.SGD, "step", overflow_at_step_4)
    with pytest.raises(FloatingPointError, match=r"non-finite weights after epoch 2 .*last good checkpoint"):
        train_in_process(overrides(toy, tmp_path, **SUPERVISED_3X2))
    assert sorted(p.name for p in snapshot(tmp_path).iterdir()) == ["epoch-1.pth", "last.pth"]
    assert load_checkpoint(str(snapshot(tmp_path) / "last.pth"))["epoch"] == 1


# ------------------------------------------------------------------------------ 1 vs N processes: training
METHODS = ("supervised", "cps", "mgd")


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5, atol: float = 1e-7) -> bool:
    """max |a - b| <= rtol * max |a| + atol: relative to the tensor's scale, with a floor for tensors that are
    float noise (e.g. a BatchNorm bias right before another BatchNorm has no gradient and stays ~1e-17)."""
    return bool((a.double() - b.double()).abs().max() <= rtol * a.double().abs().max() + atol)


def test_two_processes_match_one_process(toy, teachers, tmp_path):
    """A 2-process gloo torchrun run and a 1-process run with the same global batch (4) reach the same
    weights and BatchNorm statistics within 1e-5 relative, for supervised, cps and mgd (3 steps each;
    teacher_bn='train' so that the teachers' BatchNorm is synchronised too, hence online teachers; the offline
    labels of 1 and 2 processes are compared in test_teacher_labels.py).

    The 3-step runs compute in float64: in float32 the two runs differ by reassociation (the 2-process
    gradient is a sum of two partial sums), and these randomly initialised BatchNorm nets amplify a 1-ulp
    weight difference into a ~0.3% gradient difference within one step (MobileNet-v2), so float32 weights
    agree to ~1e-6 after one step but not to 1e-5 after three. float64 leaves the arithmetic identical and
    the rounding 1e-9 times smaller (the runs then agree to ~1e-8). A float32 single-step run (supervised)
    checks the production path."""
    common = overrides(toy, tmp_path / "unused", batch_size=4, epochs=1, iters_per_epoch=3,
                       teacher_deep=teachers[0], teacher_wide=teachers[1], teacher_bn="train",
                       teacher_labels="online")

    def runs(tag):
        fp64 = [dict(out=str(tmp_path / tag / m), args=[f"method={m}"], fp64=True) for m in METHODS]
        return fp64 + [dict(out=str(tmp_path / tag / "fp32"), args=["method=supervised", "iters_per_epoch=1"])]

    procs = {n: subprocess.Popen(driver_command(common, n, runs=runs(f"p{n}")), stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, env=clean_env(), cwd=str(ROOT)) for n in (1, 2)}
    outputs = {n: p.communicate(timeout=500)[0] for n, p in procs.items()}
    for n, p in procs.items():
        assert p.returncode == 0, f"{n} process(es):\n" + outputs[n][-4000:]

    for name in METHODS + ("fp32",):
        one, two = (load(tmp_path / f"p{n}" / name / "snapshot" / "last.pth") for n in (1, 2))
        assert one["epoch"] == two["epoch"] == 1 and two["config"]["batch_size"] == 4
        compared = 0
        for part in [k for k in ("model", "model_b") if k in one]:
            assert one[part].keys() == two[part].keys()
            for key, a in one[part].items():
                b = two[part][key]
                if a.is_floating_point():
                    same = close(a, b)
                    assert same, (f"{name} {part}.{key}: max |1p - 2p| = {(a - b).abs().max().item():.3g}, "
                                  f"max |1p| = {a.abs().max().item():.3g}")
                else:  # num_batches_tracked
                    assert torch.equal(a, b), f"{name} {part}.{key}"
                compared += 1
        assert compared == len(one["model"]) * (2 if name == "cps" else 1)
        assert one["iteration"] == two["iteration"] == (1 if name == "fp32" else 3)


# ------------------------------------------------------------------------- process-synchronised BatchNorm
def _sync_bn_worker(rank, world, init_file, out_file, x, grad_out, weight, bias):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        bn = ProcessSyncBatchNorm(x.shape[1])
        with torch.no_grad():
            bn.weight.copy_(weight)
            bn.bias.copy_(bias)
        ddp = nn.parallel.DistributedDataParallel(bn, broadcast_buffers=False)
        part = slice(0, 3) if rank == 0 else slice(3, None)  # uneven local batches: 3 and 2 samples
        results = {}
        for it in range(2):
            xi = (x[part] + it).clone().requires_grad_(True)
            y = ddp(xi)
            # DDP averages parameter gradients: scale so that the average is the gradient of sum(y * g)
            (world * (y * grad_out[part]).sum()).backward()
            results[it] = dict(y=y.detach(), grad_x=xi.grad / world, grad_w=bn.weight.grad.clone(),
                               grad_b=bn.bias.grad.clone())
            bn.zero_grad()
        bn.eval()
        results["eval"] = bn(x[part]).detach()
        results["state"] = {k: v.clone() for k, v in bn.state_dict().items()}
        torch.save(results, out_file)
    finally:
        dist.destroy_process_group()


def test_process_sync_batchnorm_equals_batchnorm_on_the_whole_batch(tmp_path):
    """2 gloo processes with 3 and 2 samples: outputs, input gradients, DDP-averaged weight and bias
    gradients and running statistics equal nn.BatchNorm2d's on the concatenated 5 samples."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 4, 6, 7, generator=g) * 3 + 2
    grad_out = torch.randn(5, 4, 6, 7, generator=g)
    weight, bias = torch.rand(4, generator=g) + 0.5, torch.randn(4, generator=g)
    outs = [str(tmp_path / f"rank{r}.pt") for r in range(2)]
    mp.spawn(_spawn_entry, args=(str(tmp_path / "init"), outs, x, grad_out, weight, bias), nprocs=2, join=True)
    got = [torch.load(f) for f in outs]

    ref = nn.BatchNorm2d(4).double()
    with torch.no_grad():
        ref.weight.copy_(weight)
        ref.bias.copy_(bias)
    for it in range(2):
        xi = (x + it).double().requires_grad_(True)
        y = ref(xi)
        (y * grad_out.double()).sum().backward()
        want = dict(y=y.detach(), grad_x=xi.grad, grad_w=ref.weight.grad.clone(), grad_b=ref.bias.grad.clone())
        ref.zero_grad()
        for name in ("y", "grad_x"):
            both = torch.cat([got[0][it][name], got[1][it][name]]).double()
            torch.testing.assert_close(both, want[name], rtol=1e-5, atol=1e-5, msg=f"step {it} {name}")
        for name in ("grad_w", "grad_b"):
            for r in range(2):
                torch.testing.assert_close(got[r][it][name].double(), want[name], rtol=1e-5, atol=1e-5,
                                           msg=f"step {it} rank {r} {name}")
    ref.eval()
    want_eval = ref(x.double()).detach()
    torch.testing.assert_close(torch.cat([got[0]["eval"], got[1]["eval"]]).double(), want_eval, rtol=1e-5, atol=1e-5)
    for r in range(2):
        for key, value in ref.state_dict().items():
            torch.testing.assert_close(got[r]["state"][key].double(), value.double(), rtol=1e-6, atol=1e-6,
                                       msg=f"rank {r} {key}")


def _spawn_entry(rank, init_file, outs, x, grad_out, weight, bias):
    _sync_bn_worker(rank, 2, init_file, outs[rank], x, grad_out, weight, bias)


def test_convert_sync_batchnorm_on_cpu_keeps_the_state():
    torch.manual_seed(0)
    net = build_segmentor("mobilenet_v2", NUM_CLASSES)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    bns = sum(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    net = convert_sync_batchnorm(net, torch.device("cpu"))
    assert sum(isinstance(m, ProcessSyncBatchNorm) for m in net.modules()) == bns > 0
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


# ---------------------------------------------------------------------------- 1 vs N processes: evaluation
def test_two_process_eval_py_gives_the_one_process_result(toy, tmp_path):
    """The experiment's eval.py under torchrun (2 processes) on the 5 toy val images: same per-class IoU,
    same predictions, every image evaluated exactly once."""
    torch.manual_seed(0)
    net = build_segmentor("mobilenet_v2", NUM_CLASSES)
    with torch.no_grad():
        net.classifier.weight.mul_(300.0)  # varied predictions from random weights
    ckpt = save_ckpt(net, tmp_path / "net.pth")
    argv = [f"data_root={toy}", f"num_classes={NUM_CLASSES}", f"class_names={TOY_CLASSES!r}", "eval_crop_size=64",
            "device=cpu"]
    val_names = read_list(toy / "lists" / "val.txt")
    assert len(val_names) % 2 == 1

    two = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node=2", str(EXP / "eval.py"), "-p", ckpt,
                          "--save_path", str(tmp_path / "p2"), "--json", str(tmp_path / "p2.json"),
                          f"output_dir={tmp_path / 'out2'}"] + argv,
                         capture_output=True, text=True, timeout=300, env=clean_env(), cwd=str(ROOT))
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    evaluate_main(load_experiment(EXP), ["-p", ckpt, "--save_path", str(tmp_path / "p1"),
                                         "--json", str(tmp_path / "p1.json"), f"output_dir={tmp_path / 'out1'}"] + argv)

    r1, r2 = (json.loads((tmp_path / f"p{n}.json").read_text()) for n in (1, 2))
    assert len(r1) == len(r2) == 1
    assert r1[0]["miou"] == r2[0]["miou"] and r1[0]["pixel_acc"] == r2[0]["pixel_acc"]
    assert [None if math.isnan(v) else v for v in r1[0]["iou"]] == [None if math.isnan(v) else v for v in r2[0]["iou"]]
    assert "processes=2" in (tmp_path / "out2" / "eval.log").read_text()

    conf = {1: torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.int64), 2: None}
    valid = 0
    for name in val_names:
        p1, p2 = (np.array(Image.open(tmp_path / f"p{n}" / "label" / f"{name}.png")) for n in (1, 2))
        assert np.array_equal(p1, p2), name
        label = read_label(toy / "val" / "label" / f"{name}.png")
        conf[1] += confusion_matrix(torch.from_numpy(p1).long(), torch.from_numpy(label).long(), NUM_CLASSES)
        valid += int((label != 255).sum())
    assert sorted(p.stem for p in (tmp_path / "p2" / "label").iterdir()) == sorted(val_names)
    assert int(conf[1].sum()) == valid  # every valid pixel of every image counted once
    diag = conf[1].diag().double()
    iou = diag / (conf[1].sum(0) + conf[1].sum(1) - conf[1].diag()).double()
    assert r2[0]["pixel_acc"] == pytest.approx(float(diag.sum() / valid), abs=1e-12)
    for c in range(NUM_CLASSES):
        if not math.isnan(r2[0]["iou"][c]):
            assert r2[0]["iou"][c] == pytest.approx(float(iou[c]), abs=1e-12)


def save_ckpt(net, path):
    save_checkpoint({"model": net.state_dict(), "network": "mobilenet_v2", "num_classes": NUM_CLASSES}, str(path))
    return str(path)


# ---------------------------------------------------------------------------------------- bad input
@pytest.fixture
def data(toy, tmp_path):
    """A private copy of the toy set to damage: (root, labeled names, unlabeled names)."""
    root = tmp_path / "voc"
    shutil.copytree(toy, root)
    return root, read_list(root / "lists" / "labeled_1-8.txt"), read_list(root / "lists" / "unlabeled_1-8.txt")


def refused(argv, exc, *fragments, out=None):
    """Training with argv fails with `exc` naming every fragment, before any training step."""
    with pytest.raises(exc) as error:
        train_in_process(argv)
    message = str(error.value)
    for fragment in fragments:
        assert str(fragment) in message, f"{fragment!r} not in: {message}"
    if out is not None:
        assert log_epochs(out) == []
        assert not (snapshot(out) / "epoch-1.pth").exists()
    return message


def image(root, name):
    return root / "train_aug" / "image" / f"{name}.jpg"


def label(root, name):
    return root / "train_aug" / "label" / f"{name}.png"


def test_missing_image_is_refused(data, tmp_path):
    root, labeled, _ = data
    image(root, labeled[0]).unlink()
    refused(overrides(root, tmp_path / "out", method="cps"), DatasetError, "image not found", image(root, labeled[0]),
            out=tmp_path / "out")


def test_corrupt_image_is_refused(data, tmp_path):
    root, _, unlabeled = data
    image(root, unlabeled[5]).write_bytes(b"this is not a JPEG file")
    refused(overrides(root, tmp_path / "out", method="cps"), DatasetError, image(root, unlabeled[5]),
            out=tmp_path / "out")


def test_truncated_image_is_refused(data, tmp_path):
    """An interrupted copy: the JPEG header is intact, the pixel data cut in half."""
    root, labeled, _ = data
    path = image(root, labeled[1])
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    refused(overrides(root, tmp_path / "out", method="cps"), DatasetError, "cannot decode image", path,
            out=tmp_path / "out")


def test_missing_label_is_refused(data, tmp_path):
    root, labeled, _ = data
    label(root, labeled[2]).unlink()
    refused(overrides(root, tmp_path / "out", method="supervised"), DatasetError, "label not found",
            label(root, labeled[2]), out=tmp_path / "out")


def test_corrupt_label_is_refused(data, tmp_path):
    root, labeled, _ = data
    label(root, labeled[0]).write_bytes(b"\x89PNG garbage")
    refused(overrides(root, tmp_path / "out", method="supervised"), DatasetError, "cannot read label",
            label(root, labeled[0]), out=tmp_path / "out")


def test_label_of_another_size_is_refused(data, tmp_path):
    root, labeled, _ = data
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(label(root, labeled[1]))
    refused(overrides(root, tmp_path / "out", method="supervised"), DatasetError, image(root, labeled[1]),
            label(root, labeled[1]), "is 10x12", out=tmp_path / "out")


def test_label_value_out_of_range_is_refused(data, tmp_path):
    root, labeled, _ = data
    values = read_label(label(root, labeled[0])).copy()
    values[3, 4] = 9  # 6 classes: 0..5 and 255 are valid
    Image.fromarray(values).save(label(root, labeled[0]))
    refused(overrides(root, tmp_path / "out", method="supervised"), DatasetError, label(root, labeled[0]), "[9]",
            "num_classes=6", out=tmp_path / "out")


def test_empty_split_list_is_refused(data, tmp_path):
    root, _, _ = data
    (root / "lists" / "labeled_1-8.txt").write_text("\n")
    refused(overrides(root, tmp_path / "out", method="cps"), ValueError, "split list is empty",
            root / "lists" / "labeled_1-8.txt", out=tmp_path / "out")


def test_missing_split_list_is_refused(data, tmp_path):
    root, _, _ = data
    missing = root / "lists" / "unlabeled_1-16.txt.missing"
    refused(overrides(root, tmp_path / "out", method="cps", unlabeled_list=str(missing)), FileNotFoundError,
            "split list not found", missing, out=tmp_path / "out")


def test_teacher_of_the_wrong_architecture_is_refused(toy, teachers, tmp_path):
    wrong = str(make_teacher(tmp_path / "r18.pth", network="resnet18"))
    refused(overrides(toy, tmp_path / "out", method="mgd", teacher_deep=wrong, teacher_wide=teachers[1]), ValueError,
            "teacher_deep", wrong, "is a resnet18 network, expected mobilenet_v2", out=tmp_path / "out")


def test_teacher_with_another_class_count_is_refused(toy, teachers, tmp_path):
    wrong = str(make_teacher(tmp_path / "c21.pth", num_classes=21))
    refused(overrides(toy, tmp_path / "out", method="mgd", teacher_deep=teachers[0], teacher_wide=wrong), ValueError,
            "teacher_wide", wrong, "predicts 21 classes, expected 6", out=tmp_path / "out")


def test_teacher_weights_that_do_not_fit_its_network_are_refused(toy, teachers, tmp_path):
    """A checkpoint claiming mobilenet_v2 that holds ResNet-18 weights."""
    ckpt = load(make_teacher(tmp_path / "r18.pth", network="resnet18"))
    ckpt["network"] = "mobilenet_v2"
    save_checkpoint(ckpt, str(tmp_path / "liar.pth"))
    refused(overrides(toy, tmp_path / "out", method="mgd", teacher_deep=str(tmp_path / "liar.pth"),
                      teacher_wide=teachers[1]), RuntimeError, "teacher_deep", tmp_path / "liar.pth",
            "weights do not fit a mobilenet_v2 network", out=tmp_path / "out")


def test_teacher_trained_on_another_dataset_is_refused(toy, teachers, tmp_path):
    other = str(make_teacher(tmp_path / "city.pth", dataset="cityscapes"))
    refused(overrides(toy, tmp_path / "out", method="mgd", teacher_deep=teachers[0], teacher_wide=other), ValueError,
            "teacher_wide", other, "dataset='cityscapes'", out=tmp_path / "out")


def test_teacher_split_check_compares_the_lists_not_their_paths(toy, teachers, tmp_path):
    """Teachers trained on a copy of the data (same list name and images, another path) are accepted; a list
    of the same name with other images, or another partition, is refused by name."""
    trained = tmp_path / "old_copy" / "labeled_1-8.txt"
    trained.parent.mkdir()
    current = toy / "lists" / "labeled_1-8.txt"
    trained.write_text(current.read_text())
    assert same_split(str(trained), str(current)) and same_split(str(current), str(current))
    assert same_split(str(tmp_path / "moved_away" / "labeled_1-8.txt"), str(current))  # gone: the name decides
    assert not same_split(str(tmp_path / "labeled_1-16.txt"), str(current))
    trained.write_text("\n".join(reversed(current.read_text().split())))  # the same images in another order
    assert same_split(str(trained), str(current))
    trained.write_text("\n".join(current.read_text().split()[1:]))  # one image fewer
    assert not same_split(str(trained), str(current))

    other = tmp_path / "other" / "labeled_1-8.txt"
    other.parent.mkdir()
    other.write_text(current.read_text().split()[0] + "\n")
    ckpt = load(make_teacher(tmp_path / "t.pth"))
    ckpt["config"]["labeled_list"] = str(other)
    save_checkpoint(ckpt, str(tmp_path / "t.pth"))
    refused(overrides(toy, tmp_path / "out", method="mgd", teacher_deep=str(tmp_path / "t.pth"),
                      teacher_wide=teachers[1]), ValueError, "teacher_deep", tmp_path / "t.pth",
            f"labeled_list={str(other)!r}", out=tmp_path / "out")


def test_missing_teacher_is_refused(toy, teachers, tmp_path):
    refused(overrides(toy, tmp_path / "out", method="mgd", teacher_deep=str(tmp_path / "nope.pth"),
                      teacher_wide=teachers[1]), FileNotFoundError, "checkpoint not found", tmp_path / "nope.pth",
            out=tmp_path / "out")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_checkpoint_on_resume_is_refused(toy, teachers, tmp_path, damage):
    last = snapshot(tmp_path) / "last.pth"
    last.parent.mkdir(parents=True)
    if damage == "garbage":
        last.write_bytes(b"\x00" * 1000)
    else:  # a real checkpoint file cut in half
        data = (make_teacher(tmp_path / "whole.pth")).read_bytes()
        last.write_bytes(data[: len(data) // 2])
    size = last.stat().st_size
    refused(["--resume"] + overrides(toy, tmp_path, method="supervised"), RuntimeError, last, "corrupt", out=tmp_path)
    assert last.stat().st_size == size  # left as it was, for inspection


def test_unknown_config_key_is_refused(toy, tmp_path):
    refused(overrides(toy, tmp_path, method="supervised") + ["lerning_rate=0.1"], KeyError, "'lerning_rate'",
            "command-line override")
    cfg = tmp_path / "bad.cfg"
    cfg.write_text("# toy\nbatch_size = 2\nbatchsize = 4\n")
    refused(["--cfg", str(cfg)] + overrides(toy, tmp_path, method="supervised"), KeyError, "'batchsize'",
            f"{cfg}:3")
    assert not (tmp_path / "train.log").exists()


def test_config_ignores_environment_variables(monkeypatch):
    """Settings come from config.py, --cfg files and key=value arguments only: an MGD_<KEY> variable (an
    override channel of earlier versions) changes nothing, so a run's settings never depend on the shell."""
    monkeypatch.setenv("MGD_SEED", "7")
    monkeypatch.setenv("MGD_BATCHSIZE", "4")  # not a key: not refused either, since it is not read
    assert resolve(load_experiment(EXP), collect_overrides()).seed == load_experiment(EXP).seed != 7


@pytest.mark.parametrize("changes,message", [
    (dict(batch_size=3, gpu_batch=1), "batch_size=3 is not divisible by the 2 processes"),
    (dict(batch_size=2), "groups of gpu_batch=2 images, and 2 processes hold 1 each")])
def test_batch_size_not_divisible_by_the_processes_is_refused(toy, tmp_path, changes, message):
    """torchrun with 2 processes and a batch they cannot share (or, with the published per-GPU losses, not in
    whole published per-GPU groups): both processes stop at once, naming the setting."""
    result = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node=2", str(EXP / "train.py")]
                            + overrides(toy, tmp_path, method="supervised", **changes),
                            capture_output=True, text=True, timeout=120, env=clean_env(), cwd=str(ROOT))
    assert result.returncode != 0
    assert message in result.stdout + result.stderr
    assert not (tmp_path / "train.log").exists()  # refused before the log, the data or the networks
