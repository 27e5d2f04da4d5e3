#!/usr/bin/env python
"""Speed of one MGD training step: the published schedule, the project's published setting and its fast
setting, side by side in one run, at fp32 and at amp='auto' (where that is not fp32 on this device).

  python tools/benchmark.py                          # CPU default: crop 321, batch 2 labeled + 2 unlabeled,
                                                     # resnet18 student, resnet101 / wide_resnet50_2 teachers
  python tools/benchmark.py --tiny --json b.json     # CI size: crop 32, mobilenet_v2 / resnet18 nets, 1 repeat
  python tools/benchmark.py --device cuda --crop 512 --batch 8 --repeats 10

Schedules (random-init networks unless teacher checkpoints are given; speed does not depend on the weights):
  published          tools/published_step.py: the published call order, reverse terms, train-mode teachers
                     called as plain networks (at amp='auto': the same calls under autocast)
  published_setting  furnace.methods.mgd.mgd_step under setting='published' (what the paper's experiments run)
  fast               mgd_step under setting='fast': offline teacher labels (made once here, by
                     furnace.teacher_labels.precompute), eval-mode BN-folded (CPU: int8 where accepted) teachers
  fast_online        the fast setting with teacher_labels='online': the same teachers run on every batch
Each runs on batches from the toy VOC readers (the trainer's three streams, furnace.sampling), interleaved
step by step so that all see the same machine load; the median over --repeats after --warmup of the phases
data, teacher, student forward (+ losses), backward, optimizer. FLOPs per step and per phase come from
torch.utils.flop_counter on 'meta' tensors (the same step code; nothing is computed); utilization is
FLOPs / (seconds x the measured torch.mm peak of the schedule's precision). The gradient check runs the
published setting and the published schedule on one batch, student and teachers in train-mode BatchNorm,
fp32: the student gradients (grad_max_rel_diff_train_bn) and BatchNorm running statistics must agree; a
second one, fast_online against the published schedule with BatchNorm in eval mode, gives grad_max_rel_diff.
Besides: each teacher's inference per form (train-mode BN, eval, BN-folded, int8), the student's forward and
backward NCHW and channels-last, the loader's throughput and sliding-window evaluation speed (the last two
with tools/gpu_check.py's functions). The JSON keeps the keys of the benchmark's earlier versions
(speedup_same_precision, speedup_online_vs_published, utilization_published, ...; see earlier_keys).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import os
import os.path as osp
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from typing import Dict, List, Optional

import torch
import torch.nn as nn
from easydict import EasyDict
from torch.utils.flop_counter import FlopCounterMode

from furnace import teacher_labels
from furnace.amp import amp_reason, autocast, resolve_amp
from furnace.checkpoint import load_segmentor
from furnace.config import new_config, resolve
from furnace.data import VOC_CLASS_NAMES
from furnace.distributed import DistInfo
from furnace.engine import build_datasets, param_groups
from furnace.methods.mgd import mgd_step, offline_labels
from furnace.models import build_segmentor
from furnace.run import cpu_model
from furnace.sampling import LABELED, UNLABELED_0, UNLABELED_1, cutmix_masks, stream_loader, training_batch
from furnace.teachers import ROLES, FrozenTeacher, int8_choice, precision_reason, use_int8

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))  # tools/, when this file is not run as a script
from published_step import published_mgd_step  # noqa: E402

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
KINDS = ("published", "published_setting", "fast", "fast_online")
# kind -> (setting, keys set on top of it)
SETTINGS = {"published": ("published", {}), "published_setting": ("published", {}), "fast": ("fast", {}),
            "fast_online": ("fast", {"teacher_labels": "online"})}
PHASES = ("data", "teacher", "student_forward", "backward", "optimizer")
DTYPES = {"off": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
Batch = Dict[str, torch.Tensor]


# ------------------------------------------------------------------------------ timing and counting
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Phases:
    """Seconds of the named phases of the steps since the last read(), or, with count_flops, their FLOPs
    (torch.utils.flop_counter; phases may nest: 'teacher' runs inside 'forward')."""

    def __init__(self, device: torch.device, count_flops: bool = False):
        self.device, self.count_flops = device, count_flops
        self.totals: Dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, name: str):
        if self.count_flops:
            with FlopCounterMode(display=False) as counter:
                yield
            self.totals[name] += counter.get_total_flops()
            return
        sync(self.device)
        t0 = time.perf_counter()
        yield
        sync(self.device)
        self.totals[name] += time.perf_counter() - t0

    def read(self) -> Dict[str, float]:
        """Per phase (PHASES), since the last read; student_forward is 'forward' less 'teacher'."""
        t = self.totals
        out = dict(data=t["data"], teacher=t["teacher"], student_forward=t["forward"] - t["teacher"],
                   backward=t["backward"], optimizer=t["optimizer"])
        self.totals = defaultdict(float)
        return out


class Timed:
    """A teacher whose calls (net(x) for the published schedule, predict_views for mgd_step) count as phase
    'teacher' of `phases`."""

    def __init__(self, teacher, phases: Phases):
        self.teacher, self.phases = teacher, phases

    def __call__(self, *args, **kwargs):
        with self.phases("teacher"):
            return self.teacher(*args, **kwargs)

    def predict_views(self, *args, **kwargs):
        with self.phases("teacher"):
            return self.teacher.predict_views(*args, **kwargs)


def peak_matmul(device: torch.device, amp: str, sizes: List[int], repeats: int = 3) -> dict:
    """The machine's matrix-multiply limit at a precision: the fastest of `repeats` torch.mm calls of two
    n x n matrices (2 n^3 FLOPs), best n of `sizes`, in GFLOP/s."""
    gen = torch.Generator().manual_seed(0)
    rates = {}
    for n in sizes:
        a, b = (torch.randn(n, n, generator=gen).to(device, DTYPES[amp]) for _ in range(2))
        torch.mm(a, b)
        best = float("inf")
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            torch.mm(a, b)
            sync(device)
            best = min(best, time.perf_counter() - t0)
        rates[n] = 2 * n ** 3 / best / 1e9
    n = max(rates, key=rates.get)
    return dict(n=n, gflops=rates[n])


# ---------------------------------------------------------------------------------------- schedules
class Schedule:
    """One timed schedule: its config, student, teachers (as its step calls them) and optimizer."""

    def __init__(self, name: str, kind: str, C: EasyDict, student: nn.Module, teachers: dict,
                 device: torch.device, count_flops: bool = False, optimize: bool = True):
        self.name, self.kind, self.C, self.student, self.device = name, kind, C, student, device
        if C.channels_last:  # as the trainer converts it
            student.to(memory_format=torch.channels_last)
        self.phases = Phases(device, count_flops)
        self.teachers = {role: Timed(t, self.phases) for role, t in teachers.items()}
        self.teacher_precision = {role: getattr(t, "precision", "fp32" if C.amp == "off" else C.amp)
                                  for role, t in teachers.items()}
        self.optimizer = None if count_flops or not optimize else torch.optim.SGD(
            param_groups(student, C.weight_decay), lr=C.lr, momentum=C.momentum)
        self.records: List[Dict[str, float]] = []
        self.peak_mb: List[float] = []

    def step(self, batch: Batch) -> torch.Tensor:
        """One training step on `batch` (forward with the teachers, backward, optimizer), phase by phase."""
        self.student.train()
        with self.phases("forward"):
            if self.kind == "published":
                with autocast(self.device, self.C.amp):
                    loss, _ = published_mgd_step(self.student, self.teachers, batch, self.C)
            else:
                labels = offline_labels(batch) if self.C.teacher_labels == "offline" else None
                loss, _ = mgd_step(self.student, self.teachers, batch, labels, self.C, self.device)
        if self.optimizer:
            self.optimizer.zero_grad(set_to_none=True)
        with self.phases("backward"):
            loss.backward()
        if self.optimizer:
            with self.phases("optimizer"):
                self.optimizer.step()
        return loss

    def run(self, streams: "Streams", record: bool) -> None:
        with self.phases("data"):
            batch = streams.next()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        loss = self.step(batch)
        if not torch.isfinite(loss.detach()):
            raise FloatingPointError(f"{self.name}: non-finite loss {float(loss)}")
        sec = self.phases.read()
        if record:
            self.records.append(dict(sec, step=sum(sec.values())))
            if self.device.type == "cuda":
                self.peak_mb.append(torch.cuda.max_memory_allocated(self.device) / 2 ** 20)


def make_teachers(kind: str, C: EasyDict, networks: Dict[str, nn.Module], int8: dict) -> dict:
    """The teachers of a schedule, each its own copy: plain train-mode networks (published), train-mode
    FrozenTeachers (published setting: nothing to fold, no int8), eval-mode BN-folded FrozenTeachers, int8
    where `int8` holds a copy (fast, fast_online)."""
    fast = kind.startswith("fast")
    nets = {r: copy.deepcopy(n).train(not fast) for r, n in networks.items()}
    if C.channels_last:
        nets = {r: n.to(memory_format=torch.channels_last) for r, n in nets.items()}
    if kind == "published":
        return nets
    return {r: FrozenTeacher(n, C.amp, C.channels_last, int8=int8.get(r) if fast else None)
            for r, n in nets.items()}


def step_flops(kind: str, C: EasyDict, nets: Dict[str, str], n: int, crop: int) -> Dict[str, int]:
    """FLOPs of one step of a schedule, per phase (teacher, student_forward, backward) and 'step' in all, on
    'meta' tensors: the schedule's own step code, shapes only."""
    meta = torch.device("meta")
    with meta:
        student = build_segmentor(nets["student"], C.num_classes)
        networks = {r: build_segmentor(nets[r], C.num_classes).requires_grad_(False) for r in ROLES}
        batch = dict(x_l=torch.empty(n, 3, crop, crop), u0=torch.empty(n, 3, crop, crop),
                     u1=torch.empty(n, 3, crop, crop), mask=torch.empty(n, 1, crop, crop),
                     y_l=torch.zeros(n, crop, crop, dtype=torch.long))
        batch.update({f"teacher_{r}_{v}": torch.zeros(n, crop, crop, dtype=torch.long)
                      for r in ROLES for v in ("l", "u0", "u1")})
    C = EasyDict(dict(C, amp="off"))
    s = Schedule(kind, kind, C, student, make_teachers(kind, C, networks, {}), meta, count_flops=True)
    s.step(batch)
    out = {k: int(v) for k, v in s.phases.read().items() if k in ("teacher", "student_forward", "backward")}
    out["step"] = sum(out.values())
    return out


