"""Evaluation: sliding-window / whole-image inference (multi-scale, flip), confusion-matrix mIoU over a dataset
(one process or several under torchrun), checkpoint ranges, result tables, logs and saved predictions.

Inference returns class *probabilities*: windows, scales and flips are combined by averaging softmax
probabilities (the published evaluation averages its windows; this project averages probabilities, listed
among its departures in README "Faithfulness to the paper"); the final label is their argmax.
Every experiment's eval.py is `from config import C; from furnace.evaluate import main; main(C)`.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from furnace.checkpoint import load_segmentor
from furnace.config import config_from_cli, config_value, crop_hw
from furnace.distributed import init_distributed
from furnace.metrics import confusion_matrix, format_results, iou_per_class, mean_iou, pixel_accuracy
from furnace.visualize import config_palette, get_palette, save_label_png


# ----------------------------------------------------------------------------------------------- inference
def _logits(model, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out["logits"] if isinstance(out, dict) else out


def _window_starts(length: int, crop: int, stride: int) -> list[int]:
    """Start offsets of windows of size `crop` every `stride` pixels, the last one flush with the end."""
    n = math.ceil(max(length - crop, 0) / stride) + 1
    return sorted({min(i * stride, length - crop) for i in range(n)})


@torch.no_grad()
def whole_probs(model, image: torch.Tensor) -> torch.Tensor:
    """softmax(model(image)) over classes for a normalised (B,3,H,W) batch -> (B,C,H,W)."""
    return _logits(model, image).softmax(1)


@torch.no_grad()
def sliding_probs(model, image: torch.Tensor, crop_size=512, stride_rate: float = 2 / 3,
                  max_batch: int = 8) -> torch.Tensor:
    """Sliding-window class probabilities for a normalised (B,3,H,W) batch -> (B,C,H,W).

    The image is zero-padded (0 = mean colour after normalisation), centred, to at least crop_size; windows of
    crop_size every stride = ceil(crop * stride_rate) pixels, the last flush with the border, cover it. Each
    pixel gets the mean of the softmax probabilities of the windows containing it; the padding is cut off.
    Windows go through the model in batches of at most max_batch images; everything stays on image.device.
    """
    ch, cw = crop_hw(crop_size)
    b, _, h, w = image.shape
    pad_h, pad_w = max(ch - h, 0), max(cw - w, 0)
    top, left = pad_h // 2, pad_w // 2
    x = F.pad(image, (left, pad_w - left, top, pad_h - top)) if pad_h or pad_w else image
    hp, wp = x.shape[2:]
    boxes = [(y, xx) for y in _window_starts(hp, ch, math.ceil(ch * stride_rate))
             for xx in _window_starts(wp, cw, math.ceil(cw * stride_rate))]
    probs = count = None
    per_call = max(1, max_batch // b)
    for i in range(0, len(boxes), per_call):
        chunk = boxes[i:i + per_call]
        p = whole_probs(model, torch.cat([x[:, :, y:y + ch, xx:xx + cw] for y, xx in chunk]))
        if probs is None:
            probs = p.new_zeros(b, p.shape[1], hp, wp)
            count = p.new_zeros(1, 1, hp, wp)
        for k, (y, xx) in enumerate(chunk):
            probs[:, :, y:y + ch, xx:xx + cw] += p[k * b:(k + 1) * b]
            count[:, :, y:y + ch, xx:xx + cw] += 1
    return (probs / count)[:, :, top:top + h, left:left + w]


@torch.no_grad()
def predict_probs(model, image: torch.Tensor, mode: str = "sliding", crop_size=512, stride_rate: float = 2 / 3,
                  scales: Sequence[float] = (1.0,), flip: bool = False, max_batch: int = 8) -> torch.Tensor:
    """Class probabilities (B,C,H,W) of a normalised (B,3,H,W) batch of any size.

    P = mean over scales s (and flips f) of resize_to_HxW( infer(resize_s(image)) ), where infer is
    sliding_probs or whole_probs and the flipped term is flip(infer(flip(image))). Scales other than 1 resize
    bilinearly (align_corners=False) to round(s*H) x round(s*W). Each scale's flip pair is summed before the
    scales are, so the result for a flipped image is exactly the flipped result.
    """
    if mode not in ("sliding", "whole"):
        raise ValueError(f"eval mode must be 'sliding' or 'whole', got {mode!r}")
    if image.dim() != 4 or image.shape[1] != 3:
        raise ValueError(f"expected a (B,3,H,W) image batch, got shape {tuple(image.shape)}")
    h, w = image.shape[2:]

    def infer(x):
        if mode == "whole":
            return whole_probs(model, x)
        return sliding_probs(model, x, crop_size, stride_rate, max_batch)

    total = None
    for s in scales:
        x = image if s == 1 else F.interpolate(image, size=(max(1, round(h * s)), max(1, round(w * s))),
                                               mode="bilinear", align_corners=False)
        p = infer(x)
        if flip:
            p = p + infer(x.flip(3)).flip(3)
        if p.shape[2:] != (h, w):
            p = F.interpolate(p, size=(h, w), mode="bilinear", align_corners=False)
        total = p if total is None else total + p
    return total / (len(scales) * (2 if flip else 1))


def inference_options(C, mode=None, scales=None, flip=None) -> dict:
    """predict_probs keyword arguments from the config (C.eval_mode, eval_crop_size, eval_stride_rate,
    eval_scales, eval_flip), with explicit arguments taking precedence."""
    return dict(mode=mode or config_value(C, "eval_mode", "sliding"),
                crop_size=crop_hw(config_value(C, "eval_crop_size", 512)),
                stride_rate=float(config_value(C, "eval_stride_rate", 2 / 3)),
                scales=[float(s) for s in (scales or config_value(C, "eval_scales", None) or [1.0])],
                flip=bool(config_value(C, "eval_flip", False) if flip is None else flip))


# ------------------------------------------------------------------------------------------------ datasets
def save_prediction(save_path: str, name: str, pred: np.ndarray, dataset: str, palette=None) -> None:
    """save_path/label/NAME.png: raw class indices (Cityscapes: train ids), single channel;
    save_path/color/NAME.png: the same indices as a 'P' PNG carrying `palette` (default: the dataset's)."""
    base = os.path.basename(str(name))
    save_label_png(os.path.join(save_path, "label", base + ".png"), pred)
    save_label_png(os.path.join(save_path, "color", base + ".png"), pred,
                   get_palette(dataset) if palette is None else palette)


@torch.no_grad()
def evaluate_dataset(model, dataset, C, device, rank: int = 0, world: int = 1, save_path: str | None = None,
                     progress: bool = False, options: dict | None = None) -> torch.Tensor:
    """Confusion matrix (num_classes x num_classes, int64, CPU, rows = ground truth) of model over dataset.

    Rank r of `world` evaluates samples r, r+world, ... (every sample exactly once, no sampler padding); when
    world > 1 and torch.distributed is initialised the per-rank matrices are summed with all_reduce, so the
    result equals the one-process result exactly. Samples are dicts with image (3,H,W normalised), label (H,W),
    name. options: predict_probs keyword arguments, default inference_options(C).
    """
    opts = options if options is not None else inference_options(C)
    n = int(config_value(C, "num_classes"))
    conf = torch.zeros(n, n, dtype=torch.int64, device=device)
    was_training = model.training
    model.eval()
    indices = range(rank, len(dataset), world)
    if progress and rank == 0:
        from tqdm import tqdm
        indices = tqdm(indices, desc="eval", dynamic_ncols=True)
    for i in indices:
        sample = dataset[i]
        image = torch.as_tensor(sample["image"]).to(device, torch.float32)[None]
        label = torch.as_tensor(sample["label"]).to(device)
        pred = predict_probs(model, image, **opts).argmax(1)[0]
        conf += confusion_matrix(pred, label, n)
        if save_path:
            save_prediction(save_path, sample["name"], pred.cpu().numpy(), config_value(C, "dataset", "voc"),
                            config_palette(C))
    model.train(was_training)
    if world > 1 and dist.is_available() and dist.is_initialized():
        dist.all_reduce(conf, op=dist.ReduceOp.SUM)
    return conf.cpu()


# --------------------------------------------------------------------------------------------- checkpoints
def _epoch_of(path: str) -> int | None:
    m = re.fullmatch(r"epoch-(\d+)\.pth", os.path.basename(path))
    return int(m.group(1)) if m else None


def resolve_checkpoints(snapshot_dir: str, epochs: str | None = None, paths: Sequence[str] | None = None) -> list[str]:
    """Checkpoint files to evaluate.

    paths: explicit files (must exist). epochs: comma-separated items 'E' (snapshot_dir/epoch-E.pth, must exist),
    'A-B' or 'A-' (every existing epoch-E.pth with A <= E (<= B)). Neither: snapshot_dir/last.pth, else the
    highest epoch file.
    """
    out = []
    for p in paths or []:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"checkpoint not found: {p}")
        out.append(p)
    available = {}
    if snapshot_dir and os.path.isdir(snapshot_dir):
        for f in os.listdir(snapshot_dir):
            if _epoch_of(f) is not None:
                available[_epoch_of(f)] = os.path.join(snapshot_dir, f)
    for item in (epochs.split(",") if epochs else []):
        m = re.fullmatch(r"\s*(\d+)\s*(-\s*(\d*)\s*)?", item)
        if not m:
            raise ValueError(f"bad epoch spec {item!r}: use E, A-B or A-")
        lo = int(m.group(1))
        if m.group(2) is None:
            p = os.path.join(snapshot_dir, f"epoch-{lo}.pth")
            if not os.path.isfile(p):
                raise FileNotFoundError(f"checkpoint not found: {p}")
            out.append(p)
            continue
        hi = int(m.group(3)) if m.group(3) else math.inf
        found = [available[e] for e in sorted(available) if lo <= e <= hi]
        if not found:
            raise FileNotFoundError(f"no epoch-E.pth with {lo} <= E <= {hi} in {snapshot_dir}")
        out += found
    if not out:
        last = os.path.join(snapshot_dir or "", "last.pth")
        if os.path.isfile(last):
            out.append(last)
        elif available:
            out.append(available[max(available)])
        else:
            raise FileNotFoundError(f"no checkpoints (last.pth or epoch-E.pth) in {snapshot_dir}; use -p PATH")
    return list(dict.fromkeys(out))  # drop duplicates, keep order


