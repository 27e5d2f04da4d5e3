"""Int8 copies of the frozen teachers for CPU training: post-training static quantization.

A teacher is frozen during MGD, so a quantized copy can be made once, before training: torch.ao's FX graph
mode inserts observers, the teacher runs on a few training images (calibration: each activation's range),
and every convolution becomes an int8 kernel (per-channel int8 weights, uint8 activations; BatchNorm folded
first). The classifier stays fp32 so the logits, and the bilinear upsampling after it, are not rounded to
256 levels (rounded logits tie, and an argmax of a tie is arbitrary).

Int8 only changes what the student is taught if the copy predicts something else than the teacher, so the
copy is checked on held-out images against the fp32 teacher (argmax agreement, ignored pixels excluded) and
`teacher_precision='auto'` only keeps it above `teacher_int8_min_agreement`.

The int8 kernels are oneDNN's where this torch has them (quantized engine 'onednn'; the packed weights keep
their engine, so the copy runs oneDNN kernels whatever the global engine is later); oneDNN was faster than
the x86/fbgemm engine on the CPUs measured, at the same argmax agreement (README, "Performance").

torch.ao.quantization is deprecated in favour of torchao (whose CPU int8 path needs torch.compile); it is
present and works in the pinned torch 2.13. Where it is missing, int8_supported() is False and
teacher_precision='auto' keeps the teachers in the training precision.
"""
import copy
import warnings
from contextlib import contextmanager
from typing import Iterable, Optional, Tuple, Union

import torch
import torch.nn as nn

from furnace.data import IGNORE_INDEX

try:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
    HAVE_FX_QUANTIZATION = True
except ImportError:  # a future torch without torch.ao.quantization
    HAVE_FX_QUANTIZATION = False


class _LogitsAndDecoder(nn.Module):
    """The segmentor as a function of x alone (what FX traces): (logits, decoder feature)."""

    def __init__(self, segmentor: nn.Module):
        super().__init__()
        self.segmentor = segmentor

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        out = self.segmentor(x, return_features=True)
        return out["logits"], out["decoder"]


class Int8Teacher(nn.Module):
    """A quantized teacher with the segmentor's call signature: forward(x) -> logits,
    forward(x, return_features=True) -> dict(logits, decoder), both fp32. CPU only, inference only."""

    def __init__(self, graph: nn.Module, network: str, num_classes: int):
        super().__init__()
        self.graph, self.network, self.num_classes = graph, network, num_classes

    def forward(self, x: torch.Tensor, return_features: bool = False
                ) -> Union[torch.Tensor, dict]:
        logits, decoder = self.graph(x.contiguous())
        return {"logits": logits, "decoder": decoder} if return_features else logits


PREFERRED_ENGINE = "onednn"  # faster than the default 'x86' (fbgemm) engine where measured, see above
# Observers of the 'x86' default: 7-bit activation ranges (reduce_range), which cannot saturate the 16-bit
# intermediate sums of int8 dot products on CPUs without VNNI (oneDNN's own default, 8-bit, can).
QCONFIG = "x86"


def int8_engine() -> str:
    """The quantized engine int8 copies are made with: PREFERRED_ENGINE where this torch has it."""
    supported = torch.backends.quantized.supported_engines
    return PREFERRED_ENGINE if PREFERRED_ENGINE in supported else torch.backends.quantized.engine


@contextmanager
def quantized_engine(engine: str):
    """torch.backends.quantized.engine set to `engine` inside the block, restored after it."""
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


def int8_supported(device: torch.device) -> bool:
    """Int8 kernels exist for this device: CPU with a quantized engine (x86/fbgemm or qnnpack)."""
    return HAVE_FX_QUANTIZATION and device.type == "cpu" and torch.backends.quantized.engine != "none"


@torch.no_grad()
def quantize_teacher(teacher: nn.Module, calibration: Iterable[torch.Tensor]) -> Int8Teacher:
    """An Int8Teacher made from an eval-mode segmentor, its activation ranges observed on `calibration`
    (batches of normalised images, as the teacher sees them in training). The teacher is not modified."""
    if any(m.training for m in teacher.modules()):
        raise ValueError("int8 teachers need teacher_bn='eval' (train-mode BatchNorm has no fixed statistics)")
    batches = [b.float().cpu().contiguous() for b in calibration]
    if not batches:
        raise ValueError("quantize_teacher: no calibration images")
    qconfig = get_default_qconfig_mapping(QCONFIG).set_module_name("segmentor.classifier", None)
    wrapped = _LogitsAndDecoder(copy.deepcopy(teacher).cpu().float().to(memory_format=torch.contiguous_format))
    with warnings.catch_warnings(), quantized_engine(int8_engine()):  # torch.ao's deprecation notices: hundreds
        warnings.filterwarnings("ignore", message=r"(?s).*(deprecated|reduce_range)")
        observed = prepare_fx(wrapped.eval(), qconfig, example_inputs=(batches[0][:1],))
        for batch in batches:
            observed(batch)
        graph = convert_fx(observed)
    return Int8Teacher(graph, getattr(teacher, "network", type(teacher).__name__), getattr(teacher, "num_classes", -1))


@torch.no_grad()
def argmax_agreement(model: nn.Module, reference: nn.Module, images: torch.Tensor,
                     labels: Optional[torch.Tensor] = None, max_batch: int = 8) -> float:
    """Fraction of pixels where model and reference predict the same class; pixels whose label is
    IGNORE_INDEX (crop padding, VOC object borders) do not count."""
    same, total = 0, 0
    for start in range(0, images.shape[0], max_batch):
        x = images[start:start + max_batch]
        agree = model(x).argmax(1) == reference(x).argmax(1)
        if labels is not None:
            valid = labels[start:start + max_batch] != IGNORE_INDEX
            agree = agree & valid
            total += int(valid.sum())
        else:
            total += agree.numel()
        same += int(agree.sum())
    return same / max(total, 1)