# ------------------------------------------------------------------------------------- gradient check
def max_rel_diff(a: List[torch.Tensor], b: List[torch.Tensor]) -> float:
    """max |a - b| over all tensors, over max |a|."""
    scale = max(float(x.abs().max()) for x in a)
    return max(float((x - y).abs().max()) for x, y in zip(a, b)) / max(scale, 1e-30)


def gradient_check_train_bn(student: nn.Module, networks: Dict[str, nn.Module], batch: Batch, C: EasyDict,
                            device: torch.device) -> dict:
    """The published setting (mgd_step, setting='published') against the published schedule on one batch, as
    both train: student and teachers in train-mode BatchNorm, fp32, the batch as one GPU's (gpu_batch = its
    size). Both call the networks separately in the published order, so the student's gradients and its
    BatchNorm running statistics after the step agree. Relative differences: max |a - b| / max |a|."""
    C = EasyDict(dict(C, amp="off", gpu_batch=batch["x_l"].shape[0]))
    grads, buffers = {}, {}
    for kind in ("published_setting", "published"):
        net = copy.deepcopy(student).float().train()
        Schedule(kind, kind, C, net, make_teachers(kind, C, networks, {}), device, optimize=False).step(batch)
        grads[kind] = [p.grad.detach().clone() for p in net.parameters()]
        buffers[kind] = [b.detach().clone() for b in net.buffers() if b.is_floating_point()]

    a, b = "published_setting", "published"
    return dict(grad_max_rel_diff=max_rel_diff(grads[a], grads[b]),
                grad_max_abs=max(float(g.abs().max()) for g in grads[a]),
                bn_buffers_max_rel_diff=max_rel_diff(buffers[a], buffers[b]), crop=batch["x_l"].shape[-1],
                note="student and teachers in train-mode BN, fp32, separate calls in the published order, both")


