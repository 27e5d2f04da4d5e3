"""Train / val transforms on numpy images (HxWx3 uint8 RGB) and labels (HxW uint8).

Every random choice is drawn from the numpy Generator passed in, so a sample's augmentation is a pure
function of the dataset's rng key (exact resume, same batches with 1 or N processes)."""
from typing import Optional, Sequence, Union

import cv2
import numpy as np
import torch

from furnace.config import crop_hw

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IGNORE_INDEX = 255  # the label value of pixels without a class (borders, padding); the one definition


def normalize(image: np.ndarray, mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD) -> np.ndarray:
    """float32 (image / 255 - mean) / std, per RGB channel."""
    mean = np.asarray(mean, dtype=np.float32)
    std = np.asarray(std, dtype=np.float32)
    return (image.astype(np.float32) / 255.0 - mean) / std


def hflip(image: np.ndarray, label: Optional[np.ndarray]):
    image = np.ascontiguousarray(image[:, ::-1])
    return image, (None if label is None else np.ascontiguousarray(label[:, ::-1]))


def rescale(image: np.ndarray, label: Optional[np.ndarray], scale: float):
    """Resize by `scale` (size int(h*scale) x int(w*scale)): bilinear for the image, nearest for the label
    so no new class values appear."""
    h, w = image.shape[:2]
    sh, sw = max(1, int(h * scale)), max(1, int(w * scale))
    if (sh, sw) == (h, w):
        return image, label
    image = cv2.resize(image, (sw, sh), interpolation=cv2.INTER_LINEAR)
    if label is not None:
        label = cv2.resize(label, (sw, sh), interpolation=cv2.INTER_NEAREST)
    return image, label


def crop_pad(array: np.ndarray, top: int, left: int, crop_h: int, crop_w: int, fill: float) -> np.ndarray:
    """Cut array[top:top+crop_h, left:left+crop_w]; where the array is smaller than the crop, centre it
    and fill the margin with `fill`."""
    patch = array[top:top + crop_h, left:left + crop_w]
    ph, pw = patch.shape[:2]
    if (ph, pw) == (crop_h, crop_w):
        return np.ascontiguousarray(patch)
    out = np.full((crop_h, crop_w) + array.shape[2:], fill, dtype=array.dtype)
    y0, x0 = (crop_h - ph) // 2, (crop_w - pw) // 2
    out[y0:y0 + ph, x0:x0 + pw] = patch
    return out


def to_tensors(image: np.ndarray, label: Optional[np.ndarray]):
    """float32 CxHxW image, int64 HxW label (or None)."""
    img = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
    lbl = None if label is None else torch.from_numpy(label.astype(np.int64))
    return img, lbl


class TrainTransform:
    """Random h-flip (p=0.5) -> random scale from `scales` -> normalise -> random crop to `crop_size`,
    padding the image with 0 (i.e. the mean colour, after normalising) and the label with 255."""

    def __init__(self, crop_size: Union[int, Sequence[int]], scales: Sequence[float] = (1.0,),
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD, flip: bool = True):
        self.crop_h, self.crop_w = crop_hw(crop_size)
        if self.crop_h < 1 or self.crop_w < 1:
            raise ValueError(f"crop_size must be positive, got {crop_size}")
        self.scales = [float(s) for s in scales] or [1.0]
        if min(self.scales) <= 0:
            raise ValueError(f"train scales must be positive, got {list(scales)}")
        self.mean, self.std, self.flip = tuple(mean), tuple(std), flip

    def __call__(self, image: np.ndarray, label: Optional[np.ndarray], rng: np.random.Generator):
        if self.flip and rng.random() < 0.5:
            image, label = hflip(image, label)
        scale = self.scales[int(rng.integers(len(self.scales)))]
        image, label = rescale(image, label, scale)
        image = normalize(image, self.mean, self.std)
        h, w = image.shape[:2]
        top = int(rng.integers(h - self.crop_h + 1)) if h > self.crop_h else 0
        left = int(rng.integers(w - self.crop_w + 1)) if w > self.crop_w else 0
        image = crop_pad(image, top, left, self.crop_h, self.crop_w, 0.0)
        if label is not None:
            label = crop_pad(label, top, left, self.crop_h, self.crop_w, IGNORE_INDEX)
        return to_tensors(image, label)

    def __repr__(self) -> str:
        return f"TrainTransform(crop=({self.crop_h}, {self.crop_w}), scales={self.scales}, flip={self.flip})"


class ValTransform:
    """Normalise only (full image, no randomness; the rng argument is ignored)."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, image: np.ndarray, label: Optional[np.ndarray], rng: Optional[np.random.Generator] = None):
        return to_tensors(normalize(image, self.mean, self.std), label)

    def __repr__(self) -> str:
        return "ValTransform()"
