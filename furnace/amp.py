"""Mixed precision: what amp='auto' means on a device, and the autocast context of a step."""
import functools
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

# bf16 is taken on a CPU only when a measured convolution runs at most this fraction of its fp32 time: the CPUs
# seen so far are far off either side (native bf16 about 2x faster, emulated several times slower).
BF16_MAX_TIME_RATIO = 0.8


def native_bf16() -> bool:
    """oneDNN reports bf16 support on this CPU. Necessary, not sufficient: it also reports it for AVX-512 CPUs
    without AVX512-BF16 or AMX, where bf16 is emulated (slower than fp32), so resolve_amp measures as well."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


@functools.lru_cache(maxsize=None)
def cpu_bf16_time_ratio() -> float:
    """Measured seconds of a bf16 3x3 convolution (4 x 64 x 56 x 56, 64 -> 64 channels) over the same in fp32 on
    this CPU at the current thread count, best of 5 after a warm-up each (about 0.1-0.3 s, once per process)."""
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(4, 64, 56, 56, generator=gen), torch.randn(64, 64, 3, 3, generator=gen)

    def best(x: torch.Tensor, w: torch.Tensor) -> float:
        F.conv2d(x, w, padding=1)
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            F.conv2d(x, w, padding=1)
            times.append(time.perf_counter() - t0)
        return min(times)
    return best(x.bfloat16(), w.bfloat16()) / best(x, w)


def cpu_bf16_faster() -> bool:
    """bf16 is worth taking on this CPU: oneDNN supports it and it measures clearly faster than fp32."""
    return native_bf16() and cpu_bf16_time_ratio() <= BF16_MAX_TIME_RATIO


def resolve_amp(amp: str, device: torch.device) -> str:
    """'auto' -> 'bf16' on CUDA and on CPUs where bf16 is supported and measured faster (cpu_bf16_faster), 'off'
    elsewhere: on a CPU without native bf16 units it is emulated and several times slower than fp32."""
    if amp != "auto":
        return amp
    return "bf16" if device.type == "cuda" or cpu_bf16_faster() else "off"


def amp_reason(device: torch.device) -> str:
    """Why amp='auto' resolves as it does on `device`, for the logs."""
    if device.type == "cuda":
        return "CUDA: bf16 autocast"
    if not native_bf16():
        return "CPU without bf16 support in oneDNN (no AVX-512 / AMX): fp32"
    ratio = cpu_bf16_time_ratio()
    verdict = ("bf16 autocast" if ratio <= BF16_MAX_TIME_RATIO
               else "fp32 (bf16 emulated without AVX512-BF16 / AMX units, or not fast enough)")
    return (f"CPU with bf16 support in oneDNN; a measured bf16 convolution takes {ratio:.2f}x its fp32 time "
            f"(bf16 when at most {BF16_MAX_TIME_RATIO}): {verdict}")


def autocast(device: torch.device, amp: str):
    """torch.amp autocast for 'bf16' / 'fp16', nothing for 'off'."""
    if amp == "off":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)
