"""Plan a run before it starts: memory per device, FLOPs, time and cost of training; KV cache and decode speed.

Pure arithmetic on a ModelConfig (no GPU, no model built). The activation term is counted tensor by tensor from
what this model's forward saves for backward (checked against torch.autograd.graph.saved_tensors_hooks in
tests/test_plan.py), in the spirit of Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
Transformer Models" (sec. 4.1: 34sbh + 5as^2b bytes per layer for their fp16 GPT with dropout); the comments
below say which of their terms each line is and how this model differs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptforge.checkpoint import CONFIG_FILE, resolve_checkpoint
from gptforge.config import (RunConfig, ModelConfig, TrainConfig, load_yaml, model_preset, run_config_from_dict,
                             update_dataclass)
from gptforge.errors import GptforgeError
from gptforge.hardware import GIB, PRESETS, Hardware, get_hardware
from gptforge.hf import model_config_from_hf
from gptforge.model import value_embed_layers
from gptforge.optim import trained_by_muon
from gptforge.settings import PlanConfig

CHINCHILLA_TOKENS_PER_PARAM = 20  # Hoffmann et al. 2022, "Training Compute-Optimal LLMs": ~20 tokens/parameter
FRAGMENTATION = 0.05  # caching-allocator slack (reserved - allocated): an assumption, not a measured constant
INTER_NODE_GBS = 50.0  # per-GPU network bandwidth between nodes: 400 Gb/s InfiniBand NDR per GPU (DGX H100)


# --- memory ------------------------------------------------------------------------------------------------

def _bytes(precision: str) -> tuple[int, int, int]:
    """(compute, residual, weight) bytes per element.

    compute: matmul inputs/outputs (bf16/fp16 under AMP or pure bf16). residual: the residual stream and the
    norms, which autocast leaves in fp32 (layer_norm is on autocast's fp32 list; the residual adds see fp32).
    weight: the stored parameters (fp32 master weights under AMP, bf16 when the model is cast).
    """
    if precision == "fp32":
        return 4, 4, 4
    if precision == "bf16-pure":
        return 2, 2, 2
    return 2, 4, 4  # autocast (bf16, fp16)


def matmul_weights(cfg: ModelConfig) -> int:
    """Weights that multiply every token: every block's matrices and the output head (tied or not)."""
    d, hd, f = cfg.d_model, cfg.head_dim, cfg.mlp_width
    per_layer = d * (cfg.n_head + 2 * cfg.kv_heads) * hd + cfg.n_head * hd * d + (3 if cfg.mlp == "swiglu" else 2) * d * f
    return cfg.n_layer * per_layer + cfg.padded_vocab_size * d


def param_shapes(cfg: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every parameter GPT(cfg) holds, as named_parameters() names them (optimizer state is
    per tensor, and Muon takes a tensor by its name and rank)."""
    d, hd, f, bias, v = cfg.d_model, cfg.head_dim, cfg.mlp_width, cfg.bias, cfg.padded_vocab_size
    qkv = (cfg.n_head + 2 * cfg.kv_heads) * hd

    def norm(name: str, width: int = d) -> list[tuple[str, tuple[int, ...]]]:
        both = cfg.norm == "layernorm" and bias
        return [(f"{name}.weight", (width,))] + ([(f"{name}.bias", (width,))] if both else [])

    def linear(name: str, out: int, inp: int, biased: bool = bias) -> list[tuple[str, tuple[int, ...]]]:
        return [(f"{name}.weight", (out, inp))] + ([(f"{name}.bias", (out,))] if biased else [])

    shapes = [("tok_emb.weight", (v, d))] + ([("pos_emb.weight", (cfg.block_size, d))]
                                            if cfg.pos_encoding == "learned" else [])
    shapes += [(f"value_embeds.{k}.weight", (v, cfg.kv_heads * hd)) for k in range(cfg.value_embeds)]
    gated = value_embed_layers(cfg)
    for i in range(cfg.n_layer):
        at = f"blocks.{i}.attn"
        shapes += norm(f"blocks.{i}.norm1") + ([(f"{at}.value_gate", (1,))] if i in gated else [])
        shapes += linear(f"{at}.qkv", qkv, d, bias or cfg.qkv_bias) + linear(f"{at}.proj", d, cfg.n_head * hd)
        if cfg.qk_norm:  # gains only, whatever the norm type (RMSNorm per head dim)
            shapes += [(f"{at}.q_norm.weight", (hd,)), (f"{at}.k_norm.weight", (hd,))]
        shapes += norm(f"blocks.{i}.norm2")
        mlp = ["gate", "up"] if cfg.mlp == "swiglu" else ["up"]
        shapes += [row for m in mlp for row in linear(f"blocks.{i}.mlp.{m}", f, d)]
        shapes += linear(f"blocks.{i}.mlp.down", d, f)
    shapes += norm("norm_f")
    if not cfg.tie_embeddings:
        shapes.append(("lm_head.weight", (v, d)))
    return shapes


def param_tensors(cfg: ModelConfig) -> tuple[int, list[int]]:
    """Number of parameter tensors and their sizes, in the order GPT builds them."""
    sizes = [math.prod(shape) for _, shape in param_shapes(cfg)]
    return len(sizes), sizes


@dataclass
class ModelStates:
    """Bytes of weights, gradients and optimizer states, before any sharding."""

    weights: int
    gradients: int
    optimizer: int


def model_state_bytes(cfg: ModelConfig, precision: str, optimizer: str) -> ModelStates:
    """Weights, gradients and optimizer states (Rajbhandari et al. 2020, ZeRO, sec. 3.1: 2+2+K bytes/parameter
    for fp16 mixed precision with K=12; here the stored weights are fp32 under AMP (torch.autocast keeps fp32
    parameters and casts per op), so AMP is 4+4+8, and pure bf16 is 2+2+4 (the states take the parameter's
    dtype). AdamW keeps exp_avg and exp_avg_sq per parameter and a 4-byte `step` per tensor (torch.optim.AdamW);
    with optimizer muon, the tensors Muon trains (optim.trained_by_muon) keep one momentum_buffer each
    (torch.optim.Muon, no step) and AdamW keeps the rest, as optim.build_optimizer splits them."""
    n = cfg.num_params()
    _, _, w = _bytes(precision)
    muon = adamw = adamw_tensors = 0
    for name, shape in param_shapes(cfg):
        if optimizer == "muon" and trained_by_muon(name, len(shape)):
            muon += math.prod(shape)
        else:
            adamw, adamw_tensors = adamw + math.prod(shape), adamw_tensors + 1
    return ModelStates(weights=w * n, gradients=w * n, optimizer=w * muon + 2 * w * adamw + 4 * adamw_tensors)


@dataclass
class Activations:
    """Bytes saved for backward in one micro-batch, by where they come from."""

    per_layer: int  # one block, as held until its backward (with checkpointing: its input only)
    layers: int  # all blocks
    head: int  # final norm, output head, log-softmax of the loss (fp32, B*T*V*4: the term that dominates small GPTs)
    inputs: int  # token ids, targets, positions or rotary tables
    weight_copies: int  # AMP: the bf16 copies of weights that autocast caches and matmuls save for backward
    transient: int  # not saved but alive at the peak: loss-backward buffers, a recomputed block

    @property
    def saved(self) -> int:
        return self.layers + self.head + self.inputs + self.weight_copies


def block_activation_bytes(cfg: ModelConfig, b: int, t: int, precision: str, attention: str,
                           device: str = "cuda") -> int:
    """Bytes one block saves for backward, tensor by tensor (each distinct storage once).

    Korthikanti et al. 2022 (sec. 4.1) count, in 2-byte units of sbh: layernorm inputs 4, QKV input 2, Q and K 4,
    V 2, softmax output 2as/h + dropout mask as/h + its output 2as/h, out-projection input 2, MLP input 2, GeLU
    input 8 and output 8, dropout masks 2. Here: no dropout at p=0, a fused QKV output kept whole (V is a view of
    it), the norm's output saved once by the next linear, and SDPA/flash keeping its output (which is also the
    out-projection's input) and a log-sum-exp per head instead of the s^2 softmax (Dao et al. 2022).
    """
    c, r, _ = _bytes(precision)
    d, hd, h, k, f = cfg.d_model, cfg.head_dim, cfg.n_head, cfg.kv_heads, cfg.mlp_width
    stat = 4  # LayerNorm keeps mean and rstd per token in fp32 (CUDA's accumulate type; bf16 on CPU, ~equal size)

    def norm_bytes() -> int:  # input + its statistics
        if cfg.norm == "layernorm":
            return d * r + 2 * stat
        # torch's RMSNorm is composite and upcasts to fp32 (measured, torch 2.13): the fp32 input, rstd and
        # x*rstd are saved whatever the precision (a bf16 input is saved as its fp32 copy).
        return 2 * d * 4 + 4

    per_tok = 0
    per_tok += norm_bytes() + d * c  # norm1: input, stats; its output as the QKV input (a bf16 copy under AMP)
    if attention == "sdpa":
        per_tok += (h + 2 * k) * hd * c  # fused QKV output, held whole as V is a view of it
        if cfg.pos_encoding == "rotary":
            per_tok += (h + k) * hd * c  # rotated Q and K are new tensors (x*cos saves cos, not x)
        per_tok += h * hd * c + h * 4  # SDPA output (= out-proj input, no copy) + fp32 log-sum-exp per head
        per_seq_attn = 0
    else:
        # Eager attention through torch.matmul: Q, K, V are copied contiguous (K, V expanded to all heads for GQA),
        # the softmax output P is saved (B*H*T*T), and the transposed output is copied for the out-projection.
        per_tok += 3 * h * hd * c + h * hd * c
        p_bytes = c + 4 if precision in ("bf16", "fp16") and device != "cpu" else c  # CUDA autocast: softmax in fp32,
        per_seq_attn = h * t * t * p_bytes + t * t  # then a bf16 copy for P@V; + the bool causal mask (T*T)
    per_tok += norm_bytes() + d * c  # norm2: input (residual), stats; output as the MLP input
    per_tok += (4 if cfg.mlp == "swiglu" else 2) * f * c  # gelu: up out, gelu out; swiglu: gate, up, silu, product
    if cfg.dropout > 0:  # residual dropout masks, 1 byte/element on CUDA (Korthikanti: 2sbh); attention dropout
        per_tok += 2 * d  # inside flash/SDPA is regenerated from the RNG state, so no mask is stored
    return b * t * per_tok + b * per_seq_attn


def activation_bytes(cfg: ModelConfig, b: int, t: int, precision: str = "fp32", attention: str = "sdpa",
                     checkpointing: bool = False, device: str = "cuda") -> Activations:
    """Activation memory of one micro-batch of b sequences of t tokens (per device)."""
    c, r, _ = _bytes(precision)
    d, v = cfg.d_model, cfg.padded_vocab_size
    block = block_activation_bytes(cfg, b, t, precision, attention, device)
    if checkpointing:
        # Full recomputation (Chen et al. 2016; Korthikanti et al. 2022 sec. 5: 2sbhL): each block keeps only its
        # input, and during backward one block's activations exist again at a time.
        per_layer, transient_layer = b * t * d * r, block
    else:
        per_layer, transient_layer = block, 0
    norm_f = d * r + 2 * 4 if cfg.norm == "layernorm" else 2 * d * 4 + 4  # as in block_activation_bytes
    # The head saves the final norm's output (as the matmul input); next_token_loss upcasts logits to fp32 and
    # log_softmax saves its fp32 output (B*T*V*4); the logits themselves are not saved.
    head = b * t * (norm_f + d * c + 4 * v)
    inputs = 2 * b * t * 8 + (t * 8 if cfg.pos_encoding == "learned" else 2 * t * cfg.head_dim * 4) + 4
    if cfg.dropout > 0:
        inputs += b * t * d  # embedding dropout mask
    copies = 0
    if precision in ("bf16", "fp16"):
        # torch.autocast caches one low-precision copy per weight per forward; the matmuls save it for backward.
        # Inside checkpointed blocks the copies are recomputed, so only the head's stays.
        copies = 2 * (cfg.padded_vocab_size * d if checkpointing else matmul_weights(cfg))
    # Loss backward: the gradient of log_softmax's output and of its input (fp32, B*T*V each) exist together
    # while the saved output is still held; the forward's logits (+ their fp32 copy) are smaller or equal.
    loss_transient = b * t * v * max(8, c + (4 if c != 4 else 0))
    return Activations(per_layer=per_layer, layers=cfg.n_layer * per_layer, head=head, inputs=inputs,
                       weight_copies=copies, transient=loss_transient + transient_layer)


@dataclass
class Memory:
    """Per-device bytes at the peak of a training step."""

    weights: int
    gradients: int
    optimizer: int
    activations: int  # saved for backward (all layers, head, inputs, AMP weight copies)
    activations_per_layer: int
    transient: int  # alive only around the loss backward / a recomputed block
    parallel_buffers: int  # DDP gradient buckets, FSDP gathered units
    framework: int  # CUDA context and kernels + allocator slack
    capacity: int

    @property
    def peak_allocated(self) -> int:
        """What torch.cuda.max_memory_allocated should read."""
        return (self.weights + self.gradients + self.optimizer + self.activations + self.transient
                + self.parallel_buffers)

    @property
    def total(self) -> int:
        return self.peak_allocated + self.framework

    @property
    def fits(self) -> bool:
        return self.total <= self.capacity


def memory(pc: PlanConfig, hw: Hardware) -> Memory:
    """Per-device memory of a training step under pc's parallelism.

    The peak is taken at the start of backward with gradients present: with gradient accumulation, the
    gradients of earlier micro-batches are held during later forwards, so weights + gradients + optimizer +
    activations + loss transients is reached from the second micro-batch on (and is an upper bound without).
    """
    cfg, n = pc.model, pc.world_size
    states = model_state_bytes(cfg, pc.precision, pc.optimizer)
    device = "cpu" if hw.name == "cpu" else "cuda"
    act = activation_bytes(cfg, pc.micro_batch, pc.seq_len, pc.precision, pc.attention, pc.checkpointing, device)
    w, g, o, buffers = states.weights, states.gradients, states.optimizer, 0
    _, _, wb = _bytes(pc.precision)
    unit = wb * max(cfg.num_params(embeddings=False) // cfg.n_layer, cfg.padded_vocab_size * cfg.d_model)
    if n > 1 and pc.parallel == "ddp":
        # DDP copies gradients into flat all-reduce buckets (gradient_as_bucket_view=False, the default):
        # a second gradient-sized buffer (Li et al. 2020, "PyTorch Distributed", sec. 3.2.3; DDP docs).
        buffers = g
    elif n > 1 and pc.parallel == "fsdp" and pc.fsdp_strategy == "full_shard":
        # ZeRO-3 / FSDP FULL_SHARD: every state is 1/n per device (Rajbhandari et al. 2020, (2+2+K)Psi/Nd); the
        # unit being computed and the prefetched one are gathered whole, and a unit's full gradient exists
        # before its reduce-scatter (Zhao et al. 2023, "PyTorch FSDP", sec. 3.2-3.3): ~3 units.
        w, g, o = math.ceil(w / n), math.ceil(g / n), math.ceil(o / n)
        buffers = 3 * unit
    elif n > 1 and pc.parallel == "fsdp":
        # shard_grad_op (FSDP2 reshard_after_forward=False, ZeRO-2-like): the gathered weights stay whole from
        # forward to backward, gradients and optimizer states are 1/n; a unit's full gradient exists before its
        # reduce-scatter.
        g, o = math.ceil(g / n), math.ceil(o / n)
        buffers = unit
    peak = w + g + o + act.saved + act.transient + buffers
    framework = int(hw.context_gib * GIB + FRAGMENTATION * peak)
    return Memory(weights=w, gradients=g, optimizer=o, activations=act.saved, activations_per_layer=act.per_layer,
                  transient=act.transient, parallel_buffers=buffers, framework=framework, capacity=hw.memory_bytes)


# --- time and cost -----------------------------------------------------------------------------------------

@dataclass
class Throughput:
    flops_per_token: int  # model FLOPs (PaLM appendix B), what MFU is measured against
    tokens_per_s: float  # all devices
    step_s: float
    compute_s: float  # per optimizer step
    comm_s: float  # per optimizer step, assumed overlapped with backward
    train_tokens: int
    train_hours: float
    cost_usd: float


def comm_bytes_per_step(pc: PlanConfig) -> float:
    """Bytes each device sends per optimizer step for data parallelism.

    Ring all-reduce moves 2(n-1)/n of the buffer per device (Patarasuk & Yuan 2009; NCCL's bus-bandwidth
    convention); FSDP full_shard all-gathers the weights in forward and backward and reduce-scatters the
    gradients, 3(n-1)/n, i.e. 1.5x DDP (Rajbhandari et al. 2020, sec. 7); shard_grad_op gathers once: 2(n-1)/n.
    """
    n = pc.world_size
    if n == 1:
        return 0.0
    _, _, w = _bytes(pc.precision)
    grad = pc.model.num_params() * w
    factor = 3 if pc.parallel == "fsdp" and pc.fsdp_strategy == "full_shard" else 2
    return factor * (n - 1) / n * grad


def throughput(pc: PlanConfig, hw: Hardware) -> Throughput:
    """Tokens/s at the MFU prior, step time, and the time and cost of the token budget."""
    cfg = pc.model
    fpt = cfg.flops_per_token(pc.seq_len)  # 6N + 12*L*d*T (PaLM, Chowdhery et al. 2022, appendix B)
    # Checkpointing reruns every block's forward in backward: hardware FLOPs grow by 2N_blocks per token
    # (~33% of 6N; Korthikanti et al. 2022 sec. 5), at the same hardware utilisation.
    hw_fpt = fpt + (2 * cfg.num_params(embeddings=False) + 4 * cfg.n_layer * cfg.d_model * pc.seq_len
                    if pc.checkpointing else 0)
    step_tokens = pc.global_batch * pc.seq_len
    compute_s = step_tokens * hw_fpt / (pc.world_size * hw.peak_flops(pc.precision) * pc.mfu)
    link = hw.interconnect_gbs if pc.nodes == 1 else min(hw.interconnect_gbs, INTER_NODE_GBS)
    comm_s = comm_bytes_per_step(pc) / (link * 1e9) if pc.world_size > 1 and link > 0 else 0.0
    # DDP and FSDP overlap communication with backward (Li et al. 2020 sec. 3.2.3), so the slower of the two
    # sets the pace.
    step_s = max(compute_s, comm_s)
    tokens_per_s = step_tokens / step_s
    budget = pc.tokens if pc.tokens is not None else CHINCHILLA_TOKENS_PER_PARAM * cfg.num_params()
    hours = budget / tokens_per_s / 3600
    return Throughput(flops_per_token=fpt, tokens_per_s=tokens_per_s, step_s=step_s, compute_s=compute_s,
                      comm_s=comm_s, train_tokens=budget, train_hours=hours,
                      cost_usd=hours * hw.usd_per_hour * pc.world_size)


# --- inference ---------------------------------------------------------------------------------------------

@dataclass
class Inference:
    weight_bytes: int
    kv_bytes_per_token: int
    max_cached_tokens: int  # over all sequences of a batch
    max_batch_at_seq_len: int
    max_context_batch1: int
    decode_tokens_per_s: float  # batch 1, at a context of seq_len


def inference(pc: PlanConfig, hw: Hardware) -> Inference:
    """KV cache size and a bandwidth-bound decode rate, with the weights in the run's compute dtype."""
    cfg = pc.model
    c = 4 if pc.precision == "fp32" else 2
    weights = cfg.num_params() * c
    # K and V per layer per token: 2 * n_kv_head * head_dim values (Pope et al. 2022, "Efficiently Scaling
    # Transformer Inference", sec. 3.1; GQA divides it by n_head/n_kv_head, Ainslie et al. 2023).
    kv = 2 * cfg.n_layer * cfg.kv_heads * cfg.head_dim * c
    free = hw.memory_bytes - int(hw.context_gib * GIB) - weights
    max_tokens = max(0, free // kv)
    # Batch-1 decode is memory-bound: each new token reads every matmul weight and the whole cache once
    # (Pope et al. 2022 sec. 2; the gpt-fast roofline), so tokens/s <= bandwidth / bytes read per token.
    read = matmul_weights(cfg) * c + kv * pc.seq_len
    return Inference(weight_bytes=weights, kv_bytes_per_token=kv, max_cached_tokens=max_tokens,
                     max_batch_at_seq_len=max_tokens // pc.seq_len,
                     max_context_batch1=min(max_tokens, cfg.block_size),
                     decode_tokens_per_s=hw.bandwidth_gbs * 1e9 / read)


# --- the plan ----------------------------------------------------------------------------------------------

@dataclass
class Plan:
    config: PlanConfig
    hardware: Hardware
    params: int
    memory: Memory
    throughput: Throughput
    inference: Inference
    suggestion: str | None = None  # when it does not fit: the smallest change that would
    recommendation: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        pc = dataclasses.asdict(self.config)
        pc["accum_steps"] = self.config.accum_steps
        mem = dataclasses.asdict(self.memory)
        mem.update(peak_allocated=self.memory.peak_allocated, total=self.memory.total, fits=self.memory.fits)
        return {"config": pc, "hardware": dataclasses.asdict(self.hardware), "params": self.params, "memory": mem,
                "throughput": dataclasses.asdict(self.throughput), "inference": dataclasses.asdict(self.inference),
                "suggestion": self.suggestion, "recommendation": self.recommendation}


def make_plan(pc: PlanConfig, hw: Hardware | None = None) -> Plan:
    hw = hw or get_hardware(pc.hardware)
    mem = memory(pc, hw)
    plan = Plan(pc, hw, pc.model.num_params(), mem, throughput(pc, hw), inference(pc, hw))
    if not mem.fits:
        plan.suggestion = smallest_fitting_change(pc, hw)
    return plan


def _fits(pc: PlanConfig, hw: Hardware, **changes: Any) -> bool:
    try:
        trial = dataclasses.replace(pc, global_batch=None, **changes)
    except GptforgeError:
        return False
    return memory(trial, hw).fits


def max_micro_batch(pc: PlanConfig, hw: Hardware, limit: int = 4096, **changes: Any) -> int:
    """The largest micro-batch that fits (0 if not even 1 does): doubling, then bisection."""
    if not _fits(pc, hw, micro_batch=1, **changes):
        return 0
    lo = 1
    while lo < limit and _fits(pc, hw, micro_batch=min(2 * lo, limit), **changes):
        lo = min(2 * lo, limit)
    hi = min(2 * lo, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if _fits(pc, hw, micro_batch=mid, **changes) else (lo, mid)
    return lo


def smallest_fitting_change(pc: PlanConfig, hw: Hardware) -> str:
    """One change, the least disruptive first, that makes pc fit on hw; or what the best one still lacks."""
    b = max_micro_batch(pc, hw, limit=pc.micro_batch)
    if b:
        return f"--micro-batch {b} (with more accumulation steps for the same global batch)"
    if not pc.checkpointing and _fits(pc, hw, micro_batch=1, checkpointing=True):
        return f"--checkpointing --micro-batch {max_micro_batch(pc, hw, checkpointing=True)}"
    if pc.world_size > 1 and pc.parallel != "fsdp":
        for ckpt in (pc.checkpointing, True):
            if _fits(pc, hw, micro_batch=1, checkpointing=ckpt, parallel="fsdp"):
                b = max_micro_batch(pc, hw, checkpointing=ckpt, parallel="fsdp")
                return f"--parallel fsdp{' --checkpointing' if ckpt else ''} --micro-batch {b}"
    if pc.precision != "bf16-pure" and _fits(pc, hw, micro_batch=1, checkpointing=True, precision="bf16-pure"):
        return "--precision bf16-pure --checkpointing --micro-batch 1"  # half the bytes of every model state
    for n in (2, 4, 8, 16, 32, 64):
        if n > pc.world_size and _fits(pc, hw, micro_batch=1, checkpointing=True, parallel="fsdp", world_size=n,
                                       nodes=max(1, n // 8)):
            return f"--parallel fsdp --world-size {n} --checkpointing"
    for t in (2 ** k for k in range(int(math.log2(pc.seq_len)), 5, -1)):
        if _fits(pc, hw, micro_batch=1, seq_len=t, checkpointing=True):
            return f"--seq-len {t} --micro-batch 1 --checkpointing"
    return "no change of batch, checkpointing or sharding up to 64 devices fits; a device with more memory is needed"


def recommend(pc: PlanConfig, hw: Hardware, deadline_hours: float | None = None) -> dict[str, Any]:
    """Largest micro-batch, checkpointing and FSDP when needed, accumulation steps, and the cheapest listed
    hardware that trains the budget by the deadline."""
    rec: dict[str, Any] = {}
    # The cheapest way to fit first: as given; then sharding (more communication, no more compute); then
    # checkpointing (~33% more compute); then both.
    options = [{"checkpointing": pc.checkpointing, "parallel": pc.parallel}]
    if pc.world_size > 1:
        options.append({"checkpointing": pc.checkpointing, "parallel": "fsdp"})
    options += [{"checkpointing": True, "parallel": pc.parallel}, {"checkpointing": True, "parallel": "fsdp"}]
    for choice in options:
        if choice["parallel"] == "fsdp" and pc.world_size == 1:
            continue
        b = max_micro_batch(pc, hw, **choice)
        if b:
            break
    if b == 0:
        elsewhere = [name for name, h in PRESETS.items() if _fits(pc, h, micro_batch=1, **choice)]
        where = (f"with micro-batch 1 it fits on {', '.join(elsewhere)}" if elsewhere
                 else "it fits on no listed device as configured")
        raise GptforgeError(f"{pc.model.num_params() / 1e6:.0f}M parameters at seq-len {pc.seq_len} do not fit on "
                            f"{pc.world_size} x {hw.name} ({where}); smallest change: {smallest_fitting_change(pc, hw)}")
    per_device = pc.global_batch // pc.world_size
    # The micro-batch must divide the per-device share of the global batch; take the largest such that fits.
    micro = max(m for m in range(1, min(b, per_device) + 1) if per_device % m == 0)
    rec.update(micro_batch=micro, max_micro_batch=b, accum_steps=per_device // micro, **choice)
    if choice["checkpointing"] and not pc.checkpointing:
        rec["checkpointing_why"] = "needed: not even micro-batch 1 fits without it"
    elif pc.checkpointing and max_micro_batch(pc, hw, checkpointing=False, parallel=choice["parallel"]):
        rec["checkpointing_why"] = "not needed: micro-batch 1 fits without it, which saves ~33% compute"
    else:
        rec["checkpointing_why"] = "as given" if pc.checkpointing else "off: it would cost ~33% more compute"
    if deadline_hours is not None:
        rec["cheapest"] = cheapest_hardware(pc, deadline_hours)
    return rec


def cheapest_hardware(pc: PlanConfig, deadline_hours: float) -> dict[str, Any] | None:
    """Over the listed presets and 1-64 devices (8 per node), the cheapest setup that fits and finishes in time."""
    best = None
    for name, hw in PRESETS.items():
        for n in (1, 2, 4, 8, 16, 32, 64):
            if pc.global_batch % n:  # the global batch must split evenly over the devices
                continue
            nodes = max(1, n // 8)
            per_device = pc.global_batch // n
            for parallel, ckpt in (("ddp", False), ("ddp", True), ("fsdp", False), ("fsdp", True)):
                if parallel == "fsdp" and n == 1:
                    continue
                trial = dict(world_size=n, nodes=nodes, parallel=parallel, checkpointing=ckpt, hardware=name)
                b = max_micro_batch(pc, hw, limit=per_device, **trial)
                if b == 0:
                    continue
                micro = max(m for m in range(1, b + 1) if per_device % m == 0)
                try:
                    cand = dataclasses.replace(pc, micro_batch=micro, global_batch=per_device * n, **trial)
                except GptforgeError:
                    continue
                tp = throughput(cand, hw)
                if tp.train_hours <= deadline_hours and (best is None or tp.cost_usd < best["cost_usd"]):
                    best = {"hardware": name, "world_size": n, "nodes": nodes, "parallel": parallel,
                            "checkpointing": ckpt, "micro_batch": micro, "hours": tp.train_hours,
                            "cost_usd": tp.cost_usd}
                break  # the first (cheapest-compute) setting that fits this device count is the one to use
    return best


# --- reading the run from what the user has -----------------------------------------------------------------

def load_run_config(spec: str) -> RunConfig:
    """The run `spec` names: a model preset (trained with TrainConfig's defaults), a YAML run config, a checkpoint
    or run directory (the config.yaml it was trained with), or a Hugging Face config.json or a folder holding one
    (its model, mapped by hf.model_config_from_hf as import-hf maps it)."""
    p = Path(spec)
    if not p.exists():
        return RunConfig(model=model_preset(spec))  # names the valid presets when spec is none
    if p.is_dir():
        if (p / "config.json").is_file() and not (p / CONFIG_FILE).is_file():
            p = p / "config.json"
        else:
            p = resolve_checkpoint(p) / CONFIG_FILE
    if p.suffix == ".json":
        try:
            raw = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise GptforgeError(f"{p}: not valid JSON: {e}") from None
        return RunConfig(model=model_config_from_hf(raw, str(p))[0])
    return run_config_from_dict(load_yaml(p), source=str(p))


def load_model_config(spec: str) -> ModelConfig:
    """The model of the run `spec` names (see load_run_config)."""
    return load_run_config(spec).model


# PlanConfig field -> TrainConfig field, for the settings a plan shares with a training run
TRAIN_FIELDS = {"seq_len": "seq_len", "micro_batch": "micro_batch", "precision": "precision", "optimizer": "optimizer",
                "parallel": "parallel", "fsdp_strategy": "fsdp_strategy", "checkpointing": "activation_checkpointing"}


def plan_config_from_run(run: RunConfig, run_budget: bool = False, **fields: Any) -> PlanConfig:
    """Plan `run` as `gptforge train` would run it on `world_size` devices. `fields` (PlanConfig's) override the
    run's settings, checked as --train.FIELD overrides are. Without global_batch, the step is train.batch_tokens
    split as the loop splits it (TrainConfig.micro_batches_per_step), or one micro-batch per device.
    run_budget: the token budget is the run's own, where train stops first: max_steps steps or max_tokens."""
    shared = {TRAIN_FIELDS[k]: fields.pop(k) for k in list(fields) if k in TRAIN_FIELDS}
    tc: TrainConfig = update_dataclass(run.train, shared, "train.")
    seq_len = tc.seq_len or run.model.block_size
    if fields.get("global_batch") is None:
        fields["global_batch"] = tc.micro_batch * tc.micro_batches_per_step(seq_len, fields.get("world_size", 1))
    if run_budget:
        steps = tc.max_steps * fields["global_batch"] * seq_len
        fields["tokens"] = min(steps, tc.max_tokens) if tc.max_tokens else steps
    return PlanConfig(run.model, seq_len=seq_len, micro_batch=tc.micro_batch, precision=tc.precision,
                      optimizer=tc.optimizer, checkpointing=tc.activation_checkpointing, parallel=tc.parallel,
                      fsdp_strategy=tc.fsdp_strategy, **fields)


def parse_tokens(text: str) -> int | None:
    """`chinchilla` -> None (20 per parameter), else a count like 3e9, 300B, 2.5T, 10M."""
    if text.lower() == "chinchilla":
        return None
    m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([kKmMbBtT]?)\s*", text)
    if not m:
        raise GptforgeError(f"--tokens {text!r}: give a count like 3e9, 300B, 10M, or 'chinchilla'")
    scale = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}[m.group(2).lower()]
    try:
        return int(float(m.group(1)) * scale)
    except ValueError:
        raise GptforgeError(f"--tokens {text!r}: not a number") from None


# --- output ------------------------------------------------------------------------------------------------

def _gib(n: float) -> str:
    return f"{n / GIB:,.2f} GiB" if n >= GIB else f"{n / 2**20:,.1f} MiB"


def _duration(hours: float) -> str:
    if hours < 1:
        return f"{hours * 60:.1f} min"
    return f"{hours:,.1f} h" if hours < 48 else f"{hours / 24:,.1f} days"


def print_plan(plan: Plan) -> None:
    """The plan as rich tables on standard output."""
    from rich.console import Console

    pc, hw = plan.config, plan.hardware
    console = Console(highlight=False)
    ckpt = ", activation checkpointing" if pc.checkpointing else ""
    par = f"{pc.world_size} x {hw.name}" + (f" over {pc.nodes} nodes" if pc.nodes > 1 else "")
    par += f", {pc.parallel}" if pc.world_size > 1 else ""
    par += f" {pc.fsdp_strategy}" if pc.world_size > 1 and pc.parallel == "fsdp" else ""
    console.print(f"[bold]{plan.params:,} parameters[/] ({plan.params / 1e6:,.1f}M); {par}; {pc.precision}, "
                  f"{pc.optimizer}, {pc.attention}{ckpt}; micro-batch {pc.micro_batch} x {pc.seq_len} tokens, "
                  f"global batch {pc.global_batch} ({pc.accum_steps} accumulation step(s))")
    console.print(_memory_table(plan))
    if plan.suggestion:
        console.print(f"[yellow]smallest change that fits:[/] {plan.suggestion}")
    console.print(_training_table(plan))
    console.print(_inference_table(plan))
    if plan.recommendation:
        _print_recommendation(console, plan.recommendation)


def _table(title: str, *columns: tuple[str, str]):
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    for name, justify in columns:
        t.add_column(name, justify=justify)
    return t


def _memory_table(plan: Plan):
    pc, hw, mem = plan.config, plan.hardware, plan.memory
    t = _table("memory per device (training step peak)", ("term", "left"), ("bytes", "right"), ("how", "left"))
    t.add_row("weights", _gib(mem.weights), "parameters x bytes (fp32 master weights under autocast)")
    t.add_row("gradients", _gib(mem.gradients), "same dtype as the weights")
    how = ("muon: 1 state per block-matrix weight, adamw: 2 per other" if pc.optimizer == "muon"
           else "adamw: 2 states per weight")
    sharded = pc.world_size > 1 and pc.parallel == "fsdp"
    t.add_row("optimizer states", _gib(mem.optimizer), how + (f", sharded 1/{pc.world_size}" if sharded else ""))
    t.add_row("activations", _gib(mem.activations),
              f"saved for backward; {_gib(mem.activations_per_layer)} per layer x {pc.model.n_layer}, + head/loss")
    t.add_row("loss / recompute transients", _gib(mem.transient), "fp32 log-softmax gradients (+ one recomputed block)")
    if mem.parallel_buffers:
        t.add_row("parallelism buffers", _gib(mem.parallel_buffers),
                  "DDP gradient buckets" if pc.parallel == "ddp" else "FSDP gathered units")
    t.add_row("peak allocated", _gib(mem.peak_allocated), "what torch.cuda.max_memory_allocated should read")
    t.add_row("framework", _gib(mem.framework), f"CUDA context {hw.context_gib:g} GiB + {FRAGMENTATION:.0%} allocator slack")
    verdict = "[green]fits[/]" if mem.fits else "[red]does not fit[/]"
    t.add_row("[bold]total[/]", f"[bold]{_gib(mem.total)}[/]", f"{verdict} in {_gib(mem.capacity)} "
              f"({mem.total / mem.capacity:.0%})")
    return t


def _training_table(plan: Plan):
    pc, hw, tp = plan.config, plan.hardware, plan.throughput
    t = _table(f"training at {pc.mfu:.0%} MFU", ("quantity", "left"), ("value", "right"))
    t.add_row("FLOPs per token (6N + 12 L d T)", f"{tp.flops_per_token / 1e9:,.3f} GFLOP")
    t.add_row("peak per device", f"{hw.peak_flops(pc.precision) / 1e12:,.4g} TFLOP/s ({pc.precision})")
    t.add_row("tokens/s (all devices)", f"{tp.tokens_per_s:,.0f}")
    t.add_row("step time", f"{tp.step_s:,.3f} s" + (f" (communication {tp.comm_s:,.3f} s, overlapped)" if tp.comm_s else ""))
    budget = "Chinchilla 20/param" if pc.tokens is None else "given"
    t.add_row("token budget", f"{tp.train_tokens:,.0f} ({budget})")
    t.add_row("time to train", _duration(tp.train_hours))
    t.add_row("cost", f"${tp.cost_usd:,.0f} at ${hw.usd_per_hour:g}/device-hour")
    return t


def _inference_table(plan: Plan):
    pc, inf = plan.config, plan.inference
    t = _table("inference", ("quantity", "left"), ("value", "right"))
    t.add_row("weights", _gib(inf.weight_bytes))
    t.add_row("KV cache per token", f"{inf.kv_bytes_per_token / 1024:,.1f} KiB")
    t.add_row("tokens the cache can hold", f"{inf.max_cached_tokens:,}")
    t.add_row(f"largest batch at {pc.seq_len} tokens", f"{inf.max_batch_at_seq_len:,}")
    t.add_row("longest context at batch 1", f"{inf.max_context_batch1:,} (block_size {pc.model.block_size:,})")
    t.add_row(f"batch-1 decode at {pc.seq_len} context (bandwidth bound)", f"{inf.decode_tokens_per_s:,.0f} tokens/s")
    return t


def _print_recommendation(console, rec: dict[str, Any]) -> None:
    console.print(f"[bold]recommended:[/] --micro-batch {rec['micro_batch']} (largest that fits "
                  f"{rec['max_micro_batch']}), {rec['accum_steps']} accumulation step(s), parallel {rec['parallel']}, "
                  f"checkpointing {'on' if rec['checkpointing'] else 'off'} ({rec['checkpointing_why']})")
    if "cheapest" in rec:
        c = rec["cheapest"]
        if c is None:
            console.print("[yellow]no listed hardware (up to 64 devices) finishes the budget by the deadline[/]")
        else:
            console.print(f"[bold]cheapest by the deadline:[/] {c['world_size']} x {c['hardware']} ({c['parallel']}"
                          f"{', checkpointing' if c['checkpointing'] else ''}, micro-batch {c['micro_batch']}): "
                          f"{_duration(c['hours'])}, ${c['cost_usd']:,.0f}")
