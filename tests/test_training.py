"""Training engine on the toy data (CPU, fixed seeds): gradients reach only the student, each method runs and
writes complete checkpoints, `--resume` after a stop is exact, and a 2-process torchrun run works.

Runs are tiny (MobileNet-v2 nets, crop 32, batch 2, a few steps, see trainkit.overrides) and use one thread,
so that runs compared bit for bit do the same arithmetic.
"""
import math
import re
import subprocess

import pytest
import torch

from furnace.checkpoint import load_segmentor
from furnace.config import collect_overrides, load_experiment, resolve
from furnace.engine import Trainer
from furnace.sampling import cutmix_masks
from furnace.models import build_segmentor
from trainkit import (EXP, NUM_CLASSES, TORCHRUN, assert_bitwise_equal, clean_env, load, overrides,
                      tensors, train_in_process)

STUDENT_KEYS = set(build_segmentor("mobilenet_v2", NUM_CLASSES).state_dict())
CHECKPOINT_KEYS = {"model", "network", "num_classes", "method", "epoch", "iteration", "train_seconds",
                   "optimizer", "scaler", "rng", "config", "losses", "val"}


pytestmark = pytest.mark.usefixtures("one_thread")  # fixtures one_thread and toy: tests/conftest.py


@pytest.fixture(scope="module")
def cps_run(toy, tmp_path_factory):
    """An uninterrupted CPS run: 2 epochs of 2 steps. Its branch a is the teacher of the MGD tests."""
    out = tmp_path_factory.mktemp("cps")
    train_in_process(overrides(toy, out, method="cps"))
    return out


def logged_losses(output_dir):
    """{epoch: {term: value}} from the 'epoch E/N term=value ...' lines of train.log."""
    out = {}
    for line in (output_dir / "train.log").read_text().splitlines():
        m = re.search(r"epoch (\d+)/\d+ (.*) lr=", line)
        if m:
            out[int(m.group(1))] = {k: float(v) for k, v in re.findall(r"(\w+)=(\S+)", m.group(2))}
    return out


def check_training_checkpoint(path, method, epoch, iters_per_epoch=2):
    ckpt = load(path)
    assert ckpt["network"] == "mobilenet_v2" and ckpt["num_classes"] == NUM_CLASSES
    assert ckpt["method"] == method and ckpt["epoch"] == epoch and ckpt["iteration"] == epoch * iters_per_epoch
    assert set(ckpt["model"]) == STUDENT_KEYS
    for name, t in tensors(ckpt).items():
        if t.is_floating_point():
            assert torch.isfinite(t).all(), name
    return ckpt


def trainer_for(argv):
    return Trainer(resolve(load_experiment(EXP), collect_overrides([], argv)))


def test_supervised_baseline_has_the_semi_supervised_schedule(toy, tmp_path):
    """Without iters_per_epoch, an epoch is max(|D_l|, |D_u|) // batch for every method: the supervised baseline
    makes as many updates as MGD and CPS (21 unlabeled against 3 labeled images, batch 2: 10 per epoch)."""
    sizes = {}
    for method in ("supervised", "cps"):
        trainer = trainer_for(overrides(toy, tmp_path / method, method=method, iters_per_epoch=None))
        sizes[method] = (trainer.iters_per_epoch, trainer.total_iters)
    assert sizes["supervised"] == sizes["cps"] == (10, 20)


