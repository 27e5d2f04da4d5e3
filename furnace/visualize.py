"""Turning label maps into pictures: palettes, colour masks, overlays, side-by-side strips and grids.

All images are HxWx3 uint8 RGB numpy arrays; labels are HxW integer arrays (255 = ignore / unknown).
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from PIL import Image


def full_palette(palette) -> np.ndarray:
    """Pad an (N,3) palette to the (256,3) uint8 table a 'P' PNG carries; missing entries (incl. 255) are black."""
    palette = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    if len(palette) > 256:
        raise ValueError(f"a palette has at most 256 colours, got {len(palette)}")
    out = np.zeros((256, 3), dtype=np.uint8)
    out[: len(palette)] = palette
    return out


def get_palette(dataset: str) -> np.ndarray:
    """(256,3) palette of a dataset: the VOC colour map for 'voc' (and for 'custom', whose own colours are the
    config's `palette`: config_palette), the official Cityscapes train-id colours for 'cityscapes' (ids
    19..255 black)."""
    dataset = {"pascal_voc": "voc", "city": "cityscapes"}.get(str(dataset).lower(), str(dataset).lower())
    if dataset in ("voc", "custom"):
        from furnace.data.palette import VOC_PALETTE
        return full_palette(VOC_PALETTE)
    if dataset == "cityscapes":
        from furnace.data.cityscapes_labels import CITYSCAPES_PALETTE
        return full_palette(CITYSCAPES_PALETTE)
    raise ValueError(f"unknown dataset {dataset!r} for a palette (expected 'voc', 'cityscapes' or 'custom')")


def config_palette(C) -> np.ndarray:
    """(256,3) palette of a config (or a checkpoint's config dict): its `palette` when set (custom datasets),
    else its dataset's."""
    get = C.get if hasattr(C, "get") else lambda k, d=None: getattr(C, k, d)
    colours = get("palette", None)
    return full_palette(colours) if colours is not None else get_palette(get("dataset", None) or "voc")


def colorize(label, palette) -> np.ndarray:
    """HxW class indices -> HxWx3 uint8 RGB, colour = palette[index]."""
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"label must be HxW, got shape {label.shape}")
    return full_palette(palette)[label.astype(np.int64).clip(0, 255)]


def overlay(image, label, palette, alpha: float = 0.5, ignore_index: int | None = 255) -> np.ndarray:
    """Blend: out = (1 - alpha) * image + alpha * colorize(label); pixels labelled ignore_index keep the image."""
    image = np.asarray(image, dtype=np.uint8)
    label = np.asarray(label)
    if image.shape[:2] != label.shape:
        raise ValueError(f"image {image.shape[:2]} and label {label.shape} sizes differ")
    blend = (1 - alpha) * image.astype(np.float32) + alpha * colorize(label, palette).astype(np.float32)
    if ignore_index is not None:
        keep = label == ignore_index
        blend[keep] = image[keep]
    return np.clip(blend + 0.5, 0, 255).astype(np.uint8)


def side_by_side(images: Sequence[np.ndarray], gap: int = 4, fill: int = 255) -> np.ndarray:
    """Concatenate HxWx3 images left to right (same height), separated by `gap` columns of colour `fill`."""
    images = [np.asarray(im, dtype=np.uint8) for im in images]
    heights = {im.shape[0] for im in images}
    if len(heights) != 1:
        raise ValueError(f"side_by_side needs images of one height, got {sorted(heights)}")
    spacer = np.full((images[0].shape[0], gap, 3), fill, dtype=np.uint8)
    parts = []
    for i, im in enumerate(images):
        parts += ([spacer] if i else []) + [im]
    return np.concatenate(parts, axis=1)


def grid(rows: Sequence[Sequence[np.ndarray]], gap: int = 4, fill: int = 255) -> np.ndarray:
    """Rows of images (each row via side_by_side) stacked top to bottom; narrower rows are padded with `fill`."""
    strips = [side_by_side(r, gap, fill) for r in rows]
    width = max(s.shape[1] for s in strips)
    out = []
    for i, s in enumerate(strips):
        if i:
            out.append(np.full((gap, width, 3), fill, dtype=np.uint8))
        out.append(np.pad(s, ((0, 0), (0, width - s.shape[1]), (0, 0)), constant_values=fill))
    return np.concatenate(out, axis=0)


def save_label_png(path: str, label, palette=None) -> None:
    """Write an HxW label as PNG: a single-channel 'L' PNG of raw indices when palette is None, else a 'P'
    PNG (same indices) with the palette attached, so viewers show colours and read_label gets the indices."""
    label = np.asarray(label)
    if label.ndim != 2 or label.min(initial=0) < 0 or label.max(initial=0) > 255:
        raise ValueError(f"{path}: label must be HxW with values in 0..255")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    label = np.ascontiguousarray(label, dtype=np.uint8)
    size = (label.shape[1], label.shape[0])
    if palette is None:
        Image.frombytes("L", size, label.tobytes()).save(path)
    else:
        im = Image.frombytes("P", size, label.tobytes())
        im.putpalette(full_palette(palette).reshape(-1).tolist())
        im.save(path)


def save_rgb(path: str, image) -> None:
    """Write an HxWx3 uint8 RGB array (png/jpg by extension), creating the folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(path)
