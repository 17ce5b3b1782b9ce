"""Features that wrap a built model from outside: each `apply_*` takes a model and returns it.

`model.py` never imports this file. Multi-process training (DDP/FSDP under torchrun) will join here.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint


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


def apply_compile(model: nn.Module, **kwargs) -> nn.Module:
    """torch.compile the model; checkpoints still save the unwrapped module (checkpoint.unwrap)."""
    return torch.compile(model, **kwargs)