# ------------------------------------------------------------------------------------------- gradients
def test_mgd_gradients_reach_the_student_and_never_the_teachers(toy, cps_run, tmp_path):
    teacher = str(cps_run / "snapshot" / "last.pth")
    trainer = trainer_for(overrides(toy, tmp_path, method="mgd", epochs=1, iters_per_epoch=1,
                                    teacher_deep=teacher, teacher_wide=teacher))
    student, teachers = trainer.model, trainer.method.teachers
    student_ids = {id(p) for p in student.parameters()}
    teacher_params = [p for t in teachers.values() for p in t.parameters()]
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimised == student_ids and not optimised & {id(p) for p in teacher_params}
    assert not any(p.requires_grad for p in teacher_params)
    teachers_before = {role: {k: v.clone() for k, v in t.state_dict().items()} for role, t in teachers.items()}
    student_before = {k: p.detach().clone() for k, p in student.named_parameters()}

    trainer.fit()  # one MGD step: forward, backward, SGD update

    for role, t in teachers.items():
        assert all(p.grad is None for p in t.parameters()), role
        after = t.state_dict()
        # Train-mode teachers (the published setting) update their BatchNorm running statistics, which they
        # never use (batch statistics); their weights never change.
        kept = [k for k, _ in t.named_parameters()] if t.training else list(after)
        assert all(torch.equal(after[k], teachers_before[role][k]) for k in kept), f"teacher {role} changed"
    for name, p in student.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert not torch.equal(p.detach(), student_before[name]), f"student {name} not updated"
    assert any(p.grad.abs().sum() > 0 for p in student.parameters())

    # Even teachers that would accept gradients get none: mgd_step runs them without autograd.
    for p in teacher_params:
        p.requires_grad_(True)
    batch = next(trainer._batches(0))
    batch["mask"] = cutmix_masks(trainer.C, trainer.info, 0)
    trainer.optimizer.zero_grad(set_to_none=True)
    loss, terms = trainer._step(batch)
    assert set(terms) == {"sup", "pix_u", "pix_l", "semantic", "region"}
    loss.backward()
    assert all(p.grad is None for p in teacher_params)
    assert all(p.grad is not None for p in student.parameters())


# ------------------------------------------------------------------------------------ runs and checkpoints
def test_cps_run_checkpoints(cps_run):
    snap = cps_run / "snapshot"
    assert sorted(p.name for p in snap.iterdir()) == ["epoch-1.pth", "epoch-2.pth", "last.pth"]
    last = check_training_checkpoint(snap / "last.pth", "cps", 2)
    assert set(last) == CHECKPOINT_KEYS | {"model_b"}
    assert set(last["model_b"]) == STUDENT_KEYS
    differ = [k for k in STUDENT_KEYS if last["model"][k].is_floating_point()
              and not torch.equal(last["model"][k], last["model_b"][k])]
    assert len(differ) > len(STUDENT_KEYS) // 2  # two branches, initialised differently
    assert last["config"]["method"] == "cps" and last["config"]["batch_size"] == 2
    assert assert_bitwise_equal(load(snap / "epoch-2.pth"), last) > 0
    first = check_training_checkpoint(snap / "epoch-1.pth", "cps", 1)
    assert not torch.equal(first["model"]["classifier.weight"], last["model"]["classifier.weight"])
    losses = logged_losses(cps_run)
    assert sorted(losses) == [1, 2]
    for terms in losses.values():
        assert set(terms) == {"total", "sup", "cps"} and all(math.isfinite(v) for v in terms.values())
        assert terms["total"] == pytest.approx(terms["sup"] + terms["cps"], abs=2e-4)
    net = load_segmentor(str(snap / "last.pth")).eval()
    with torch.no_grad():
        assert torch.isfinite(net(torch.randn(1, 3, 32, 32))).all()


def test_supervised_run_checkpoints(toy, tmp_path):
    summary = train_in_process(overrides(toy, tmp_path, method="supervised"))
    assert summary["epochs"] == 2 and summary["checkpoint"] == str(tmp_path / "snapshot" / "last.pth")
    last = check_training_checkpoint(tmp_path / "snapshot" / "last.pth", "supervised", 2)
    assert set(last) == CHECKPOINT_KEYS
    assert (tmp_path / "snapshot" / "epoch-1.pth").is_file() and (tmp_path / "snapshot" / "epoch-2.pth").is_file()
    for terms in logged_losses(tmp_path).values():
        assert set(terms) == {"total", "sup"} and math.isfinite(terms["sup"]) and terms["sup"] > 0


