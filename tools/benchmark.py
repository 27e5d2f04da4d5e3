#!/usr/bin/env python
"""Speed of one MGD training step: this project's step against the published schedule, against the
machine's measured matrix-multiply peak, with teacher inference, the data loader and evaluation.

  python tools/benchmark.py                          # CPU default: crop 321, batch 2 labeled + 2 unlabeled,
                                                     # resnet18 student, resnet101 / wide_resnet50_2 teachers
  python tools/benchmark.py --tiny --json b.json     # CI size: crop 32, mobilenet_v2 / resnet18 nets, 1 repeat
  python tools/benchmark.py --device cuda --crop 512 --batch 8 --repeats 10

Everything is measured in the one run, on random-init networks unless teacher checkpoints are given (speed
does not depend on the weights; the argmax agreement of low-precision teachers does):
  peak       torch.mm of two NxN matrices per precision -> GFLOP/s, the machine's limit for utilization
             (measured before the steps and again after them; the better one counts); int8: a quantized
             Linear (the quantized engine's GEMM, which the int8 convolutions use).
  int8       each teacher's int8 copy made as the trainer makes it (furnace.engine.int8_copies: calibrated on
             the config's teacher_calibration_images unlabeled crops) and its argmax agreement with fp32 on the
             valid pixels of teacher_check_images labeled crops (the trainer's acceptance test).
  teachers   each teacher on the inputs of one step in every inference variant (plain fp32, inference_mode,
             BatchNorm folded, channels_last, int8, bf16 / fp16 autocast), with argmax agreement against plain
             fp32. The fastest precision and memory format become "ours" (--precision auto, --channels-last
             auto); a teacher runs int8 in ours where it is faster and passes the trainer's acceptance test
             (--teacher-precision auto).
  flops      FLOPs of one step, forward and backward, from torch.utils.flop_counter on 'meta' tensors
             (2 x multiply-accumulates of convolutions and matrix products; nothing is computed).
  gradient   (train BN) the published setting (mgd_step, setting='published') against published_mgd_step on one
             batch (cut to --grad-crop), student and teachers in train-mode BatchNorm as both train, fp32: the
             student gradients (grad_max_rel_diff_train_bn) and its BN running statistics must agree.
  gradient   (eval BN) published and ours online on one batch (cut to --grad-crop), teachers in the same (eval) BN mode,
             fp32, the student in eval mode: the student gradients must agree (grad_max_rel_diff). (The offline
             step equals the online one when handed the online argmax: tests/test_teacher_labels.py.) The student is
             in eval mode because ours runs x_l and u_m through the student in ONE call, so train-mode
             BatchNorm statistics (and therefore the gradients) legitimately differ from the published
             separate calls.
  offline    the offline teachers' pseudo-labels (furnace.teacher_labels.precompute, as the trainer makes them)
             of the first --offline-images images of each training list, which every stream then draws from;
             their cost, and their agreement with the online teachers' argmax on the same augmented crops.
  steps      ours (furnace.methods.mgd_step in the fast setting: offline teachers), ours_online (the
             same with teacher_labels='online': teachers on every crop of every step) and published
             (published_mgd_step below), published_setting (mgd_step under setting='published': what the paper's
             experiments run; fp32, and published_setting_amp at amp='auto' where that is not fp32 on this
             device), published_setting_lean (the same with the opt-in student_bn_calls=False), plus ours_fp32
             (ours with fp32 student and teachers) when ours uses another precision, on batches from the real dataset readers (the training transform at the crop,
             config's num_workers, three streams as in the Trainer), interleaved step by step so all see the
             same machine load; median over --repeats after --warmup of: data wait, teacher inference,
             student forward (+ losses), backward, optimizer.
             Memory: CUDA max allocated during the step; CPU peak RSS of this process (VmHWM, reset before
             each step). The process holds the networks of both schedules (and the BN-folded teacher copies),
             so "step mem" (peak minus the RSS / allocation before the step) is the figure to compare.
  loader     the three training streams alone: images/s against what the step consumes (3 x batch per step).
  eval       furnace.evaluate.sliding_probs on one image with the student: images/s with the windows batched
             (the default) and one window per call.
CUDA work is timed with events, CPU work with perf_counter (CUDA "fp32" convolutions use TF32 unless
torch.backends.cudnn.allow_tf32 is switched off). The load average is printed at start and end:
other processes on the machine slow everything down, and the interleaving keeps the comparison fair.
Data: the toy VOC set (python tools/make_toy_data.py; generated into a temporary folder when --data-root
does not exist). Its images are small (about 130 x 110), so real VOC images cost the loader more.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
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
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn
from easydict import EasyDict
from torch.utils.flop_counter import FlopCounterMode

import furnace.methods as methods
from furnace.checkpoint import load_segmentor
from furnace.config import new_config, resolve
from furnace.data import VOC_CLASS_NAMES
from furnace.data import cutmix_box_mask
from furnace.distributed import DistInfo
from furnace import teacher_labels
from furnace.engine import (LABELED, UNLABELED_0, UNLABELED_1, build_datasets, int8_copies, keeps_int8,
                            param_groups, stream_loader, training_batch)
from furnace.evaluate import sliding_probs
from furnace.losses import combine_cutmix, content_aware_loss, pseudo_label_ce, semantic_sensitive_loss
from furnace.methods import folded_teacher, mgd_step, mix, supervised_loss, teacher_predict
from furnace.models import build_segmentor
from furnace.quantize import int8_engine, int8_supported, quantized_engine

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
AMP = {"fp32": "off", "bf16": "bf16", "fp16": "fp16"}
INT8_VARIANT = "int8 (torch.ao static, calibrated), NCHW"
FOLDED_VARIANT = "fp32 BN folded, channels_last"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
Batch = Dict[str, torch.Tensor]


# ------------------------------------------------------------------------------------ the published step
def published_mgd_step(student: nn.Module, teachers: Dict[str, nn.Module], batch: Batch, C: EasyDict,
                       device: torch.device, watch: Optional["Stopwatch"] = None) -> Tuple[torch.Tensor, dict]:
    """One MGD step scheduled as the published training code does it. FOR COMPARISON ONLY: never used to train.

    Same loss terms and weights as furnace.methods.mgd_step (same functions, so the gradient-carrying
    terms are identical), scheduled as published:
      * in the published order (ALGORITHM.md, "One MGD training step"): each teacher on u0 and u1, then the
        student and each teacher on u_m, then on x_l; the student on u0 and u1 too, without gradient (those two
        predictions only serve the reverse terms below), before u_m. Every call is separate, so in train mode
        each normalises with its own batch statistics and updates the BatchNorm running statistics in turn;
      * the teachers run under no_grad, in whatever BN mode the caller left them in (published: train mode);
      * the reverse terms CE(teacher logits, argmax student) are computed and added to the loss. Teachers are
        frozen and an argmax carries no gradient, so they change the loss value, never the gradient;
      * fp32 throughout (no autocast), NCHW.
    `watch`, if given, times the teacher calls as section 'teacher'."""
    watch = watch or Stopwatch(device, enabled=False)
    x_l, y_l, u0, u1, mask = batch["x_l"], batch["y_l"], batch["u0"], batch["u1"], batch["mask"]
    n_u = u0.shape[0]
    u_m = mix(u0, u1, mask)

    t: Dict[str, dict] = {role: {} for role in teachers}

    def teachers_on(name: str, x: torch.Tensor) -> None:  # one separate call per teacher
        with watch("teacher"), torch.no_grad():
            for role, net in teachers.items():
                if name == "u_m":
                    out = net(x, return_features=True)
                    t[role].update(u_m=out["logits"], f_m=out["decoder"])
                else:
                    t[role][name] = net(x)

    teachers_on("u0", u0)
    teachers_on("u1", u1)
    with torch.no_grad():                                 # wasted: only feeds the reverse terms
        s_u0, s_u1 = student(u0), student(u1)
    out_m = student(u_m, return_features=True)            # mixed forward, with gradient
    s_m, f_student = out_m["logits"], out_m["decoder"]
    teachers_on("u_m", u_m)
    s_l = student(x_l)                                    # labeled forward, with gradient
    teachers_on("x_l", x_l)
    deep, wide = t["deep"], t["wide"]

    terms = {"sup": C.sup_weight * supervised_loss(C, s_l, y_l, 1)}
    if C.pixel_unlabeled_weight > 0:
        terms["pix_u"] = C.pixel_unlabeled_weight * (pseudo_label_ce(s_m, (deep["u0"], deep["u1"]), mask)
                                                     + pseudo_label_ce(s_m, (wide["u0"], wide["u1"]), mask))
    if C.pixel_labeled_weight > 0:
        terms["pix_l"] = C.pixel_labeled_weight * (pseudo_label_ce(s_l, deep["x_l"])
                                                   + pseudo_label_ce(s_l, wide["x_l"]))
    if C.semantic_weight > 0:
        terms["semantic"] = C.semantic_weight * C.gpu_batch * semantic_sensitive_loss(s_m, deep["u_m"]) / n_u
    if C.region_weight > 0:
        terms["region"] = C.region_weight * content_aware_loss(f_student, wide["f_m"], C.region_grid)
    # Reverse terms (published): each teacher's prediction against the student's pseudo-labels. No gradient.
    reverse = 0.0
    for role in ("deep", "wide"):
        teacher_mix = combine_cutmix(t[role]["u0"], t[role]["u1"], mask)
        reverse = reverse + pseudo_label_ce(teacher_mix, (s_u0, s_u1), mask) + pseudo_label_ce(t[role]["x_l"], s_l)
    terms["reverse"] = C.pixel_unlabeled_weight * reverse
    total = sum(terms.values())
    return total, {k: v.detach() for k, v in terms.items()}


# ------------------------------------------------------------------------------------------------ timing
class Stopwatch:
    """Accumulates the time of named sections: CUDA events on CUDA (read() synchronises), perf_counter on CPU."""

    def __init__(self, device: torch.device, enabled: bool = True):
        self.cuda, self.enabled = device.type == "cuda", enabled
        self.totals: Dict[str, float] = defaultdict(float)
        self._events: list = []

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((name, start, end))
        else:
            t0 = time.perf_counter()
            yield
            self.totals[name] += time.perf_counter() - t0

    def read(self) -> Dict[str, float]:
        """Seconds per section since the last read."""
        if self.cuda:
            torch.cuda.synchronize()
            for name, start, end in self._events:
                self.totals[name] += start.elapsed_time(end) / 1000.0
            self._events.clear()
        out = dict(self.totals)
        self.totals.clear()
        return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable, device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median seconds of fn() over `repeats` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with contextlib.suppress(OSError):  # Linux: '5' resets the peak RSS (VmHWM) of this process
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")


def _proc_status_mb(field: str) -> Optional[float]:
    with contextlib.suppress(OSError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    return None


def peak_memory_mb(device: torch.device) -> Optional[float]:
    """CUDA: max allocated since the last reset; CPU: peak RSS of this process since the last reset."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return _proc_status_mb("VmHWM")


