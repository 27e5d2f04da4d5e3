"""Parameter and FLOP counts with PyTorch's own counter (torch.utils.flop_counter).

FLOPs follow the counter's convention: 2 x multiply-accumulates of convolutions and matrix products;
BatchNorm, activations, pooling and resizing count 0. Papers often call MACs "FLOPs": halve to compare.
"""
import torch
from torch.utils.flop_counter import FlopCounterMode

from furnace.models import build_segmentor


def count_flops(module: torch.nn.Module, x: torch.Tensor) -> int:
    """FLOPs (2 x MACs of conv / matmul) of one forward pass, as torch.utils.flop_counter counts them."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(x)
    return int(counter.get_total_flops())


def measure(network: str, size=(512, 512), num_classes: int = 21, output_stride: int = 16) -> dict:
    """Parameter counts and FLOPs of the backbone and of the whole DeepLabv3+ on a 1x3xHxW input."""
    with torch.device("meta"):  # no memory, no compute: the counter only needs shapes
        model = build_segmentor(network, num_classes, output_stride=output_stride).eval()
        x = torch.empty(1, 3, *size)
    return dict(network=network, size=list(size), num_classes=num_classes, output_stride=output_stride,
                backbone_params=sum(p.numel() for p in model.backbone.parameters()),
                model_params=sum(p.numel() for p in model.parameters()),
                backbone_flops=count_flops(model.backbone, x), model_flops=count_flops(model, x))
