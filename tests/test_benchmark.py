"""tools/benchmark.py in its CI size, and the teacher inference path it measures (furnace.methods.teacher_predict).

Timings are never asserted (the machine may be loaded); gradients, FLOP counts, keys and agreement are."""
import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from easydict import EasyDict

from furnace.config import new_config, resolve
from furnace.methods import _FOLDED, fold_batchnorm, folded_teacher, mgd_step, teacher_predict
from furnace.models import build_segmentor
from furnace.quantize import int8_engine, int8_supported
from trainkit import load_tool

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def benchmark():
    return load_tool("benchmark")


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    subprocess.run([sys.executable, str(ROOT / "tools" / "make_toy_data.py"), "--out", str(out), "--num-train", "24",
                    "--num-val", "2", "--num-city-train", "2", "--num-city-val", "2"], check=True,
                   stdout=subprocess.DEVNULL)
    return out / "pascal_voc"


def random_bn(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters, so that folding them changes the weights."""
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)
    return net


def test_tiny_benchmark_run(benchmark, toy_root, tmp_path, capsys):
    out = tmp_path / "bench.json"
    result = benchmark.main(["--tiny", "--data-root", str(toy_root), "--json", str(out)])
    saved = json.loads(out.read_text())
    for key in ("speedup_vs_published", "speedup_same_precision", "utilization", "grad_max_rel_diff",
                "flops_per_step", "peak_matmul", "teacher_inference", "steps", "loader", "eval", "env"):
        assert key in saved, key
    # the published schedule and ours give the student the same gradient (teachers in the same BN mode)
    assert saved["grad_max_rel_diff"] < 1e-4
    check = saved["gradient_check"]
    assert check["grad_max_abs"] > 0
    assert check["loss_terms_max_abs_diff"] < 1e-4
    assert set(check["loss_terms_published"]) - set(check["loss_terms_ours"]) == {"reverse"}
    # the published setting computes the published schedule's update with train-mode BatchNorm too: the same
    # student gradients and BatchNorm running statistics (separate calls in the same order), no reverse terms
    assert "speedup_published_setting" in saved and saved["speedup_published_setting"] > 0
    assert saved["grad_max_rel_diff_train_bn"] < 1e-5
    train_bn = saved["gradient_check_train_bn"]
    assert train_bn["grad_max_abs"] > 0 and train_bn["bn_buffers_max_rel_diff"] < 1e-6
    assert set(train_bn["loss_terms_published"]) - set(train_bn["loss_terms_published_setting"]) == {"reverse"}
    setting = saved["steps"]["published_setting"]
    assert (setting["teacher_bn"], setting["teacher_labels"], setting["precision"]) == ("train", "online", "off")
    assert saved["published_setting_amp_auto"]["amp"] in ("off", "bf16")
    assert ("published_setting_amp" in saved["steps"]) == (saved["published_setting_amp_auto"]["amp"] != "off")
    # FLOPs of the three schedules: the published setting makes every network call of the published schedule
    # (its only saving, the reverse terms, has no matrix products); the published step does exactly two extra
    # student forwards (u0 and u1, no gradient) over ours online
    flops = load_tool("flops")
    with torch.device("meta"):
        student = build_segmentor("mobilenet_v2", 21).train()
        extra = flops.count_flops(student, torch.empty(2 * 2, 3, 32, 32))
    assert saved["flops_per_step"]["published"] - saved["flops_per_step"]["ours_online"] == extra
    assert saved["flops_per_step"]["published_setting"] == saved["flops_per_step"]["published"]
    # opt-in student_bn_calls=False: the same two student forwards fewer
    assert saved["flops_per_step"]["published_setting"] - saved["flops_per_step"]["published_setting_lean"] == extra
    assert saved["speedup_published_setting_lean"] > 0
    assert saved["flop_bound_published_setting"] == 1.0 < saved["flop_bound_published_setting_lean"]
    # ours (offline teachers, the default): the same student work, teachers on u_m only (n_u images, not 3 n_u + n_l)
    teacher_saved = sum(saved["flops_teachers_per_step"].values()) - sum(saved["flops_teachers_per_step_offline"].values())
    assert saved["flops_per_step"]["ours_online"] - saved["flops_per_step"]["ours"] == teacher_saved > 0
    assert sum(saved["flops_teachers_per_step"].values()) == 4 * sum(saved["flops_teachers_per_step_offline"].values())
    offline = saved["offline_teachers"]
    assert offline["images"] == 8 + 3 and offline["seconds"] > 0  # 24 toy images: 3 labeled, first 8 unlabeled
    assert set(offline["agreement_with_online"]) == {"deep", "wide"}
    assert all(0 <= v <= 1 for v in offline["agreement_with_online"].values())
    assert saved["speedup_online_vs_published"] > 0 and offline["speedup_vs_online"] > 0
    assert saved["steps"]["ours"]["teacher_labels"] == "offline" and saved["steps"]["ours_online"]["teacher_labels"] == "online"
    for name in ("ours", "published", "ours_online", "published_setting"):
        sec = saved["steps"][name]["seconds"]
        assert set(sec) == {"data", "teacher", "student_forward", "backward", "optimizer", "step"}
        assert all(v >= 0 for v in sec.values()) and sec["teacher"] > 0
        assert math.isclose(sec["step"], saved["steps"][name]["all_step_seconds"][0])
        assert saved["steps"][name]["images_per_second"] > 0
    assert saved["speedup_vs_published"] > 0 and saved["speedup_same_precision"] > 0 and saved["utilization"] > 0
    assert saved["ours_choice"]["precision"] in ("fp32", "bf16")
    # low-precision teacher predictions stay close to fp32 (random nets, so only loosely)
    for role in ("deep", "wide"):
        variants = saved["teacher_inference"][role]
        for name in ("fp32 BN folded, NCHW", "fp32 BN folded, channels_last",
                     "teacher_predict fp32 (comparison for low precision)"):
            assert variants[name]["argmax_agreement"] > 0.999, name
        assert variants["teacher_predict bf16 autocast"]["argmax_agreement"] > 0.9
    # int8 teacher copies: made and checked as the trainer does, probed, and chosen only where they pass
    if int8_supported(torch.device("cpu")):
        assert saved["peak_matmul"]["int8"]["engine"] == int8_engine()  # the int8 teachers' engine
        assert set(saved["int8_teachers"]) == {"deep", "wide"}
        for role, info in saved["int8_teachers"].items():
            assert 0 <= info["check_agreement"] <= 1
            assert saved["teacher_inference"][role][benchmark.INT8_VARIANT]["argmax_agreement"] > 0.8
    choice = saved["ours_teacher_precision"]["precision"]
    assert set(choice) == {"deep", "wide"} and set(choice.values()) <= {"int8", "fp32", "bf16"}
    for role, p in choice.items():
        if p == "int8":
            assert saved["int8_teachers"][role]["check_agreement"] >= new_config("voc", __file__).teacher_int8_min_agreement
    assert saved["steps"]["ours"]["teacher_precision"] == choice
    assert saved["steps"]["published"]["teacher_precision"] == {"deep": "fp32", "wide": "fp32"}
    if "int8" in choice.values() or saved["ours_choice"]["precision"] != "fp32":
        assert saved["steps"]["ours_fp32"]["teacher_precision"] == {"deep": "fp32", "wide": "fp32"}
    for name, st in saved["steps"].items():
        assert 0 < st["utilization_by_phase"]["step"] == pytest.approx(st["ideal_seconds"] / st["seconds"]["step"])
    assert set(saved["student_memory_format"]) == {"NCHW", "channels_last"}
    assert saved["eval"]["probs_on_device"] and saved["eval"]["windows"] == 9
    assert saved["loader"]["images_per_second"] > 0
    assert result["grad_max_rel_diff"] == saved["grad_max_rel_diff"]
    assert "speedup_vs_published" in capsys.readouterr().out


def test_published_step_same_gradient_as_ours(benchmark):
    """Direct check on hand-made data, every loss term on, student in eval mode."""
    torch.manual_seed(0)
    C = EasyDict(dict(new_config("voc", __file__), num_classes=5, amp="off", channels_last=False,
                      teacher_labels="online"))
    student = build_segmentor("mobilenet_v2", 5).eval()
    teachers = {r: random_bn(build_segmentor("resnet18", 5), i).eval().requires_grad_(False)
                for i, r in enumerate(("deep", "wide"))}
    g = torch.Generator().manual_seed(1)
    batch = dict(x_l=torch.randn(2, 3, 40, 40, generator=g), u0=torch.randn(3, 3, 40, 40, generator=g),
                 u1=torch.randn(3, 3, 40, 40, generator=g), y_l=torch.randint(0, 5, (2, 40, 40), generator=g),
                 mask=(torch.rand(3, 1, 40, 40, generator=g) > 0.5).float())
    batch["y_l"][:, :4] = 255
    grads = []
    for step in (mgd_step, benchmark.published_mgd_step):
        student.zero_grad()
        loss, terms = step(student, teachers, batch, C, torch.device("cpu"))
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in student.parameters()]))
    assert (grads[0] - grads[1]).abs().max() <= 1e-5 * grads[0].abs().max()
    assert terms["reverse"] > 0  # the published reverse terms are there, and carry no gradient


def test_published_setting_same_update_as_published_schedule_in_train_bn(benchmark):
    """Train-mode BatchNorm for student and teachers, as both train: the published setting's step gives the
    published schedule's student gradients and BatchNorm running statistics (one GPU's batch of 2 images)."""
    torch.manual_seed(0)
    C = resolve(EasyDict(dict(new_config("voc", __file__), num_classes=5, class_names=list("abcde"),
                              setting="published")))
    assert (C.teacher_bn, C.network_calls, C.loss_scope, C.amp) == ("train", "separate", "per_gpu", "off")
    student = build_segmentor("mobilenet_v2", 5).train()
    teachers = {r: random_bn(build_segmentor("resnet18", 5), i).train().requires_grad_(False)
                for i, r in enumerate(("deep", "wide"))}
    g = torch.Generator().manual_seed(1)
    batch = dict(x_l=torch.randn(2, 3, 40, 40, generator=g), u0=torch.randn(2, 3, 40, 40, generator=g),
                 u1=torch.randn(2, 3, 40, 40, generator=g), y_l=torch.randint(0, 5, (2, 40, 40), generator=g),
                 mask=(torch.rand(2, 1, 40, 40, generator=g) > 0.5).float())
    batch["y_l"][:, :4] = 255
    check = benchmark.gradient_check_train_bn(student, teachers, batch, C, torch.device("cpu"))
    assert check["grad_max_abs"] > 0
    assert check["grad_max_rel_diff"] <= 1e-6 and check["bn_buffers_max_rel_diff"] <= 1e-6
    assert check["loss_terms_max_abs_diff"] <= 1e-5
    assert check["loss_terms_published"]["reverse"] > 0  # computed by the published step only, no gradient
    # train-mode teachers keep no autograd state either
    logits, feature = teacher_predict(teachers["wide"], batch["u0"], "off", True)
    assert logits.grad_fn is None and feature.grad_fn is None and not logits.requires_grad


def test_student_bn_calls_off_same_gradients_other_running_statistics():
    """student_bn_calls=False (opt-in) skips the student's no-grad calls on u0 and u1: the gradients stay, the
    student's BatchNorm running statistics (which only those calls would have moved further) differ."""
    torch.manual_seed(0)
    C = resolve(EasyDict(dict(new_config("voc", __file__), num_classes=4, class_names=list("abcd"),
                              setting="published")))
    assert C.student_bn_calls is True  # the published default
    student = build_segmentor("mobilenet_v2", 4).train()
    teachers = {r: build_segmentor("resnet18", 4).train().requires_grad_(False) for r in ("deep", "wide")}
    g = torch.Generator().manual_seed(2)
    batch = dict(x_l=torch.randn(2, 3, 33, 33, generator=g), u0=torch.randn(2, 3, 33, 33, generator=g),
                 u1=torch.randn(2, 3, 33, 33, generator=g), y_l=torch.randint(0, 4, (2, 33, 33), generator=g),
                 mask=(torch.rand(2, 1, 33, 33, generator=g) > 0.5).float())
    grads, buffers = [], []
    for calls in (True, False):
        net = copy.deepcopy(student)
        loss, _ = mgd_step(net, teachers, batch, EasyDict(dict(C, student_bn_calls=calls)), torch.device("cpu"))
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
        buffers.append(torch.cat([b.flatten().float() for b in net.buffers()]))
    assert (grads[0] - grads[1]).abs().max() <= 1e-6 * grads[0].abs().max()
    assert not torch.allclose(buffers[0], buffers[1])


