#!/usr/bin/env python
"""Segment a folder of images (any size, jpg/png) with a trained checkpoint; no labels needed.

  python tools/predict.py -p exp.voc/.../epoch-34.pth -i photos/ -o out/ [--mode sliding --crop 512 --flip]

For each image NAME writes out/NAME.png (the mask: class indices as a 'P' PNG carrying the dataset palette)
and out/NAME_overlay.jpg (image | mask blended over the image | mask, side by side).
Normalisation, palette and the evaluation's inference (mode, crop, stride, scales, flip) come from the
checkpoint's config when it has them (else ImageNet mean/std, the VOC palette -- Cityscapes for 19 classes --
and sliding windows of 512); options override them. It is furnace.inference.Segmenter on each image.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


from furnace.inference import Segmenter
from furnace.visualize import save_label_png, save_rgb, side_by_side

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
    p.add_argument("--dataset", choices=["voc", "cityscapes", "custom"],
                   help="palette (default: from the checkpoint)")
    p.add_argument("--mode", choices=["sliding", "whole"], help="default: the checkpoint's eval_mode")
    p.add_argument("--crop", type=int, nargs="+", help="sliding-window crop, 1 or 2 ints (H W)")
    p.add_argument("--stride_rate", type=float)
    p.add_argument("--scales", type=float, nargs="+")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="average with the flipped image (default: the checkpoint's eval_flip)")
    p.add_argument("--alpha", type=float, default=0.5, help="mask opacity in the overlay")
    p.add_argument("--device", default="auto")
    return p


def main(argv=None) -> list[Path]:
    args = build_parser().parse_args(argv)
    crop = args.crop[0] if args.crop and len(args.crop) == 1 else args.crop
    seg = Segmenter.from_checkpoint(args.checkpoint, args.device, args.mode, crop, args.stride_rate, args.scales,
                                    args.flip, args.dataset)
    os.makedirs(args.output, exist_ok=True)
    written = []
    for path in list_images(args.input):
        image = seg.as_rgb(path)
        pred = seg.predict(image)
        mask_path, overlay_path = Path(args.output) / f"{path.stem}.png", Path(args.output) / f"{path.stem}_overlay.jpg"
        save_label_png(str(mask_path), pred, seg.palette)
        save_rgb(str(overlay_path), side_by_side([image, seg.overlay(image, pred, args.alpha), seg.colorize(pred)]))
        written += [mask_path, overlay_path]
        print(f"{path} ({image.shape[1]}x{image.shape[0]}) -> {mask_path}, {overlay_path}", flush=True)
    return written


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
