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
from typing import Any, Literal

from gptforge.config import ModelConfig, model_preset
from gptforge.errors import GptforgeError
from gptforge.hardware import GIB, PRESETS, Hardware, get_hardware

Precision = Literal["fp32", "bf16", "fp16", "bf16-pure"]
Optimizer = Literal["adamw", "sgd", "adamw-8bit"]
Parallel = Literal["ddp", "fsdp", "fsdp-grad-op"]
PRECISIONS = ("fp32", "bf16", "fp16", "bf16-pure")  # train.precision's names: bf16/fp16 are autocast
OPTIMIZERS = ("adamw", "sgd", "adamw-8bit")
PARALLELS = ("ddp", "fsdp", "fsdp-grad-op")
ATTENTIONS = ("sdpa", "eager")

CHINCHILLA_TOKENS_PER_PARAM = 20  # Hoffmann et al. 2022, "Training Compute-Optimal LLMs": ~20 tokens/parameter
DEFAULT_MFU = 0.40  # prior: PaLM reached 46% MFU (Chowdhery et al. 2022, table 3), Megatron 54% with selective
# recompute on 1T models (Korthikanti et al. 2022, table 5); smaller models on one GPU reach less, so 40%.
FRAGMENTATION = 0.05  # caching-allocator slack (reserved - allocated): an assumption, not a measured constant
INTER_NODE_GBS = 50.0  # per-GPU network bandwidth between nodes: 400 Gb/s InfiniBand NDR per GPU (DGX H100)
BNB_BLOCK = 2048  # bitsandbytes 8-bit optimizers quantize states in blocks of 2048 with one fp32 absmax each
BNB_MIN_SIZE = 4096  # ...and keep 32-bit states for tensors smaller than this (bnb min_8bit_size default)


@dataclass
class PlanConfig:
    """What to plan: the model, the batch, numerics, parallelism, the device and the token budget."""

    model: ModelConfig
    seq_len: int | None = None  # tokens per sequence; None: model.block_size
    micro_batch: int = 8  # sequences per device per forward/backward
    global_batch: int | None = None  # sequences per optimizer step over all devices; None: micro_batch * world
    precision: Precision = "bf16"
    optimizer: Optimizer = "adamw"
    checkpointing: bool = False  # activation checkpointing of every block
    attention: Literal["sdpa", "eager"] = "sdpa"
    parallel: Parallel = "ddp"
    world_size: int = 1  # devices in all
    nodes: int = 1
    hardware: str = "h100-sxm"
    tokens: int | None = None  # training budget; None: Chinchilla, 20 tokens per parameter
    mfu: float = DEFAULT_MFU

    def __post_init__(self) -> None:
        if self.seq_len is None:
            self.seq_len = self.model.block_size
        for name in ("seq_len", "micro_batch", "world_size", "nodes"):
            if getattr(self, name) < 1:
                raise GptforgeError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.seq_len > self.model.block_size:
            raise GptforgeError(f"seq-len ({self.seq_len}) exceeds the model's block_size ({self.model.block_size}); "
                                f"give --seq-len {self.model.block_size} or less")
        for name, choices in (("precision", PRECISIONS), ("optimizer", OPTIMIZERS), ("parallel", PARALLELS),
                              ("attention", ATTENTIONS)):
            if getattr(self, name) not in choices:
                raise GptforgeError(f"unknown {name} {getattr(self, name)!r}; choose one of {', '.join(choices)}")
        if self.world_size % self.nodes:
            raise GptforgeError(f"world size ({self.world_size}) must be a multiple of nodes ({self.nodes}), "
                                f"e.g. --world-size {self.nodes * max(1, self.world_size // self.nodes)}")
        if self.global_batch is None:
            self.global_batch = self.micro_batch * self.world_size
        per_step = self.micro_batch * self.world_size
        if self.global_batch % per_step:
            fix = per_step * max(1, round(self.global_batch / per_step))
            raise GptforgeError(f"global batch ({self.global_batch}) must be a multiple of micro-batch x world size "
                                f"({self.micro_batch} x {self.world_size} = {per_step}); e.g. --global-batch {fix}")
        if not 0 < self.mfu <= 1:
            raise GptforgeError(f"mfu must be in (0, 1], got {self.mfu}")
        if self.tokens is not None and self.tokens < 1:
            raise GptforgeError(f"tokens must be >= 1, got {self.tokens}")

    @property
    def accum_steps(self) -> int:
        return self.global_batch // (self.micro_batch * self.world_size)


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