def current_memory_mb(device: torch.device) -> Optional[float]:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2 ** 20
    return _proc_status_mb("VmRSS")


def loadavg() -> Optional[List[float]]:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


# ------------------------------------------------------------------------------------------ measurements
def peak_matmul(device: torch.device, precision: str, sizes: List[int], repeats: int = 3) -> dict:
    """The machine's matrix-multiply limit: torch.mm of two n x n matrices (2 n^3 FLOPs) for each n in `sizes`
    (int8: a quantized Linear, uint8 x int8 with int32 sums, 2 n^3 operations);
    the best rate (fastest of `repeats` calls, best size) is the peak: a peak is what the machine can do,
    and the fastest call is the one least disturbed by other processes."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    per_size = {}
    for n in sizes:
        if precision == "int8":  # the quantized engine's GEMM (uint8 x int8 -> int32, requantized): what the
            # int8 convolutions run on, in the engine the int8 teachers use (torch._int_mm has no fast CPU
            # kernel: ~1 GOP/s)
            with warnings.catch_warnings(), quantized_engine(int8_engine()):
                warnings.simplefilter("ignore")
                linear = torch.ao.nn.quantized.Linear(n, n, bias_=False)
                w = torch.quantize_per_tensor(torch.randn(n, n, generator=gen) / n ** 0.5, 1 / 128 / n ** 0.5, 0,
                                              torch.qint8)
                linear.set_weight_bias(w, None)
                linear.scale, linear.zero_point = 0.05, 128
                a = torch.quantize_per_tensor(torch.rand(n, n, generator=gen), 1 / 255, 0, torch.quint8)
            b = None

            def mm(x, _):
                return linear(x)
        else:
            a = torch.randn(n, n, generator=gen).to(device, DTYPES[precision])
            b = torch.randn(n, n, generator=gen).to(device, DTYPES[precision])
            mm = torch.mm
        mm(a, b)
        seconds = min(timed(lambda: mm(a, b), device, 1, warmup=0) for _ in range(repeats))
        per_size[n] = 2 * n ** 3 / seconds / 1e9
    best = max(per_size, key=per_size.get)
    return dict(n=best, gflops=per_size[best], gflops_per_size=per_size)


def agreement(logits: torch.Tensor, reference: torch.Tensor) -> float:
    """Fraction of pixels whose argmax class equals the reference's."""
    return float((logits.argmax(1) == reference.argmax(1)).float().mean())


def probe_teacher(teacher: nn.Module, x: torch.Tensor, device: torch.device, precisions: List[str],
                  low_precision_side: Optional[int], repeats: int,
                  int8: Optional[nn.Module] = None) -> Tuple[dict, float]:
    """Seconds per image and argmax agreement (vs plain fp32) of one eval-mode teacher's inference variants,
    and the share of the most frequent class in the fp32 prediction (near 1: agreement says little).

    x: images of the step's teacher batch. On CPU the low-precision variants run on one image cut to
    `low_precision_side` pixels (they are an order of magnitude slower there, minutes per image at a
    realistic crop) and are compared with fp32 on that same image. `int8`: the teacher's int8 copy
    (furnace.quantize), run on all of x like the fp32 variants."""
    out: Dict[str, dict] = {}
    variants: List[Tuple[str, Callable, torch.Tensor, Optional[str]]] = []  # (name, fn, inputs, reference)

    def add(name: str, fn: Callable, inputs: torch.Tensor, reference: Optional[str]) -> None:
        variants.append((name, fn, inputs, reference))

    def plain(inputs):
        with torch.no_grad():
            return teacher(inputs)

    def inference_mode(inputs):
        with torch.inference_mode():
            return teacher(inputs)

    def folded(channels_last: bool) -> Callable:
        def fn(inputs):
            net = folded_teacher(teacher, channels_last)
            if net is None:
                raise RuntimeError(f"{type(teacher).__name__} could not be BN-folded (torch.fx trace or check failed)")
            with torch.no_grad():
                if channels_last:
                    inputs = inputs.contiguous(memory_format=torch.channels_last)
                return net(inputs, True)["logits"]
        return fn

    ref = "fp32 plain (no_grad, NCHW)"
    add(ref, plain, x, None)
    add("fp32 inference_mode", inference_mode, x, ref)
    add("fp32 BN folded, NCHW", folded(False), x, ref)
    add(FOLDED_VARIANT, folded(True), x, ref)
    # teacher_predict as mgd_step calls it, in fp32: the reference of the low-precision variants
    small_ref = "teacher_predict fp32 (comparison for low precision)"
    small = x if low_precision_side is None else x[:1, :, :low_precision_side, :low_precision_side]
    add(small_ref, lambda i: teacher_predict(teacher, i, "off", False)[0], small, ref if small is x else None)
    if int8 is not None:
        add(INT8_VARIANT, lambda i: teacher_predict(int8, i, "off", False)[0], x, ref)
    for p in precisions:
        if p != "fp32":
            add(f"teacher_predict {p} autocast", lambda i, p=p: teacher_predict(teacher, i, AMP[p], False)[0], small,
                small_ref)

    # warm-up call of each variant (its output gives the agreement), then the variants timed in turn, `repeats`
    # rounds, so that a change of machine load hits all of them alike; the fastest round counts (the one least
    # disturbed by other processes)
    logits = {name: fn(inputs) for name, fn, inputs, _ in variants}
    times: Dict[str, List[float]] = defaultdict(list)
    for _ in range(repeats):
        for name, fn, inputs, _ in variants:
            times[name].append(timed(lambda: fn(inputs), device, 1, warmup=0))
    labels = logits[ref].argmax(1)
    majority = float(labels.flatten().bincount().max()) / labels.numel()
    for name, fn, inputs, reference in variants:
        out[name] = dict(seconds_per_image=min(times[name]) / inputs.shape[0], images=inputs.shape[0],
                         side=list(inputs.shape[2:]),
                         argmax_agreement=1.0 if reference is None else agreement(logits[name], logits[reference]))
    return out, majority


