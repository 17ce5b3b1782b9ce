"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") as a module swap.

`apply_lora` freezes a built GPT and replaces the chosen nn.Linear modules by `LoRALinear`, which *is* an
nn.Linear (same `weight` and `bias` keys, so base checkpoints load unchanged) plus two small matrices:
    y = x W^T + b + (alpha / r) * dropout(x) A^T B^T,   A (r, in) ~ Kaiming-uniform, B (out, r) = 0
B starts at zero, so a freshly adapted model computes exactly what its base does. Only A and B train, so
the optimizer holds 2 x r x (in + out) numbers per matrix instead of 2 x in x out, and a checkpoint saves
only them. `merge_lora` folds B A into W and swaps plain nn.Linear back in, for export and serving.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptforge.config import LoRAConfig
from gptforge.errors import GptforgeError


class LoRALinear(nn.Linear):
    """nn.Linear with a low-rank update (alpha / r) * B A beside its frozen weight."""

    def __init__(self, base: nn.Linear, cfg: LoRAConfig):
        nn.Module.__init__(self)  # no fresh weight: the base's own parameters are taken over below
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        w = base.weight
        self.lora_a = nn.Parameter(torch.empty(cfg.rank, self.in_features, device=w.device, dtype=w.dtype))
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, cfg.rank, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear initialises its weight (and peft A)
        self.scale = cfg.alpha / cfg.rank
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.scale * F.linear(F.linear(self.drop(x), self.lora_a), self.lora_b)

    def merged(self) -> nn.Linear:
        """A plain nn.Linear computing the same function (in eval mode): W + (alpha / r) B A."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            delta = (self.lora_b.float() @ self.lora_a.float()) * self.scale  # (out, in)
            out.weight.copy_(self.weight.float() + delta)
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> nn.Module:
    """Freeze every parameter of `model`, then swap each target nn.Linear for a LoRALinear (in place).

    Returns the model. An untied `lm_head` is a target like any other; a tied head is the embedding and
    cannot be adapted this way.
    """
    model.requires_grad_(False)
    swapped = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in cfg.targets and type(child) is nn.Linear:
                setattr(module, child_name, LoRALinear(child, cfg))
                swapped += 1
    if swapped == 0:
        raise GptforgeError(f"no Linear named {', '.join(cfg.targets)} in this model; LoRA would train nothing "
                            f"(a gelu MLP has up/down, a swiglu one gate/up/down; a tied head has no lm_head)")
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRALinear into a plain nn.Linear (in place); returns the model."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, child_name, child.merged())
    return model


def is_lora_key(key: str) -> bool:
    return key.endswith((".lora_a", ".lora_b"))
