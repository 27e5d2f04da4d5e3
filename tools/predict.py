#!/usr/bin/env python
"""Segment a folder of images (any size, jpg/png) with a trained checkpoint; no labels needed.

  python tools/predict.py -p exp.voc/.../epoch-34.pth -i photos/ -o out/ [--mode sliding --crop 512 --flip]

For each image NAME writes out/NAME.png (the mask: class indices as a 'P' PNG carrying the dataset palette)
and out/NAME_overlay.jpg (image | mask blended over the image | mask, side by side).
Normalisation, palette and crop come from the checkpoint's config when it has them (else ImageNet
mean/std, the VOC palette -- Cityscapes for 19 classes -- and crop 512); options override them.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

from furnace.data import IMAGENET_MEAN, IMAGENET_STD, normalize, read_image
from furnace.checkpoint import load_checkpoint, segmentor_from_checkpoint
from furnace.distributed import init_distributed
from furnace.evaluate import predict_probs
from furnace.visualize import colorize, get_palette, overlay, save_label_png, save_rgb, side_by_side

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png"}


def list_images(inputs) -> list[Path]:
    """Image files among `inputs` (files, or folders searched non-recursively), sorted, no duplicates."""
    files = []
    for item in map(Path, inputs):
        if item.is_dir():
            files += sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        elif item.is_file():
            files.append(item)
        else:
            raise FileNotFoundError(f"input not found: {item}")
    if not files:
        raise FileNotFoundError(f"no .jpg/.png images in {list(map(str, inputs))}")
    return list(dict.fromkeys(files))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-p", "--checkpoint", required=True)
    p.add_argument("-i", "--input", nargs="+", required=True, help="image files and/or folders")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--dataset", choices=["voc", "cityscapes"], help="palette (default: from the checkpoint)")
    p.add_argument("--mode", choices=["sliding", "whole"], default="sliding")
    p.add_argument("--crop", type=int, nargs="+", help="sliding-window crop, 1 or 2 ints (H W)")
    p.add_argument("--stride_rate", type=float, default=2 / 3)
    p.add_argument("--scales", type=float, nargs="+", default=[1.0])
    p.add_argument("--flip", action="store_true")
    p.add_argument("--alpha", type=float, default=0.5, help="mask opacity in the overlay")
    p.add_argument("--device", default="auto")
    return p


def main(argv=None) -> list[Path]:
    args = build_parser().parse_args(argv)
    ckpt = load_checkpoint(args.checkpoint)
    cfg = ckpt.get("config") or {}
    device = init_distributed(args.device).device
    model = segmentor_from_checkpoint(ckpt, args.checkpoint).to(device).eval()
    dataset = args.dataset or cfg.get("dataset") or ("cityscapes" if model.num_classes == 19 else "voc")
    palette = get_palette(dataset)
    mean, std = cfg.get("image_mean") or IMAGENET_MEAN, cfg.get("image_std") or IMAGENET_STD
    crop = args.crop or cfg.get("eval_crop_size") or 512
    crop = crop[0] if isinstance(crop, (list, tuple)) and len(crop) == 1 else crop
    os.makedirs(args.output, exist_ok=True)
    written = []
    for path in list_images(args.input):
        image = read_image(path)
        x = torch.from_numpy(normalize(image, mean, std)).permute(2, 0, 1)[None].to(device)
        pred = predict_probs(model, x, args.mode, crop, args.stride_rate, args.scales, args.flip).argmax(1)[0]
        pred = pred.cpu().numpy().astype(np.uint8)
        mask_path, overlay_path = Path(args.output) / f"{path.stem}.png", Path(args.output) / f"{path.stem}_overlay.jpg"
        save_label_png(str(mask_path), pred, palette)
        save_rgb(str(overlay_path), side_by_side([image, overlay(image, pred, palette, args.alpha),
                                                  colorize(pred, palette)]))
        written += [mask_path, overlay_path]
        print(f"{path} ({image.shape[1]}x{image.shape[0]}) -> {mask_path}, {overlay_path}", flush=True)
    return written


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