def test_mgd_run_saves_only_the_student(toy, cps_run, tmp_path):
    teacher = str(cps_run / "snapshot" / "last.pth")
    train_in_process(overrides(toy, tmp_path, method="mgd", teacher_deep=teacher, teacher_wide=teacher))
    last = check_training_checkpoint(tmp_path / "snapshot" / "last.pth", "mgd", 2)
    assert set(last) == CHECKPOINT_KEYS  # no model_b, no teacher
    student = build_segmentor("mobilenet_v2", NUM_CLASSES)
    assert sum(t.numel() for t in last["model"].values()) == sum(t.numel() for t in student.state_dict().values())
    params = [p for group in last["optimizer"]["param_groups"] for p in group["params"]]
    assert len(params) == len(list(student.parameters()))
    assert not [k for k in tensors(last) if "teacher" in k]
    losses = logged_losses(tmp_path)
    assert sorted(losses) == [1, 2]
    for terms in losses.values():
        assert set(terms) == {"total", "sup", "pix_u", "pix_l", "semantic", "region"}
        assert all(math.isfinite(v) for v in terms.values())


# ---------------------------------------------------------------------------------------------- resume
def test_resume_after_a_stop_reproduces_the_uninterrupted_run_exactly(toy, cps_run, tmp_path, monkeypatch):
    """Stop a CPS run right after its epoch-1 checkpoint, `--resume` it: the final checkpoint equals the
    uninterrupted run's (cps_run) bit for bit: both branches, BatchNorm statistics and optimiser state."""
    class Stop(Exception):
        pass

    save = Trainer._save

    def save_then_stop(self):
        save(self)
        if self.epoch == 1:
            raise Stop

    argv = overrides(toy, tmp_path, method="cps")
    monkeypatch.setattr(Trainer, "_save", save_then_stop)
    with pytest.raises(Stop):
        train_in_process(argv)
    monkeypatch.setattr(Trainer, "_save", save)
    assert load(tmp_path / "snapshot" / "last.pth")["epoch"] == 1
    assert not (tmp_path / "snapshot" / "epoch-2.pth").exists()

    summary = train_in_process(["--resume"] + argv)

    assert summary["epochs"] == 2
    assert "resumed from" in (tmp_path / "train.log").read_text()
    resumed, uninterrupted = load(tmp_path / "snapshot" / "last.pth"), load(cps_run / "snapshot" / "last.pth")
    assert resumed["epoch"] == uninterrupted["epoch"] == 2
    assert assert_bitwise_equal(resumed, uninterrupted) > 2 * len(STUDENT_KEYS)
    assert torch.equal(resumed["rng"], uninterrupted["rng"])


# ----------------------------------------------------------------------------------------------- torchrun
def test_two_process_torchrun_run_of_train_py(toy, tmp_path):
    """The experiment's real train.py under torchrun, 2 gloo processes (2 images each), config from --cfg."""
    cfg = tmp_path / "run.cfg"
    cfg.write_text("".join(f"{a.split('=', 1)[0]} = {a.split('=', 1)[1]}\n"
                           for a in overrides(toy, tmp_path / "out", batch_size=4, epochs=1)))
    result = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node=2", str(EXP / "train.py"), "--cfg", str(cfg),
                             "method=supervised"], capture_output=True, text=True, timeout=300, env=clean_env())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    last = check_training_checkpoint(tmp_path / "out" / "snapshot" / "last.pth", "supervised", 1)
    assert last["config"]["batch_size"] == 4
    log = (tmp_path / "out" / "train.log").read_text()
    assert log.count("epoch 1/1 ") == 1  # only rank 0 writes the log
    assert math.isfinite(logged_losses(tmp_path / "out")[1]["sup"])
