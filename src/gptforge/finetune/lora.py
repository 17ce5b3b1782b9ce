"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") as a module swap.

`apply_lora` freezes a built GPT and replaces the chosen nn.Linear modules by `LoRALinear`, which *is* an
nn.Linear (same `weight` and `bias` keys, so base checkpoints load unchanged) plus two small matrices:
    y = x W^T + b + (alpha / r) * dropout(x) A^T B^T,   A (r, in) ~ Kaiming-uniform, B (out, r) = 0
B starts at zero, so a freshly adapted model computes exactly what its base does. Only A and B train, so
the optimizer holds 2 x r x (in + out) numbers per matrix instead of 2 x in x out, and a checkpoint saves
only them. `merge_lora` folds B A into W and swaps plain nn.Linear back in, for export and serving.
"""

from __future__ import annotations

import contextlib
import math
import threading

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptforge.config import LoRAConfig
from gptforge.errors import GptforgeError
from gptforge.native.schema import AdaptedLinear


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


# --- several adapters of one base, chosen per row (the server's --adapter) ------------------------------------

class _Selection(threading.local):
    """Each thread's current row mask (None: every row is the base's). Thread-local: the server's decode loop and
    its embeddings worker run forwards of the same model at once, each for its own rows."""

    mask: torch.Tensor | None = None


class MultiLoRALinear(AdaptedLinear):
    """An nn.Linear plus the low-rank updates of n adapters, each row of a batch taking its own adapter's (or none):
        y[b] = x[b] W^T + bias + ((x[b] A^T) * mask[b]) B^T,
    A (n R, in) and B (out, n R) the adapters' matrices stacked in blocks of R = the largest rank (zero-padded;
    an adapter that leaves this Linear out has zeros), B pre-scaled by each adapter's alpha / r, and mask[b] the
    one-hot block of row b's adapter (all zeros for the base: its update is exactly +0). A is stacked under W in
    one (out + n R, in) Linear, so a single product gives both x W^T and x A^T; then one more product adds every
    row's update: at a few rows, products cost their fixed overhead more than their FLOPs, so three ops per
    Linear (instead of a loop over adapters) is what keeps a mixed batch near the base's speed. (S-LoRA, Sheng
    et al. 2023, gathers each row's matrices instead, which pays off at many adapters.) The CPU decode layout runs
    a block of these as one native op, which reads what native.schema.AdaptedLinear names."""

    def __init__(self, base: nn.Linear, a: torch.Tensor, b: torch.Tensor, selection: _Selection):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        w = base.weight
        self.fused = nn.Linear(self.in_features, self.out_features + a.shape[0], bias=base.bias is not None,
                               device=w.device, dtype=w.dtype)
        with torch.no_grad():
            self.fused.weight.copy_(torch.cat([w, a]))  # (out + n R, in)
            if base.bias is not None:
                self.fused.bias.copy_(torch.cat([base.bias, base.bias.new_zeros(a.shape[0])]))
        self.fused.requires_grad_(False)
        self.register_buffer("lora_bt", b.t().contiguous(), persistent=False)  # (n R, out)
        self.selection = selection

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.fused.forward(x)  # (B, T, out + n R); its forward, not its __call__: ~2 us less per call
        y, h = z[..., : self.out_features], z[..., self.out_features:]  # x W^T + bias, x A^T
        mask = self.selection.mask  # (B, 1, n R) or (1, 1, n R); None: every row is the base's
        if mask is None:
            return y  # a strided view, as the halves of a split are
        update = (h * mask).reshape(-1, h.shape[-1])  # (B T, n R): the other adapters' columns zeroed
        return torch.addmm(y.reshape(-1, self.out_features), update, self.lora_bt).view(*x.shape[:-1], -1)


class AdapterSet:
    """The adapters `apply_adapters` put into a model, by name; `use` selects each row's for the forwards inside."""

    def __init__(self, names: list[str], rank: int, device: torch.device, dtype: torch.dtype):
        self.names, self.rank = list(names), rank
        self.selection = _Selection()
        n = len(names)
        # row j: adapter j's block of ones; the last row (index -1): the base, all zeros
        self.table = torch.zeros(n + 1, n * rank, device=device, dtype=dtype)
        for j in range(n):
            self.table[j, j * rank:(j + 1) * rank] = 1

    def index(self, name: str) -> int:
        return self.names.index(name)

    @contextlib.contextmanager
    def use(self, rows: int | list[int]):
        """Within: each row of a forward takes adapter rows[i] (-1: the base), or every row adapter `rows`."""
        ids = [rows] if isinstance(rows, int) else rows
        old = self.selection.mask
        if all(i < 0 for i in ids):
            self.selection.mask = None
        else:
            self.selection.mask = self.table[torch.tensor(ids, device=self.table.device)][:, None]  # (B, 1, n R)
        try:
            yield
        finally:
            self.selection.mask = old


def apply_adapters(model: nn.Module, adapters: list[tuple[str, LoRAConfig, dict[str, torch.Tensor]]]) -> AdapterSet:
    """Swap each Linear that any adapter targets for a MultiLoRALinear holding every adapter's update (in place).

    `adapters`: (name, the LoRA settings it was trained with, its lora_a / lora_b tensors by state-dict key, as
    a LoRA checkpoint holds them). Every key must land on a module: a mismatch is an error naming it."""
    w = next(model.parameters())
    rank = max(cfg.rank for _, cfg, _ in adapters)
    aset = AdapterSet([name for name, _, _ in adapters], rank, w.device, w.dtype)
    used: set[tuple[int, str]] = set()
    for path, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            key = f"{path}.{child_name}" if path else child_name
            if not isinstance(child, nn.Linear) or not any(f"{key}.lora_a" in s for _, _, s in adapters):
                continue
            a = torch.zeros(len(adapters) * rank, child.in_features, device=w.device, dtype=w.dtype)
            b = torch.zeros(child.out_features, len(adapters) * rank, device=w.device, dtype=w.dtype)
            for j, (_, cfg, state) in enumerate(adapters):
                if f"{key}.lora_a" not in state:
                    continue
                a[j * rank: j * rank + cfg.rank] = state[f"{key}.lora_a"]
                b[:, j * rank: j * rank + cfg.rank] = state[f"{key}.lora_b"].float() * (cfg.alpha / cfg.rank)
                used.update({(j, f"{key}.lora_a"), (j, f"{key}.lora_b")})
            setattr(module, child_name, MultiLoRALinear(child, a, b, aset.selection))
    for j, (name, _, state) in enumerate(adapters):
        extra = sorted(k for k in state if (j, k) not in used)
        if extra:
            raise GptforgeError(f"adapter {name}: {extra[0]} names no Linear of the base model"
                                f"{f' (and {len(extra) - 1} more)' if len(extra) > 1 else ''}")
    return aset
