#!/usr/bin/env python
"""The first run on a CUDA GPU, in one command (bash tools/gpu_check.sh, which keeps it under 8 minutes):

  1. the CUDA tests (pytest -m cuda; they skip on a machine without CUDA);
  2. one training step of each method (supervised, cps, mgd in the published and the fast setting) at the
     published size, crop 512 and batch 8 labeled + 8 unlabeled, in bf16 and fp16: loss and gradients finite,
     seconds (after one warm-up step), peak memory;
  3. tools/benchmark.py at that size: the published schedule, the published setting and the fast setting;
  4. the data loader alone per worker count against what the step consumes;
  5. sliding-window evaluation speed, windows batched and one per call;
and prints one table of all of it. Networks are random-init (speed and finiteness do not depend on weights).

  python tools/gpu_check.py                       # what gpu_check.sh runs
  python tools/gpu_check.py --device cpu --tiny --skip-tests --skip-benchmark   # CPU smoke test (fp32, CI)
"""
from __future__ import annotations

import argparse
import json
import math
import os.path as osp
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Dict, List, Optional

import torch
from easydict import EasyDict

from furnace.config import new_config, resolve
from furnace.data import VOC_CLASS_NAMES
from furnace.engine import build_datasets
from furnace.evaluate import sliding_probs
from furnace.methods.cps import CPSPair, cps_step
from furnace.methods.mgd import mgd_step, offline_labels
from furnace.methods.supervised import supervised_step
from furnace.models import build_segmentor
from furnace.teachers import ROLES, FrozenTeacher

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))  # the sibling tool benchmark
import benchmark  # noqa: E402
from benchmark import sync  # noqa: E402

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


def config(setting: str, amp: str, crop: int, batch: int, nets: Dict[str, str], data_root: str) -> EasyDict:
    values = dict(setting=setting, amp=amp, crop_size=crop, eval_crop_size=crop, batch_size=batch, num_classes=21,
                  class_names=VOC_CLASS_NAMES, network=nets["student"], teacher_deep_network=nets["deep"],
                  teacher_wide_network=nets["wide"], data_root=data_root, output_dir=tempfile.gettempdir())
    return resolve(new_config("voc", __file__), [(k, repr(v), "tools/gpu_check.py") for k, v in values.items()])


def method_step(method: str, setting: str, amp: str, crop: int, batch: int, nets: Dict[str, str],
                device: torch.device, data_root: str) -> dict:
    """One warm-up and one timed training step (forward, backward, SGD) of `method` on random data."""
    C = config(setting, amp, crop, batch, nets, data_root)
    g = torch.Generator().manual_seed(0)
    data = dict(x_l=torch.randn(batch, 3, crop, crop, generator=g), u0=torch.randn(batch, 3, crop, crop, generator=g),
                u1=torch.randn(batch, 3, crop, crop, generator=g),
                y_l=torch.randint(0, C.num_classes, (batch, crop, crop), generator=g),
                mask=(torch.rand(batch, 1, crop, crop, generator=g) > 0.5).float())
    for role in ROLES:  # offline pseudo-labels (fast setting)
        for view in ("l", "u0", "u1"):
            data[f"teacher_{role}_{view}"] = torch.randint(0, C.num_classes, (batch, crop, crop), generator=g)
    data = {k: v.to(device) for k, v in data.items()}
    torch.manual_seed(0)
    teachers = None
    if method == "cps":
        model = CPSPair(build_segmentor(nets["deep"], C.num_classes), build_segmentor(nets["deep"], C.num_classes))
    else:
        model = build_segmentor(nets["student"], C.num_classes)
    model = model.to(device).train()
    if method == "mgd":
        teachers = {r: FrozenTeacher(build_segmentor(nets[r], C.num_classes).requires_grad_(False).to(device)
                                     .train(C.teacher_bn == "train"), C.amp, C.channels_last) for r in ROLES}
        labels = offline_labels(data) if C.teacher_labels == "offline" else None
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")

    def step():
        optimizer.zero_grad(set_to_none=True)
        if method == "supervised":
            loss, terms = supervised_step(model, data, C, device)
        elif method == "cps":
            loss, terms = cps_step(model, data, C, device)
        else:
            loss, terms = mgd_step(model, teachers, data, labels, C, device)
        scaler.scale(loss).backward()
        grads_finite = all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)
        scaler.step(optimizer)
        scaler.update()
        return float(loss.detach()), grads_finite or scaler.is_enabled()  # fp16: the scaler skips non-finite steps

    step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t0 = time.perf_counter()
    loss, grads_ok = step()
    sync(device)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None
    model = teachers = optimizer = None  # released here, not at return, so that empty_cache frees their memory
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return dict(method=method, setting=setting, amp=amp, loss=loss, finite=math.isfinite(loss) and grads_ok,
                seconds=seconds, peak_memory_mb=peak)


