"""DeepLabv3+ segmentor (ASPP + decoder + classifier) as used by MGD's teachers and students."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .weights import create_backbone

__all__ = ["ASPP", "Decoder", "DeepLabV3Plus", "NETWORKS", "SEGMENTOR_PRESETS", "build_segmentor"]


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (published MGD/CPS form).

    a = red_conv(act(map_bn(cat[conv1x1(x), conv3x3_d6(x), conv3x3_d12(x), conv3x3_d18(x)])))
    p = pool_red_conv(act(pool_bn(pool_conv(mean_hw(x)))))       (B, out, 1, 1), broadcast over H, W
    y = act(red_bn(a + p)),  act = LeakyReLU(0.01); all convs bias-free.
    """

    def __init__(self, in_channels: int, out_channels: int = 256, rates: Sequence[int] = (6, 12, 18),
                 hidden_channels: int = 256):
        super().__init__()
        self.map_convs = nn.ModuleList([nn.Conv2d(in_channels, hidden_channels, 1, bias=False)] + [
            nn.Conv2d(in_channels, hidden_channels, 3, padding=r, dilation=r, bias=False) for r in rates])
        self.map_bn = nn.BatchNorm2d(hidden_channels * len(self.map_convs))
        self.red_conv = nn.Conv2d(hidden_channels * len(self.map_convs), out_channels, 1, bias=False)
        self.pool_conv = nn.Conv2d(in_channels, hidden_channels, 1, bias=False)
        self.pool_bn = nn.BatchNorm2d(hidden_channels)
        self.pool_red_conv = nn.Conv2d(hidden_channels, out_channels, 1, bias=False)
        self.red_bn = nn.BatchNorm2d(out_channels)
        self.act = nn.LeakyReLU(0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.red_conv(self.act(self.map_bn(torch.cat([conv(x) for conv in self.map_convs], 1))))
        # Image pooling as a mean over H, W (exports to ONNX as ReduceMean); broadcasting replaces repeat/upsample.
        pool = self.pool_red_conv(self.act(self.pool_bn(self.pool_conv(x.mean((2, 3), keepdim=True)))))
        return self.act(self.red_bn(out + pool))


class Decoder(nn.Module):
    """DeepLabv3+ decoder: f = fuse(cat[up(aspp_out), relu(bn(conv1x1(low)))]) -> (B, 256, H/4, W/4).

    up = bilinear to the low-level size (align_corners=True); fuse = two 3x3 256-ch conv-BN-ReLU.
    """

    def __init__(self, low_channels: int, reduce_channels: int = 48, in_channels: int = 256,
                 channels: int = 256):
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(low_channels, reduce_channels, 1, bias=False),
                                    nn.BatchNorm2d(reduce_channels), nn.ReLU(inplace=True))
        self.fuse = nn.Sequential(
            nn.Conv2d(in_channels + reduce_channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(inplace=True))

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        high = F.interpolate(high, size=low.shape[-2:], mode="bilinear", align_corners=True)
        return self.fuse(torch.cat([high, self.reduce(low)], 1))


class DeepLabV3Plus(nn.Module):
    """backbone -> ASPP(last feature) -> Decoder(first feature) -> 1x1 classifier -> upsample to input size.

    forward(x) -> logits (B, num_classes, H, W); forward(x, return_features=True) ->
    dict(logits, features=[4 backbone maps], decoder=(B, 256, ~H/4, ~W/4)).
    """

    def __init__(self, backbone: str, num_classes: int, output_stride: int = 16, deep_stem: bool = False,
                 stem_width: int = 64, pretrained: Optional[str] = None):
        super().__init__()
        self.network = backbone
        self.num_classes = num_classes
        self.backbone = create_backbone(backbone, output_stride, deep_stem, stem_width, pretrained)
        low, high = self.backbone.feature_channels[0], self.backbone.feature_channels[-1]
        self.aspp = ASPP(high, 256)
        self.decoder = Decoder(low, 24 if backbone == "mobilenet_v2" else 48)
        self.classifier = nn.Conv2d(256, num_classes, 1, bias=True)
        for head in (self.aspp, self.decoder, self.classifier):
            for m in head.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
                elif isinstance(m, nn.BatchNorm2d):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, return_features: bool = False
                ) -> Union[torch.Tensor, Dict[str, Union[torch.Tensor, List[torch.Tensor]]]]:
        feats = self.backbone(x)
        dec = self.decoder(feats[0], self.aspp(feats[-1]))
        logits = F.interpolate(self.classifier(dec), size=x.shape[-2:], mode="bilinear", align_corners=True)
        if return_features:
            return {"logits": logits, "features": feats, "decoder": dec}
        return logits


# network preset -> DeepLabV3Plus backbone options (docs/method.md, "Networks").
SEGMENTOR_PRESETS: Dict[str, dict] = {
    "resnet18": dict(backbone="resnet18", deep_stem=True, stem_width=32),      # student
    "mobilenet_v2": dict(backbone="mobilenet_v2"),                               # student
    "resnet101": dict(backbone="resnet101", deep_stem=True, stem_width=64),     # deep teacher T_D
    "wide_resnet50_2": dict(backbone="wide_resnet50_2"),                         # wide teacher T_W
    "resnet50": dict(backbone="resnet50", deep_stem=True, stem_width=64),
}
# The network names a config may give (network, teacher_*_network): the one list, checked by furnace/settings.py.
NETWORKS: Tuple[str, ...] = tuple(SEGMENTOR_PRESETS)


def build_segmentor(network: str, num_classes: int, pretrained: Optional[str] = None,
                    output_stride: int = 16) -> DeepLabV3Plus:
    """DeepLabV3Plus for a preset name (see SEGMENTOR_PRESETS); sets .network and .num_classes."""
    if network not in SEGMENTOR_PRESETS:
        raise ValueError(f"unknown network {network!r}; choose from {sorted(SEGMENTOR_PRESETS)}")
    model = DeepLabV3Plus(num_classes=num_classes, output_stride=output_stride, pretrained=pretrained,
                          **SEGMENTOR_PRESETS[network])
    model.network = network
    return model
