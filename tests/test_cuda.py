"""CUDA paths (marker `cuda`; skipped without a GPU, run by bash tools/gpu_check.sh): every method's step in
bf16 and fp16 with finite losses, teacher inference and sliding-window evaluation on the device, the tiny
benchmark's gradient equalities on CUDA."""
import math

import pytest
import torch

import benchmark
import gpu_check
from furnace.evaluate import sliding_probs
from furnace.amp import resolve_amp
from furnace.models import build_segmentor
from furnace.teachers import FrozenTeacher

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def data_root():
    return benchmark.ensure_toy_data(None)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
@pytest.mark.parametrize("method,setting", [("supervised", "published"), ("cps", "published"),
                                            ("mgd", "published"), ("mgd", "fast")])
def test_cuda_step_finite(method, setting, amp, data_root):
    nets = dict(student="mobilenet_v2", deep="resnet18", wide="resnet18")
    row = gpu_check.method_step(method, setting, amp, 64, 4, nets, CUDA, data_root)
    assert row["finite"] and math.isfinite(row["loss"]) and row["peak_memory_mb"] > 0


def test_cuda_amp_auto_and_frozen_teacher():
    assert resolve_amp("auto", CUDA) == "bf16"
    torch.manual_seed(0)
    teacher = build_segmentor("resnet18", 5).eval().requires_grad_(False)
    x = torch.randn(2, 3, 65, 65)
    with torch.no_grad():
        want = teacher(x)
    got, _ = FrozenTeacher(teacher.to(CUDA)).predict(x.to(CUDA))
    assert got.device.type == "cuda" and not got.requires_grad
    assert torch.allclose(got.cpu(), want, rtol=1e-2, atol=1e-2 * float(want.abs().max()))  # TF32 convolutions


def test_cuda_sliding_window_stays_on_device():
    net = build_segmentor("mobilenet_v2", 4).eval().to(CUDA)
    probs = sliding_probs(net, torch.randn(1, 3, 100, 90, device=CUDA), 64)
    assert probs.device.type == "cuda" and probs.shape == (1, 4, 100, 90)
    assert torch.allclose(probs.sum(1), torch.ones(1, 100, 90, device=CUDA), atol=1e-3)


def test_cuda_tiny_benchmark_gradients(tmp_path):
    saved = benchmark.main(["--tiny", "--device", "cuda", "--json", str(tmp_path / "b.json")])
    assert saved["grad_max_rel_diff_train_bn"] < 1e-3  # TF32 convolutions on both sides
    assert saved["flops_per_step"]["published_setting"] == saved["flops_per_step"]["published"]
    assert saved["config"]["amp_auto"]["amp"] == "bf16" and "fast_amp" in saved["steps"]
    assert all(st["peak_memory_mb"] > 0 for st in saved["steps"].values())
