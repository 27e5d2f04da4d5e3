"""Validation during training (furnace/engine.py, Trainer._validate): it does not change the training (same
weights, optimiser, BatchNorm buffers and RNG state as without it), its mIoU is what eval.py computes for
that epoch's checkpoint, best.pth is the best epoch's checkpoint, and both survive a kill and --resume.
The N-process validation is checked by tests/test_cluster.py's 2-node run."""
import math
import signal

import pytest
import torch

from furnace.config import collect_overrides, load_experiment, resolve
from furnace.engine import validation_dataset
from furnace.evaluate import evaluate_checkpoints
from trainkit import EXP, assert_bitwise_equal, load, overrides, run_driver, train_in_process

pytestmark = pytest.mark.usefixtures("one_thread")
# 3 epochs of 1 step, validation on 2 of the 5 toy val images; val_every=None is the default (here: every epoch)
VAL = dict(method="supervised", epochs=3, iters_per_epoch=1, val_images=2, save_every_iters=0)


@pytest.fixture(scope="module")
def validated(toy, tmp_path_factory):
    out = tmp_path_factory.mktemp("validated")
    summary = train_in_process(overrides(toy, out, **VAL, val_every=None))
    return out, summary


def test_validation_does_not_change_the_training(toy, validated, tmp_path):
    out, _ = validated
    train_in_process(overrides(toy, tmp_path, **VAL))  # val_every=0 (trainkit's default)
    with_val, without = load(out / "snapshot" / "last.pth"), load(tmp_path / "snapshot" / "last.pth")
    assert "history" not in without["val"] or not without["val"]["history"]
    assert assert_bitwise_equal(with_val, without, keys=("model", "optimizer")) > 0  # BatchNorm buffers included
    assert torch.equal(with_val["rng"], without["rng"])
    assert not (tmp_path / "snapshot" / "best.pth").exists()


def test_validation_results_best_checkpoint_and_logs(toy, validated):
    out, summary = validated
    last = load(out / "snapshot" / "last.pth")
    history, best = last["val"]["history"], last["val"]["best"]
    assert [r["epoch"] for r in history] == [1, 2, 3] and all(r["images"] == 2 for r in history)
    # each epoch's validation is eval.py's evaluation of that epoch's checkpoint on the same 2 images
    C = resolve(load_experiment(EXP), collect_overrides(pairs=overrides(toy, out, **VAL)))
    results = evaluate_checkpoints(C, epochs="1-3", dataset=validation_dataset(C), verbose=False,
                                   log_file=str(out / "check.log"))
    for record, result in zip(history, results):
        assert result["epoch"] == record["epoch"] and math.isclose(result["miou"], record["miou"], rel_tol=1e-12)
        assert all(a == b or (math.isnan(a) and math.isnan(b)) for a, b in zip(result["iou"], record["iou"]))
    want = max(history, key=lambda r: r["miou"])
    assert best == {"epoch": want["epoch"], "miou": want["miou"]}
    assert_bitwise_equal(load(out / "snapshot" / "best.pth"), load(out / "snapshot" / f"epoch-{want['epoch']}.pth"),
                         keys=("model",))
    assert summary["val"]["last"] == history[-1] and summary["val"]["best"] == best  # the run reports the last
    log = (out / "train.log").read_text()
    for r in history:
        assert f"val epoch {r['epoch']}/3: mIoU={100 * r['miou']:.2f} on 2 images" in log
    assert f"best {100 * best['miou']:.2f} at epoch {best['epoch']}" in log and "IoU background=" in log
    (events,) = (out / "tb").glob("events.*")
    assert b"val/mIoU" in events.read_bytes() and b"val/IoU/background" in events.read_bytes()


def test_best_checkpoint_and_history_survive_a_kill(toy, validated, tmp_path):
    """SIGKILL as step 3 (epoch 3) begins, then --resume: the same history, best.pth and last.pth as the
    uninterrupted run."""
    out, _ = validated
    args = overrides(toy, tmp_path, **VAL, val_every=None)
    killed = run_driver(args, fault="kill-at-step:3")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert [r["epoch"] for r in load(tmp_path / "snapshot" / "last.pth")["val"]["history"]] == [1, 2]
    train_in_process(["--resume"] + args)
    want, got = load(out / "snapshot" / "last.pth"), load(tmp_path / "snapshot" / "last.pth")
    assert assert_bitwise_equal(got, want, keys=("model", "optimizer")) > 0
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in want["val"]["history"]]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in got["val"]["history"]] == strip
    assert got["val"]["best"] == want["val"]["best"]
    assert_bitwise_equal(load(tmp_path / "snapshot" / "best.pth"), load(out / "snapshot" / "best.pth"), keys=("model",))


@pytest.mark.parametrize("pair,fragment", [("val_every=-1", "val_every=-1"), ("val_images=0", "val_images=0"),
                                           ("val_every=1.5", "val_every=1.5")])
def test_bad_validation_setting_is_refused(pair, fragment):
    with pytest.raises(ValueError) as error:
        resolve(load_experiment(EXP), collect_overrides(pairs=[pair]))
    assert fragment in str(error.value)


def test_missing_val_list_is_refused_before_training(toy, tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        train_in_process(overrides(toy, tmp_path, **VAL, val_every=1, val_list=str(tmp_path / "none.txt")))
    assert "val_every=0" in str(error.value) and not (tmp_path / "snapshot").exists()
