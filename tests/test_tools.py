import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import export_onnx
import flops
import gpu_check
import predict
import toy_benchmark
from furnace.data import VOC_PALETTE, normalize
from furnace.evaluate import predict_probs
from furnace.flops import count_flops
from furnace.models import build_segmentor

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A mobilenet_v2 'student' checkpoint (DESIGN.md format) with logits of a trained net's size (~10)."""
    torch.manual_seed(0)
    net = build_segmentor("mobilenet_v2", 6).eval()
    with torch.no_grad():
        net.classifier.weight.mul_(300.0)  # random init gives tiny logits; scale them to exercise the tolerance
        assert net(torch.randn(1, 3, 32, 32)).abs().max() > 3
    path = tmp_path_factory.mktemp("ckpt") / "epoch-3.pth"
    torch.save(dict(model=net.state_dict(), network="mobilenet_v2", num_classes=6, epoch=3,
                    config=dict(dataset="voc", eval_crop_size=48)), path)
    return path, net


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Two images of different sizes: a toy val image if the toy set exists, else random; one smaller than the crop."""
    folder = tmp_path_factory.mktemp("images")
    toy = sorted((ROOT / "DATA/toy/pascal_voc/val/image").glob("*.jpg"))[:1]
    rng = np.random.default_rng(0)
    big = np.asarray(Image.open(toy[0]).convert("RGB")) if toy else rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)
    Image.fromarray(big).save(folder / "a.jpg")
    Image.fromarray(rng.integers(0, 256, (30, 41, 3), dtype=np.uint8)).save(folder / "b.png")
    return folder


def test_flops_table(tmp_path, capsys):
    # the counter's convention: a conv counts 2 x MACs
    conv = torch.nn.Conv2d(3, 8, 3, padding=1)
    assert count_flops(conv, torch.zeros(1, 3, 10, 10)) == 2 * (3 * 9 * 8) * 100
    # counting on meta tensors gives the same number as a real forward
    torch.manual_seed(0)
    real = build_segmentor("mobilenet_v2", 21).eval()
    assert count_flops(real, torch.zeros(1, 3, 64, 64)) == flops.measure("mobilenet_v2", (64, 64))["model_flops"]
    result = flops.main(["--size", "64", "--json", str(tmp_path / "f.json")])
    out = capsys.readouterr().out
    assert "| resnet101 / resnet18 |" in out and "GMACs" in out
    assert json.loads((tmp_path / "f.json").read_text())["ratios"] == result["ratios"]
    assert len(result["ratios"]) == 4 and all(r["backbone_flops"] > 1 for r in result["ratios"])
    nets = result["networks"]
    assert nets["resnet18"]["backbone_params"] < nets["resnet101"]["backbone_params"]
    assert nets["mobilenet_v2"]["backbone_flops"] < nets["resnet18"]["backbone_flops"] < nets["resnet18"]["model_flops"]


def test_export_onnx_matches_pytorch(checkpoint, images, tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime")
    path, net = checkpoint
    onnx_path = tmp_path / "student.onnx"
    assert export_onnx.main(["-p", str(path), "-o", str(onnx_path), "--images", str(images / "a.jpg"),
                             "--sizes", "40x56"]) == 0
    assert "largest difference" in capsys.readouterr().out
    # independent check at two sizes through the dynamic axes
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    for x in export_onnx.load_images([images], 2, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)):
        ref = net(x).detach().numpy()
        out = session.run(None, {"image": x.numpy()})[0]
        assert out.shape == ref.shape
        assert np.abs(ref).max() > 1 and np.abs(out - ref).max() <= 1e-4


def test_predict_writes_masks_and_overlays(checkpoint, images, tmp_path):
    path, net = checkpoint
    out = tmp_path / "out"
    written = predict.main(["-p", str(path), "-i", str(images), "-o", str(out), "--device", "cpu"])
    assert sorted(p.name for p in written) == ["a.png", "a_overlay.jpg", "b.png", "b_overlay.jpg"]
    for name in ("a.jpg", "b.png"):
        image = np.asarray(Image.open(images / name).convert("RGB"))
        mask = Image.open(out / f"{Path(name).stem}.png")
        assert mask.mode == "P" and mask.size == (image.shape[1], image.shape[0])
        assert np.array_equal(np.array(mask.getpalette(), dtype=np.uint8).reshape(-1, 3)[:256], VOC_PALETTE)
        x = torch.from_numpy(normalize(image)).permute(2, 0, 1)[None]
        expected = predict_probs(net, x, "sliding", 48).argmax(1)[0].numpy()  # crop 48 from the checkpoint config
        assert np.array_equal(np.array(mask), expected)
        strip = Image.open(out / f"{Path(name).stem}_overlay.jpg")
        assert strip.size == (3 * image.shape[1] + 2 * 4, image.shape[0])


def test_toy_benchmark_summary_and_teachers_check(tmp_path, capsys):
    """Mean and sample standard deviation per configuration over seeds, in stage order; --teachers refuses a
    folder without the two teacher checkpoints, naming the missing file."""
    row = dict(network="resnet18", method="mgd", backbone_gflops=34.3)
    runs = {0: [dict(row, label="a", miou=60.0), dict(row, label="b", miou=70.0)],
            1: [dict(row, label="a", miou=64.0), dict(row, label="b", miou=71.0)],
            2: [dict(row, label="a", miou=62.0), dict(row, label="b", miou=72.0)]}
    rows = toy_benchmark.summarise(runs)
    assert [r["label"] for r in rows] == ["a", "b"]
    assert rows[0]["miou_mean"] == pytest.approx(62.0) and rows[0]["miou_std"] == pytest.approx(2.0)
    assert rows[1]["miou_per_seed"] == [70.0, 71.0, 72.0] and rows[1]["miou_std"] == pytest.approx(1.0)
    table = toy_benchmark.format_summary(rows, [0, 1, 2], "teachers from x, shared")
    assert "| a | 34.3 | 62.00 | 2.00 | 60.0, 64.0, 62.0 |" in table and "(teachers from x, shared)" in table
    with pytest.raises(SystemExit):
        toy_benchmark.main(["--teachers", str(tmp_path), "--out", str(tmp_path / "out")])
    assert "voc8.resnet101_deeplabv3plus/cps/snapshot/last.pth" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        toy_benchmark.main(["--only", "mgd,mgd-fast,nope", "--out", str(tmp_path / "out")])
    assert "no stage tagged nope" in capsys.readouterr().err
    assert {"supervised", "mgd", "mgd-fast", "mgd-fast-pergpu", "mgd-no-student-bn-calls", "mgd-channels-last"} <= {
        s.tag for s in toy_benchmark.benchmark_stages()}


def test_gpu_check_cpu_smoke(tmp_path):
    """tools/gpu_check.py (what tools/gpu_check.sh runs on a GPU) end to end on CPU at its tiny size, without the
    CUDA tests and the benchmark (tests/test_benchmark.py runs that): every method's step finite, one table."""
    R = gpu_check.main(["--device", "cpu", "--tiny", "--skip-tests", "--skip-benchmark", "--workers", "0",
                        "--json", str(tmp_path / "g.json")])
    assert [(s["method"], s["setting"]) for s in R["steps"]] == [("supervised", "published"), ("cps", "published"),
                                                                 ("mgd", "published"), ("mgd", "fast")]
    assert all(s["finite"] for s in R["steps"])
    assert R["loader"][0]["images_per_second"] > 0
    assert "train step mgd" in gpu_check.table(R) and json.loads((tmp_path / "g.json").read_text())["steps"]
    assert (tmp_path / "g.md").read_text() == gpu_check.table(R) + "\n"