def gradient_check_eval_bn(student: nn.Module, networks: Dict[str, nn.Module], batch: Batch, C: EasyDict,
                           device: torch.device) -> dict:
    """The fast setting's step handed online teachers (joint calls) against the published schedule on one batch
    with BatchNorm on fixed statistics (student and teachers in eval mode, teachers unfolded, fp32): the call
    order only matters to train-mode BatchNorm, so the student's gradients agree up to summation order."""
    C = EasyDict(dict(C, amp="off", channels_last=False, teacher_labels="online", gpu_batch=batch["x_l"].shape[0]))
    nets = {r: copy.deepcopy(n).eval() for r, n in networks.items()}
    steps = dict(fast_online=lambda net: mgd_step(net, {r: FrozenTeacher(n, fold_bn=False) for r, n in nets.items()},
                                                  batch, None, C, device),
                 published=lambda net: published_mgd_step(net, nets, batch, C))
    grads, losses = {}, {}
    for name, step in steps.items():
        net = copy.deepcopy(student).float().eval()
        loss, terms = step(net)
        loss.backward()
        grads[name] = [p.grad.detach().clone() for p in net.parameters()]
        losses[name] = {k: float(v) for k, v in terms.items()}
    shared = [k for k in losses["published"] if k in losses["fast_online"]]
    return dict(grad_max_rel_diff=max_rel_diff(grads["fast_online"], grads["published"]),
                grad_max_abs=max(float(g.abs().max()) for g in grads["fast_online"]), crop=batch["x_l"].shape[-1],
                loss_terms_max_abs_diff=max(abs(losses["fast_online"][k] - losses["published"][k]) for k in shared),
                note="fast setting with online teachers vs published schedule; student and teachers in eval-mode "
                     "BN, fp32")


