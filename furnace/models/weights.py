"""Backbone factory and pretrained-weight loading (torchvision / timm / TorchSemSeg-style files)."""
from __future__ import annotations

import os
import re
from typing import Callable, Dict, List, Mapping, NamedTuple, Optional, Union

import torch
from torch import nn

from .mobilenet_v2 import mobilenet_v2
from .resnet import resnet18, resnet50, resnet101, wide_resnet50_2

__all__ = ["BACKBONES", "create_backbone", "load_pretrained", "convert_timm_mobilenetv2", "LoadResult"]

BACKBONES: Dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18, "resnet50": resnet50, "resnet101": resnet101,
    "wide_resnet50_2": wide_resnet50_2, "mobilenet_v2": mobilenet_v2,
}

# Classification-head keys of ImageNet files; dropped when the model has no such parameter.
_HEAD_PREFIXES = ("fc.", "classifier.", "features.18.")


def create_backbone(name: str, output_stride: int = 16, deep_stem: bool = False, stem_width: int = 64,
                    pretrained: Optional[str] = None, strict: bool = True) -> nn.Module:
    """Build a backbone by name; forward(x) -> 4 feature maps, with .feature_channels / .feature_strides.

    name: one of BACKBONES. deep_stem / stem_width apply to ResNets only. pretrained: path to an ImageNet file
    loaded with ``load_pretrained(model, pretrained, strict)``; its LoadResult is kept as ``.pretrained_load``
    (None without a file), for the run's log.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose from {sorted(BACKBONES)}")
    if name == "mobilenet_v2":
        if deep_stem or stem_width != 64:
            raise ValueError("deep_stem / stem_width are ResNet options; mobilenet_v2 takes neither")
        model = mobilenet_v2(output_stride=output_stride)
    else:
        model = BACKBONES[name](output_stride=output_stride, deep_stem=deep_stem, stem_width=stem_width)
    model.pretrained_load = load_pretrained(model, pretrained, strict=strict) if pretrained else None
    return model


def convert_timm_mobilenetv2(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Rename a timm ``mobilenetv2_100`` state dict to torchvision's MobileNetV2 names.

    conv_stem/bn1 -> features.0.{0,1}; blocks.S.J -> features.N (N = 1 + running block index over stages
    S of sizes 1,2,3,4,3,3,1); inside blocks: DepthwiseSeparable (stage 0) conv_dw, bn1, conv_pw, bn2 ->
    conv.0.0, conv.0.1, conv.1, conv.2; InvertedResidual conv_pw, bn1, conv_dw, bn2, conv_pwl, bn3 ->
    conv.0.0, conv.0.1, conv.1.0, conv.1.1, conv.2, conv.3; conv_head/bn2 -> features.18.{0,1};
    classifier -> classifier.1. Unknown keys are kept unchanged (so they show up as unexpected).
    """
    first_index = [1, 2, 4, 7, 11, 14, 17]  # torchvision feature index of each timm stage's first block
    ds = {"conv_dw": "conv.0.0", "bn1": "conv.0.1", "conv_pw": "conv.1", "bn2": "conv.2"}
    ir = {"conv_pw": "conv.0.0", "bn1": "conv.0.1", "conv_dw": "conv.1.0", "bn2": "conv.1.1",
          "conv_pwl": "conv.2", "bn3": "conv.3"}
    top = {"conv_stem": "features.0.0", "bn1": "features.0.1", "conv_head": "features.18.0",
           "bn2": "features.18.1", "classifier": "classifier.1"}
    out = {}
    for key, value in state_dict.items():
        m = re.fullmatch(r"blocks\.(\d+)\.(\d+)\.(\w+)\.(\w+)", key)
        if m and int(m[1]) < len(first_index):
            stage, j, module, param = int(m[1]), int(m[2]), m[3], m[4]
            table = ds if stage == 0 else ir
            if module in table:
                out[f"features.{first_index[stage] + j}.{table[module]}.{param}"] = value
                continue
        head, _, param = key.partition(".")
        out[f"{top[head]}.{param}" if head in top and "." not in param else key] = value
    return out


