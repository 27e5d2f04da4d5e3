"""ResNet backbones (18/50/101, wide_resnet50_2) returning the four stage features.

Parameter names follow torchvision (conv1, bn1, layer1.0.conv1, layer1.0.downsample.0/1, ...), so torchvision and
timm ImageNet files load directly (their fc.* keys are ignored by ``load_pretrained``). The deep "v1c" stem uses
timm's ``resnet*c`` / TorchSemSeg naming: conv1.0, conv1.1, conv1.3, conv1.4, conv1.6 (Sequential indices of
conv, BN, ReLU, conv, BN, ReLU, conv) and ``bn1`` for the third conv's BN.

Output stride (OS) is reached by turning strides into dilations (DeepLab):
  OS32: plain ResNet, feature strides 4, 8, 16, 32.
  OS16: layer4 stride 2 -> 1; multi-grid dilation 2, 4, 8 for its blocks (block i: 2 * 2**i), as the published
        MGD/CPS code does. Every 3x3 conv of a block gets the block's dilation, including the first block's conv
        that lost its stride (dilation 2, padding 2), as in the published networks (torchvision's
        replace_stride_with_dilation keeps dilation 1 on that conv; the published code does not). Strides 4, 8, 16, 16.
  OS8:  the same rule one stage earlier: layer3 stride -> 1 with dilation 2 in every 3x3 conv of every block;
        layer4 stride -> 1 with multi-grid 4, 8, 16. Strides 4, 8, 8, 8.
        (Our choice: the published code only uses OS16; this continues its "double per block" rule.)
The 1x1 downsample conv of a dilated stage only loses its stride.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Type, Union

import torch
from torch import nn

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "resnet18", "resnet50", "resnet101", "wide_resnet50_2"]


def conv3x3(cin: int, cout: int, stride: int = 1, dilation: int = 1, groups: int = 1) -> nn.Conv2d:
    """3x3 conv whose padding equals its dilation, so the size only changes by the stride."""
    return nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, groups=groups, bias=False)


class BasicBlock(nn.Module):
    """y = relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)); two 3x3 convs, both with ``dilation``."""
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 dilation: int = 1, base_width: int = 64):
        super().__init__()
        if base_width != 64:
            raise ValueError("BasicBlock only supports base_width=64 (wide nets use Bottleneck)")
        self.conv1 = conv3x3(inplanes, planes, stride, dilation)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes, dilation=dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """y = relu(bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x)))))))) + shortcut(x)).

    1x1 reduce to ``width = planes * base_width / 64`` -> 3x3 (stride, dilation) -> 1x1 expand to 4 * planes
    (torchvision v1.5: the stride sits on the 3x3 conv, which also carries ``dilation``).
    """
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 dilation: int = 1, base_width: int = 64):
        super().__init__()
        width = int(planes * base_width / 64)
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride, dilation)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


Block = Type[Union[BasicBlock, Bottleneck]]


class ResNet(nn.Module):
    """ResNet feature extractor: forward(x) -> [layer1, layer2, layer3, layer4] outputs.

    Args:
        block, layers: block type and number of blocks per stage (e.g. Bottleneck, [3, 4, 23, 3]).
        output_stride: 8, 16 or 32 (see module docstring for the dilation scheme).
        deep_stem: three 3x3 conv-BN-ReLU (3->w stride 2, w->w, w->2w) instead of one 7x7 conv; the stem then
            outputs 2 * stem_width channels (w=32 -> 64, w=64 -> 128), which is layer1's input width.
        stem_width: w above; only meaningful with deep_stem (the 7x7 stem is always 64 wide).
        base_width: bottleneck width per 64 planes (64 standard, 128 for wide_resnet50_2).
        multi_grid: double the dilation per block of the last dilated stage (published code); if False every block
            of a dilated stage uses the same dilation.
    """

    def __init__(self, block: Block, layers: Sequence[int], output_stride: int = 16, deep_stem: bool = False,
                 stem_width: int = 64, base_width: int = 64, multi_grid: bool = True):
        super().__init__()
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        if not deep_stem and stem_width != 64:
            raise ValueError(f"stem_width={stem_width} needs deep_stem=True (the 7x7 stem is 64 channels wide)")
        self.base_width = base_width
        self.inplanes = 2 * stem_width if deep_stem else 64
        if deep_stem:
            w = stem_width
            self.conv1 = nn.Sequential(
                nn.Conv2d(3, w, 3, 2, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
                nn.Conv2d(w, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
                nn.Conv2d(w, 2 * w, 3, 1, 1, bias=False))
        else:
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)

        # (stride, dilation, multi-grid) per stage; a dilated stage replaces its stride 2 by dilation.
        dilate3, dilate4 = output_stride == 8, output_stride <= 16
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=1 if dilate3 else 2,
                                       dilation=2 if dilate3 else 1)
        d3 = 2 if dilate3 else 1
        self.layer4 = self._make_layer(block, 512, layers[3], stride=1 if dilate4 else 2,
                                       dilation=2 * d3 if dilate4 else 1, multi_grid=multi_grid and dilate4)
        c = 64 * block.expansion
        self.feature_channels: List[int] = [c, 2 * c, 4 * c, 8 * c]
        self.feature_strides: List[int] = [4, 8, 8 if dilate3 else 16, output_stride]
        self._init_weights()

    def _make_layer(self, block: Block, planes: int, blocks: int, stride: int = 1, dilation: int = 1,
                    multi_grid: bool = False) -> nn.Sequential:
        """Stage of ``blocks`` blocks; every 3x3 conv of block i uses dilation ``dilation * 2**i`` with multi_grid,
        else ``dilation`` (the first block's conv that would carry the stride in the undilated net included)."""
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                                       nn.BatchNorm2d(planes * block.expansion))
        dils = [dilation * (2 ** i if multi_grid else 1) for i in range(blocks)]
        mods = [block(self.inplanes, planes, stride, downsample, dils[0], base_width=self.base_width)]
        self.inplanes = planes * block.expansion
        mods += [block(self.inplanes, planes, dilation=d, base_width=self.base_width) for d in dils[1:]]
        return nn.Sequential(*mods)

    def _init_weights(self) -> None:
        # torchvision's init: He (fan_out) for convs, BN identity.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        feats = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            feats.append(x)
        return feats