def median_seconds(fn, device: torch.device, repeats: int) -> float:
    """Median wall time of `repeats` calls of fn after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def probe_teachers(networks: Dict[str, nn.Module], int8: dict, batch: Batch, images: int, device: torch.device,
                   repeats: int):
    """Per teacher, seconds per image and argmax agreement with the eval-mode fp32 network of each form a schedule
    runs (train-mode BN as published, BN-folded eval mode, int8 where kept) on `images` images of u0; and the
    share of the pixels in the fp32 argmax's most frequent class (near 1: a degenerate teacher)."""
    x = batch["u0"][:images]
    inference, majority = {}, {}
    for role, net in networks.items():
        forms = {"train_bn_fp32": FrozenTeacher(copy.deepcopy(net).train(), fold_bn=False),
                 "eval_fp32": FrozenTeacher(net, fold_bn=False), "eval_folded_fp32": FrozenTeacher(net)}
        if role in int8:
            forms["int8"] = FrozenTeacher(net, int8=int8[role])
        reference = forms["eval_fp32"].predict(x)[0].argmax(1)
        inference[role] = {}
        for name, teacher in forms.items():
            seconds = median_seconds(lambda: teacher.predict(x), device, repeats)
            agree = float((teacher.predict(x)[0].argmax(1) == reference).float().mean())
            inference[role][name] = dict(seconds_per_image=seconds / x.shape[0], images=x.shape[0],
                                         argmax_agreement=agree)
        majority[role] = float(reference.flatten().bincount().max()) / reference.numel()
    return inference, majority


def probe_student(student: nn.Module, batch: Batch, device: torch.device, repeats: int) -> Dict[str, float]:
    """Seconds of one student forward and backward on x_l and u0 together, NCHW and channels-last."""
    x = torch.cat([batch["x_l"], batch["u0"]])
    out = {}
    for name, fmt in (("NCHW", torch.contiguous_format), ("channels_last", torch.channels_last)):
        net = copy.deepcopy(student).train().to(memory_format=fmt)
        xf = x.contiguous(memory_format=fmt)
        out[name] = median_seconds(lambda: net(xf).float().mean().backward(), device, repeats)
    return out


# ------------------------------------------------------------------------------------------------ data
class Streams:
    """The trainer's three training streams (labeled, u0, u1) at the benchmark's batch, and CutMix masks."""

    def __init__(self, C: EasyDict, datasets: dict, device: torch.device, iters: int, epoch: int = 0):
        self.info = DistInfo(0, 1, 0, device)
        loaders = [stream_loader(datasets["labeled"], C, self.info, LABELED, epoch, iters),
                   stream_loader(datasets["unlabeled"], C, self.info, UNLABELED_0, epoch, iters),
                   stream_loader(datasets["unlabeled"], C, self.info, UNLABELED_1, epoch, iters)]
        self.it, self.C, self.n = zip(*loaders), C, 0

    def next(self) -> Batch:
        batch = training_batch(*next(self.it))
        batch["mask"] = cutmix_masks(self.C, self.info, self.n)
        self.n += 1
        return {k: v.to(self.info.device, non_blocking=True) for k, v in batch.items()}


def ensure_toy_data(path: Optional[str]) -> str:
    """A toy VOC root: `path` if given (must exist), DATA/toy/pascal_voc if present, else generated in /tmp."""
    if path:
        if not osp.isdir(path):
            raise FileNotFoundError(f"--data-root {path} does not exist (make one: python tools/make_toy_data.py --out DIR)")
        return path
    default = osp.join(ROOT, "DATA", "toy", "pascal_voc")
    if osp.isdir(default):
        return default
    out = tempfile.mkdtemp(prefix="mgd_bench_toy_")
    subprocess.run([sys.executable, osp.join(ROOT, "tools", "make_toy_data.py"), "--out", out, "--num-train", "64",
                    "--num-val", "4", "--num-city-train", "2", "--num-city-val", "2"], check=True,
                   stdout=subprocess.DEVNULL)
    return osp.join(out, "pascal_voc")


def make_config(args, data_root: str, kind: str, amp: str) -> EasyDict:
    # eval_crop_size: the sliding window of the offline labels (at least 128: about one window per toy image)
    setting, keys = SETTINGS[kind]
    values = dict(**keys,
                  data_root=data_root, crop_size=args.crop, eval_crop_size=max(args.crop, 128), batch_size=args.batch,
                  num_workers=args.num_workers, num_classes=args.num_classes, network=args.student,
                  teacher_deep_network=args.deep, teacher_wide_network=args.wide, seed=0,
                  channels_last=args.channels_last and kind != "published",
                  output_dir=tempfile.gettempdir(), setting=setting, amp=amp,
                  class_names=VOC_CLASS_NAMES if args.num_classes == 21 else [f"c{i}" for i in range(args.num_classes)])
    if args.teacher_precision:
        values["teacher_precision"] = args.teacher_precision
    return resolve(new_config("voc", __file__), [(k, repr(v), "tools/benchmark.py") for k, v in values.items()])


