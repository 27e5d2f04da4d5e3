"""MobileNet-v2 (width 1.0) feature extractor with torchvision parameter names (features.0 ... features.17).

Returned features (torchvision indices, undilated strides):
  features[3]  -> 24 ch, stride 4   (DeepLabv3+ low-level feature)
  features[6]  -> 32 ch, stride 8
  features[13] -> 96 ch, stride 16
  features[17] -> 320 ch, stride 32 (ASPP input)
Choice: the final 1x1 conv to 1280 channels (torchvision features.18) and the classifier are dropped, to keep the
student light (ASPP on 320 instead of 1280 channels); their keys in ImageNet files are ignored on load.

Output stride 8/16 as in DeepLab/timm: once the running stride reaches the target, a block's stride 2 becomes 1
and all later blocks' depthwise convs are dilated by the accumulated factor (the block that lost its stride keeps
the previous dilation, like the ResNet convention). OS16 -> strides 4, 8, 16, 16; OS8 -> 4, 8, 8, 8.
"""
from __future__ import annotations

from typing import List

import torch
from torch import nn

__all__ = ["MobileNetV2", "mobilenet_v2"]

# (expansion t, out channels c, repeats n, first stride s) -- the MobileNet-v2 paper's table.
_SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
_TAPS = (3, 6, 13, 17)  # features[i] outputs returned by forward


class ConvBNReLU6(nn.Sequential):
    """conv (no bias) -> BN -> ReLU6; a Sequential so names are .0 (conv) / .1 (BN) as in torchvision."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, dilation: int = 1, groups: int = 1):
        pad = (kernel - 1) // 2 * dilation
        super().__init__(nn.Conv2d(cin, cout, kernel, stride, pad, dilation=dilation, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    """x + pwl(dw(pw(x))) when stride 1 and cin == cout, else pwl(dw(pw(x))); pw is skipped for expansion 1.

    pw: 1x1 expand to t*cin (BN, ReLU6); dw: 3x3 depthwise (stride, dilation; BN, ReLU6); pwl: 1x1 linear + BN.
    """

    def __init__(self, cin: int, cout: int, stride: int, expand: int, dilation: int = 1):
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers: List[nn.Module] = [] if expand == 1 else [ConvBNReLU6(cin, hidden, 1)]
        layers += [ConvBNReLU6(hidden, hidden, 3, stride, dilation, groups=hidden),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNet-v2 (width 1.0) backbone: forward(x) -> [f4 (24), f8 (32), f16 (96), f32 (320)]."""

    def __init__(self, output_stride: int = 16):
        super().__init__()
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        layers: List[nn.Module] = [ConvBNReLU6(3, 32, 3, 2)]
        cin, cur_stride, dilation = 32, 2, 1
        strides = []
        for t, c, n, s in _SETTINGS:
            for i in range(n):
                stride = s if i == 0 else 1
                block_dilation = dilation
                if stride > 1 and cur_stride >= output_stride:
                    dilation *= stride  # later blocks see the stride as dilation
                    stride = 1
                cur_stride *= stride
                layers.append(InvertedResidual(cin, c, stride, t, block_dilation))
                strides.append(cur_stride)
                cin = c
        self.features = nn.Sequential(*layers)
        self.feature_channels: List[int] = [24, 32, 96, 320]
        self.feature_strides: List[int] = [strides[i - 1] for i in _TAPS]
        self._init_weights()

    def _init_weights(self) -> None:
        # torchvision's init: He (fan_out) for convs, BN identity.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        feats = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in _TAPS:
                feats.append(x)
        return feats


def mobilenet_v2(output_stride: int = 16) -> MobileNetV2:
    """MobileNet-v2 width 1.0 without features.18 / classifier (see module docstring)."""
    return MobileNetV2(output_stride)