def zero_init_residual_(model: nn.Module) -> nn.Module:
    """Zero the scale of the last BatchNorm in every residual block (BasicBlock.bn2, Bottleneck.bn3), in place.

    Each block then starts as the identity, so a deep ResNet trained from scratch starts as a shallow one and
    trains faster (Goyal et al. 2017, "Accurate, Large Minibatch SGD"). For training without ImageNet weights
    only: pretrained weights overwrite it."""
    for m in model.modules():
        if isinstance(m, Bottleneck):
            nn.init.zeros_(m.bn3.weight)
        elif isinstance(m, BasicBlock):
            nn.init.zeros_(m.bn2.weight)
    return model


def resnet18(**kw) -> ResNet:
    """ResNet-18: BasicBlock, [2, 2, 2, 2]; features 64/128/256/512 channels."""
    return ResNet(BasicBlock, [2, 2, 2, 2], **kw)


def resnet50(**kw) -> ResNet:
    """ResNet-50: Bottleneck, [3, 4, 6, 3]; features 256/512/1024/2048 channels."""
    return ResNet(Bottleneck, [3, 4, 6, 3], **kw)


def resnet101(**kw) -> ResNet:
    """ResNet-101: Bottleneck, [3, 4, 23, 3]; features 256/512/1024/2048 channels."""
    return ResNet(Bottleneck, [3, 4, 23, 3], **kw)


def wide_resnet50_2(**kw) -> ResNet:
    """Wide ResNet-50-2: Bottleneck, [3, 4, 6, 3] with bottleneck width x2 (128 per 64 planes).

    The published MGD code calls this teacher "wide_resnet34_2"; the shape is torchvision's wide_resnet50_2.
    """
    return ResNet(Bottleneck, [3, 4, 6, 3], base_width=128, **kw)