# --------------------------------------------------------------------------------------------- the run
def build_networks(args, num_classes: int, device: torch.device):
    """The random-init student and the two teachers (from --deep/--wide-checkpoint, or random init), eval mode."""
    torch.manual_seed(0)
    student = build_segmentor(args.student, num_classes).to(device)
    networks = {}
    for role in ROLES:
        path, network = getattr(args, f"{role}_checkpoint"), getattr(args, role)
        net = (load_segmentor(path, network, num_classes, role=f"teacher_{role}") if path
               else build_segmentor(network, num_classes))
        networks[role] = net.requires_grad_(False).eval().to(device)
    return student, networks


def logger() -> logging.Logger:
    """Where furnace.teachers.int8_choice reports each int8 copy's agreement: stdout."""
    log = logging.getLogger("mgd.benchmark")
    if not log.handlers:
        log.addHandler(logging.StreamHandler(sys.stdout))
        log.setLevel(logging.INFO)
    return log


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="CI size: crop 32, mobilenet_v2 / resnet18 nets, 1 repeat")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--crop", type=int, help="training crop (default 321; --tiny 32)")
    p.add_argument("--batch", type=int, default=2, help="labeled images per step; u0 and u1 the same (default 2)")
    p.add_argument("--student", help="student network (default resnet18; --tiny mobilenet_v2)")
    p.add_argument("--deep", help="deep teacher network (default resnet101; --tiny resnet18)")
    p.add_argument("--wide", help="wide teacher network (default wide_resnet50_2; --tiny resnet18)")
    p.add_argument("--deep-checkpoint", help="trained deep teacher (default: random init)")
    p.add_argument("--wide-checkpoint", help="trained wide teacher (default: random init)")
    p.add_argument("--num-classes", type=int, default=21)
    p.add_argument("--teacher-precision", choices=["auto", "amp", "int8"],
                   help="the fast setting's teachers (default: the config's, 'auto': int8 on CPU where accepted)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps of each schedule (default 1)")
    p.add_argument("--repeats", type=int, help="timed steps of each schedule (default 3; --tiny 1)")
    p.add_argument("--num-workers", type=int, help="DataLoader workers per stream (default: the config's; --tiny 0)")
    p.add_argument("--data-root", help="toy VOC root (default DATA/toy/pascal_voc, generated if missing)")
    p.add_argument("--offline-images", type=int,
                   help="images of each training list the steps draw from, given offline labels (default 48; --tiny 8)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default torch's; --tiny 1)")
    p.add_argument("--channels-last", action="store_true",
                   help="the project's schedules (published setting, fast) with channels-last networks, as "
                        "channels_last=True trains; the published schedule stays NCHW, as published")
    p.add_argument("--probe-images", type=int, help="images of the teacher and student probes (default 4; --tiny 2)")
    p.add_argument("--loader-batches", type=int, help="batches of the loader measurement (default 12; --tiny 4)")
    p.add_argument("--eval-size", type=int, help="image side of the sliding-window speed (default 512; --tiny 48)")
    p.add_argument("--json", help="write all figures to this file")
    args = p.parse_args(argv)
    tiny = args.tiny
    defaults = dict(crop=32 if tiny else 321, student="mobilenet_v2" if tiny else "resnet18",
                    deep="resnet18" if tiny else "resnet101", wide="resnet18" if tiny else "wide_resnet50_2",
                    repeats=1 if tiny else 3, offline_images=8 if tiny else 48, threads=1 if tiny else None,
                    probe_images=2 if tiny else 4, loader_batches=4 if tiny else 12, eval_size=48 if tiny else 512,
                    num_workers=0 if tiny else new_config("voc", __file__).num_workers)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.repeats < 1 or args.warmup < 0 or args.batch < 1 or args.crop < 16:
        p.error("need --repeats >= 1, --warmup >= 0, --batch >= 1, --crop >= 16")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message="This DataLoader will create")  # 4 workers x 3 streams on 2 cores
    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available() if args.device == "auto" else args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but CUDA is not available")
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cudnn.benchmark = True
    nets = dict(student=args.student, deep=args.deep, wide=args.wide)
    amp_auto = resolve_amp("auto", device)
    amps = ["off"] + ([amp_auto] if amp_auto != "off" else [])
    env = dict(torch=torch.__version__, python=platform.python_version(), cpu=cpu_model(),
               threads=torch.get_num_threads(),
               cpu_capability=torch.backends.cpu.get_cpu_capability(), cpu_count=os.cpu_count(),
               loadavg_start=list(os.getloadavg()), gpu=torch.cuda.get_device_name(device) if cuda else None)
    R: dict = dict(config=dict(device=str(device), crop=args.crop, batch_labeled=args.batch,
                               batch_unlabeled=args.batch, networks=nets, warmup=args.warmup, repeats=args.repeats,
                               num_workers=args.num_workers, tiny=args.tiny, channels_last=args.channels_last,
                               amp_auto=dict(amp=amp_auto, reason=amp_reason(device)),
                               teacher_weights={r: getattr(args, f"{r}_checkpoint") or "random init" for r in ROLES}),
                   env=env)
    print(f"# MGD step benchmark on {env['gpu'] or env['cpu']} ({env['cpu_count']} cores, {env['cpu_capability']}, "
          f"{env['threads']} threads), torch {env['torch']}; load {env['loadavg_start']}; amp='auto' here: "
          f"{amp_auto} ({amp_reason(device)})", flush=True)
    sizes = [512] if args.tiny else [4096, 8192] if cuda else [1024, 2048]
    peak = {amp: peak_matmul(device, amp, sizes) for amp in amps}

    # -- data, configs, networks
    data_root = ensure_toy_data(args.data_root)
    configs = {(kind, amp): make_config(args, data_root, kind, amp) for kind in KINDS for amp in amps}
    C_fast = configs["fast", "off"]
    datasets = build_datasets(C_fast, unlabeled=True)
    for ds in datasets.values():
        ds.names = ds.names[:args.offline_images]
    student, networks = build_networks(args, C_fast.num_classes, device)
    R["int8_teachers"] = {}
    int8 = int8_choice(networks, C_fast, datasets, logger(), R["int8_teachers"]) if use_int8(C_fast, device) else {}

    # -- schedules; the fast setting's offline labels, made once (every stream then carries them)
    schedules = [Schedule(kind if amp == "off" else f"{kind}_amp", kind, configs[kind, amp],
                          copy.deepcopy(student), make_teachers(kind, configs[kind, amp], networks, int8), device)
                 for amp in amps for kind in KINDS]
    fast = next(s for s in schedules if s.name == "fast")
    R["ours_teacher_precision"] = dict(precision=fast.teacher_precision, reason={
        r: "int8 copy kept" if r in int8 else precision_reason(C_fast, device) for r in ROLES})
    R["ours_choice"] = dict(precision=amp_auto, precision_reason=amp_reason(device),
                            channels_last=C_fast.channels_last, teacher_labels=C_fast.teacher_labels)
    C_labels = EasyDict(dict(C_fast, teacher_label_dir=tempfile.mkdtemp(prefix="mgd_bench_teacher_labels_")))
    t0 = time.perf_counter()
    root = teacher_labels.precompute({r: t.teacher for r, t in fast.teachers.items()}, datasets, C_labels,
                                     DistInfo(0, 1, 0, device))
    R["offline_labels_seconds"] = time.perf_counter() - t0
    datasets = {k: ds.with_teacher_labels(root) for k, ds in datasets.items()}
    rounds = args.warmup + args.repeats
    streams = Streams(C_fast, datasets, device, iters=rounds * len(schedules) + 2)

    # -- gradient equality, then the steps, interleaved
    g = min(args.crop, 161)
    grad = gradient_check_train_bn(student, networks, {k: v[..., :g, :g] for k, v in streams.next().items()},
                                   configs["published", "off"], device)
    R["gradient_check_train_bn"] = grad
    R["grad_max_rel_diff_train_bn"] = grad["grad_max_rel_diff"]
    print(f"gradient check (published setting vs published schedule, train-mode BN, fp32): "
          f"{grad['grad_max_rel_diff']:.2e}, BN running statistics {grad['bn_buffers_max_rel_diff']:.2e}", flush=True)
    probe_batch = streams.next()
    R["gradient_check"] = gradient_check_eval_bn(student, networks, {k: v[..., :g, :g] for k, v in probe_batch.items()},
                                                 configs["fast_online", "off"], device)
    R["grad_max_rel_diff"] = R["gradient_check"]["grad_max_rel_diff"]
    print(f"gradient check (fast setting, online teachers, vs published schedule, eval-mode BN, fp32): "
          f"{R['grad_max_rel_diff']:.2e}", flush=True)
    R["teacher_inference"], R["teacher_majority_class_share"] = probe_teachers(
        networks, int8, probe_batch, args.probe_images, device, args.repeats)
    R["student_memory_format"] = probe_student(student, probe_batch, device, args.repeats)
    for r in range(rounds):
        for s in (schedules if r % 2 == 0 else schedules[::-1]):
            s.run(streams, record=r >= args.warmup)
        print(f"round {r + 1}/{rounds}{' (warm-up)' if r < args.warmup else ''}; load {list(os.getloadavg())}",
              flush=True)
    del streams
    for amp in amps:  # again after the steps: the better measurement is the machine's limit
        peak[amp]["gflops"] = max(peak[amp]["gflops"], peak_matmul(device, amp, [peak[amp]["n"]])["gflops"])
    R["peak_matmul"] = {("fp32" if a == "off" else a): v for a, v in peak.items()}

    # -- FLOPs, summaries, ratios
    flops = {kind: step_flops(kind, C_fast if kind == "fast" else configs[kind, "off"], nets, args.batch, args.crop)
             for kind in KINDS}
    R["flops_per_step"] = {s.name: flops[s.kind]["step"] for s in schedules}
    R["flops_by_phase"] = flops
    R["steps"] = {s.name: summary(s, flops[s.kind], peak[s.C.amp]["gflops"] * 1e9, 3 * args.batch) for s in schedules}
    t = {name: st["seconds"]["step"] for name, st in R["steps"].items()}
    R["speedup"] = {name: t["published"] / sec for name, sec in t.items()}
    R["speedup_published_setting"] = R["speedup"]["published_setting"]
    R["published_setting_bound"] = published_setting_bound(flops["published_setting"]["step"],
                                                           peak["off"]["gflops"] * 1e9, t["published"])
    as_trained = "fast_amp" if "fast_amp" in t else "fast"  # the fast setting as it trains (amp='auto')
    R["speedup_vs_published"] = R["speedup"][as_trained]
    R["utilization"] = R["steps"][as_trained]["utilization"]["step"]
    R.update(earlier_keys(R, t, as_trained))
    R["offline_teachers"] = dict(images=len({n for ds in datasets.values() for n in ds.names}),
                                 seconds=R["offline_labels_seconds"], step_seconds=t["fast"],
                                 speedup_vs_online=t["fast_online"] / t["fast"])
    R["offline_teachers"]["seconds_per_image_both_teachers"] = (R["offline_labels_seconds"]
                                                               / R["offline_teachers"]["images"])
    import gpu_check  # it imports this module: here, not at the top
    R["loader"] = gpu_check.loader_throughput(C_fast, datasets, device, args.loader_batches)
    R["loader"]["step_consumes_images_per_second"] = R["steps"][as_trained]["images_per_second"]
    R["loader"]["margin"] = R["loader"]["images_per_second"] / R["loader"]["step_consumes_images_per_second"]
    R["eval"] = gpu_check.eval_speed(args.student, C_fast.num_classes, device, args.eval_size, args.crop, args.repeats)
    env["loadavg_end"] = list(os.getloadavg())
    R["total_seconds"] = time.perf_counter() - t_start
    print("\n" + format_table(R), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(R, f, indent=1)
    return R


def published_setting_bound(flops: int, peak: float, published_seconds: float, target: float = 1.5) -> dict:
    """How fast the published setting's fp32 step could be on this machine: all of its FLOPs at the measured
    torch.mm fp32 peak. It keeps its FLOPs (the same update, see README "The published setting's step"), so
    this bounds its speed-up over the published schedule by published_seconds / seconds_at_peak; reaching
    `target` needs its step at `utilization_for_target` of the peak."""
    at_peak = flops / peak
    return dict(seconds_at_peak=at_peak, max_speedup=published_seconds / at_peak, target=target,
                utilization_for_target=at_peak * target / published_seconds)


def earlier_keys(R: dict, t: Dict[str, float], as_trained: str) -> dict:
    """The ratios the benchmark reported before the published setting existed, when 'ours' was the fast
    setting: kept so that scripts reading them still work."""
    online = "fast_online_amp" if as_trained.endswith("_amp") else "fast_online"
    return dict(speedup_same_precision=t["published"] / t["fast"],
                speedup_online_vs_published=t["published"] / t[online],
                speedup_note=f"published schedule (fp32) over: the fast setting at amp='auto' (speedup_vs_published), "
                             f"at fp32 (speedup_same_precision), with online teachers ({online}, "
                             f"speedup_online_vs_published); the published setting at fp32 (speedup_published_setting)",
                utilization_published=R["steps"]["published"]["utilization"]["step"],
                flops_teachers_per_step=R["flops_by_phase"]["fast_online"]["teacher"],
                flops_teachers_per_step_offline=R["flops_by_phase"]["fast"]["teacher"])


def summary(s: Schedule, flops: Dict[str, int], peak: float, images: int) -> dict:
    """Median seconds per phase and of the step; utilization per phase: FLOPs / (seconds x peak)."""
    sec = {k: statistics.median(r[k] for r in s.records) for k in (*PHASES, "step")}
    util = {k: flops.get(k, 0) / (sec[k] * peak) if sec[k] > 0 else 0.0 for k in (*PHASES, "step")}
    return dict(seconds=sec, all_step_seconds=[r["step"] for r in s.records], images_per_second=images / sec["step"],
                utilization=util, precision="fp32" if s.C.amp == "off" else s.C.amp,
                teacher_precision=s.teacher_precision, teacher_bn=s.C.teacher_bn,
                teacher_labels=s.C.teacher_labels, network_calls=s.C.network_calls,
                channels_last=s.C.channels_last,
                peak_memory_mb=max(s.peak_mb) if s.peak_mb else None)


def format_table(R: dict) -> str:
    cfg, env = R["config"], R["env"]
    n = cfg["networks"]
    lines = [f"## MGD step: {n['student']} student, {n['deep']} + {n['wide']} teachers, crop {cfg['crop']}, batch "
             f"{cfg['batch_labeled']} + {cfg['batch_unlabeled']}, {cfg['device']}; median of {cfg['repeats']} after "
             f"{cfg['warmup']} warm-up, interleaved; load {env['loadavg_start']} -> {env['loadavg_end']}", "",
             "| schedule | student / teachers | data | teacher | student fwd | backward | optimizer | step (s) | "
             "vs published | GFLOP/step | utilization (teacher / fwd / bwd / step) |",
             "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for name, s in R["steps"].items():
        sec, u = s["seconds"], s["utilization"]
        teachers = "/".join(sorted(set(s["teacher_precision"].values())))
        lines.append(f"| {name} | {s['precision']} / {teachers}, BN {s['teacher_bn']}, {s['teacher_labels']}"
                     f"{', NHWC' if s['channels_last'] else ''} | "
                     + " | ".join(f"{sec[k]:.3f}" for k in PHASES) + f" | {sec['step']:.3f} | "
                     f"{R['speedup'][name]:.2f}x | {R['flops_per_step'][name] / 1e9:.2f} | "
                     f"{u['teacher']:.0%} / {u['student_forward']:.0%} / {u['backward']:.0%} / {u['step']:.0%} |")
    g, b = R["gradient_check_train_bn"], R["published_setting_bound"]
    lines += ["", f"speedup_published_setting = {R['speedup_published_setting']:.2f}x (published / published setting, "
                  f"fp32); speedup_vs_published = {R['speedup_vs_published']:.2f}x (published fp32 / fast setting at "
                  f"amp='auto' = {cfg['amp_auto']['amp']})",
              f"speedup_same_precision = {R['speedup_same_precision']:.2f}x (fast, fp32), speedup_online_vs_published "
              f"= {R['speedup_online_vs_published']:.2f}x (fast setting with online teachers)",
              f"published setting at the fp32 peak: {R['flops_per_step']['published_setting'] / 1e9:.1f} GFLOP in "
              f"{b['seconds_at_peak']:.3f} s, at most {b['max_speedup']:.2f}x the published schedule's "
              f"{R['steps']['published']['seconds']['step']:.3f} s; {b['target']}x needs "
              f"{b['utilization_for_target']:.0%} of the peak (it runs at "
              f"{R['steps']['published_setting']['utilization']['step']:.0%})",
              f"grad_max_rel_diff_train_bn = {g['grad_max_rel_diff']:.2e}, BN running statistics "
              f"{g['bn_buffers_max_rel_diff']:.2e} ({g['note']}, crop {g['crop']})",
              f"grad_max_rel_diff = {R['grad_max_rel_diff']:.2e} ({R['gradient_check']['note']})",
              "teachers per image (argmax agreement with eval fp32): " + "; ".join(
                  f"{role} " + ", ".join(f"{form} {v['seconds_per_image'] * 1000:.0f} ms ({v['argmax_agreement']:.4f})"
                                         for form, v in forms.items())
                  for role, forms in R["teacher_inference"].items()),
              "student forward+backward on x_l + u0: " + ", ".join(
                  f"{k} {v:.3f} s" for k, v in R["student_memory_format"].items()),
              f"loader {R['loader']['images_per_second']:.1f} images/s ({R['loader']['num_workers']} workers per "
              "stream), "
              f"{R['loader']['margin']:.0f}x what the fast step consumes; sliding-window evaluation of a "
              f"{R['eval']['image_size']}px image, crop {R['eval']['crop']}: "
              f"{R['eval']['batched_images_per_second']:.2f} images/s",
              "peak torch.mm: " + ", ".join(f"{p} {v['gflops']:.1f} GFLOP/s (n={v['n']})"
                                           for p, v in R["peak_matmul"].items())
              + "; data and optimizer do no matrix products (utilization 0); int8 teachers count at the fp32 peak",
              f"offline teacher labels made in {R['offline_labels_seconds']:.1f} s; total {R['total_seconds']:.0f} s"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