def param_tensors(cfg: ModelConfig) -> tuple[int, list[int]]:
    """Number of parameter tensors and their sizes, in the order GPT builds them (optimizer state is per tensor)."""
    d, hd, f, bias = cfg.d_model, cfg.head_dim, cfg.mlp_width, cfg.bias
    qkv = (cfg.n_head + 2 * cfg.kv_heads) * hd
    norm = [d, d] if cfg.norm == "layernorm" and bias else [d]
    sizes = [cfg.padded_vocab_size * d] + ([cfg.block_size * d] if cfg.pos_encoding == "learned" else [])
    mlp = ([d * f, d * f, f * d] + ([f, f, d] if bias else [])) if cfg.mlp == "swiglu" else \
        ([d * f, f * d] + ([f, d] if bias else []))
    sizes += [cfg.padded_vocab_size * cfg.kv_heads * hd] * cfg.value_embeds  # value-embedding tables
    attn = [d * qkv] + ([qkv] if bias else []) + [cfg.n_head * hd * d] + ([d] if bias else [])
    attn += [hd, hd] if cfg.qk_norm else []  # query and key norm gains
    block = norm + attn + norm + mlp
    sizes += block * cfg.n_layer + [1] * (2 * cfg.value_embeds) + norm  # + a gate per layer reading a value table
    if not cfg.tie_embeddings:
        sizes.append(cfg.padded_vocab_size * d)
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
    parameters and casts per op), so AMP is 4+4+8, and pure bf16 is 2+2+4 (AdamW's states take the parameter's
    dtype). AdamW keeps exp_avg and exp_avg_sq per parameter and a 4-byte `step` per tensor (torch.optim.AdamW)."""
    n = cfg.num_params()
    _, _, w = _bytes(precision)
    n_tensors, sizes = param_tensors(cfg)
    if optimizer == "adamw":
        opt = 2 * w * n + 4 * n_tensors
    elif optimizer == "sgd":  # one momentum buffer (torch.optim.SGD with momentum > 0)
        opt = w * n
    else:  # 8-bit AdamW (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization"), bitsandbytes
        opt = 0
        for s in sizes:
            opt += 2 * (s + 4 * math.ceil(s / BNB_BLOCK)) if s >= BNB_MIN_SIZE else 8 * s
    return ModelStates(weights=w * n, gradients=w * n, optimizer=opt)


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
    elif n > 1 and pc.parallel == "fsdp":
        # ZeRO-3 / FSDP FULL_SHARD: every state is 1/n per device (Rajbhandari et al. 2020, (2+2+K)Psi/Nd); the
        # unit being computed and the prefetched one are gathered whole, and a unit's full gradient exists
        # before its reduce-scatter (Zhao et al. 2023, "PyTorch FSDP", sec. 3.2-3.3): ~3 units.
        w, g, o = math.ceil(w / n), math.ceil(g / n), math.ceil(o / n)
        buffers = 3 * unit
    elif n > 1 and pc.parallel == "fsdp-grad-op":
        # ZeRO-2 / SHARD_GRAD_OP: weights stay whole, gradients and optimizer states are 1/n; a unit's full
        # gradient exists before its reduce-scatter.
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
    convention); FSDP full-shard all-gathers the weights in forward and backward and reduce-scatters the
    gradients, 3(n-1)/n, i.e. 1.5x DDP (Rajbhandari et al. 2020, sec. 7); SHARD_GRAD_OP gathers once: 2(n-1)/n.
    """
    n = pc.world_size
    if n == 1:
        return 0.0
    _, _, w = _bytes(pc.precision)
    grad = pc.model.num_params() * w
    factor = 3 if pc.parallel == "fsdp" else 2
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
    if pc.optimizer != "adamw-8bit" and _fits(pc, hw, micro_batch=1, checkpointing=True, optimizer="adamw-8bit"):
        return "--optimizer adamw-8bit --checkpointing --micro-batch 1"
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


# --- reading a model from what the user has ------------------------------------------------------------------