def test_gpu_check_stage_failure_keeps_the_others(tmp_path, monkeypatch):
    """A stage that raises (here the loader) is a row of its error in the table and in the saved JSON; the stages
    after it still run, and the file saved after every stage holds the figures measured before it."""
    saved_steps = []

    def broken_loader(*args, **kwargs):
        saved_steps.append(len(json.loads((tmp_path / "g.json").read_text())["steps"]))
        raise OSError("no shared memory for the workers")

    monkeypatch.setattr(gpu_check, "loader_rates", broken_loader)
    monkeypatch.setattr(gpu_check, "method_step", lambda method, setting, amp, *a: dict(
        method=method, setting=setting, amp=amp, loss=1.0, finite=True, seconds=0.1, peak_memory_mb=None))
    R = gpu_check.main(["--device", "cpu", "--tiny", "--skip-tests", "--skip-benchmark", "--json",
                        str(tmp_path / "g.json")])
    assert saved_steps == [4] and "loader" not in R and R["eval"]["windows"] == 9
    assert R["errors"] == {"loader": "OSError: no shared memory for the workers"}
    assert json.loads((tmp_path / "g.json").read_text())["errors"] == R["errors"]
    assert "| loader | - | ERROR: OSError: no shared memory for the workers |" in (tmp_path / "g.md").read_text()


def test_gpu_check_script_saves_json_and_table(tmp_path):
    """tools/gpu_check.sh with this machine's python (all packages present, so no wheels are installed) on CPU at
    the tiny size: exit 0, the JSON and the table in GPU_CHECK_DIR."""
    env = dict(os.environ, PYTHON=sys.executable, GPU_CHECK_DIR=str(tmp_path))
    run = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), "--device", "cpu", "--tiny", "--skip-tests",
                          "--skip-benchmark", "--workers", "0"], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "installing" not in run.stdout
    R = json.loads((tmp_path / "gpu_check.json").read_text())
    assert len(R["steps"]) == 4 and "errors" not in R
    assert (tmp_path / "gpu_check.md").read_text().count("| train step ") == 4
