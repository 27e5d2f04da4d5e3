"""The main job, reduced: every stage of the toy pipeline (CPS teachers once, supervised and MGD students for
two seeds) runs through the real experiment scripts for one iteration on tiny data, then evaluates and reports
the students as mean and spread over the seeds it ran."""
import json
import math
import os
import socket
import statistics
import subprocess
import sys

import pytest
import torch

from furnace.config import REPO_ROOT
from furnace.run import cpu_model


def test_toy_pipeline_end_to_end(tmp_path):
    data = tmp_path / "toy"
    subprocess.run([sys.executable, os.path.join(REPO_ROOT, "tools", "make_toy_data.py"), "--out", str(data),
                    "--seed", "3", "--num-train", "24", "--num-val", "3"], check=True, capture_output=True)
    out, img = tmp_path / "runs", tmp_path / "img"
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    cmd = [sys.executable, os.path.join(REPO_ROOT, "tools", "toy_pipeline.py"), "--out", str(out), "--img", str(img),
           "--seeds", "2", "--teacher-jobs", "2",
           f"data_root={data}/pascal_voc", "epochs=1", "iters_per_epoch=1", "crop_size=32", "batch_size=2",
           "eval_crop_size=64", "num_workers=0"]
    # torchrun's default port taken, as by another experiment running on the machine: every stage still starts
    with socket.socket() as busy:
        try:
            busy.bind(("127.0.0.1", 29500))
            busy.listen()
        except OSError:  # already taken by someone else: the same situation
            pass
        run = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    summary = json.loads((img / "toy_results.json").read_text())
    runs = summary["runs"]
    assert [(r["network"], r["method"], r["seed"]) for r in runs] == [
        ("wide_resnet50_2", "cps", 12345), ("resnet101", "cps", 12345), ("resnet18", "supervised", 0),
        ("resnet18", "mgd", 0), ("resnet18", "supervised", 1), ("resnet18", "mgd", 1)]
    for r in runs:  # each run's mIoU is its own eval.json's
        evaluated = json.loads(open(os.path.join(r["folder"], "eval.json")).read())[-1]
        assert r["miou"] == pytest.approx(100 * evaluated["miou"]) and math.isfinite(r["miou"])
    rows = summary["rows"]
    assert [(r["network"], r["method"], r["n"]) for r in rows] == [
        ("wide_resnet50_2", "cps", 1), ("resnet101", "cps", 1), ("resnet18", "supervised", 2), ("resnet18", "mgd", 2)]
    table = (out / "results.md").read_text()
    for row in rows[2:]:  # the students: mean and spread of the seeds this job ran
        per_seed = [r["miou"] for r in runs if r["method"] == row["method"]]
        assert row["miou_last"] == pytest.approx(per_seed)
        assert row["miou_last_mean"] == pytest.approx(statistics.mean(per_seed))
        assert row["miou_last_std"] == pytest.approx(statistics.stdev(per_seed))
        assert f"| {row['miou_last_mean']:.2f} ± {row['miou_last_std']:.2f} |" in table
    assert "MGD - supervised:" in table and "over 2 seeds" in table
    # backbone cost ordering of the paper: WRN-50-2 > ResNet-101 > ResNet-18
    assert rows[0]["backbone_gflops"] > rows[1]["backbone_gflops"] > rows[2]["backbone_gflops"]
    for exp, tag in [("voc8.wresnet50_deeplabv3plus", "cps"), ("voc8.resnet101_deeplabv3plus", "cps"),
                     ("voc8.resnet18_deeplabv3plus", "supervised-seed1"), ("voc8.resnet18_deeplabv3plus", "mgd-seed0")]:
        ckpt = torch.load(out / exp / tag / "snapshot" / "last.pth", map_location="cpu", weights_only=False)
        assert ckpt["epoch"] == 1 and ckpt["method"] == tag.split("-")[0]
        assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    # the MGD student was trained in the published setting (the default): online teachers in train mode
    mgd = torch.load(out / "voc8.resnet18_deeplabv3plus" / "mgd-seed0" / "snapshot" / "last.pth", map_location="cpu",
                     weights_only=False)["config"]
    assert (mgd["setting"], mgd["teacher_labels"], mgd["teacher_bn"]) == ("published", "online", "train")
    assert not (out / "voc8.resnet18_deeplabv3plus" / "mgd-seed0" / "teacher_labels").exists()
    # the two teachers trained side by side, each on half the cores and with its output in its own log;
    # the students one by one with torch's default thread count
    threads = max(1, (os.cpu_count() or 1) // 2)
    for exp in ("voc8.wresnet50_deeplabv3plus", "voc8.resnet101_deeplabv3plus"):
        assert json.loads((out / exp / "cps" / "run.json").read_text())["torch_threads"] == threads
        assert "mIoU" in (out / "logs" / f"{exp}-cps.log").read_text()
    assert "2 teachers side by side" in run.stdout
    student = json.loads((out / "voc8.resnet18_deeplabv3plus" / "mgd-seed0" / "run.json").read_text())
    assert student["torch_threads"] == torch.get_num_threads() and student["cpu"] == cpu_model()
    for name in ("toy_miou_vs_flops.png", "toy_predictions.png"):
        assert (img / name).stat().st_size > 1000

    # a second run finds everything done and only rebuilds the report
    again = subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
    assert again.stdout.count("done earlier") == 6