# ------------------------------------------------------------------------------------------------- running
def evaluate_checkpoints(C, epochs: str | None = None, checkpoints: Sequence[str] | None = None,
                         save_path: str | None = None, mode: str | None = None, scales=None, flip=None,
                         device=None, log_file: str | None = None, dataset=None, verbose: bool = True) -> list[dict]:
    """Evaluate each checkpoint (resolve_checkpoints) on the validation set (furnace.data.build_dataset(C, 'val')
    unless `dataset` is given). Rank 0 prints a per-class table per checkpoint, names the best of several, and
    appends everything to log_file (default C.output_dir/eval.log).
    Returns [dict(checkpoint, epoch, miou, pixel_acc, iou)] with fractions in 0..1 and NaN for absent classes."""
    info = init_distributed(device or config_value(C, "device", "auto"))
    rank, world, dev = info.rank, info.world_size, info.device
    if dataset is None:
        from furnace.data import build_dataset
        dataset = build_dataset(C, "val")
    output_dir = config_value(C, "output_dir", ".")
    paths = resolve_checkpoints(os.path.join(output_dir, "snapshot"), epochs, checkpoints)
    opts = inference_options(C, mode, scales, flip)
    names = config_value(C, "class_names", None)
    log_file = log_file or os.path.join(output_dir, "eval.log")
    results = []
    for path in paths:
        model = load_segmentor(path, num_classes=int(config_value(C, "num_classes"))).to(dev).eval()
        sub = save_path
        if save_path and len(paths) > 1:  # one folder per checkpoint, e.g. SAVE/epoch-30/
            sub = os.path.join(save_path, os.path.splitext(os.path.basename(path))[0])
        conf = evaluate_dataset(model, dataset, C, dev, rank, world, sub, progress=verbose, options=opts)
        r = dict(checkpoint=path, epoch=_epoch_of(path), miou=mean_iou(conf), pixel_acc=pixel_accuracy(conf),
                 iou=iou_per_class(conf).tolist())
        results.append(r)
        if rank == 0:
            desc = (f"{path}  mode={opts['mode']} crop={opts['crop_size']} scales={opts['scales']} "
                    f"flip={opts['flip']}  images={len(dataset)} processes={world}")
            _report(format_results(conf, names, title=desc), log_file, verbose)
    if rank == 0 and len(results) > 1:
        best = max(results, key=lambda r: -1 if math.isnan(r["miou"]) else r["miou"])
        lines = ["| checkpoint | mIoU (%) | pixel acc (%) |", "|:--|--:|--:|"]
        lines += [f"| {os.path.basename(r['checkpoint'])} | {100 * r['miou']:.2f} | {100 * r['pixel_acc']:.2f} |"
                  for r in results]
        lines.append(f"best: {best['checkpoint']}  mIoU {100 * best['miou']:.2f}")
        _report("\n".join(lines), log_file, verbose)
    return results