def probe_student(student: nn.Module, x: torch.Tensor, device: torch.device, repeats: int) -> Dict[str, float]:
    """Seconds of one student forward + backward (train mode, fp32) on x, NCHW and channels_last: after a
    warm-up call of each, the fastest of `repeats` interleaved calls."""
    fns = {}
    for name, fmt in (("NCHW", torch.contiguous_format), ("channels_last", torch.channels_last)):
        net = copy.deepcopy(student).train().to(memory_format=fmt)
        inputs = x.contiguous(memory_format=fmt)

        def fn(net=net, inputs=inputs):
            out = net(inputs, return_features=True)
            (out["logits"].float().logsumexp(1).mean() + out["decoder"].float().mean()).backward()
        fns[name] = fn
    for fn in fns.values():
        fn()
    times = defaultdict(list)
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn, device, 1, warmup=0))
    return {name: min(t) for name, t in times.items()}


def count_step_flops(C: EasyDict, published: bool, nets: Dict[str, str], n_l: int, n_u: int, crop: int) -> int:
    """FLOPs of one step (forward and backward) of mgd_step (or published_mgd_step) under C (teacher_bn,
    teacher_labels), on 'meta' tensors: shapes only, nothing is computed."""
    meta = torch.device("meta")
    with meta:
        student = build_segmentor(nets["student"], C.num_classes).train()
        teachers = {r: build_segmentor(nets[r], C.num_classes).requires_grad_(False).train(C.teacher_bn == "train")
                    for r in ("deep", "wide")}
        batch = dict(x_l=torch.empty(n_l, 3, crop, crop), u0=torch.empty(n_u, 3, crop, crop),
                     u1=torch.empty(n_u, 3, crop, crop), mask=torch.empty(n_u, 1, crop, crop),
                     y_l=torch.zeros(n_l, crop, crop, dtype=torch.long))
        for role in teachers:  # offline pseudo-labels
            batch.update({f"{role}_{v}": torch.zeros(n, crop, crop, dtype=torch.long)
                          for v, n in (("l", n_l), ("u0", n_u), ("u1", n_u))})
    C = EasyDict(dict(C, amp="off", channels_last=False))
    with FlopCounterMode(display=False) as counter:
        if not published:
            loss, _ = mgd_step(student, teachers, batch, C, meta)
        else:
            loss, _ = published_mgd_step(student, teachers, batch, C, meta)
        loss.backward()
    return int(counter.get_total_flops())


def count_teacher_flops(C: EasyDict, nets: Dict[str, str], images: int, crop: int) -> Dict[str, int]:
    """FLOPs of each teacher's forward on `images` images (online and published: x_l, u0, u1, u_m; offline:
    u_m)."""
    total = {}
    for role in ("deep", "wide"):
        with torch.device("meta"):
            teacher = build_segmentor(nets[role], C.num_classes).eval()
            x = torch.empty(images, 3, crop, crop)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            teacher(x, return_features=True)
        total[role] = int(counter.get_total_flops())
    return total


def gradient_check(student: nn.Module, teachers: Dict[str, nn.Module], batch: Batch, C: EasyDict,
                   device: torch.device) -> dict:
    """Student gradients of published vs ours on one batch: teachers in eval mode for both, fp32, the student
    in eval mode (ours concatenates x_l and u_m in one student call, which changes train-mode BN statistics).

    grad_max_rel_diff = max over all parameters |g_published - g_ours| / max over all parameters |g_ours|."""
    C32 = EasyDict(dict(C, amp="off", channels_last=False, teacher_labels="online"))
    net = copy.deepcopy(student).float().to(memory_format=torch.contiguous_format).eval()
    for t in teachers.values():
        t.eval()
    grads, losses = {}, {}
    for name, step in (("ours", mgd_step), ("published", published_mgd_step)):
        net.zero_grad(set_to_none=True)
        loss, terms = step(net, teachers, batch, C32, device)
        loss.backward()
        grads[name] = [p.grad.detach().clone() for p in net.parameters()]
        losses[name] = {k: float(v) for k, v in terms.items()}
    scale = max(float(g.abs().max()) for g in grads["ours"])
    diff = max(float((a - b).abs().max()) for a, b in zip(grads["ours"], grads["published"]))
    shared = [k for k in losses["ours"] if k in losses["published"]]
    return dict(grad_max_rel_diff=diff / max(scale, 1e-30), grad_max_abs=scale,
                loss_terms_ours=losses["ours"], loss_terms_published=losses["published"],
                loss_terms_max_abs_diff=max(abs(losses["ours"][k] - losses["published"][k]) for k in shared),
                note="teachers eval-mode BN and fp32 for both, student in eval mode (ours runs x_l and u_m in "
                     "one student call, so train-mode BN batch statistics would differ from separate calls)")


def gradient_check_train_bn(student: nn.Module, teachers: Dict[str, nn.Module], batch: Batch, C_published: EasyDict,
                            device: torch.device) -> dict:
    """The published setting (mgd_step under setting='published') against the published schedule on one
    batch, as both train: student and teachers in train-mode BatchNorm (batch statistics of each call), fp32,
    the batch as one GPU's (gpu_batch = its size). Both call the networks separately in the published order,
    so the student's gradients and its BatchNorm running statistics after the step must agree.

    grad_max_rel_diff = max over all parameters |g_published - g_setting| / max over all parameters |g_setting|;
    bn_buffers_max_rel_diff the same over the student's running means and variances."""
    C32 = EasyDict(dict(C_published, amp="off", channels_last=False, gpu_batch=batch["x_l"].shape[0]))
    train_teachers = {r: copy.deepcopy(t).float().to(memory_format=torch.contiguous_format).train()
                      for r, t in teachers.items()}
    grads, losses, buffers = {}, {}, {}
    for name, step in (("published_setting", mgd_step), ("published", published_mgd_step)):
        net = copy.deepcopy(student).float().to(memory_format=torch.contiguous_format).train()
        loss, terms = step(net, train_teachers, batch, C32, device)
        loss.backward()
        grads[name] = [p.grad.detach().clone() for p in net.parameters()]
        buffers[name] = [b.detach().clone() for b in net.buffers() if b.is_floating_point()]
        losses[name] = {k: float(v) for k, v in terms.items()}

    def rel(a: List[torch.Tensor], b: List[torch.Tensor]) -> float:
        scale = max(float(x.abs().max()) for x in a)
        return max(float((x - y).abs().max()) for x, y in zip(a, b)) / max(scale, 1e-30)
    ours, pub = "published_setting", "published"
    shared = [k for k in losses[ours] if k in losses[pub]]
    return dict(grad_max_rel_diff=rel(grads[ours], grads[pub]), grad_max_abs=max(float(g.abs().max()) for g in grads[ours]),
                bn_buffers_max_rel_diff=rel(buffers[ours], buffers[pub]),
                loss_terms_published_setting=losses[ours], loss_terms_published=losses[pub],
                loss_terms_max_abs_diff=max(abs(losses[ours][k] - losses[pub][k]) for k in shared),
                note="student and teachers in train-mode BN, fp32, separate calls in the published order, both")