def test_teacher_predict_folds_batchnorm_exactly():
    torch.manual_seed(0)
    teacher = random_bn(build_segmentor("resnet18", 7)).eval().requires_grad_(False)
    folded = fold_batchnorm(teacher)
    assert folded is not None
    n_bn = [sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules()) for net in (teacher, folded)]
    assert n_bn[1] <= 2 < n_bn[0]  # only ASPP's BNs after a concatenation / a sum stay
    x = torch.randn(3, 3, 45, 61)  # another size than the check input of fold_batchnorm
    with torch.no_grad():
        want = teacher(x, return_features=True)
    # the folded copies themselves, in both memory formats
    for channels_last in (False, True):
        got = folded_teacher(teacher, channels_last)(x, True)
        for key in ("logits", "decoder"):
            assert torch.allclose(got[key], want[key], rtol=1e-4, atol=1e-4 * want[key].abs().max())
    # teacher_predict (which picks the format: NHWC on CPU)
    for channels_last in (False, True):
        logits, decoder = teacher_predict(teacher, x, "off", True, channels_last=channels_last)
        assert logits.shape == (3, 7, 45, 61) and decoder.shape == want["decoder"].shape
        assert torch.allclose(logits, want["logits"], rtol=1e-4, atol=1e-4 * want["logits"].abs().max())
        assert torch.allclose(decoder, want["decoder"], rtol=1e-4, atol=1e-4 * want["decoder"].abs().max())
        assert (logits.argmax(1) == want["logits"].argmax(1)).float().mean() > 0.999
        assert not logits.requires_grad
    logits, nothing = teacher_predict(teacher, x, "off", False)
    assert nothing is None and logits.shape == (3, 7, 45, 61)