def _report(text: str, log_file: str, verbose: bool) -> None:
    if verbose:
        print(text, flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
    with open(log_file, "a") as f:
        f.write(f"[{datetime.datetime.now().isoformat(timespec='seconds')}]\n{text}\n\n")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Evaluate checkpoints of this experiment (mIoU on the val list).")
    p.add_argument("-e", "--epochs", help="E, A-B or A- (comma-separated items allowed), from C.output_dir/snapshot")
    p.add_argument("-p", "--checkpoint", action="append", default=[], help="checkpoint file (repeatable)")
    p.add_argument("--save_path", help="write label/ and color/ PNG predictions here")
    p.add_argument("--mode", choices=["sliding", "whole"], help="default C.eval_mode")
    p.add_argument("--scales", type=float, nargs="+", help="e.g. 0.75 1 1.25 (default C.eval_scales)")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="average with the horizontally flipped image (default C.eval_flip)")
    p.add_argument("--device", help="auto | cpu | cuda (default C.device)")
    p.add_argument("--log_file", help="default C.output_dir/eval.log")
    p.add_argument("--json", help="write the results (list of dicts) here (default C.output_dir/eval.json)")
    return p


def main(C, argv: Sequence[str] | None = None, dataset=None) -> list[dict]:
    """Command line of every experiment's eval.py (works under torchrun for several processes).
    dataset: evaluate on this instead of build_dataset(C, 'val')."""
    C, args = config_from_cli(C, build_parser(), argv)
    if not args.checkpoint:  # the run these settings name (furnace/run.py), not one with other settings
        from furnace.run import check_folder
        check_folder(C, "reporting its checkpoints as this run's")
    try:
        results = evaluate_checkpoints(C, args.epochs, args.checkpoint, args.save_path, args.mode, args.scales,
                                       args.flip, args.device, args.log_file, dataset)
        if not dist.is_initialized() or dist.get_rank() == 0:
            with open(args.json or os.path.join(C.output_dir, "eval.json"), "w") as f:
                json.dump(results, f, indent=1)
        return results
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