class Streams:
    """The Trainer's three training streams (labeled, u0, u1) at the benchmark's batch, and the CutMix masks."""

    def __init__(self, C: EasyDict, datasets: dict, device: torch.device, iters: int, epoch: int = 0):
        info = DistInfo(0, 1, 0, device)
        self.loaders = [stream_loader(datasets["labeled"], C, info, LABELED, epoch, iters),
                        stream_loader(datasets["unlabeled"], C, info, UNLABELED_0, epoch, iters),
                        stream_loader(datasets["unlabeled"], C, info, UNLABELED_1, epoch, iters)]
        self.it = zip(*self.loaders)
        self.device, self.C, self.n = device, C, 0

    def next(self) -> Batch:
        batch = training_batch(*next(self.it))
        h = w = self.C.crop_size
        batch["mask"] = cutmix_box_mask(self.C.batch_size, h, w, generator=torch.Generator().manual_seed(self.n))
        self.n += 1
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}


@contextlib.contextmanager
def timed_teacher_predict(watch: Stopwatch) -> Iterator[None]:
    """Times every furnace.methods.teacher_predict call (mgd_step looks it up at call time) as 'teacher'."""
    original = methods.teacher_predict

    def wrapper(*args, **kwargs):
        with watch("teacher"):
            return original(*args, **kwargs)

    methods.teacher_predict = wrapper
    try:
        yield
    finally:
        methods.teacher_predict = original


class Schedule:
    """A student, its optimizer, the teachers and the step function of one schedule being timed."""

    def __init__(self, name: str, student: nn.Module, teachers: Dict[str, nn.Module], C: EasyDict,
                 step: Callable, device: torch.device, teacher_precision: Dict[str, str]):
        self.name, self.student, self.teachers, self.C, self.step = name, student, teachers, C, step
        self.teacher_precision = teacher_precision
        self.device = device
        self.optimizer = torch.optim.SGD(param_groups(student, C.weight_decay), lr=C.lr, momentum=C.momentum)
        self.records: List[Dict[str, float]] = []
        self.peak_mb: List[float] = []
        self.step_mb: List[float] = []

    def run(self, streams: Streams, record: bool) -> None:
        watch = Stopwatch(self.device)
        sync(self.device)
        with watch("data"):
            batch = streams.next()
        reset_peak_memory(self.device)
        before = current_memory_mb(self.device)
        self.student.train()
        with watch("forward"):
            if self.step is published_mgd_step:
                loss, _ = published_mgd_step(self.student, self.teachers, batch, self.C, self.device, watch)
            else:
                with timed_teacher_predict(watch):
                    loss, _ = self.step(self.student, self.teachers, batch, self.C, self.device)
        self.optimizer.zero_grad(set_to_none=True)
        with watch("backward"):
            loss.backward()
        with watch("optimizer"):
            self.optimizer.step()
        sec = watch.read()
        memory = peak_memory_mb(self.device)
        if not torch.isfinite(loss.detach()):
            raise FloatingPointError(f"{self.name}: non-finite loss {float(loss)}")
        if record:
            parts = dict(data=sec["data"], teacher=sec.get("teacher", 0.0),
                         student_forward=sec["forward"] - sec.get("teacher", 0.0),
                         backward=sec["backward"], optimizer=sec["optimizer"])
            parts["step"] = sum(parts.values())
            self.records.append(parts)
            if memory is not None and before is not None:
                self.peak_mb.append(memory)
                self.step_mb.append(memory - before)

    def summary(self, images_per_step: int) -> dict:
        med = {k: statistics.median(r[k] for r in self.records) for k in self.records[0]}
        return dict(seconds=med, all_step_seconds=[r["step"] for r in self.records],
                    images_per_second=images_per_step / med["step"],
                    peak_memory_mb=max(self.peak_mb) if self.peak_mb else None,
                    step_memory_mb=max(self.step_mb) if self.step_mb else None,
                    precision=self.C.amp, channels_last=self.C.channels_last, teacher_bn=self.C.teacher_bn,
                    teacher_labels="online" if self.step is published_mgd_step else self.C.teacher_labels,
                    teacher_precision=self.teacher_precision)


def loader_throughput(C: EasyDict, datasets: dict, device: torch.device, batches: int) -> dict:
    """The three streams alone: images/s after the first batch (worker start-up is reported apart)."""
    t0 = time.perf_counter()
    streams = Streams(C, datasets, device, batches, epoch=1)
    streams.next()
    startup = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(batches - 1):
        streams.next()
    seconds = time.perf_counter() - t0
    return dict(num_workers=C.num_workers, batches=batches - 1, startup_seconds=startup,
                images_per_second=3 * C.batch_size * (batches - 1) / seconds)


