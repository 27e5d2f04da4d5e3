"""Int8 teachers (furnace/quantize.py) and the precision settings: what the quantized copy computes, how the
trainer decides to use it, and that bad settings are refused by name."""
import logging

import pytest
import torch
import torch.nn as nn
from easydict import EasyDict

from furnace.config import collect_overrides, load_experiment, resolve
from furnace.amp import resolve_amp
from furnace.data import IGNORE_INDEX
from furnace.distributed import DistInfo
from furnace.engine import build_datasets
from furnace.models import build_segmentor
from furnace.quantize import argmax_agreement, int8_supported, quantize_teacher, quantized_engine
from furnace.teachers import FrozenTeacher, load_teachers, precision_reason
from trainkit import EXP, NUM_CLASSES, make_teacher, overrides, train_in_process

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not int8_supported(torch.device("cpu")), reason="no int8 CPU kernels")]


@pytest.fixture(scope="module")
def resnet18_int8():
    torch.manual_seed(0)
    teacher = build_segmentor("resnet18", NUM_CLASSES).eval()
    calibration = torch.randn(8, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    engine = torch.backends.quantized.engine
    int8 = quantize_teacher(teacher, calibration.split(4))
    assert torch.backends.quantized.engine == engine  # quantize_teacher used its own engine, then restored this
    return teacher, int8


def test_int8_copy_is_quantized_keeps_the_teacher_and_an_fp32_classifier(resnet18_int8):
    teacher, int8 = resnet18_int8
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    quantized = [m for m in int8.modules() if type(m).__module__.startswith("torch.ao.nn.")]
    assert len(quantized) >= 20  # every conv of the backbone, ASPP and decoder
    classifier = int8.graph.get_submodule("segmentor.classifier")
    assert type(classifier) is nn.Conv2d and classifier.weight.dtype == torch.float32
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())  # teacher untouched


def test_int8_teacher_predicts_what_the_fp32_teacher_predicts(resnet18_int8):
    teacher, int8 = resnet18_int8
    x = torch.randn(4, 3, 48, 48, generator=torch.Generator().manual_seed(2))
    frozen = FrozenTeacher(teacher, int8=int8)
    logits, decoder = frozen.predict(x, with_decoder=True)
    ref = teacher(x, return_features=True)
    assert logits.shape == ref["logits"].shape and decoder.shape == ref["decoder"].shape
    assert logits.dtype == decoder.dtype == torch.float32
    # 8-bit rounding: a few % of the signal (measured 6% for the logits, 5% for the decoder feature)
    assert (logits - ref["logits"]).norm() / ref["logits"].norm() < 0.15
    assert (decoder - ref["decoder"]).norm() / ref["decoder"].norm() < 0.15
    assert argmax_agreement(int8, teacher, x) > 0.85  # random weights: many near-ties between classes
    assert frozen.predict(x, with_decoder=False)[1] is None and frozen.precision == "int8"
    # the packed int8 weights keep the engine they were made with: the global setting does not matter
    for other in set(torch.backends.quantized.supported_engines) & {"x86", "onednn", "fbgemm"}:
        with quantized_engine(other):
            assert torch.equal(frozen.predict(x)[0], logits)


def test_argmax_agreement_counts_only_valid_pixels():
    class Constant(nn.Module):
        def __init__(self, cls):
            super().__init__()
            self.cls = cls

        def forward(self, x):
            out = torch.zeros(x.shape[0], 3, *x.shape[2:])
            out[:, self.cls] = 1
            out[:, :, :, :2] = torch.tensor([1.0, 0, 0]).view(1, 3, 1, 1)  # left two columns: class 0 for both
            return out

    x = torch.zeros(2, 3, 4, 4)
    labels = torch.zeros(2, 4, 4, dtype=torch.long)
    assert argmax_agreement(Constant(1), Constant(2), x) == 0.5  # agree on the left half only
    labels[:, :, 2:] = IGNORE_INDEX
    assert argmax_agreement(Constant(1), Constant(2), x, labels) == 1.0
    labels[:, :, :] = 0
    labels[:, :, :1] = IGNORE_INDEX  # valid: 3 columns, of which 1 agrees
    assert argmax_agreement(Constant(1), Constant(2), x, labels, max_batch=1) == pytest.approx(1 / 3)


def test_amp_auto_resolves_per_device():
    assert resolve_amp("auto", torch.device("cuda")) == "bf16"
    assert resolve_amp("auto", torch.device("cpu")) in ("bf16", "off")
    for explicit in ("off", "bf16", "fp16"):
        assert resolve_amp(explicit, torch.device("cpu")) == explicit


def test_auto_choices_follow_a_capability_and_a_measurement_and_say_why(monkeypatch):
    """amp='auto' takes bf16 on a CPU only where oneDNN supports it *and* a measured bf16 convolution is clearly
    faster than fp32 (oneDNN also reports support on AVX-512 CPUs without bf16 units, where it is emulated and
    slower), never by a CPU name; the reasons the trainer logs name the choice and the measurement."""
    import furnace.amp as amp
    cpu = torch.device("cpu")
    for native, ratio, want in ((True, 0.5, "bf16"), (True, 3.8, "off"), (False, 0.5, "off")):
        monkeypatch.setattr(amp, "native_bf16", lambda native=native: native)
        monkeypatch.setattr(amp, "cpu_bf16_time_ratio", lambda ratio=ratio: ratio)
        assert amp.resolve_amp("auto", cpu) == want
        reason = amp.amp_reason(cpu)
        assert reason.endswith("bf16 autocast") == (want == "bf16")
        assert (f"{ratio:.2f}x" in reason) == native
    monkeypatch.undo()
    ratio = amp.cpu_bf16_time_ratio()  # the real measurement on this CPU
    assert ratio > 0 and amp.cpu_bf16_time_ratio() == ratio  # measured once per process
    C = EasyDict(teacher_precision="auto", teacher_bn="train", amp="off", teacher_int8_min_agreement=0.98)
    assert "eval-mode" in precision_reason(C, cpu)
    C.teacher_bn = "eval"
    if int8_supported(cpu):
        assert "int8 copies tried" in precision_reason(C, cpu) and "0.98" in precision_reason(C, cpu)
    assert "no int8 kernels" in precision_reason(C, torch.device("cuda"))