def cuda_tests() -> dict:
    """pytest -m cuda: its exit status and summary line."""
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", osp.join(ROOT, "tests")],
                         cwd=ROOT, capture_output=True, text=True)
    lines = [l for l in run.stdout.strip().splitlines() if l.strip()]
    return dict(returncode=run.returncode, summary=lines[-1] if lines else run.stderr.strip()[-200:],
                seconds=time.perf_counter() - t0)


def loader_throughput(C: EasyDict, datasets: dict, device: torch.device, batches: int) -> dict:
    """The trainer's three streams alone (benchmark.Streams): images/s after the first batch (worker start-up
    is reported apart)."""
    t0 = time.perf_counter()
    streams = benchmark.Streams(C, datasets, device, batches, epoch=1)
    streams.next()
    startup = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(batches - 1):
        streams.next()
    seconds = time.perf_counter() - t0
    return dict(num_workers=C.num_workers, batches=batches - 1, startup_seconds=startup,
                images_per_second=3 * C.batch_size * (batches - 1) / seconds)


def loader_rates(C: EasyDict, device: torch.device, workers: List[int], batches: int) -> Dict[int, dict]:
    datasets = build_datasets(C, unlabeled=True)
    return {w: loader_throughput(EasyDict(dict(C, num_workers=w)), datasets, device, batches) for w in workers}