class LoadResult(NamedTuple):
    missing: List[str]
    unexpected: List[str]
    mismatched: List[str]  # "key: file shape -> model shape"
    loaded: int = 0        # tensors copied from the file

    def describe(self) -> str:
        """One line for a run's log: what was loaded and what was not."""
        parts = [f"{self.loaded} tensors loaded"]
        if self.missing:
            parts.append(f"not in the file, kept at initialisation ({len(self.missing)}): {', '.join(self.missing)}")
        if self.unexpected:
            parts.append(f"in the file, unused ({len(self.unexpected)}): {', '.join(self.unexpected)}")
        if self.mismatched:
            parts.append(f"shape mismatch, not loaded ({len(self.mismatched)}): {', '.join(self.mismatched)}")
        return "; ".join(parts)


def is_7x7_stem_into_deep_stem(model_keys, file_keys) -> bool:
    """A torchvision-format ResNet file (one 7x7 `conv1`) for a deep-stem network (`conv1.0`, ...)."""
    return "conv1.0.weight" in model_keys and "conv1.weight" in file_keys and "conv1.0.weight" not in file_keys


def _read_state_dict(path: Union[str, os.PathLike, Mapping]) -> Dict[str, torch.Tensor]:
    if isinstance(path, Mapping):
        sd = path
    else:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"pretrained weight file not found: {path}")
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # e.g. pickled non-tensor objects, or not a torch file at all
            raise RuntimeError(f"cannot read weights from {path}: {e}") from e
    for wrapper in ("state_dict", "model"):  # checkpoint dicts wrap the weights
        if isinstance(sd, Mapping) and isinstance(sd.get(wrapper), Mapping):
            sd = sd[wrapper]
    if not isinstance(sd, Mapping):
        raise RuntimeError(f"{path}: expected a state dict, got {type(sd).__name__}")
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if sd and all(k.startswith("module.") for k in sd):  # saved from DataParallel / DDP
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def load_pretrained(model: nn.Module, path: Union[str, os.PathLike, Mapping], strict: bool = True) -> LoadResult:
    """Load weights from ``path`` (file, or an already loaded dict) into ``model``.

    Accepts a bare state dict or {'state_dict': ...} / {'model': ...}; strips a 'module.' prefix; converts timm
    MobileNet-v2 names; ignores classifier keys (fc.*, classifier.*, features.18.*) the model lacks and missing
    BN ``num_batches_tracked`` counters. strict=True: any missing / unexpected / shape-mismatched key raises a
    RuntimeError listing them and the file. strict=False: loads the matching tensors and returns the lists.

    One exception to strict, the published student's start: a torchvision-format ResNet file (7x7 stem) into a
    deep-stem network loads everything but the stem, which keeps its initialisation (conv1.0/1/3/4/6 missing,
    the file's conv1.weight unused, both listed in the result); the rest of that load is still strict.
    """
    sd = _read_state_dict(path)
    own = model.state_dict()
    if "features.0.0.weight" in own and "conv_stem.weight" in sd:
        sd = convert_timm_mobilenetv2(sd)
    sd = {k: v for k, v in sd.items() if k in own or not k.startswith(_HEAD_PREFIXES)}
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    mismatched = [f"{k}: {tuple(v.shape)} -> {tuple(own[k].shape)}" for k, v in sd.items()
                  if k in own and v.shape != own[k].shape]
    good = {k: v for k, v in sd.items() if k in own and v.shape == own[k].shape}
    result = LoadResult(missing, unexpected, mismatched, len(good))
    excused = set()
    if is_7x7_stem_into_deep_stem(own, sd):
        excused = {"conv1.weight"} | {k for k in missing if k.startswith("conv1.")}
    if strict and (set(missing) - excused or set(unexpected) - excused or mismatched):
        def fmt(name: str, keys: List[str]) -> str:
            shown = ", ".join(keys[:20]) + (f", ... ({len(keys)} in all)" if len(keys) > 20 else "")
            return f"\n  {name} ({len(keys)}): {shown}" if keys else ""
        src = path if not isinstance(path, Mapping) else "<state dict>"
        raise RuntimeError(f"weights in {src} do not fit {type(model).__name__}:"
                           + fmt("missing", missing) + fmt("unexpected", unexpected)
                           + fmt("shape mismatch (file -> model)", mismatched)
                           + "\n  (pass strict=False to load only the matching tensors)")
    model.load_state_dict(good, strict=False)
    return result