@pytest.fixture(scope="module")
def teacher_paths(tmp_path_factory):
    d = tmp_path_factory.mktemp("int8_teachers")
    return str(make_teacher(d / "deep.pth", seed=1)), str(make_teacher(d / "wide.pth", seed=2))


def _load(toy, tmp_path, teacher_paths, **changes):
    """load_teachers as the Trainer calls it; returns (teachers, the messages it logged)."""
    settings = dict(method="mgd", teacher_deep=teacher_paths[0], teacher_wide=teacher_paths[1],
                    teacher_calibration_images=4, teacher_check_images=2, setting="fast")  # int8: eval-mode teachers
    settings.update(changes)
    C = resolve(load_experiment(EXP), collect_overrides([], overrides(toy, tmp_path, **settings)))
    messages = []

    class Collect(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())
    log = logging.getLogger(f"test_quantize.{id(messages)}")
    log.addHandler(Collect())
    log.setLevel(logging.INFO)
    teachers = load_teachers(C, DistInfo(0, 1, 0, torch.device("cpu")), build_datasets(C, unlabeled=True), log)
    return teachers, messages


def test_teacher_precision_decides_int8_by_measured_agreement(toy, tmp_path, teacher_paths):
    plain, messages = _load(toy, tmp_path, teacher_paths, teacher_precision="amp")
    assert all(t.int8 is None and t.precision == "fp32" for t in plain.values()) and messages == []

    forced, messages = _load(toy, tmp_path, teacher_paths, teacher_precision="int8")
    assert all(t.int8 is not None and t.folded is None for t in forced.values())
    assert len(messages) == 2 and all("int8 copy agrees with fp32 on" in m for m in messages)
    agreement = [float(m.split("agrees with fp32 on ")[1].split()[0]) for m in messages]

    accepted, _ = _load(toy, tmp_path, teacher_paths, teacher_precision="auto", teacher_int8_min_agreement=0.0)
    assert all(t.int8 is not None for t in accepted.values())
    # a threshold between the two copies' agreements keeps the lower one's teacher in fp32, and only that one
    # (the fixture's two random teachers quantize differently; equal agreements would make this test vacuous)
    low, high = sorted(zip(agreement, ("deep", "wide")))
    assert low[0] < high[0], f"fixture teachers reach the same int8 agreement {agreement}"
    mixed, messages = _load(toy, tmp_path, teacher_paths, teacher_precision="auto",
                            teacher_int8_min_agreement=(low[0] + high[0]) / 2)
    assert mixed[low[1]].int8 is None and mixed[high[1]].int8 is not None
    logged = dict(zip(("deep", "wide"), messages))
    assert "-> fp32 teacher" in logged[low[1]] and "-> int8 teacher" in logged[high[1]]
    rejected, messages = _load(toy, tmp_path, teacher_paths, teacher_precision="auto",
                               teacher_int8_min_agreement=1.0)
    for (role, teacher), value in zip(rejected.items(), agreement):
        assert (teacher.int8 is not None) == (value >= 1.0), role


def test_int8_mgd_run_trains_and_logs_the_agreement(toy, tmp_path, teacher_paths):
    train_in_process(overrides(toy, tmp_path, method="mgd", epochs=1, iters_per_epoch=2, teacher_deep=teacher_paths[0],
                               teacher_wide=teacher_paths[1], teacher_precision="int8", setting="fast",
                               teacher_calibration_images=4, teacher_check_images=2))
    log = (tmp_path / "train.log").read_text()
    assert log.count("-> int8 teacher") == 2
    ckpt = torch.load(tmp_path / "snapshot" / "last.pth", map_location="cpu", weights_only=False)
    assert ckpt["epoch"] == 1 and all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


@pytest.mark.parametrize("changes, message", [
    (dict(teacher_precision="fp8"), "teacher_precision='fp8'"),
    (dict(teacher_int8_min_agreement=1.5), "teacher_int8_min_agreement=1.5"),
    (dict(teacher_calibration_images=0), "teacher_calibration_images=0"),
    (dict(teacher_precision="int8", teacher_bn="train", teacher_labels="online"),
     "teacher_precision='int8' is for eval-mode teachers"),
])
def test_bad_teacher_precision_settings_are_refused_by_name(toy, tmp_path, teacher_paths, changes, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        _load(toy, tmp_path, teacher_paths, **changes)


def _choice_worker(rank, init_file, out_dir):
    import torch.distributed as dist
    from furnace.distributed import rank0_choice
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.save(rank0_choice("bf16" if rank == 0 else "off"), f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_a_measured_choice_is_rank_0s_on_every_process(tmp_path):
    """amp='auto' is measured in each process; the trainer takes rank 0's answer everywhere (furnace.distributed
    rank0_choice), so that two processes whose measurements differ still run one precision."""
    import torch.multiprocessing as mp
    from furnace.distributed import rank0_choice
    assert rank0_choice("off") == "off"  # one process: its own value
    mp.spawn(_choice_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    assert [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)] == ["bf16", "bf16"]