def model_from_hf_config(raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """A ModelConfig from a Hugging Face config.json of a GPT-2 or Llama model (the key names of each)."""
    kind = raw.get("model_type")
    try:
        if kind == "gpt2":
            act = raw.get("activation_function", "gelu_new")
            if act not in ("gelu_new", "gelu_pytorch_tanh"):
                raise GptforgeError(f"{source}: activation {act!r} is not GPT-2's tanh GELU, which gptforge builds")
            return ModelConfig(n_layer=raw["n_layer"], n_head=raw["n_head"], d_model=raw["n_embd"],
                               d_mlp=raw.get("n_inner"), vocab_size=raw["vocab_size"], block_size=raw["n_positions"],
                               norm_eps=raw.get("layer_norm_epsilon", 1e-5),
                               tie_embeddings=raw.get("tie_word_embeddings", True))
        if kind in ("llama", "mistral", "qwen2"):
            if raw.get("mlp_bias") or (raw.get("attention_bias") and kind != "qwen2"):
                raise GptforgeError(f"{source}: biases in Llama layers are not supported by ModelConfig")
            if kind == "qwen2":  # Qwen2 has biases on q, k, v only, which ModelConfig cannot express
                raise GptforgeError(f"{source}: Qwen2's q/k/v-only biases are not expressible in ModelConfig")
            return ModelConfig(n_layer=raw["num_hidden_layers"], n_head=raw["num_attention_heads"],
                               n_kv_head=raw.get("num_key_value_heads"), d_model=raw["hidden_size"],
                               d_mlp=raw["intermediate_size"], vocab_size=raw["vocab_size"],
                               block_size=raw["max_position_embeddings"], pos_encoding="rotary",
                               rope_theta=raw.get("rope_theta", 10000.0), norm="rmsnorm",
                               norm_eps=raw.get("rms_norm_eps", 1e-6), mlp="swiglu", bias=False,
                               tie_embeddings=raw.get("tie_word_embeddings", False))
    except KeyError as e:
        raise GptforgeError(f"{source}: missing key {e.args[0]!r} for model_type {kind!r}") from None
    raise GptforgeError(f"{source}: model_type {kind!r} is not supported; supported: gpt2, llama, mistral")


def load_model_config(spec: str) -> ModelConfig:
    """A model from a preset name, a YAML run config, a checkpoint or run directory, or an HF config.json."""
    p = Path(spec)
    if not p.exists():
        return model_preset(spec)  # names the valid presets when spec is none
    if p.is_dir():
        if (p / "config.json").is_file() and not (p / "config.yaml").is_file():
            p = p / "config.json"
        else:
            from gptforge.checkpoint import CONFIG_FILE, resolve_checkpoint

            p = resolve_checkpoint(p) / CONFIG_FILE
    if p.suffix == ".json":
        try:
            raw = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise GptforgeError(f"{p}: not valid JSON: {e}") from None
        return model_from_hf_config(raw, str(p))
    from gptforge.config import load_yaml, run_config_from_dict

    return run_config_from_dict(load_yaml(p), source=str(p)).model


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
    from rich.table import Table

    pc, hw, mem, tp, inf = plan.config, plan.hardware, plan.memory, plan.throughput, plan.inference
    console = Console(highlight=False)
    ckpt = ", activation checkpointing" if pc.checkpointing else ""
    par = f"{pc.world_size} x {hw.name}" + (f" over {pc.nodes} nodes" if pc.nodes > 1 else "")
    par += f", {pc.parallel}" if pc.world_size > 1 else ""
    console.print(f"[bold]{plan.params:,} parameters[/] ({plan.params / 1e6:,.1f}M); {par}; {pc.precision}, "
                  f"{pc.optimizer}, {pc.attention}{ckpt}; micro-batch {pc.micro_batch} x {pc.seq_len} tokens, "
                  f"global batch {pc.global_batch} ({pc.accum_steps} accumulation step(s))")

    t = Table(title="memory per device (training step peak)", title_justify="left")
    t.add_column("term")
    t.add_column("bytes", justify="right")
    t.add_column("how")
    t.add_row("weights", _gib(mem.weights), "parameters x bytes (fp32 master weights under autocast)")
    t.add_row("gradients", _gib(mem.gradients), "same dtype as the weights")
    t.add_row("optimizer states", _gib(mem.optimizer), f"{pc.optimizer}" + (f", sharded 1/{pc.world_size}"
                                                                            if pc.parallel != "ddp" and pc.world_size > 1 else ""))
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
    console.print(t)
    if plan.suggestion:
        console.print(f"[yellow]smallest change that fits:[/] {plan.suggestion}")

    t = Table(title=f"training at {pc.mfu:.0%} MFU", title_justify="left")
    t.add_column("quantity")
    t.add_column("value", justify="right")
    t.add_row("FLOPs per token (6N + 12 L d T)", f"{tp.flops_per_token / 1e9:,.3f} GFLOP")
    t.add_row("peak per device", f"{hw.peak_flops(pc.precision) / 1e12:,.4g} TFLOP/s ({pc.precision})")
    t.add_row("tokens/s (all devices)", f"{tp.tokens_per_s:,.0f}")
    t.add_row("step time", f"{tp.step_s:,.3f} s" + (f" (communication {tp.comm_s:,.3f} s, overlapped)" if tp.comm_s else ""))
    budget = "Chinchilla 20/param" if pc.tokens is None else "given"
    t.add_row("token budget", f"{tp.train_tokens:,.0f} ({budget})")
    t.add_row("time to train", _duration(tp.train_hours))
    t.add_row("cost", f"${tp.cost_usd:,.0f} at ${hw.usd_per_hour:g}/device-hour")
    console.print(t)

    t = Table(title="inference", title_justify="left")
    t.add_column("quantity")
    t.add_column("value", justify="right")
    t.add_row("weights", _gib(inf.weight_bytes))
    t.add_row("KV cache per token", f"{inf.kv_bytes_per_token / 1024:,.1f} KiB")
    t.add_row("tokens the cache can hold", f"{inf.max_cached_tokens:,}")
    t.add_row(f"largest batch at {pc.seq_len} tokens", f"{inf.max_batch_at_seq_len:,}")
    t.add_row("longest context at batch 1", f"{inf.max_context_batch1:,} (block_size {pc.model.block_size:,})")
    t.add_row(f"batch-1 decode at {pc.seq_len} context (bandwidth bound)", f"{inf.decode_tokens_per_s:,.0f} tokens/s")
    console.print(t)

    rec = plan.recommendation
    if rec:
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
