"""Pruning: unstructured (magnitude, Wanda), N:M (2:4) and structured (whole heads and MLP channels).

Unstructured and N:M pruning zero weights of the blocks' Linear layers in place and write a dense checkpoint
(zeros are what sparse kernels and compressors exploit; a dense CPU matmul is not faster for them, which is
why `structured` exists). The embedding and the head are left alone, as in Wanda and SparseGPT.
Structured pruning removes the least important attention heads (whole key/value groups under GQA) and MLP
channels, the same count in every layer so one config describes the model, and writes a genuinely smaller
dense model: torch.nn.utils.prune's masks never shrink anything (pytorch/pytorch#36214). Its sparsity means
what it means for the other methods, the share of block Linear weights removed (`structured_widths`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn as nn

from gptforge.errors import GptforgeError

METHODS = ("magnitude", "wanda", "structured")


def parse_pattern(pattern: str | None) -> tuple[int, int] | None:
    if pattern is None:
        return None
    try:
        n, m = (int(p) for p in pattern.split(":"))
    except ValueError:
        raise GptforgeError(f"--pattern must look like N:M (e.g. 2:4), got {pattern!r}") from None
    if not 0 < n < m:
        raise GptforgeError(f"--pattern N:M needs 0 < N < M (N weights kept of every M), got {pattern!r}")
    return n, m


def check_args(method: str, sparsity: float | None, pattern: tuple[int, int] | None) -> float:
    """The sparsity to reach, after checking the combination; with an N:M pattern it is 1 - N/M."""
    if method not in METHODS:
        raise GptforgeError(f"unknown pruning method {method!r}; use one of {', '.join(METHODS)}")
    if pattern is not None:
        if method == "structured":
            raise GptforgeError("--pattern applies to magnitude and wanda; structured pruning removes whole heads and channels")
        implied = 1 - pattern[0] / pattern[1]
        if sparsity is not None and abs(sparsity - implied) > 1e-9:
            raise GptforgeError(f"pattern {pattern[0]}:{pattern[1]} means sparsity {implied:g}, but --sparsity is {sparsity:g}; leave --sparsity out")
        return implied
    if sparsity is None:
        raise GptforgeError("give --sparsity S with 0 < S < 1 (or an N:M --pattern)")
    if not 0 < sparsity < 1:
        raise GptforgeError(f"--sparsity must be in (0, 1), got {sparsity:g}")
    return sparsity


def block_linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and name.startswith("blocks.")}


@torch.no_grad()
def input_norms(model: nn.Module, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """||X_j||_2 over every calibration token, per input feature j of every block Linear (Wanda's statistic)."""
    sums: dict[str, torch.Tensor] = {}
    hooks = []
    for name, m in block_linears(model).items():
        def hook(mod, args, _name=name):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            sums[_name] = sums.get(_name, 0) + (x * x).sum(0)
        hooks.append(m.register_forward_pre_hook(hook))
    try:
        for x in batches:
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return {k: v.sqrt() for k, v in sums.items()}


def calibration_batches(data_dir: str, n_batches: int, batch: int, seq_len: int, seed: int = 0) -> list[torch.Tensor]:
    """Input windows from the train shards of a prepared data directory."""
    from gptforge.data import BatchSampler, TokenData

    data = TokenData(data_dir)
    sampler = BatchSampler(data.shards("train"), batch, seq_len, seed=seed)
    return [sampler.batch(i)[0] for i in range(n_batches)]


def _keep_mask(scores: torch.Tensor, sparsity: float, pattern: tuple[int, int] | None, per_row: bool) -> torch.Tensor:
    """Boolean mask keeping the highest scores: in every N:M group, in every row, or over the whole matrix.
    The pruned count is round(sparsity * size) of the comparison group, exactly."""
    n_out, n_in = scores.shape
    if pattern is not None:
        n, m = pattern
        if n_in % m:
            raise GptforgeError(f"an {n}:{m} pattern needs input widths divisible by {m}, got {n_in}")
        groups = scores.reshape(n_out, n_in // m, m)
        keep = torch.zeros_like(groups, dtype=torch.bool)
        keep.scatter_(-1, groups.topk(n, dim=-1).indices, True)
        return keep.view(n_out, n_in)
    if per_row:
        k = round(sparsity * n_in)
        keep = torch.ones_like(scores, dtype=torch.bool)
        keep.scatter_(1, scores.topk(k, dim=1, largest=False).indices, False)
        return keep
    k = round(sparsity * scores.numel())
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    keep[scores.flatten().topk(k, largest=False).indices] = False
    return keep.view_as(scores)


@torch.no_grad()
def unstructured_masks(model: nn.Module, method: str, sparsity: float, pattern: tuple[int, int] | None = None,
                       batches: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """{parameter name: keep mask} for every block Linear weight.

    magnitude: |W|, compared over the whole layer. wanda: |W_ij| * ||X_j||, compared within each output row
    (Sun et al. 2023, "A Simple and Effective Pruning Approach for LLMs"): a small weight on a feature with
    large activations matters more than its magnitude says.
    """
    norms = None
    if method == "wanda":
        if not batches:
            raise GptforgeError("wanda needs calibration batches: give --data DIR (a directory from gptforge prepare)")
        norms = input_norms(model, batches)
    masks = {}
    for name, m in block_linears(model).items():
        scores = m.weight.abs().float()
        if norms is not None:
            scores = scores * norms[name][None, :]
        masks[f"{name}.weight"] = _keep_mask(scores, sparsity, pattern, per_row=method == "wanda")
    return masks


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    for name, keep in masks.items():
        model.get_parameter(name).mul_(keep.to(model.get_parameter(name).dtype))


def sparsity_of(model: nn.Module) -> float:
    """Share of zeros among the block Linear weights."""
    ws = [m.weight for m in block_linears(model).values()]
    return sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)


# --- structured ---------------------------------------------------------------------------------------------

# Kept MLP widths are whole multiples of this: int4's groups (32/64/128 input columns) then still divide
# mlp.down's input, so a pruned model can be quantized afterwards, and GPU matmul tiles stay full. (On the CI
# CPU, fp32 batch-1 GEMVs measured no slower per channel at an odd width: this is not for CPU decode speed.)
CHANNEL_MULTIPLE = 64


def structured_widths(cfg, sparsity: float, channel_multiple: int = CHANNEL_MULTIPLE) -> tuple[int, int, float]:
    """(kept key/value groups, kept MLP channels, achieved sparsity) per layer for `sparsity`, the share of the
    block Linear weights to remove (the measure `sparsity_of` uses for unstructured pruning).

    Heads go first, to the nearest whole key/value group of (1 - sparsity); the MLP then loses the fewest
    channels that bring the removed share to at least `sparsity`, rounded so that the kept width is a multiple
    of `channel_multiple` (of 1 when the MLP is narrower than 4 multiples, where steps of 64 would be too
    coarse). If the MLP cannot make up the rest, one more group goes. The achieved sparsity is therefore
    >= the requested one, and above it by less than one rounding step of channels (or one head group)."""
    d, hd, K, F = cfg.d_model, cfg.head_dim, cfg.kv_heads, cfg.mlp_width
    per_group = cfg.n_head // K
    group_w = d * hd * (2 * per_group + 2)  # its queries, key, value (qkv rows) and its attn.proj columns
    channel_w = d * (3 if cfg.mlp == "swiglu" else 2)  # a row of up (and gate), a column of down
    total = K * group_w + F * channel_w
    need = sparsity * total
    step = channel_multiple if F >= 4 * channel_multiple else 1
    for groups in range(max(1, round((1 - sparsity) * K)), 0, -1):
        left = need - (K - groups) * group_w
        if left <= 0:  # the heads alone remove enough; the MLP keeps its width
            channels = F
        else:
            channels = (F - math.ceil(round(left / channel_w, 9))) // step * step
        if channels >= 1:
            return groups, channels, 1 - (groups * group_w + channels * channel_w) / total
    most = 1 - (group_w + min(F, step) * channel_w) / total
    raise GptforgeError(f"structured sparsity {sparsity:g} would leave less than one head group and {min(F, step)} MLP "
                        f"channels per layer; this model can lose at most {most:.3f} of its block weights")


@dataclasses.dataclass
class StructuredPlan:
    """Per layer, the key/value groups (heads, under plain MHA) and the MLP channels that stay."""

    groups: list[list[int]]
    channels: list[list[int]]


@torch.no_grad()
def structured_plan(model: nn.Module, sparsity: float, batches: list[torch.Tensor] | None = None,
                    channel_multiple: int = CHANNEL_MULTIPLE) -> StructuredPlan:
    """Which heads and MLP channels to keep: in each layer, the counts `structured_widths` gives (at least
    `sparsity` of the block weights removed, MLP widths a multiple of `channel_multiple`), choosing the units
    with the largest importance. A unit's importance is the sum of the Wanda scores |W| * ||X|| of the output-projection
    columns it writes through (attn.proj for a head's values, mlp.down for a channel); without calibration
    batches the activation norms are taken as 1 (plain weight magnitude)."""
    cfg = model.config
    if cfg.value_embeds:  # a table feeds an early and a late layer, which may keep different heads
        raise GptforgeError("structured pruning cannot remove heads of a model with value embeddings "
                            f"(model.value_embeds = {cfg.value_embeds}); use --method magnitude or wanda")
    hd, per_group = cfg.head_dim, cfg.n_head // cfg.kv_heads
    norms = input_norms(model, batches) if batches else {}
    keep_groups, keep_channels, _ = structured_widths(cfg, sparsity, channel_multiple)
    plan = StructuredPlan([], [])
    for i, block in enumerate(model.blocks):
        proj = block.attn.proj.weight.abs().float() * norms.get(f"blocks.{i}.attn.proj", 1.0)
        head_score = proj.sum(0).view(cfg.kv_heads, per_group * hd).sum(1)  # (K,)
        plan.groups.append(sorted(head_score.topk(keep_groups).indices.tolist()))
        down = block.mlp.down.weight.abs().float() * norms.get(f"blocks.{i}.mlp.down", 1.0)
        plan.channels.append(sorted(down.sum(0).topk(keep_channels).indices.tolist()))
    return plan


def _qkv_rows(cfg, groups: list[int]) -> torch.Tensor:
    """Rows of the fused qkv weight that belong to the kept key/value groups (queries, then keys, then values)."""
    hd, per_group, H, K = cfg.head_dim, cfg.n_head // cfg.kv_heads, cfg.n_head, cfg.kv_heads
    q = [r for g in groups for h in range(g * per_group, (g + 1) * per_group) for r in range(h * hd, (h + 1) * hd)]
    k = [H * hd + r for g in groups for r in range(g * hd, (g + 1) * hd)]
    v = [(H + K) * hd + r for g in groups for r in range(g * hd, (g + 1) * hd)]
    return torch.tensor(q + k + v)


def _proj_cols(cfg, groups: list[int]) -> torch.Tensor:
    hd, per_group = cfg.head_dim, cfg.n_head // cfg.kv_heads
    return torch.tensor([c for g in groups for h in range(g * per_group, (g + 1) * per_group)
                         for c in range(h * hd, (h + 1) * hd)])


@torch.no_grad()
def shrink(model: nn.Module, plan: StructuredPlan) -> nn.Module:
    """A new, smaller GPT holding only the kept heads and channels (the same function of its input as
    `model` with the other heads' and channels' outputs zeroed)."""
    from gptforge.model import GPT

    cfg = model.config
    kept = len(plan.groups[0])
    per_group = cfg.n_head // cfg.kv_heads
    new_cfg = dataclasses.replace(
        cfg, n_head=kept * per_group, n_kv_head=None if cfg.n_kv_head is None else kept,
        head_size=cfg.head_dim, d_mlp=len(plan.channels[0]))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for i in range(cfg.n_layer):
        p = f"blocks.{i}."
        rows, cols = _qkv_rows(cfg, plan.groups[i]), _proj_cols(cfg, plan.groups[i])
        ch = torch.tensor(plan.channels[i])
        state[p + "attn.qkv.weight"] = state[p + "attn.qkv.weight"][rows]
        if cfg.bias or cfg.qkv_bias:
            state[p + "attn.qkv.bias"] = state[p + "attn.qkv.bias"][rows]
        state[p + "attn.proj.weight"] = state[p + "attn.proj.weight"][:, cols]
        for name in ("mlp.up", "mlp.gate"):
            if p + name + ".weight" in state:
                state[p + name + ".weight"] = state[p + name + ".weight"][ch]
                if cfg.bias:
                    state[p + name + ".bias"] = state[p + name + ".bias"][ch]
        state[p + "mlp.down.weight"] = state[p + "mlp.down.weight"][:, ch]
    with torch.device("meta"):
        new = GPT(new_cfg)
    new.load_state_dict({k: v.contiguous() for k, v in state.items()}, assign=True)
    return new.eval()


def prune_model(model: nn.Module, method: str, sparsity: float | None, pattern: str | None = None,
                batches: list[torch.Tensor] | None = None) -> tuple[nn.Module, dict[str, Any], dict[str, torch.Tensor] | None]:
    """The pruned model (in place for unstructured, a new smaller one for structured), its `compression`
    section, and the masks that recovery training must keep applying (None for structured)."""
    nm = parse_pattern(pattern)
    sparsity = check_args(method, sparsity, nm)
    section: dict[str, Any] = {"method": method, "sparsity": round(sparsity, 6)}
    if method == "structured":
        plan = structured_plan(model, sparsity, batches)
        new = shrink(model, plan)
        before = sum(m.weight.numel() for m in block_linears(model).values())
        after = sum(m.weight.numel() for m in block_linears(new).values())
        section.update(heads=f"{model.config.n_head}->{new.config.n_head}",
                       mlp_channels=f"{model.config.mlp_width}->{new.config.mlp_width}",
                       params=f"{model.num_params()}->{new.num_params()}", measured_sparsity=round(1 - after / before, 6))
        return new, {"pruning": section}, None
    masks = unstructured_masks(model, method, sparsity, nm, batches)
    apply_masks(model, masks)
    if nm is not None:
        section["pattern"] = f"{nm[0]}:{nm[1]}"
    section["measured_sparsity"] = round(sparsity_of(model), 6)
    return model, {"pruning": section}, masks
