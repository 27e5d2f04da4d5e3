"""Mixed precision: what amp='auto' means on a device, and the autocast context of a step."""
from contextlib import nullcontext

import torch


def native_bf16() -> bool:
    """This CPU computes bf16 natively (AVX512-BF16 or AMX, as oneDNN reports it). A capability, not a CPU name:
    it holds on every CPU seen (AVX2-only ones report False, AVX-512 BF16 ones True)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def resolve_amp(amp: str, device: torch.device) -> str:
    """'auto' -> 'bf16' on CUDA and on CPUs with native bf16 (AVX512-BF16 / AMX), 'off' elsewhere: on a CPU
    without them bf16 is emulated and several times slower than fp32 (README, "Performance")."""
    if amp != "auto":
        return amp
    return "bf16" if device.type == "cuda" or native_bf16() else "off"


def amp_reason(device: torch.device) -> str:
    """Why amp='auto' resolves as it does on `device`, for the logs."""
    if device.type == "cuda":
        return "CUDA: bf16 autocast"
    if native_bf16():
        return "CPU with native bf16 (oneDNN reports AVX512-BF16 or AMX): bf16 autocast"
    return "CPU without native bf16 (oneDNN reports no AVX512-BF16 / AMX; bf16 would be emulated, slower): fp32"


def autocast(device: torch.device, amp: str):
    """torch.amp autocast for 'bf16' / 'fp16', nothing for 'off'."""
    if amp == "off":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)