def test_teacher_predict_follows_weight_changes_and_train_mode():
    torch.manual_seed(0)
    teacher = random_bn(build_segmentor("mobilenet_v2", 4)).eval().requires_grad_(False)
    x = torch.randn(2, 3, 33, 33)
    first = teacher_predict(teacher, x, "off", False)[0]
    (built_key, built), = _FOLDED[teacher].values()  # one copy, in the format teacher_predict chose
    assert built is not None
    teacher_predict(teacher, x, "off", False)
    assert next(iter(_FOLDED[teacher].values()))[1] is built  # cached
    # new weights (load_state_dict copies in place): the folded copy must be rebuilt
    other = random_bn(build_segmentor("mobilenet_v2", 4), seed=5)
    teacher.load_state_dict(other.state_dict())
    second = teacher_predict(teacher, x, "off", False)[0]
    assert next(iter(_FOLDED[teacher].values()))[1] is not built
    with torch.no_grad():
        assert torch.allclose(second, other.eval()(x), atol=1e-4 * second.abs().max())
    assert not torch.allclose(first, second)
    # train-mode BN (teacher_bn='train') uses batch statistics: never folded, same as calling the teacher
    teacher.train()
    ref = copy.deepcopy(teacher)
    got = teacher_predict(teacher, x, "off", False)[0]
    with torch.no_grad():
        assert torch.allclose(got, ref(x), atol=1e-5 * got.abs().max())
