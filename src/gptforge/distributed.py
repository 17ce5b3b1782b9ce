"""Scaling features that wrap a built model from outside, and the process group they run in.

Each `apply_*` takes a model and returns it; `model.py` never imports this file. Multi-process training is
PyTorch's own: processes are started by `torchrun` (or `gptforge train --nproc N`, which runs torchrun), the
process group is NCCL on CUDA and gloo on CPU, and the wrappers are DDP and FSDP2 (`fully_shard`).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from gptforge.errors import GptforgeError


@dataclass(frozen=True)
class Dist:
    """This process's place in the job: rank, world size, local rank and its device."""

    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def max(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t


def init_distributed(device: torch.device, timeout_s: float) -> Dist:
    """Join the process group torchrun set up (RANK, WORLD_SIZE, LOCAL_RANK), or run alone.

    A collective that waits longer than `timeout_s` (a dead or unreachable rank) raises instead of hanging.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(0, 1, 0, device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        try:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                    timeout=datetime.timedelta(seconds=timeout_s))
        except Exception as e:  # rendezvous failures surface as several error types
            raise GptforgeError(f"rank {rank} could not join the process group within {timeout_s:g} s ({e}); "
                                f"check --rdzv-endpoint and that every node started") from None
    return Dist(rank, world, local_rank, device)


def close_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def apply_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Recompute each block's activations during backward instead of keeping them (Chen et al. 2016).

    The block's own `forward` is wrapped in place rather than the block in a new module, so parameter names,
    and with them checkpoints, are unchanged. Non-reentrant checkpointing works with autocast and compile.
    """
    for block in model.blocks:
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            if not torch.is_grad_enabled():  # evaluation: nothing to save, nothing to recompute
                return _inner(*args, **kwargs)
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward
    return model


def apply_ddp(model: nn.Module, d: Dist) -> nn.Module:
    """DistributedDataParallel: a full replica per rank, gradients all-reduced (averaged) in backward."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)


def apply_fsdp(model: nn.Module, strategy: str, param_dtype: torch.dtype | None) -> nn.Module:
    """FSDP2: parameters, gradients and optimizer states sharded over ranks, one unit per block.

    full_shard frees each block's gathered parameters after its forward (least memory, a second all-gather in
    backward); shard_grad_op keeps them until backward (ZeRO-2-like: more memory, less communication).
    `param_dtype` (bf16) gathers and computes in that dtype while the sharded fp32 master weights, the
    optimizer and the gradient reduction stay in fp32.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    reshard = strategy == "full_shard"
    for block in model.blocks:
        fully_shard(block, reshard_after_forward=reshard, mp_policy=mp)
    fully_shard(model, reshard_after_forward=reshard, mp_policy=mp)
    return model


@contextlib.contextmanager
def grad_sync(model: nn.Module, enabled: bool):
    """Let backward reduce gradients across ranks only when `enabled` (the last micro-batch of a step), so
    accumulation communicates once per step."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel) and not enabled:
        with model.no_sync():
            yield
        return
    target = getattr(model, "_orig_mod", model)  # FSDP2 modules sit under torch.compile's wrapper
    if hasattr(target, "set_requires_gradient_sync"):
        target.set_requires_gradient_sync(enabled)
    yield


def apply_compile(model: nn.Module, **kwargs) -> nn.Module:
    """torch.compile the model; checkpoints still save the unwrapped module (checkpoint.unwrap)."""
    return torch.compile(model, **kwargs)


def torchrun_command(nproc: int, argv: list[str]) -> list[str]:
    """The torchrun command that runs `gptforge <argv>` on `nproc` processes of this node."""
    import sys

    if nproc < 1:
        raise GptforgeError(f"--nproc must be >= 1, got {nproc}")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "gptforge", *argv]