def eval_speed(student: nn.Module, device: torch.device, size: int, crop: int, repeats: int) -> dict:
    """sliding_probs on one normalised size x size image: images/s with windows batched and one per call."""
    student = copy.deepcopy(student).eval()
    image = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    out = {}
    for name, max_batch in (("batched", 8), ("one_window_per_call", 1)):
        seconds = timed(lambda: sliding_probs(student, image, crop, max_batch=max_batch), device, repeats)
        out[f"{name}_images_per_second"] = 1.0 / seconds
    probs = sliding_probs(student, image, crop)
    stride = -(-crop * 2 // 3)
    per_side = -(-max(size - crop, 0) // stride) + 1
    out.update(image_size=size, crop=crop, windows=per_side ** 2,
               probs_on_device=str(probs.device) == str(image.device), argmax_device=str(probs.argmax(1).device))
    return out


def offline_teacher_labels(teachers: Dict[str, nn.Module], datasets: dict, C: EasyDict, device: torch.device,
                           precisions: Dict[str, str], images: int) -> dict:
    """Offline pseudo-labels (furnace.teacher_labels.precompute, as the trainer makes them) of the first `images`
    images of each training list, into a temporary folder, attached to the datasets, which are cut to those
    images so that every stream, online or offline, draws from them. Returns the cost of making them."""
    for ds in datasets.values():
        ds.names = ds.names[:images]
    C_off = EasyDict(dict(C, teacher_label_dir=tempfile.mkdtemp(prefix="mgd_bench_teacher_labels_")))
    t0 = time.perf_counter()
    root = teacher_labels.precompute(teachers, datasets, C_off, DistInfo(0, 1, 0, device), precisions)
    seconds = time.perf_counter() - t0
    teacher_labels.attach(datasets, root)
    n = len({name for ds in datasets.values() for name in ds.names})
    return dict(images=n, seconds=seconds, seconds_per_image_both_teachers=seconds / n, eval_crop=C.eval_crop_size,
                folder=root)


def offline_agreement(teachers: Dict[str, nn.Module], batch: Batch, C: EasyDict) -> Dict[str, float]:
    """Per teacher: share of the pixels with an offline pseudo-label where it equals the online teacher's argmax
    on the same augmented crops (x_l, u0, u1 of one batch)."""
    out = {}
    for role, teacher in teachers.items():
        views = [batch["x_l"], batch["u0"], batch["u1"]]
        logits, _ = teacher_predict(teacher, torch.cat(views), C.amp, False, C.channels_last)
        offline = torch.cat([batch[f"{role}_l"], batch[f"{role}_u0"], batch[f"{role}_u1"]])
        out[role] = teacher_labels.agreement(offline, logits)
    return out


# --------------------------------------------------------------------------------------------- the run
def ensure_toy_data(path: Optional[str]) -> str:
    """A toy VOC root: `path` if given (must exist), DATA/toy/pascal_voc if present, else generated in /tmp."""
    if path:
        if not osp.isdir(path):
            raise FileNotFoundError(f"--data-root {path} does not exist "
                                    "(make one: python tools/make_toy_data.py --out DIR)")
        return path
    default = osp.join(ROOT, "DATA", "toy", "pascal_voc")
    if osp.isdir(default):
        return default
    out = tempfile.mkdtemp(prefix="mgd_bench_toy_")
    subprocess.run([sys.executable, osp.join(ROOT, "tools", "make_toy_data.py"), "--out", out, "--num-train", "64",
                    "--num-val", "4", "--num-city-train", "2", "--num-city-val", "2"], check=True,
                   stdout=subprocess.DEVNULL)
    return osp.join(out, "pascal_voc")


def make_config(args, data_root: str, setting: str = "fast") -> EasyDict:
    """The benchmark's config in `setting` ('fast': ours, fp32 unless the caller sets amp; 'published': the
    setting's own keys, fp32 as published)."""
    values = dict(data_root=data_root, crop_size=args.crop, eval_crop_size=args.crop, batch_size=args.batch,
                  num_workers=args.num_workers, num_classes=args.num_classes, network=args.student,
                  teacher_deep_network=args.deep, teacher_wide_network=args.wide, partition=8, channels_last=False,
                  output_dir=tempfile.gettempdir(), seed=0, setting=setting)
    if setting == "fast":
        values["amp"] = "off"
    values["class_names"] = (VOC_CLASS_NAMES if args.num_classes == 21
                             else [f"class{i}" for i in range(args.num_classes)])
    return resolve(new_config("voc", __file__), [(k, repr(v), "tools/benchmark.py") for k, v in values.items()])


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="CI size: crop 32, mobilenet_v2 student, resnet18 teachers, "
                                                       "1 repeat, small peak/eval sizes")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--crop", type=int, help="training crop (default 321; --tiny 32)")
    p.add_argument("--batch", type=int, default=2, help="labeled images per step; u0 and u1 the same (default 2)")
    p.add_argument("--student", help="student network (default resnet18; --tiny mobilenet_v2)")
    p.add_argument("--deep", help="deep teacher network (default resnet101; --tiny resnet18)")
    p.add_argument("--wide", help="wide teacher network (default wide_resnet50_2; --tiny resnet18)")
    p.add_argument("--deep-checkpoint", help="trained deep teacher (makes the argmax agreement meaningful; "
                                             "default: random init)")
    p.add_argument("--wide-checkpoint", help="trained wide teacher (default: random init)")
    p.add_argument("--num-classes", type=int, default=21)
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="ours: autocast precision; auto = the fastest measured teacher precision among fp32/bf16")
    p.add_argument("--teacher-precision", default="auto", choices=["auto", "amp", "int8"],
                   help="teachers of ours: 'auto' int8 where the trainer would take it (agreement >= the config's "
                        "teacher_int8_min_agreement) and it is faster; 'amp' as the student; 'int8' always")
    p.add_argument("--channels-last", default="auto", choices=["auto", "on", "off"],
                   help="ours: NHWC teachers and student; auto = whichever the teacher probe measured faster")
    p.add_argument("--warmup", type=int, help="untimed steps of each schedule (default 1)")
    p.add_argument("--repeats", type=int, help="timed steps of each schedule (default 3; --tiny 1)")
    p.add_argument("--num-workers", type=int, help="DataLoader workers per stream (default: the config's)")
    p.add_argument("--data-root", help="toy VOC root (default DATA/toy/pascal_voc, generated if missing)")
    p.add_argument("--probe-images", type=int,
                   help="images of the step's teacher batch for the teacher inference probe (default: all "
                        "4 x batch on CUDA and with --tiny, else 2)")
    p.add_argument("--probe-repeats", type=int, help="timed rounds of the teacher and student probes after a "
                                                     "warm-up call; the fastest counts (default 2; --tiny 1)")
    p.add_argument("--grad-crop", type=int, help="side of the gradient-check batch, cut from the step batch "
                                                 "(default min(crop, 161): the equality does not depend on it)")
    p.add_argument("--low-precision-side", type=int, default=97,
                   help="CPU: the (slow) bf16 teacher probe runs on one image cut to this side (default 97)")
    p.add_argument("--offline-images", type=int, help="images of each training list given offline teacher labels; "
                   "the steps draw from these only (default 48; --tiny 8)")
    p.add_argument("--loader-batches", type=int, help="batches for the loader-alone measurement (default 8; --tiny 4)")
    p.add_argument("--eval-size", type=int, help="side of the evaluation image (default 512; --tiny 64)")
    p.add_argument("--peak-n", type=int, help="matrix side for the peak (default: best of 1024, 2048, 4096 on CPU, "
                                              "2048, 4096, 8192 on CUDA; --tiny 512)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's; --tiny 1, which keeps the "
                                               "CI run quick on a loaded machine)")
    p.add_argument("--json", help="write all figures to this file")
    args = p.parse_args(argv)
    tiny = args.tiny
    defaults = dict(crop=32 if tiny else 321, student="mobilenet_v2" if tiny else "resnet18",
                    deep="resnet18" if tiny else "resnet101", wide="resnet18" if tiny else "wide_resnet50_2",
                    warmup=1, repeats=1 if tiny else 3, probe_repeats=1 if tiny else 2, loader_batches=4 if tiny else 8,
                    offline_images=8 if tiny else 48, eval_size=64 if tiny else 512, threads=1 if tiny else None,
                    peak_n=512 if tiny else None)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.num_workers is None:
        args.num_workers = 2 if tiny else new_config("voc", __file__).num_workers
    if args.repeats < 1 or args.warmup < 0 or args.batch < 1 or args.crop < 16:
        p.error("need --repeats >= 1, --warmup >= 0, --batch >= 1, --crop >= 16")
    return args


def log(msg: str) -> None:
    print(msg, flush=True)


