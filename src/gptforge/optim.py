"""The optimizer and the learning-rate schedule."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from gptforge.config import TrainConfig


def newton_schulz(g: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float) -> torch.Tensor:
    """The quintic Newton-Schulz iteration X <- aX + (bA + cA^2)X, A = XX^T, from X = G / ||G||_F on the wide
    orientation: it pushes G's singular values towards 1 (to about [0.7, 1.2] with the default coefficients),
    i.e. approximately U V^T of G = U S V^T (Jordan et al. 2024), in G's dtype."""
    a, b, c = coefficients
    x = g if g.size(0) <= g.size(1) else g.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T  # (rows, rows), rows <= cols
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x if g.size(0) <= g.size(1) else x.T


class Muon(torch.optim.Muon):
    """torch.optim.Muon, with the Newton-Schulz iteration run in fp32 on the CPU.

    torch orthogonalises in bf16, the right choice on GPUs. On CPUs without AMX, bf16 matmuls are slower than
    fp32 ones (docs/BENCHMARKS.md), and torch's bf16 iteration measured about 3x slower than fp32 for a block
    of the `speedrun` preset, which made Muon cost more wall time than it saved. Elsewhere this is torch's
    step unchanged; the update rule, hyperparameters and state (`momentum_buffer`) are torch's in both cases.
    """

    @torch.no_grad()
    def step(self, closure=None):
        if not any(p.device.type == "cpu" for group in self.param_groups for p in group["params"]):
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                update = newton_schulz(update.float(), group["ns_coefficients"], group["ns_steps"], group["eps"])
                rows, cols = p.shape
                # torch's two scalings: "original" (Keller Jordan's) and "match_rms_adamw" (Moonshot's).
                scale = 0.2 * math.sqrt(max(rows, cols)) if group["adjust_lr_fn"] == "match_rms_adamw" \
                    else math.sqrt(max(1.0, rows / cols))
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update.to(p.dtype), alpha=-lr * scale)
        return loss


class MuonAdamW(torch.optim.Optimizer):
    """Muon for the hidden weight matrices and AdamW for everything else, stepped as one optimizer.

    The two inner optimizers share this one's param_groups (Muon's first) and its `state` dict, so
    `state_dict()` / `load_state_dict()`, torch.distributed.checkpoint's get/set_state_dict (which key the
    state by parameter name) and the training loop's per-group learning rates all see a single optimizer,
    and a checkpoint resumes both exactly.
    """

    def __init__(self, muon: Muon, adamw: torch.optim.AdamW):
        self.muon, self.adamw = muon, adamw
        super().__init__(muon.param_groups + adamw.param_groups, {})
        self._link()

    def _link(self) -> None:
        n = len(self.muon.param_groups)
        self.muon.param_groups, self.adamw.param_groups = self.param_groups[:n], self.param_groups[n:]
        self.muon.state = self.adamw.state = self.state  # parameters are disjoint, so one dict holds both

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.adamw.step()
        return loss

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)  # replaces param_groups and state with new objects
        self._link()


def trained_by_muon(name: str, ndim: int) -> bool:
    """Whether Muon trains the parameter of this name and rank: the blocks' 2-D weight matrices. Embeddings and
    the head are lookups and a classifier rather than hidden linear maps, and vectors cannot be orthogonalised,
    so AdamW keeps those (Jordan et al. 2024, "Muon: an optimizer for hidden layers"). plan.py counts Muon's
    state with this rule too."""
    return ndim == 2 and name.startswith("blocks.")


def muon_params(model: nn.Module) -> list[str]:
    """Names of the trainable parameters Muon trains (see trained_by_muon)."""
    return [n for n, p in model.named_parameters() if p.requires_grad and trained_by_muon(n, p.dim())]


def build_optimizer(model: nn.Module, cfg: TrainConfig, device_type: str) -> torch.optim.Optimizer:
    """AdamW with decoupled weight decay on matrices (weights and embeddings) only; norms and biases are
    vectors and get none (Loshchilov & Hutter 2019; GPT-2/nanoGPT practice).

    optimizer "muon": the blocks' matrices go to Muon instead (momentum, then Newton-Schulz orthogonalisation
    of the update; fp32 iteration on CPU) at muon_lr, the rest to the AdamW above. Muon's group carries an
    `lr_scale` (muon_lr / lr) that the loop multiplies the scheduled lr by (AdamW's groups: none, i.e. 1)."""
    hidden = set(muon_params(model)) if cfg.optimizer == "muon" else set()
    params = [p for n, p in model.named_parameters() if p.requires_grad and n not in hidden]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # The fused kernel updates each tensor in one pass over its memory, on CUDA and (since torch 2.4) on CPU,
    # where it measured 5x faster than foreach and 80x faster than torch's default per-tensor loop
    # (docs/BENCHMARKS.md). MPS and older builds fall back to foreach.
    fused = device_type in ("cuda", "cpu")
    adamw = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused, foreach=None if fused else True)
    if not hidden:
        return adamw
    matrices = [p for n, p in model.named_parameters() if n in hidden]
    muon = Muon([{"params": matrices, "lr_scale": cfg.muon_lr / cfg.lr}], lr=cfg.muon_lr,
                momentum=cfg.muon_momentum, weight_decay=cfg.muon_weight_decay, nesterov=True)
    return MuonAdamW(muon, adamw)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """The learning rate of optimizer step `step` (0-based): linear warmup to lr over warmup_steps, then

    cosine:   half-cosine from lr down to final_lr at max_steps (Loshchilov & Hutter 2017, SGDR);
    linear:   straight line from lr down to final_lr at max_steps;
    constant: lr;
    wsd:      warmup-stable-decay: lr until the last decay_fraction of max_steps, then linear to final_lr
              (Hu et al. 2024, MiniCPM): a run can be continued from before the decay.
    The schedule is a pure function of the step, so resuming needs no scheduler state beyond the step.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "wsd":
        decay_start = max(cfg.warmup_steps, round(cfg.max_steps * (1 - cfg.decay_fraction)))
        if step < decay_start:
            return cfg.lr
        progress = min(1.0, (step - decay_start) / max(1, cfg.max_steps - decay_start))
        return cfg.lr + progress * (cfg.final_lr - cfg.lr)
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    if cfg.schedule == "linear":
        return cfg.lr + progress * (cfg.final_lr - cfg.lr)
    return cfg.final_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.final_lr)
