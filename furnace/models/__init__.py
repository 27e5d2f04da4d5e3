"""Backbones (ResNet, MobileNet-v2) and the DeepLabv3+ segmentor used by MGD."""
from .deeplabv3plus import ASPP, NETWORKS, SEGMENTOR_PRESETS, Decoder, DeepLabV3Plus, build_segmentor
from .mobilenet_v2 import MobileNetV2, mobilenet_v2
from .resnet import (BasicBlock, Bottleneck, ResNet, resnet18, resnet50, resnet101, wide_resnet50_2,
                     zero_init_residual_)
from .weights import BACKBONES, LoadResult, convert_timm_mobilenetv2, create_backbone, load_pretrained

__all__ = [
    "create_backbone", "load_pretrained", "convert_timm_mobilenetv2", "LoadResult", "BACKBONES",
    "DeepLabV3Plus", "build_segmentor", "NETWORKS", "SEGMENTOR_PRESETS", "ASPP", "Decoder",
    "ResNet", "BasicBlock", "Bottleneck", "resnet18", "resnet50", "resnet101", "wide_resnet50_2",
    "zero_init_residual_", "MobileNetV2", "mobilenet_v2",
]