def main(argv=None) -> dict:
    args = parse_args(argv)
    # The config's 4 workers x 3 streams exceed the 2 "suggested" on a 2-core machine: measured below instead.
    warnings.filterwarnings("ignore", message="This DataLoader will create")
    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    use_cuda = torch.cuda.is_available() if args.device == "auto" else args.device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but CUDA is not available")
    device = torch.device("cuda" if use_cuda else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    n_l = n_u = args.batch
    if args.probe_images is None:
        args.probe_images = 4 * args.batch if (args.tiny or device.type == "cuda") else 2
    nets = dict(student=args.student, deep=args.deep, wide=args.wide)
    result: dict = dict(config=dict(device=str(device), crop=args.crop, batch_labeled=n_l, batch_unlabeled=n_u,
                                    networks=nets, warmup=args.warmup, repeats=args.repeats,
                                    num_workers=args.num_workers, tiny=args.tiny))
    env = dict(torch=torch.__version__, python=platform.python_version(), threads=torch.get_num_threads(),
               cpu_capability=torch.backends.cpu.get_cpu_capability(), cpu_count=os.cpu_count(),
               loadavg_start=loadavg())
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    result["env"] = env
    log(f"# MGD step benchmark on {env.get('gpu', 'CPU')} ({env['cpu_count']} cores, {env['cpu_capability']}, "
        f"{env['threads']} threads), torch {env['torch']}; load average at start {env['loadavg_start']}")

    # -- peak matrix-multiply rate, per precision
    precisions = ["fp32", "bf16"] + (["fp16"] if device.type == "cuda" else [])
    sizes = ([args.peak_n] if args.peak_n else [2048, 4096, 8192] if device.type == "cuda" else [1024, 2048, 4096])
    peak = {}
    for p in precisions:
        # CPUs without native bf16 run low-precision matmuls ~100x slower: keep those small
        n = sizes if (device.type == "cuda" or p == "fp32") else [max(128, min(sizes) // 2)]
        peak[p] = peak_matmul(device, p, n)
        log(f"peak torch.mm {p}: {peak[p]['gflops']:.1f} GFLOP/s (best of n = {n}: "
            + ", ".join(f"{v:.1f}" for v in peak[p]["gflops_per_size"].values()) + ")")
    try_int8 = args.teacher_precision != "amp" and int8_supported(device)
    if try_int8:
        peak["int8"] = peak_matmul(device, "int8", sizes if device.type == "cpu" else [4096])
        peak["int8"]["engine"] = int8_engine()
        log(f"peak int8 quantized GEMM ({int8_engine()}): {peak['int8']['gflops']:.1f} GOP/s")
    result["peak_matmul"] = peak

    # -- data, config, networks
    data_root = ensure_toy_data(args.data_root)
    C = make_config(args, data_root)
    datasets = build_datasets(C)
    torch.manual_seed(0)
    student = build_segmentor(args.student, C.num_classes).to(device)
    teachers = {}
    for role in ("deep", "wide"):
        path = getattr(args, f"{role}_checkpoint")
        net = (load_segmentor(path, nets[role], C.num_classes, role=f"teacher_{role}") if path
               else build_segmentor(nets[role], C.num_classes))
        teachers[role] = net.requires_grad_(False).eval().to(device)
    result["config"]["teacher_weights"] = {r: getattr(args, f"{r}_checkpoint") or "random init" for r in teachers}

    # -- int8 teacher copies, made and checked as the trainer makes them (furnace.engine.int8_copies)
    int8, int8_info = {}, {}
    if try_int8:
        for role, (copy8, agree, seconds) in int8_copies(teachers, C, datasets).items():
            int8[role] = copy8
            int8_info[role] = dict(check_agreement=agree, quantize_and_check_seconds=seconds,
                                   calibration_images=C.teacher_calibration_images,
                                   check_images=C.teacher_check_images)
            log(f"teacher {role}: int8 copy made and checked in {seconds:.0f} s; argmax agreement with fp32 on the "
                f"valid pixels of {C.teacher_check_images} labeled crops: {agree:.4f}")
    result["int8_teachers"] = int8_info

    # -- teacher inference variants, on the teacher batch of one step (u0, u1, u_m, x_l)
    probe_streams = Streams(C, datasets, device, iters=1, epoch=2)
    batch = probe_streams.next()
    del probe_streams  # its worker processes end here
    teacher_in = torch.cat([batch["u0"], batch["u1"], mix(batch["u0"], batch["u1"], batch["mask"]), batch["x_l"]])
    probe, majority = {}, {}
    for role, net in teachers.items():
        side = min(args.low_precision_side, args.crop) if device.type == "cpu" else None
        probe[role], majority[role] = probe_teacher(net, teacher_in[:args.probe_images], device, precisions, side,
                                                    repeats=args.probe_repeats, int8=int8.get(role))
        for name, r in probe[role].items():
            log(f"teacher {role} ({nets[role]}) {name}: {r['seconds_per_image'] * 1000:.0f} ms/image "
                f"({r['images']} images), argmax agreement with fp32 {r['argmax_agreement']:.4f}")
    result["teacher_inference"] = probe
    result["teacher_majority_class_share"] = majority

    def teacher_seconds(name):  # both teachers, per image
        return sum(probe[r][name]["seconds_per_image"] for r in teachers)

    low = {p: teacher_seconds(f"teacher_predict {p} autocast")
           / teacher_seconds("teacher_predict fp32 (comparison for low precision)")
           for p in precisions if p != "fp32"}
    if args.precision == "auto":
        precision = "bf16" if low["bf16"] < 1 else "fp32"
        why = (f"fastest measured: bf16 teacher inference takes {low['bf16']:.2f}x the fp32 time on this device")
    else:
        precision, why = args.precision, "set by --precision"
    student_probe = probe_student(student, torch.cat([batch["x_l"], batch["u0"]]), device, args.probe_repeats)
    result["student_memory_format"] = student_probe
    log("student forward+backward on the step's student batch: " + ", ".join(
        f"{k} {v:.2f} s" for k, v in student_probe.items()))
    if args.channels_last == "auto":
        cl = student_probe["channels_last"] < student_probe["NCHW"]
        why_cl = ("fastest measured student forward+backward (C.channels_last sets the student's format; the "
                  "BN-folded teachers run NHWC on CPU whatever it is)" if device.type == "cpu" else
                  "fastest measured student forward+backward (C.channels_last sets the student's and the "
                  "teachers' format)")
    else:
        cl, why_cl = args.channels_last == "on", "set by --channels-last"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("--precision fp16 needs CUDA")
    # teachers: int8 where the trainer would take it (teacher_precision 'auto': agreement at least
    # teacher_int8_min_agreement) and where it is measured faster than the fp32 BN-folded teacher
    teacher_precision, why_teacher = {}, {}
    for role in teachers:
        if role not in int8:
            teacher_precision[role] = precision
            why_teacher[role] = ("--teacher-precision amp" if args.teacher_precision == "amp"
                                 else f"no int8 kernels on {device.type}")
            continue
        agree = int8_info[role]["check_agreement"]
        ratio = probe[role][INT8_VARIANT]["seconds_per_image"] / probe[role][FOLDED_VARIANT]["seconds_per_image"]
        ok = agree >= C.teacher_int8_min_agreement
        use = keeps_int8(EasyDict(C, teacher_precision=args.teacher_precision), agree) and (
            args.teacher_precision == "int8" or ratio < 1)
        teacher_precision[role] = "int8" if use else precision
        why_teacher[role] = (f"int8 takes {ratio:.2f}x the fp32 time, agreement {agree:.4f} "
                             f"{'>=' if ok else '<'} teacher_int8_min_agreement {C.teacher_int8_min_agreement}"
                             + (" (forced by --teacher-precision int8)" if args.teacher_precision == "int8" else ""))
    result["ours_teacher_precision"] = dict(precision=teacher_precision, reason=why_teacher)
    log("ours: teachers " + ", ".join(f"{r} {teacher_precision[r]} ({why_teacher[r]})" for r in teachers))
    result["ours_choice"] = dict(precision=precision, precision_reason=why, channels_last=cl,
                                 channels_last_reason=why_cl, low_precision_time_ratio=low)
    log(f"ours: precision {precision} ({why}); channels_last {cl} ({why_cl})")

    # -- gradient equality (same batch, same eval-mode teachers, fp32, student in eval mode)
    g = min(args.grad_crop or 161, args.crop)
    grad_batch = {k: v[..., :g, :g] for k, v in batch.items()}
    grad = gradient_check(student, teachers, grad_batch, C, device)
    grad["crop"] = g
    result["gradient_check"] = grad
    result["grad_max_rel_diff"] = grad["grad_max_rel_diff"]
    log(f"gradient check: max |g_published - g_ours| / max |g_ours| = {grad['grad_max_rel_diff']:.2e} "
        f"({grad['note']})")

    # -- the published setting against the published schedule, both in train-mode BatchNorm (as they train)
    C_set = make_config(args, data_root, "published")
    grad_train = gradient_check_train_bn(student, teachers, grad_batch, C_set, device)
    grad_train["crop"] = g
    result["gradient_check_train_bn"] = grad_train
    result["grad_max_rel_diff_train_bn"] = grad_train["grad_max_rel_diff"]
    log(f"gradient check, published setting vs published schedule in train-mode BN: max |g_published - g_setting| "
        f"/ max |g_setting| = {grad_train['grad_max_rel_diff']:.2e}, student BN running statistics "
        f"{grad_train['bn_buffers_max_rel_diff']:.2e}")

    # -- the steps, interleaved. Ours: the project's defaults (offline teachers, eval-mode BN), the precision and
    # memory format chosen above. Published: its own teacher copies in train-mode BN, fp32, NCHW.
    C_ours = EasyDict(dict(C, amp=AMP[precision], channels_last=cl, teacher_bn="eval"))
    C_pub = EasyDict(dict(C, amp="off", channels_last=False, teacher_bn="train"))
    # (teacher_predict keeps the BN-folded copy of each fp32 teacher, in the chosen memory format)
    fmt = torch.channels_last if cl else torch.contiguous_format
    ours_teachers = {r: int8[r] if teacher_precision[r] == "int8" else t for r, t in teachers.items()}
    pub_teachers = {r: copy.deepcopy(t).train() for r, t in teachers.items()}

    # -- offline teachers: pseudo-labels made once per image (from here on every stream carries them)
    offline = offline_teacher_labels(ours_teachers, datasets, C_ours, device, teacher_precision, args.offline_images)
    check_streams = Streams(C, datasets, device, iters=1, epoch=3)
    offline["agreement_with_online"] = offline_agreement(ours_teachers, check_streams.next(), C_ours)
    del check_streams
    log(f"offline teacher labels: {offline['images']} images in {offline['seconds']:.1f} s "
        f"({offline['seconds_per_image_both_teachers']:.2f} s per image, both teachers); agreement with the online "
        "argmax on the same crops: " + ", ".join(f"{r} {v:.4f}" for r, v in offline["agreement_with_online"].items()))
    C_online = EasyDict(dict(C_ours, teacher_labels="online"))

    schedules = [Schedule("ours", copy.deepcopy(student).to(memory_format=fmt), ours_teachers, C_ours, mgd_step,
                          device, teacher_precision),
                 Schedule("published", copy.deepcopy(student), pub_teachers, C_pub, published_mgd_step, device,
                          {r: "fp32" for r in teachers}),
                 Schedule("ours_online", copy.deepcopy(student).to(memory_format=fmt), ours_teachers, C_online,
                          mgd_step, device, teacher_precision)]
    # the published setting (furnace.methods.mgd_step, setting='published'): fp32 as published, and at amp='auto'
    # where that resolves to another precision on this device (teachers in train-mode BN: no int8, no folding)
    schedules.append(Schedule("published_setting", copy.deepcopy(student), pub_teachers, C_set, mgd_step, device,
                              {r: "fp32" for r in teachers}))
    # opt-in: without the student's no-grad calls on u0 and u1 (same gradients, other BN running statistics)
    schedules.append(Schedule("published_setting_lean", copy.deepcopy(student), pub_teachers,
                              EasyDict(dict(C_set, student_bn_calls=False)), mgd_step, device,
                              {r: "fp32" for r in teachers}))
    amp_auto = methods.resolve_amp("auto", device)
    result["published_setting_amp_auto"] = dict(amp=amp_auto, reason=methods.amp_reason(device))
    log(f"published setting at amp='auto': {amp_auto} ({methods.amp_reason(device)})"
        + ("; the same as fp32, not timed twice" if amp_auto == "off" else ""))
    if amp_auto != "off":
        schedules.append(Schedule("published_setting_amp", copy.deepcopy(student), pub_teachers,
                                  EasyDict(dict(C_set, amp=amp_auto)), mgd_step, device,
                                  {r: amp_auto for r in teachers}))
    all_fp32 = precision == "fp32" and all(p == "fp32" for p in teacher_precision.values())
    if not all_fp32:  # same-precision comparison: ours with fp32 student and fp32 teachers (with offline teachers
        # the pseudo-labels it loads are the files made above: inputs, not part of the step's arithmetic)
        schedules.append(Schedule("ours_fp32", copy.deepcopy(student), teachers, EasyDict(dict(C_ours, amp="off")),
                                  mgd_step, device, {r: "fp32" for r in teachers}))

    # -- FLOPs of one step (meta tensors)
    flops = {s.name: count_step_flops(s.C, s.step is published_mgd_step, nets, n_l, n_u, args.crop)
             for s in schedules if s.name != "ours_fp32"}  # ours_fp32: the FLOPs of ours
    result["flops_per_step"] = flops
    result["flops_teachers_per_step"] = count_teacher_flops(C, nets, 3 * n_u + n_l, args.crop)
    result["flops_teachers_per_step_offline"] = count_teacher_flops(C, nets, n_u, args.crop)
    log("FLOPs per step: " + ", ".join(f"{name} {f / 1e9:.1f} G" for name, f in flops.items()))
    rounds = args.warmup + args.repeats
    streams = Streams(C, datasets, device, iters=rounds * len(schedules))
    for r in range(rounds):
        order = schedules if r % 2 == 0 else schedules[::-1]
        for s in order:
            s.run(streams, record=r >= args.warmup)
        log(f"round {r + 1}/{rounds}" + (" (warm-up)" if r < args.warmup else "") + ": "
            + ", ".join(f"{s.name} {s.records[-1]['step']:.2f} s" for s in schedules if s.records and r >= args.warmup)
            + f"; load {loadavg()}")
    images_per_step = 3 * args.batch  # x_l, u0 and u1 loaded per step
    steps = {s.name: s.summary(images_per_step) for s in schedules}
    del streams
    result["steps"] = steps
    t_ours, t_pub = steps["ours"]["seconds"]["step"], steps["published"]["seconds"]["step"]
    t_ours32 = steps.get("ours_fp32", steps["ours"])["seconds"]["step"]
    t_online = steps["ours_online"]["seconds"]["step"]
    # the peak again after the steps: the better of the two measurements is the machine's limit (other
    # processes can only slow a measurement down)
    for p in {"fp32", precision, *teacher_precision.values()}:
        again = peak_matmul(device, p, [peak[p]["n"]])
        peak[p]["gflops_after_steps"] = again["gflops"]
        peak[p]["gflops"] = max(peak[p]["gflops"], again["gflops"])
    log(f"peak torch.mm fp32 after the steps: {peak['fp32']['gflops_after_steps']:.1f} GFLOP/s; "
        f"peak used: {peak['fp32']['gflops']:.1f}")
    result["speedup_vs_published"] = t_pub / t_ours
    result["speedup_same_precision"] = t_pub / t_ours32
    result["speedup_online_vs_published"] = t_pub / t_online
    # the published setting (what the paper's experiments run) against the published schedule, both fp32
    result["speedup_published_setting"] = t_pub / steps["published_setting"]["seconds"]["step"]
    result["speedup_published_setting_lean"] = t_pub / steps["published_setting_lean"]["seconds"]["step"]
    # what the published setting can gain at all at the published schedule's efficiency: its FLOPs are the
    # published schedule's (every network call is part of the update or of the BN statistics)
    result["flop_bound_published_setting"] = flops["published"] / flops["published_setting"]
    result["flop_bound_published_setting_lean"] = flops["published"] / flops["published_setting_lean"]
    if "published_setting_amp" in steps:
        result["speedup_published_setting_amp"] = t_pub / steps["published_setting_amp"]["seconds"]["step"]
    result["speedup_note"] = (f"published step (fp32, train-mode teacher BN, separate calls) over ours (offline "
                              f"teachers: pseudo-labels of x_l, u0, u1 loaded with the batch; student "
                              f"{precision}, teachers " + ", ".join(f"{r} {p}" for r, p in teacher_precision.items())
                              + f", eval-mode BN-folded teachers via teacher_predict, student channels_last={cl}); "
                              "same batch, crop, data streams; same-precision ratio uses ours with fp32 student "
                              "and fp32 teachers" + (" (ours already all fp32: the same measurement)" if all_fp32 else ""))
    # utilization: the step time the machine's measured peaks allow (each teacher's FLOPs at the peak of its
    # precision, the student's at the student's) over the measured step time
    for name, st in steps.items():
        sec, fl = st["seconds"], flops[name if name in flops else "ours"]
        t_flops = result["flops_teachers_per_step_offline" if st["teacher_labels"] == "offline"
                         else "flops_teachers_per_step"]
        student_rate = peak["fp32" if st["precision"] == "off" else st["precision"]]["gflops"] * 1e9
        teacher_ideal = sum(t_flops[r] / (peak[p]["gflops"] * 1e9) for r, p in st["teacher_precision"].items())
        student_ideal = (fl - sum(t_flops.values())) / student_rate
        st["ideal_seconds"] = teacher_ideal + student_ideal
        st["utilization_by_phase"] = dict(
            teachers=teacher_ideal / sec["teacher"],
            student_forward_backward=student_ideal / (sec["student_forward"] + sec["backward"]),
            step=st["ideal_seconds"] / sec["step"])
    result["utilization"] = steps["ours"]["utilization_by_phase"]["step"]
    result["utilization_published"] = steps["published"]["utilization_by_phase"]["step"]
    iters_per_epoch = max(len(d) for d in datasets.values()) // args.batch
    offline.update(step_seconds=t_ours, speedup_vs_online=t_online / t_ours,
                   break_even_epochs=offline["seconds"] / max((t_online - t_ours) * iters_per_epoch, 1e-9),
                   note="C.teacher_labels='offline': pseudo-labels of x_l, u0, u1 made once per image (whole image, "
                        "scale 1, eval sliding windows) and augmented with it; the teachers still see u_m for the "
                        "image- and region-level terms. Agreement: offline label vs online argmax on the same "
                        "augmented crops, crop padding (no offline label) excluded.")
    result["offline_teachers"] = offline

    # -- loader alone, evaluation speed
    result["loader"] = loader_throughput(C, datasets, device, args.loader_batches)
    result["loader"]["step_consumes_images_per_second"] = steps["ours"]["images_per_second"]
    result["loader"]["margin"] = result["loader"]["images_per_second"] / steps["ours"]["images_per_second"]
    result["eval"] = eval_speed(schedules[0].student, device, args.eval_size, args.crop, repeats=args.repeats)
    env["loadavg_end"] = loadavg()
    result["total_seconds"] = time.perf_counter() - t_start
    log("\n" + format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


def format_table(R: dict) -> str:
    cfg, env = R["config"], R["env"]
    lines = [f"## MGD step: {cfg['networks']['student']} student, {cfg['networks']['deep']} + "
             f"{cfg['networks']['wide']} teachers, crop {cfg['crop']}, batch {cfg['batch_labeled']} labeled + "
             f"{cfg['batch_unlabeled']} unlabeled, {cfg['device']}",
             f"load average start {env['loadavg_start']}, end {env['loadavg_end']}; median of {cfg['repeats']} "
             f"step(s) after {cfg['warmup']} warm-up, schedules interleaved", "",
             "| schedule | precision | data | teachers | student fwd+loss | backward | optimizer | step (s) | "
             "images/s | peak mem (MB) | step mem (MB) | GFLOP/step | utilization |",
             "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for name, s in R["steps"].items():
        sec = s["seconds"]
        prec = "fp32" if s["precision"] == "off" else s["precision"]
        teacher_prec = "/".join(sorted(set(s["teacher_precision"].values())))
        fl = R["flops_per_step"].get(name, R["flops_per_step"]["ours"])
        util = s["utilization_by_phase"]["step"]
        mem = f"{s['peak_memory_mb']:.0f} | {s['step_memory_mb']:.0f}" if s["peak_memory_mb"] is not None else "- | -"
        layout = "NHWC" if s["channels_last"] else "NCHW"
        lines.append(f"| {name} | student {prec} {layout}, teachers {teacher_prec}, BN {s['teacher_bn']} | "
                     f"{sec['data']:.3f} | {sec['teacher']:.2f} | {sec['student_forward']:.2f} | {sec['backward']:.2f} "
                     f"| {sec['optimizer']:.3f} | {sec['step']:.2f} | {s['images_per_second']:.2f} | {mem} | "
                     f"{fl / 1e9:.0f} | {util:.1%} |")
    g = R["gradient_check"]
    L, E, O = R["loader"], R["eval"], R["offline_teachers"]
    lines += ["", f"speedup_vs_published = {R['speedup_vs_published']:.2f}x, speedup_same_precision = "
                  f"{R['speedup_same_precision']:.2f}x ({R['speedup_note']})",
              f"speedup_published_setting = {R['speedup_published_setting']:.2f}x (the published schedule's step "
              f"over the published setting's, both fp32"
              + (f"; at amp={R['published_setting_amp_auto']['amp']}: {R['speedup_published_setting_amp']:.2f}x"
                 if "speedup_published_setting_amp" in R else
                 f"; amp='auto' is fp32 here: {R['published_setting_amp_auto']['reason']}")
              + f"; opt-in student_bn_calls=False: {R['speedup_published_setting_lean']:.2f}x). FLOP bound (published "
              f"FLOPs over the setting's): {R['flop_bound_published_setting']:.2f}x, opt-in "
              f"{R['flop_bound_published_setting_lean']:.2f}x: teachers in train-mode BN admit no folding, int8 or "
              "offline labels, and every call of the published schedule but the reverse terms is needed",
              f"grad_max_rel_diff_train_bn = {R['grad_max_rel_diff_train_bn']:.2e}, student BN running statistics "
              f"{R['gradient_check_train_bn']['bn_buffers_max_rel_diff']:.2e} (published setting vs published "
              f"schedule, {R['gradient_check_train_bn']['note']})",
              f"utilization (ours) = {R['utilization']:.1%}, published {R['utilization_published']:.1%}: the step "
              f"time at the measured peak of each part's precision (teachers: theirs, student: its own) over the "
              f"measured step time",
              "utilization by phase: " + "; ".join(
                  f"{n}: teachers {s['utilization_by_phase']['teachers']:.1%}, student forward+backward "
                  f"{s['utilization_by_phase']['student_forward_backward']:.1%}" for n, s in R["steps"].items())
              + f" (teachers do {sum(R['flops_teachers_per_step_offline'].values()) / R['flops_per_step']['ours']:.0%}"
                f" of ours' FLOPs, {sum(R['flops_teachers_per_step'].values()) / R['flops_per_step']['ours_online']:.0%}"
                " of ours_online's)",
              "ours' teachers: " + "; ".join(f"{r} {p} ({R['ours_teacher_precision']['reason'][r]})"
                                            for r, p in R["ours_teacher_precision"]["precision"].items()),
              "peak matrix multiply: " + ", ".join(f"{p} {v['gflops']:.1f} G{'OP' if p == 'int8' else 'FLOP'}/s (n={v['n']})"
                                            for p, v in R["peak_matmul"].items()),
              f"grad_max_rel_diff = {g['grad_max_rel_diff']:.2e} ({g['note']})",
              f"loader alone ({L['num_workers']} workers x 3 streams): {L['images_per_second']:.1f} images/s vs "
              f"{L['step_consumes_images_per_second']:.2f} consumed by the step ({L['margin']:.0f}x margin); "
              f"worker start-up {L['startup_seconds']:.2f} s",
              f"sliding-window eval ({E['image_size']}x{E['image_size']} image, crop {E['crop']}, {E['windows']} "
              f"windows): {E['batched_images_per_second']:.2f} images/s batched, "
              f"{E['one_window_per_call_images_per_second']:.2f} one window per call; probabilities stay on "
              f"{E['argmax_device']} until the argmax: {E['probs_on_device']}",
              f"offline teachers (ours, the default): step {O['speedup_vs_online']:.2f}x faster than ours_online, "
              f"which is {R['speedup_online_vs_published']:.2f}x faster than published; labels made once in "
              f"{O['seconds_per_image_both_teachers']:.2f} s per image (both teachers, eval crop {O['eval_crop']}), "
              f"repaid after {O['break_even_epochs']:.2f} epochs on these {O['images']} images; agreement with the "
              f"online argmax: " + ", ".join(f"{r} {v:.4f}" for r, v in O["agreement_with_online"].items()), "",
              "| teacher inference variant | " + " | ".join(R["teacher_inference"]) + " | argmax agreement |",
              "|---|" + "--:|" * (len(R["teacher_inference"]) + 1)]
    first = next(iter(R["teacher_inference"].values()))
    for variant in first:
        cells = [f"{R['teacher_inference'][r][variant]['seconds_per_image'] * 1000:.0f} ms/img"
                 for r in R["teacher_inference"]]
        agree = min(R["teacher_inference"][r][variant]["argmax_agreement"] for r in R["teacher_inference"])
        side = "x".join(map(str, first[variant]["side"]))
        lines.append(f"| {variant} ({first[variant]['images']} img {side}) | " + " | ".join(cells)
                     + f" | {agree:.4f} |")
    lines.append("teacher weights: " + ", ".join(f"{r} {w}" for r, w in cfg["teacher_weights"].items())
                 + "; share of the most frequent class in the fp32 prediction: "
                 + ", ".join(f"{r} {v:.2f}" for r, v in R["teacher_majority_class_share"].items()))
    lines.append(f"\ntotal benchmark time {R['total_seconds']:.0f} s")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
