"""Prediction from Python: a trained checkpoint as a `Segmenter` that labels RGB images.

    from furnace.inference import Segmenter
    seg = Segmenter.from_checkpoint("exp.voc/voc8.resnet18_deeplabv3plus/output/mgd/snapshot/last.pth")
    labels = seg.predict(image)                       # HxW uint8 class indices of an HxWx3 uint8 RGB image
    labels, probs = seg.predict(image, return_probs=True)   # probs: CxHxW float32, summing to 1 per pixel
    labels = seg.predict([image_a, image_b])          # a list of images (any sizes): a list of results
    colours = seg.colorize(labels)                    # HxWx3 uint8 in the dataset's palette

Any checkpoint of the project works (a student, a CPS teacher: its deployable network). The inference is the
evaluation's (furnace.evaluate.predict_probs: sliding windows, scales, flip, softmax averaged), with the
checkpoint's own settings (eval_mode, eval_crop_size, eval_stride_rate, eval_scales, eval_flip, image_mean,
image_std, palette) unless arguments override them. Images of one size are batched together.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from furnace.checkpoint import load_checkpoint, segmentor_from_checkpoint
from furnace.data import IMAGENET_MEAN, IMAGENET_STD, normalize, read_image
from furnace.evaluate import inference_options, predict_probs
from furnace.visualize import colorize, full_palette, get_palette, overlay

Image = Union[np.ndarray, str, Path]  # HxWx3 uint8 RGB, or an image file


def resolve_device(device: Union[str, torch.device] = "auto") -> torch.device:
    """'auto': CUDA when there is a GPU, else the CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def as_rgb(image: Image) -> np.ndarray:
    """An HxWx3 uint8 RGB array as is (checked), an image file read."""
    if isinstance(image, (str, Path)):
        return read_image(image)
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 RGB image, got {image.dtype} {image.shape}")
    return image


def image_tensor(image: Image, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """(1,3,H,W) float32: an RGB image (or image file) normalised with the training mean/std, the networks'
    input (and the ONNX export's)."""
    return torch.from_numpy(normalize(as_rgb(image), mean, std)).permute(2, 0, 1)[None].to(device)


class Segmenter:
    """A segmentation network with its normalisation, inference settings and palette.

    options: furnace.evaluate.predict_probs keyword arguments (mode, crop_size, stride_rate, scales, flip).
    max_batch: images of one size per network call (sliding windows are batched within it as in evaluation)."""

    def __init__(self, model: nn.Module, options: dict, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, palette: Optional[np.ndarray] = None,
                 class_names: Optional[Sequence[str]] = None, device: Union[str, torch.device] = "auto",
                 max_batch: int = 8):
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.options = dict(options)
        self.mean, self.std = tuple(mean), tuple(std)
        self.num_classes = int(getattr(model, "num_classes", 0)) or None
        self.palette = full_palette(palette if palette is not None else get_palette("voc"))
        self.class_names = list(class_names) if class_names is not None else None
        self.max_batch = max(1, int(max_batch))

    @classmethod
    def from_checkpoint(cls, path: Union[str, Path], device: Union[str, torch.device] = "auto",
                        mode: Optional[str] = None, crop_size=None, stride_rate: Optional[float] = None,
                        scales: Optional[Sequence[float]] = None, flip: Optional[bool] = None,
                        dataset: Optional[str] = None, palette=None, max_batch: int = 8) -> "Segmenter":
        """The deployable network of a checkpoint, with the checkpoint's evaluation settings and palette; the
        arguments given override them. Without a config in the checkpoint: sliding windows of 512, scale 1,
        no flip, ImageNet mean/std, the VOC palette (Cityscapes' for 19 classes)."""
        ckpt = load_checkpoint(str(path))
        model = segmentor_from_checkpoint(ckpt, str(path))
        cfg = dict(ckpt.get("config") or {})
        options = inference_options(cfg, mode, scales, flip)
        if crop_size is not None:
            options["crop_size"] = inference_options({"eval_crop_size": crop_size})["crop_size"]
        if stride_rate is not None:
            options["stride_rate"] = float(stride_rate)
        if palette is None:
            dataset = dataset or cfg.get("dataset") or ("cityscapes" if ckpt["num_classes"] == 19 else "voc")
            # a checkpoint's own palette (custom data) unless another dataset's palette is asked for
            own = cfg.get("palette") if dataset == cfg.get("dataset") else None
            palette = own if own is not None else get_palette(dataset)
        return cls(model, options, cfg.get("image_mean") or IMAGENET_MEAN, cfg.get("image_std") or IMAGENET_STD,
                   palette, cfg.get("class_names"), device, max_batch)

    # ---- images in -------------------------------------------------------------------------------------
    def to_tensor(self, image: Image) -> torch.Tensor:
        """image_tensor with this segmenter's mean/std, on its device."""
        return image_tensor(image, self.mean, self.std, self.device)

    as_rgb = staticmethod(as_rgb)

    # ---- predictions -----------------------------------------------------------------------------------
    @torch.no_grad()
    def probs_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """predict_probs with this segmenter's settings on a normalised (B,3,H,W) batch -> (B,C,H,W)."""
        return predict_probs(self.model, x.to(self.device), **self.options)

    def _predict_many(self, images: List[np.ndarray], want_probs: bool) -> List[Tuple[np.ndarray, Optional[np.ndarray]]]:
        """(labels, probs or None) per image; images of one size go through the network together."""
        out: List[Optional[Tuple[np.ndarray, np.ndarray]]] = [None] * len(images)
        by_size: dict = {}
        for i, im in enumerate(images):
            by_size.setdefault(im.shape[:2], []).append(i)
        for indices in by_size.values():
            for k in range(0, len(indices), self.max_batch):
                chunk = indices[k:k + self.max_batch]
                p = self.probs_tensor(torch.cat([self.to_tensor(images[i]) for i in chunk]))
                labels = p.argmax(1).to(torch.uint8).cpu().numpy()
                p = p.float().cpu().numpy() if want_probs else [None] * len(chunk)  # C floats a pixel: only on request
                for j, i in enumerate(chunk):
                    out[i] = (labels[j], p[j])
        return out  # type: ignore[return-value]

    def predict(self, images: Union[Image, Sequence[Image], np.ndarray], return_probs: bool = False):
        """Class indices of one image (HxWx3 uint8 RGB array or a file) -> HxW uint8; of a list of images ->
        a list; of a (B,H,W,3) array -> (B,H,W). With return_probs, (labels, probabilities) with
        probabilities CxHxW float32 (a list, or (B,C,H,W)), the mean softmax of the configured inference."""
        stacked = isinstance(images, np.ndarray) and images.ndim == 4
        single = not stacked and not isinstance(images, (list, tuple))
        batch = [self.as_rgb(im) for im in ([images] if single else list(images))]
        results = self._predict_many(batch, return_probs)
        labels, probs = [r[0] for r in results], [r[1] for r in results]
        if single:
            labels, probs = labels[0], probs[0]
        elif stacked:
            labels, probs = np.stack(labels), (np.stack(probs) if return_probs else None)
        return (labels, probs) if return_probs else labels

    # ---- pictures out ----------------------------------------------------------------------------------
    def colorize(self, labels: np.ndarray) -> np.ndarray:
        """HxW class indices -> HxWx3 uint8 RGB in this segmenter's palette."""
        return colorize(labels, self.palette)

    def overlay(self, image: Image, labels: np.ndarray, alpha: float = 0.5) -> np.ndarray:
        """The image with the coloured labels blended over it (opacity alpha)."""
        return overlay(self.as_rgb(image), labels, self.palette, alpha)
