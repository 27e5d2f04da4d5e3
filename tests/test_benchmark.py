"""tools/benchmark.py in its CI size, and tools/published_step.py, the published schedule it times.

Timings are never asserted (the machine may be loaded); gradients, FLOP counts and keys are."""
import contextlib
import copy
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from easydict import EasyDict
from torch.utils.flop_counter import FlopCounterMode

import benchmark
import gpu_check
from furnace.config import new_config, resolve
from furnace.flops import count_flops
from furnace.losses import content_aware_loss
from furnace.methods.mgd import mgd_step
from furnace.models import build_segmentor
from furnace.quantize import int8_supported
from furnace.run import cpu_model
from furnace.teachers import FrozenTeacher
from published_step import published_mgd_step
from trainkit import random_bn

ROOT = Path(__file__).resolve().parents[1]

CPU = torch.device("cpu")


def config(setting: str, num_classes: int, **values) -> EasyDict:
    C = EasyDict(dict(new_config("voc", __file__), num_classes=num_classes,
                      class_names=[f"c{i}" for i in range(num_classes)], setting=setting, **values))
    return resolve(C)


def hand_batch(n_l: int, n_u: int, side: int, classes: int, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    batch = dict(x_l=torch.randn(n_l, 3, side, side, generator=g), u0=torch.randn(n_u, 3, side, side, generator=g),
                 u1=torch.randn(n_u, 3, side, side, generator=g),
                 y_l=torch.randint(0, classes, (n_l, side, side), generator=g),
                 mask=(torch.rand(n_u, 1, side, side, generator=g) > 0.5).float())
    batch["y_l"][:, :4] = 255
    return batch


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """One --tiny run (the CI configuration) on a 24-image toy set: (returned result, saved JSON, printed text).
    int8 teachers forced where the CPU has the kernels (random teachers seldom pass the agreement test): the
    fast setting's teachers only."""
    out = tmp_path_factory.mktemp("bench")
    subprocess.run([sys.executable, str(ROOT / "tools" / "make_toy_data.py"), "--out", str(out), "--num-train", "24",
                    "--num-val", "2", "--num-city-train", "2", "--num-city-val", "2"], check=True,
                   stdout=subprocess.DEVNULL)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = benchmark.main(["--tiny", "--data-root", str(out / "pascal_voc"), "--json", str(out / "b.json")]
                                + (["--teacher-precision", "int8"] if int8_supported(CPU) else []))
    print(printed.getvalue())
    return result, json.loads((out / "b.json").read_text()), printed.getvalue()


def finite_numbers(x) -> bool:
    if isinstance(x, dict):
        return all(finite_numbers(v) for v in x.values())
    if isinstance(x, list):
        return all(finite_numbers(v) for v in x)
    return not isinstance(x, float) or math.isfinite(x)


def test_tiny_keys_and_values(tiny):
    result, saved, printed = tiny
    for key in ("speedup_published_setting", "grad_max_rel_diff_train_bn", "speedup_vs_published",
                "flops_per_step", "steps", "utilization", "peak_matmul", "config", "env", "total_seconds",
                # the keys of the benchmark's earlier versions
                "speedup_same_precision", "speedup_online_vs_published", "grad_max_rel_diff", "gradient_check",
                "utilization_published", "flops_teachers_per_step", "flops_teachers_per_step_offline",
                "int8_teachers", "ours_teacher_precision", "ours_choice", "offline_teachers", "teacher_inference",
                "teacher_majority_class_share", "student_memory_format", "loader", "eval"):
        assert key in saved, key
        assert finite_numbers(saved[key]), key
    assert saved["grad_max_rel_diff_train_bn"] == result["grad_max_rel_diff_train_bn"]
    amp = saved["config"]["amp_auto"]["amp"]
    names = {"published", "published_setting", "fast", "fast_online"}
    assert set(saved["steps"]) == names | ({f"{n}_amp" for n in names} if amp != "off" else set())
    for name, st in saved["steps"].items():
        sec = st["seconds"]
        assert set(sec) == {"data", "teacher", "student_forward", "backward", "optimizer", "step"}
        assert all(v >= 0 for v in sec.values()) and sec["teacher"] > 0 and sec["backward"] > 0
        assert sec["step"] == pytest.approx(sum(v for k, v in sec.items() if k != "step"))
        assert 0 < st["utilization"]["step"] and st["utilization"]["data"] == st["utilization"]["optimizer"] == 0
        assert saved["speedup"][name] > 0
    assert saved["speedup_published_setting"] == saved["speedup"]["published_setting"]
    bound = saved["published_setting_bound"]
    at_peak = saved["flops_per_step"]["published_setting"] / (saved["peak_matmul"]["fp32"]["gflops"] * 1e9)
    assert bound["seconds_at_peak"] == pytest.approx(at_peak)
    assert bound["max_speedup"] == pytest.approx(saved["steps"]["published"]["seconds"]["step"] / at_peak)
    assert bound["utilization_for_target"] == pytest.approx(1.5 / bound["max_speedup"])
    assert "published setting at the fp32 peak" in printed
    assert saved["env"]["cpu"] == cpu_model() and f"# MGD step benchmark on {cpu_model()} (" in printed
    fast = saved["steps"]["fast"]
    assert (fast["teacher_bn"], fast["teacher_labels"], fast["network_calls"]) == ("eval", "offline", "joint")
    for name in ("published", "published_setting"):
        st = saved["steps"][name]
        assert (st["teacher_bn"], st["teacher_labels"], st["precision"]) == ("train", "online", "fp32")
        assert st["teacher_precision"] == {"deep": "fp32", "wide": "fp32"}  # train-mode BN: no int8
    if int8_supported(CPU):
        assert fast["teacher_precision"] == {"deep": "int8", "wide": "int8"}
    t = {name: st["seconds"]["step"] for name, st in saved["steps"].items()}
    assert saved["speedup_same_precision"] == pytest.approx(t["published"] / t["fast"])
    online = "fast_online_amp" if amp != "off" else "fast_online"
    assert saved["speedup_online_vs_published"] == pytest.approx(t["published"] / t[online])
    assert saved["steps"]["fast_online"]["teacher_labels"] == "online"
    assert saved["utilization_published"] == saved["steps"]["published"]["utilization"]["step"]
    assert saved["flops_teachers_per_step"] == saved["flops_by_phase"]["fast_online"]["teacher"]
    assert saved["flops_teachers_per_step_offline"] == saved["flops_by_phase"]["fast"]["teacher"]
    assert saved["offline_teachers"]["speedup_vs_online"] == pytest.approx(t["fast_online"] / t["fast"])
    assert saved["ours_teacher_precision"]["precision"] == fast["teacher_precision"]
    for role, forms in saved["teacher_inference"].items():
        assert set(forms) - {"int8"} == {"train_bn_fp32", "eval_fp32", "eval_folded_fp32"}
        assert forms["eval_fp32"]["argmax_agreement"] == 1.0 and forms["eval_folded_fp32"]["argmax_agreement"] > 0.99
        assert all(v["seconds_per_image"] > 0 for v in forms.values())
        assert ("int8" in forms) == saved["int8_teachers"].get(role, {}).get("kept", False)
    assert 0 < min(saved["teacher_majority_class_share"].values()) <= 1
    assert saved["loader"]["images_per_second"] > 0 and saved["eval"]["batched_images_per_second"] > 0
    assert saved["peak_matmul"]["fp32"]["gflops"] > 0 and saved["utilization"] > 0
    assert "speedup_vs_published" in printed and "| published_setting |" in printed


def test_gpu_check_table_reads_the_benchmark(tiny):
    """tools/gpu_check.py's table holds one row per benchmark schedule and the ratios row (CPU CI skips the
    benchmark stage of gpu_check: its table is checked here on the tiny run)."""
    _, saved, _ = tiny
    text = gpu_check.table(dict(config=dict(crop=32, batch=2, networks={}), device_name="CPU", steps=[],
                                benchmark=saved))
    assert all(f"| benchmark {name} |" in text for name in saved["steps"])
    assert (f"published / published setting {saved['speedup_published_setting']:.2f}x (at most "
            f"{saved['published_setting_bound']['max_speedup']:.2f}x at the fp32 peak)") in text


def test_tiny_gradient_equality_train_bn(tiny):
    """The published setting gives the student the published schedule's gradients and BatchNorm running
    statistics, student and teachers in train-mode BatchNorm (same calls in the same order: exact up to 1e-6)."""
    _, saved, _ = tiny
    check = saved["gradient_check_train_bn"]
    assert check["grad_max_abs"] > 0
    assert saved["grad_max_rel_diff_train_bn"] <= 1e-6 and check["bn_buffers_max_rel_diff"] <= 1e-6


def test_tiny_flop_accounting(tiny):
    """Each schedule's FLOPs are the sum of its network calls, each counted on its own (meta tensors):
    published: each teacher on u0, u1, u_m and x_l; the student forward on u0, u1 (no gradient), u_m and x_l.
    fast: each teacher on u_m only (offline labels); the student on x_l and u_m in one call. Same backward."""
    _, saved, _ = tiny
    cfg = saved["config"]
    n, crop, nets = cfg["batch_labeled"], cfg["crop"], cfg["networks"]
    with torch.device("meta"):
        x = torch.empty(n, 3, crop, crop)
        teacher = sum(count_flops(build_segmentor(nets[r], 21).eval(), x) for r in ("deep", "wide"))
        student_net = build_segmentor(nets["student"], 21).train()
        student = count_flops(student_net, x)
        feature = student_net(x, return_features=True)["decoder"]
    grid = new_config("voc", __file__).region_grid
    with FlopCounterMode(display=False) as counter:  # the losses' own products: region-level similarities
        content_aware_loss(feature, feature, grid)
    losses = counter.get_total_flops()
    by_phase = saved["flops_by_phase"]
    pub, setting, fast = by_phase["published"], by_phase["published_setting"], by_phase["fast"]
    online = by_phase["fast_online"]
    assert setting == pub  # the published setting makes every network call of the published schedule
    assert pub["teacher"] == 4 * teacher and fast["teacher"] == teacher > 0
    assert online["teacher"] == 4 * teacher and online["student_forward"] == fast["student_forward"]
    assert fast["student_forward"] == 2 * student + losses and losses > 0
    assert pub["student_forward"] == 4 * student + losses
    assert pub["backward"] == fast["backward"] > 0
    for name, st in saved["steps"].items():
        kind = name.removesuffix("_amp")
        assert saved["flops_per_step"][name] == by_phase[kind]["step"] == sum(
            v for k, v in by_phase[kind].items() if k != "step")


def test_published_setting_same_update_as_published_schedule_in_train_bn():
    """Hand-made data, one GPU's batch of 2 images, student and teachers in train-mode BatchNorm."""
    torch.manual_seed(0)
    C = config("published", 5)
    assert (C.teacher_bn, C.network_calls, C.loss_scope, C.amp) == ("train", "separate", "per_gpu", "off")
    student = build_segmentor("mobilenet_v2", 5)
    networks = {r: random_bn(build_segmentor("resnet18", 5), i).requires_grad_(False)
                for i, r in enumerate(("deep", "wide"))}
    batch = hand_batch(2, 2, 40, 5)
    check = benchmark.gradient_check_train_bn(student, networks, batch, C, CPU)
    assert check["grad_max_abs"] > 0
    assert check["grad_max_rel_diff"] <= 1e-6 and check["bn_buffers_max_rel_diff"] <= 1e-6
    # the published reverse terms are computed there, and carry no gradient
    _, terms = published_mgd_step(copy.deepcopy(student).train(), {r: n.train() for r, n in networks.items()},
                                  batch, C)
    assert terms["reverse"] > 0


def test_published_step_same_gradient_as_fast_online_in_eval_bn():
    """The fast setting's step (joint calls) handed online teachers gives the published schedule's gradients
    when BatchNorm uses fixed statistics (student and teachers in eval mode): the call order only matters to
    train-mode BatchNorm. Teachers unfolded, so both see the same logits."""
    torch.manual_seed(0)
    C = config("fast", 5, teacher_labels="online", amp="off")
    student = build_segmentor("mobilenet_v2", 5).eval()
    networks = {r: random_bn(build_segmentor("resnet18", 5), i).eval().requires_grad_(False)
                for i, r in enumerate(("deep", "wide"))}
    check = benchmark.gradient_check_eval_bn(student, networks, hand_batch(2, 3, 40, 5), C, CPU)
    assert check["grad_max_abs"] > 0 and check["grad_max_rel_diff"] <= 1e-5


def test_student_bn_calls_off_same_gradients_other_running_statistics():
    """student_bn_calls=False (opt-in) skips the student's no-grad calls on u0 and u1: the gradients stay, the
    student's BatchNorm running statistics (which only those calls would have moved further) differ."""
    torch.manual_seed(0)
    C = config("published", 4)
    assert C.student_bn_calls is True  # the published default
    student = build_segmentor("mobilenet_v2", 4).train()
    teachers = {r: FrozenTeacher(build_segmentor("resnet18", 4).train().requires_grad_(False)) for r in ("deep", "wide")}
    batch = hand_batch(2, 2, 33, 4, seed=2)
    grads, buffers = [], []
    for calls in (True, False):
        net = copy.deepcopy(student)
        loss, _ = mgd_step(net, teachers, batch, None, EasyDict(dict(C, student_bn_calls=calls)), CPU)
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
        buffers.append(torch.cat([b.flatten().float() for b in net.buffers()]))
    assert (grads[0] - grads[1]).abs().max() <= 1e-6 * grads[0].abs().max()
    assert not torch.allclose(buffers[0], buffers[1])


def test_channels_last_option_converts_the_projects_schedules_only():
    """--channels-last: the published setting's and fast setting's student and teacher networks run channels-last,
    as channels_last=True trains them; the published schedule keeps NCHW."""
    args = benchmark.parse_args(["--tiny", "--channels-last"])
    networks = {r: build_segmentor("resnet18", 3).eval().requires_grad_(False) for r in ("deep", "wide")}
    for kind in ("published", "published_setting", "fast"):
        C = benchmark.make_config(args, str(ROOT), kind, "off")
        assert C.channels_last == (kind != "published")
        s = benchmark.Schedule(kind, kind, C, build_segmentor("mobilenet_v2", 3),
                               benchmark.make_teachers(kind, C, networks, {}), CPU)
        convs = [m.weight for m in s.student.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
        teacher = s.teachers["deep"].teacher
        net = teacher if kind == "published" else teacher.network
        convs += [m.weight for m in net.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
        assert all(w.is_contiguous(memory_format=torch.channels_last) for w in convs) == C.channels_last