def eval_speed(network: str, num_classes: int, device: torch.device, size: int, crop: int, repeats: int = 3) -> dict:
    """furnace.evaluate.sliding_probs on one size x size image: images/s with the windows batched (the
    default) and one window per call; whether the probabilities stay on the device until the argmax."""
    torch.manual_seed(0)
    net = build_segmentor(network, num_classes).eval().to(device)
    image = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    out = {}
    for name, max_batch in (("batched", 8), ("one_window_per_call", 1)):
        seconds = benchmark.median_seconds(lambda: sliding_probs(net, image, crop, max_batch=max_batch), device,
                                           repeats)
        out[f"{name}_images_per_second"] = 1.0 / seconds
    probs = sliding_probs(net, image, crop)
    stride = -(-crop * 2 // 3)
    per_side = -(-max(size - crop, 0) // stride) + 1
    out.update(image_size=size, crop=crop, windows=per_side ** 2, probs_on_device=probs.device == image.device)
    return out


def table(R: dict) -> str:
    """The check's one table; a stage that has not run yet is left out, one that failed is a row of its error."""
    cfg = R["config"]
    lines = [f"## GPU check: {R['device_name']}, torch {torch.__version__}, crop {cfg['crop']}, batch {cfg['batch']} "
             f"labeled + {cfg['batch']} unlabeled; {cfg['networks']}", "",
             "| check | setting / precision | result | seconds | peak memory (MB) |", "|---|---|---|--:|--:|"]
    if "tests" in R:
        t = R["tests"]
        lines.append(f"| CUDA tests (pytest -m cuda) | - | {'ok' if t['returncode'] == 0 else 'FAILED'}: "
                     f"{t['summary']} | {t['seconds']:.0f} | - |")
    for s in R.get("steps", []):
        mem = f"{s['peak_memory_mb']:.0f}" if s["peak_memory_mb"] is not None else "-"
        lines.append(f"| train step {s['method']} | {s['setting']} / {s['amp']} | "
                     f"{'finite' if s['finite'] else 'NOT FINITE'}, loss {s['loss']:.3f} | {s['seconds']:.2f} | {mem} |")
    B = R.get("benchmark")
    if B:
        for name, st in B["steps"].items():
            mem = f"{st['peak_memory_mb']:.0f}" if st["peak_memory_mb"] is not None else "-"
            lines.append(f"| benchmark {name} | {st['precision']}, teachers BN {st['teacher_bn']}, "
                         f"{st['teacher_labels']} | {st['images_per_second']:.1f} images/s, "
                         f"{st['utilization']['step']:.0%} of peak | {st['seconds']['step']:.3f} | {mem} |")
        lines.append(f"| benchmark ratios | - | published / published setting {B['speedup_published_setting']:.2f}x "
                     f"(at most {B['published_setting_bound']['max_speedup']:.2f}x at the fp32 peak), "
                     f"published / fast {B['speedup_vs_published']:.2f}x; grad_max_rel_diff_train_bn "
                     f"{B['grad_max_rel_diff_train_bn']:.1e} | - | - |")
    E = R.get("eval")
    if E:
        lines.append(f"| sliding-window eval | {E['image_size']}^2 image, crop {E['crop']}, {E['windows']} windows | "
                     f"{E['batched_images_per_second']:.2f} images/s batched, "
                     f"{E['one_window_per_call_images_per_second']:.2f} one window per call | - | - |")
    consumed = R.get("step_consumes_images_per_second")
    for w, L in R.get("loader", {}).items():
        margin = f", {L['images_per_second'] / consumed:.1f}x what the fast step consumes" if consumed else ""
        lines.append(f"| loader, {w} workers per stream | 3 streams | {L['images_per_second']:.0f} images/s{margin} | "
                     f"{L['startup_seconds']:.1f} start-up | - |")
    for name, error in R.get("errors", {}).items():
        lines.append(f"| {name} | - | ERROR: {error[:300]} | {R['stage_seconds'][name]:.0f} | - |")
    return "\n".join(lines)


def run_stage(R: dict, name: str, fn: Callable[[], Any], save: Callable[[], None],
              put: Optional[Callable[[Any], None]] = None) -> Any:
    """put(fn()) (default: R[name] = fn()), then save. A stage that raises is recorded in R['errors'] and the
    check goes on: on a GPU lent for minutes, one broken stage must not cost the figures of the others."""
    t0 = time.perf_counter()
    result = None
    try:
        result = fn()
        (put or (lambda r: R.__setitem__(name, r)))(result)
    except Exception as e:
        traceback.print_exc()
        R.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"
    R.setdefault("stage_seconds", {})[name] = time.perf_counter() - t0
    save()
    return result


def main(argv: Optional[List[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="crop 32, batch 2, mobilenet_v2 / resnet18 nets (CPU smoke test)")
    p.add_argument("--skip-tests", action="store_true", help="do not run pytest -m cuda")
    p.add_argument("--skip-benchmark", action="store_true", help="do not run tools/benchmark.py")
    p.add_argument("--workers", type=int, nargs="+", help="loader workers per stream to measure (default 0 2 4 8)")
    p.add_argument("--json", help="write all figures to this file after every stage, and the table beside it "
                                  "(same name, .md): a check stopped by its time limit keeps what it measured")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device (use --device cpu --tiny for the smoke test)")
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    crop, batch = (32, 2) if args.tiny else (512, 8)
    nets = (dict(student="mobilenet_v2", deep="resnet18", wide="resnet18") if args.tiny
            else dict(student="resnet18", deep="resnet101", wide="wide_resnet50_2"))
    data_root = benchmark.ensure_toy_data(None)
    R: dict = dict(config=dict(crop=crop, batch=batch, networks=nets, device=str(device)),
                   device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU")

    def save() -> None:
        if args.json:
            with open(args.json, "w") as f:
                json.dump(R, f, indent=1, default=str)
            with open(osp.splitext(args.json)[0] + ".md", "w") as f:
                f.write(table(R) + "\n")

    if not args.skip_tests:
        if run_stage(R, "tests", cuda_tests, save):
            print(f"CUDA tests: {R['tests']['summary']}", flush=True)
    precisions = ["bf16", "fp16"] if device.type == "cuda" else ["off"]  # CPU: bf16 is emulated on most
    R["steps"] = []
    for method, setting in (("supervised", "published"), ("cps", "published"), ("mgd", "published"), ("mgd", "fast")):
        for amp in precisions:
            name = f"train step {method} {setting} {amp}"
            s = run_stage(R, name, lambda: method_step(method, setting, amp, crop, batch, nets, device, data_root),
                          save, put=R["steps"].append)
            if s:
                print(f"step {method} {setting} {amp}: loss {s['loss']:.3f}, finite {s['finite']}, "
                      f"{s['seconds']:.2f} s", flush=True)
    if not args.skip_benchmark:
        bargs = ["--device", args.device, "--crop", str(crop), "--batch", str(batch), "--repeats", "3",
                 "--offline-images", "16", "--data-root", data_root]
        if run_stage(R, "benchmark", lambda: benchmark.main((["--tiny"] if args.tiny else []) + bargs), save):
            steps = R["benchmark"]["steps"]
            R["step_consumes_images_per_second"] = steps.get("fast_amp", steps["fast"])["images_per_second"]
    C = config("fast", "off", crop, batch, nets, data_root)
    workers = args.workers or ([0, 2] if args.tiny else [0, 2, 4, 8])
    run_stage(R, "loader", lambda: loader_rates(C, device, workers, 4 if args.tiny else 12), save)
    run_stage(R, "eval", lambda: eval_speed(nets["student"], C.num_classes, device, 2 * crop, crop), save)
    print("\n" + table(R), flush=True)
    return R


if __name__ == "__main__":
    main()
