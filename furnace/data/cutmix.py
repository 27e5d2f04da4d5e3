"""Box masks for CutMix on unlabeled images (the recipe of CPS / French et al., see docs/method.md, "CutMix")."""
import math
from typing import Optional, Tuple

import torch


def cutmix_box_mask(batch: int, height: int, width: int, n_boxes: int = 3,
                    prop_range: Tuple[float, float] = (0.25, 0.5),
                    generator: Optional[torch.Generator] = None, toggle_overlaps: bool = False) -> torch.Tensor:
    """(B,1,H,W) float mask, 1 inside `n_boxes` random boxes per sample (where the second image is pasted).

    Per box:  prop ~ U(prop_range);  h_prop = exp(U(0,1) * log(prop));  w_prop = prop / h_prop;
              both scaled by sqrt(1/n_boxes), so the box covers prop / n_boxes of the image;
              size = round((h_prop*H, w_prop*W));  top-left = round((H-h, W-w) * U(0,1)), so boxes lie inside.
    Boxes may overlap; the mask is their union (1 inside any box). `toggle_overlaps=True` instead flips the
    mask inside each box (overlaps of two boxes go back to 0), which is what the published code's
    BoxMaskGenerator does. All randomness comes from torch `generator` (deterministic when it is seeded)."""
    if n_boxes < 1:
        raise ValueError(f"cutmix n_boxes must be >= 1, got {n_boxes}")
    lo, hi = prop_range
    if not 0.0 < lo <= hi <= 1.0:
        raise ValueError(f"cutmix prop_range must satisfy 0 < lo <= hi <= 1, got {prop_range}")
    # float64 so the rounding matches the numpy reference implementation
    f64 = dict(dtype=torch.float64, generator=generator)
    props = lo + (hi - lo) * torch.rand(batch, n_boxes, **f64)
    h_prop = torch.exp(torch.rand(batch, n_boxes, **f64) * torch.log(props))
    w_prop = props / h_prop
    fac = math.sqrt(1.0 / n_boxes)
    shape = torch.tensor([height, width], dtype=torch.float64)
    sizes = torch.round(torch.stack([h_prop * fac, w_prop * fac], dim=2) * shape)  # (B, n, 2)
    pos = torch.round((shape - sizes) * torch.rand(batch, n_boxes, 2, **f64))
    boxes = torch.cat([pos, pos + sizes], dim=2).long().tolist()  # (B, n, [y0, x0, y1, x1])

    mask = torch.zeros(batch, 1, height, width)
    for i, sample_boxes in enumerate(boxes):
        for y0, x0, y1, x1 in sample_boxes:
            if toggle_overlaps:
                mask[i, 0, y0:y1, x0:x1] = 1.0 - mask[i, 0, y0:y1, x0:x1]
            else:
                mask[i, 0, y0:y1, x0:x1] = 1.0
    return mask


def paste(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The CutMix image: b pasted into a inside the boxes, a * (1 - m) + b * m (mask (B,1,H,W) of 0/1)."""
    return a * (1 - mask) + b * mask


def paste_labels(y_a: torch.Tensor, y_b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The label map (B,H,W) of the CutMix image from those of its sources: y_b inside the boxes, y_a outside.

    For argmax labels this is the argmax of the pasted logits paste(t_a, t_b, mask): the mask is 0 or 1, so
    every pixel of the pasted logits is exactly one source's."""
    return torch.where(mask[:, 0] > 0.5, y_b, y_a)
