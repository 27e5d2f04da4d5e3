"""Process groups for `torchrun`, and BatchNorm synchronised across processes on CPU as well as CUDA.

A single process (plain `python train.py`) needs no launcher: world size 1, rank 0.
"""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group that `torchrun` describes in the environment (gloo on CPU, NCCL on CUDA)."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("config device='cuda' but CUDA is not available")
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistInfo(rank, world_size, local_rank, dev)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over processes (in place); identity in a single process."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def rank0_choice(value):
    """Rank 0's `value` on every process (a picklable object): for choices that a process makes from a
    measurement (furnace.amp), which must be the same on all of a run's processes."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return value


class _SyncBatchNormFn(torch.autograd.Function):
    """Batch normalisation with statistics over the batches of all processes.

    Forward: mean and variance over every process's (N, H, W) positions (two passes, for precision).
    Backward: with g = dL/dy and x_hat the normalised input, summed over all processes,
        dL/dx = w / sigma * (g - mean(g) - x_hat * mean(g * x_hat)),
    while dL/dw = sum(g * x_hat) and dL/db = sum(g) stay local: DDP averages parameter gradients."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        xf = x.float()
        dims = [0] + list(range(2, x.dim()))
        count = torch.tensor([xf.numel() / xf.shape[1]], dtype=torch.float64)
        all_reduce_sum(count)
        mean = all_reduce_sum(xf.sum(dims, dtype=torch.float64)) / count
        centred = xf - mean.float().view(1, -1, *[1] * (x.dim() - 2))
        var = all_reduce_sum((centred * centred).sum(dims, dtype=torch.float64)) / count
        invstd = torch.rsqrt(var + eps).float()
        shape = (1, -1) + (1,) * (x.dim() - 2)
        x_hat = centred * invstd.view(shape)
        ctx.save_for_backward(x_hat, weight, invstd)
        ctx.count = count
        y = x_hat * weight.float().view(shape) + bias.float().view(shape)
        stats = (mean.float(), var.float(), count.float())
        ctx.mark_non_differentiable(*stats)
        return (y.to(x.dtype),) + stats

    @staticmethod
    def backward(ctx, grad_y, _gm, _gv, _gc):
        x_hat, weight, invstd = ctx.saved_tensors
        g = grad_y.float()
        dims = [0] + list(range(2, g.dim()))
        shape = (1, -1) + (1,) * (g.dim() - 2)
        sum_g = g.sum(dims, dtype=torch.float64)
        sum_g_xhat = (g * x_hat).sum(dims, dtype=torch.float64)
        grad_weight, grad_bias = sum_g_xhat.float(), sum_g.float()
        both = all_reduce_sum(torch.stack([sum_g, sum_g_xhat])) / ctx.count
        mean_g, mean_g_xhat = both[0].float().view(shape), both[1].float().view(shape)
        grad_x = (weight.float() * invstd).view(shape) * (g - mean_g - x_hat * mean_g_xhat)
        return grad_x.to(grad_y.dtype), grad_weight.to(weight.dtype), grad_bias.to(weight.dtype), None


class ProcessSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics span all processes; works with gloo on CPU.

    PyTorch's nn.SyncBatchNorm is CUDA-only; on CUDA `convert_sync_batchnorm` uses it instead."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                False, 0.0, self.eps)
        y, mean, var, count = _SyncBatchNormFn.apply(x, self.weight, self.bias, self.eps)
        with torch.no_grad():
            n = count.item()
            self.running_mean.mul_(1 - self.momentum).add_(mean, alpha=self.momentum)
            self.running_var.mul_(1 - self.momentum).add_(var * n / max(n - 1, 1), alpha=self.momentum)
            self.num_batches_tracked += 1
        return y


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Replace every BatchNorm2d by its process-synchronised version (PyTorch's on CUDA, ours on CPU)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, ProcessSyncBatchNorm):
        new = ProcessSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                   module.track_running_stats)
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        return new
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child, device))
    return module


def synchronised_batchnorm(model: nn.Module, info: DistInfo) -> nn.Module:
    """BatchNorm with statistics over the global batch: PyTorch's SyncBatchNorm on CUDA when distributed,
    furnace's ProcessSyncBatchNorm on CPU, even in a single process.

    Why even with one CPU process: PyTorch's CPU BatchNorm and ProcessSyncBatchNorm round differently in the
    last bit, and randomly initialised BatchNorm networks amplify last-bit differences enormously, so a
    1-process run matches an N-process run only if both run the same BatchNorm arithmetic (tests/test_reliability.py
    compares them)."""
    if info.distributed or info.device.type == "cpu":
        return convert_sync_batchnorm(model, info.device)
    return model
