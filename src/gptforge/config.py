"""Typed configs: the model's shape, the training run, exact-name presets, YAML files and dotted overrides.

A config is built in one direction only: preset -> YAML file -> `--section.field value` overrides, each layer
checked against the dataclass fields (an unknown key or a wrong type names the key and the valid choices).
Values that follow from others (head size, padded vocab, MLP width when left unset) are properties, so that
overriding `d_model` on a preset never leaves a stale derived value behind.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from gptforge.errors import GptforgeError

VOCAB_MULTIPLE = 64  # pad the embedding to a multiple of 64 rows: matmul kernels prefer it (nanoGPT: 50257->50304)


@dataclass
class ModelConfig:
    """Shape and variant of a decoder-only GPT."""

    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None  # key/value heads for grouped-query attention; None: n_head (plain MHA)
    d_model: int = 768
    d_mlp: int | None = None  # hidden width of the MLP; None: 4*d_model (gelu) or ~8/3*d_model (swiglu)
    vocab_size: int = 50257  # the tokenizer's true size; the embedding is padded (see padded_vocab_size)
    block_size: int = 1024  # longest context the model is trained for
    pos_encoding: Literal["learned", "rotary"] = "learned"
    rope_theta: float = 10000.0
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = 1e-5
    mlp: Literal["gelu", "swiglu", "relu2"] = "gelu"  # relu2: down(relu(up(x))^2) (So et al. 2021, Primer)
    bias: bool = True  # biases in Linear layers and LayerNorm
    dropout: float = 0.0
    tie_embeddings: bool = True  # the output head reuses the token embedding matrix
    head_size: int | None = None  # per-head width; None: d_model // n_head (set when structured pruning drops heads)
    # Speedrun fields (docs/train.md "Speedrun recipe"); the defaults build the plain GPT above.
    qk_norm: bool = False  # RMSNorm (learned gain per head dim) on queries and keys before attention
    zero_init_proj: bool = False  # attn.proj, mlp.down (and an untied head) start at zero
    logit_softcap: float | None = None  # logits -> cap * tanh(logits / cap) (Gemma 2; modded-nanogpt)
    value_embeds: int = 0  # extra token tables added to the values of the first and last this-many layers

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_head", "d_model", "vocab_size", "block_size"):
            if getattr(self, name) < 1:
                raise GptforgeError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.head_size is None and self.d_model % self.n_head:
            raise GptforgeError(f"model.d_model ({self.d_model}) must be divisible by model.n_head ({self.n_head})")
        if self.kv_heads < 1 or self.n_head % self.kv_heads:
            raise GptforgeError(f"model.n_head ({self.n_head}) must be a multiple of model.n_kv_head ({self.n_kv_head})")
        if self.pos_encoding == "rotary" and self.head_dim % 2:
            raise GptforgeError(f"rotary embeddings need an even head size, got {self.head_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise GptforgeError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.d_mlp is not None and self.d_mlp < 1:
            raise GptforgeError(f"model.d_mlp must be >= 1 or null, got {self.d_mlp}")
        if self.head_size is not None and self.head_size < 1:
            raise GptforgeError(f"model.head_size must be >= 1 or null, got {self.head_size}")
        if self.logit_softcap is not None and self.logit_softcap <= 0:
            raise GptforgeError(f"model.logit_softcap must be > 0 or null, got {self.logit_softcap}")
        if not 0 <= 2 * self.value_embeds <= self.n_layer:
            raise GptforgeError(f"model.value_embeds ({self.value_embeds}) must be between 0 and n_layer / 2 "
                                f"({self.n_layer // 2}): each table feeds one of the first and one of the last layers")

    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head if self.head_size is None else self.head_size

    @property
    def mlp_width(self) -> int:
        if self.d_mlp is not None:
            return self.d_mlp
        if self.mlp == "swiglu":  # 2/3 of 4d keeps the parameter count of a 4d GELU MLP (Shazeer 2020)
            return 256 * math.ceil(8 * self.d_model / 3 / 256)
        return 4 * self.d_model

    @property
    def padded_vocab_size(self) -> int:
        return VOCAB_MULTIPLE * math.ceil(self.vocab_size / VOCAB_MULTIPLE)

    def num_params(self, *, embeddings: bool = True) -> int:
        """Parameters of the model this config builds, counted from the formula (no model needed).

        Per block: two norms, the fused qkv projection d x (n_head + 2 n_kv_head) hd, the output projection,
        and the MLP (2 matrices for gelu and relu2, 3 for swiglu), plus the query/key norm gains (qk_norm) and
        the value-embedding gates. Embeddings: the padded token table, the value-embedding tables, the learned
        position table if any, and the output head when it is not tied.
        """
        d, hd, f, b = self.d_model, self.head_dim, self.mlp_width, int(self.bias)
        norm = d * (2 if self.norm == "layernorm" and self.bias else 1)
        qkv_out = (self.n_head + 2 * self.kv_heads) * hd
        attn = d * qkv_out + b * qkv_out + self.n_head * hd * d + b * d
        if self.mlp == "swiglu":
            mlp = 3 * d * f + b * (2 * f + d)
        else:
            mlp = 2 * d * f + b * (f + d)
        attn += 2 * hd if self.qk_norm else 0  # the query and key norms' gains
        body = self.n_layer * (2 * norm + attn + mlp) + norm  # + the final norm
        body += 2 * self.value_embeds  # one mixing gate per layer that reads a value table
        if not embeddings:
            return body
        emb = self.padded_vocab_size * d
        emb += self.value_embeds * self.padded_vocab_size * self.kv_heads * hd  # lookups, not matmuls
        if self.pos_encoding == "learned":
            emb += self.block_size * d
        if not self.tie_embeddings:
            emb += self.padded_vocab_size * d
        return body + emb

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token: 6N + 12*L*d*T (PaLM, Chowdhery et al. 2022, appendix B).

        N counts the weights that take part in a matmul for every token: every block's matrices and the
        output head (tied or not), not the embedding lookups. 6N is the forward (2N) plus backward (4N)
        matmul cost; 12*L*d*T is attention's QK^T and AV products over a context of T = seq_len tokens.
        """
        t = self.block_size if seq_len is None else seq_len
        n = self.num_params(embeddings=False) + self.padded_vocab_size * self.d_model
        return 6 * n + 12 * self.n_layer * self.d_model * t


# Exact-name presets. Values not named take the ModelConfig defaults.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # For tests: builds and trains in milliseconds.
    "tiny": dict(n_layer=2, n_head=4, d_model=64, vocab_size=512, block_size=64),
    # The demo's model: a few minutes of bf16 training on 2 CPU cores gets it to readable verse.
    "shakespeare": dict(
        n_layer=4, n_head=4, d_model=256, vocab_size=4096, block_size=256,
        pos_encoding="rotary", norm="rmsnorm", bias=False,
    ),
    # The `shakespeare` shape with the speedrun fields that measured faster to a given val loss on 2 CPU cores
    # (benchmarks/time_to_loss.py; docs/train.md "Speedrun recipe"). Train it with configs/speedrun.yaml (Muon).
    "speedrun": dict(
        n_layer=4, n_head=4, d_model=256, vocab_size=4096, block_size=256,
        pos_encoding="rotary", norm="rmsnorm", bias=False, mlp="relu2", qk_norm=True, zero_init_proj=True,
        tie_embeddings=False,
    ),
    # GPT-2 family (Radford et al. 2019; Hugging Face model cards).
    "gpt2": dict(n_layer=12, n_head=12, d_model=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, d_model=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, d_model=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, d_model=1600),
    # Llama-style ~1.2B, the shape of Llama 3.2 1B: RoPE, RMSNorm, SwiGLU, 4:1 GQA, tied embeddings.
    "llama-1b": dict(
        n_layer=16, n_head=32, n_kv_head=8, d_model=2048, d_mlp=8192, vocab_size=128256, block_size=2048,
        pos_encoding="rotary", rope_theta=500000.0, norm="rmsnorm", mlp="swiglu", bias=False,
    ),
}


def model_preset(name: str) -> ModelConfig:
    """The ModelConfig of a preset, looked up by its exact name."""
    if name not in MODEL_PRESETS:
        raise GptforgeError(f"unknown model preset {name!r}; valid presets: {', '.join(MODEL_PRESETS)}")
    return ModelConfig(**MODEL_PRESETS[name])


# The names of a run's numerics, optimizer and sharding, spelled once: `gptforge train` (TrainConfig) and
# `gptforge plan` (plan.PlanConfig) take exactly these. fp32; bf16 / fp16: autocast over fp32 weights (fp16 with
# a GradScaler, CUDA only); bf16-pure: bf16 weights, gradients and optimizer states; auto: bf16 on CUDA, fp32
# elsewhere. adamw; muon: Muon for the blocks' matrices, AdamW for the rest (optim.build_optimizer). Under
# torchrun: ddp (a replica per rank), fsdp (FSDP2, sharded as fsdp_strategy says); none: one process; auto: ddp
# when there are several processes. full_shard regathers weights in backward (ZeRO-3-like); shard_grad_op keeps
# them from forward to backward (ZeRO-2-like).
Precision = Literal["auto", "fp32", "bf16", "fp16", "bf16-pure"]
Optimizer = Literal["adamw", "muon"]
Parallel = Literal["auto", "none", "ddp", "fsdp"]
FsdpStrategy = Literal["full_shard", "shard_grad_op"]


def check_optimizer_parallel(optimizer: str, parallel: str, world: int) -> None:
    """Muon orthogonalises whole matrices, and FSDP gives each of several ranks a shard of them."""
    if optimizer == "muon" and parallel == "fsdp" and world > 1:
        raise GptforgeError("train.optimizer muon needs whole weight matrices on every rank; use --train.parallel "
                            "ddp, or adamw with fsdp")


def _flag(default: Any, help: str, **meta: Any) -> Any:
    """A field that its verb offers as --NAME: cli.add_field_flags builds the flag from the field's type, this help
    and the default (added to the help as "(default X)" unless the help speaks of its default itself)."""
    return field(default=default, metadata={"help": help, **meta})


@dataclass(frozen=True)
class PrepareConfig:
    """`gptforge prepare`'s settings: data.prepare's keyword arguments take their defaults from these fields."""

    vocab_size: int = _flag(4096, "train a new byte-level BPE of this many tokens")
    val_fraction: float = _flag(0.05, "share of documents held out for validation")
    seed: int = _flag(1337, "seed of the document split")
    text_field: str = _flag("text", "JSONL field that holds the text")
    shard_tokens: int = _flag(100_000_000, "most tokens per shard file")


@dataclass
class TrainConfig:
    """One training run: precision, batch, schedule, optimizer, budgets, evaluation, checkpoints."""

    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    precision: Precision = "auto"  # the names are explained above Precision
    # CPU bf16 autocast's matmuls: native (oneDNN's bf16 GEMM) or widened (fp32 GEMMs on the bf16-rounded operands:
    # the same numbers up to summation order, faster on CPUs without AMX; precision.py); auto times both once at the
    # start, and the run's saved config records the choice, so a rerun takes the same numerics.
    bf16_gemm: Literal["auto", "native", "widened"] = "auto"
    compile: bool = False  # torch.compile the model and loss
    activation_checkpointing: bool = False  # recompute each block's activations in backward
    threads: int | None = None  # CPU threads for torch; None: torch's default (all cores)
    parallel: Parallel = "auto"
    fsdp_strategy: FsdpStrategy = "full_shard"
    dist_timeout: float = 300.0  # seconds a collective waits for the other ranks before the job fails
    micro_batch: int = 16  # sequences per forward/backward (per rank)
    seq_len: int | None = None  # tokens per sequence; None: model.block_size
    batch_tokens: int | None = None  # tokens per optimizer step, all ranks together; None: micro_batch * seq_len
    max_steps: int = 2000
    max_time: float | None = None  # seconds of training; when reached: evaluate, save and stop
    max_tokens: int | None = None  # tokens to train on; when reached: evaluate, save and stop
    schedule: Literal["cosine", "linear", "constant", "wsd"] = "cosine"  # after a linear warmup
    lr: float = 6e-4
    min_lr: float | None = None  # where cosine / linear / wsd end; None: lr / 10
    warmup_steps: int = 100
    decay_fraction: float = 0.2  # wsd: share of max_steps spent decaying at the end
    weight_decay: float = 0.1  # applied to matrices only, never to norms or biases
    beta1: float = 0.9
    beta2: float = 0.95
    # muon: torch.optim.Muon for the blocks' 2-D weight matrices, AdamW (lr, betas, weight_decay above) for
    # embeddings, the head and vectors. The schedule scales muon_lr by the same factor as lr.
    optimizer: Optimizer = "adamw"
    muon_lr: float = 0.02
    muon_momentum: float = 0.95  # Nesterov momentum of the Muon matrices
    muon_weight_decay: float = 0.0  # decoupled, as lr * muon_weight_decay per step
    grad_clip: float = 1.0  # max global gradient norm; 0 disables
    max_bad_steps: int = 5  # consecutive steps with a non-finite loss or gradient before the run stops
    eval_every: int = 250  # steps between evaluations (also at the first and last step)
    eval_batches: int = 20  # micro-batches of the validation split per evaluation
    early_stop_patience: int | None = None  # evaluations without a better val loss before stopping
    log_every: int = 10  # steps between metrics records
    save_every: int = 1000  # steps between checkpoints (and always at the end)
    keep_last: int = 3  # step checkpoints kept, plus the best by val loss; older ones are deleted
    save_best: bool = True  # save a checkpoint whenever val loss improves, and keep it
    tensorboard: bool = True  # event files under OUT/tb (needs the tensorboard package)

    def __post_init__(self) -> None:
        positive = ("micro_batch", "max_steps", "eval_batches", "log_every", "eval_every", "save_every", "keep_last",
                    "max_bad_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise GptforgeError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise GptforgeError(f"train.lr must be > 0, got {self.lr}")
        if self.muon_lr <= 0 or not 0.0 <= self.muon_momentum < 1.0 or self.muon_weight_decay < 0:
            raise GptforgeError(f"train.muon_lr must be > 0 (got {self.muon_lr}), train.muon_momentum in [0, 1) "
                                f"(got {self.muon_momentum}) and train.muon_weight_decay >= 0 (got {self.muon_weight_decay})")
        if self.warmup_steps < 0:
            raise GptforgeError(f"train.warmup_steps must be >= 0, got {self.warmup_steps}")
        for name in ("seq_len", "batch_tokens", "max_tokens", "early_stop_patience"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise GptforgeError(f"train.{name} must be >= 1 or null, got {getattr(self, name)}")
        if self.max_time is not None and self.max_time <= 0:
            raise GptforgeError(f"train.max_time must be > 0 seconds or null, got {self.max_time}")
        if not 0.0 < self.decay_fraction <= 1.0:
            raise GptforgeError(f"train.decay_fraction must be in (0, 1], got {self.decay_fraction}")

    @property
    def final_lr(self) -> float:
        return self.lr / 10 if self.min_lr is None else self.min_lr

    def micro_batches_per_step(self, seq_len: int, world: int = 1) -> int:
        """Micro-batches in one optimizer step, all ranks together: batch_tokens / (micro_batch x seq_len),
        split evenly over the `world` ranks; without batch_tokens, one per rank."""
        per_micro = self.micro_batch * seq_len
        if self.batch_tokens is None:
            return world
        if self.batch_tokens % per_micro:
            raise GptforgeError(
                f"train.batch_tokens ({self.batch_tokens}) must be a multiple of micro_batch x seq_len "
                f"({self.micro_batch} x {seq_len} = {per_micro}); e.g. --train.batch_tokens {per_micro * max(1, round(self.batch_tokens / per_micro))}"
            )
        total = self.batch_tokens // per_micro
        if total % world:
            valid = [w for w in range(1, total + 1) if total % w == 0]
            raise GptforgeError(
                f"a step of {total} micro-batches (batch_tokens {self.batch_tokens} / micro_batch {self.micro_batch} / "
                f"seq_len {seq_len}) cannot be split over {world} ranks; use a world size in {valid}, or change "
                f"batch_tokens to a multiple of {per_micro * world}")
        return total


@dataclass
class PlanConfig:
    """What `gptforge plan` estimates: the model, the batch, numerics, parallelism, the device and the budget.

    The settings a training run also has take TrainConfig's names, types and defaults (plan.plan_config_from_run
    fills them from a run); precision and parallel `auto` resolve as train resolves them, for the planned
    hardware and world size.
    """

    model: ModelConfig
    seq_len: int | None = _flag(None, "tokens per sequence (default: the run's train.seq_len, else the model's "
                                      "block_size)")
    micro_batch: int = _flag(TrainConfig.micro_batch, "sequences per device per forward/backward (default: the "
                                                       f"run's train.micro_batch, {TrainConfig.micro_batch} unless set)")
    global_batch: int | None = _flag(None, "sequences per optimizer step over all devices (default: the run's "
                                           "train.batch_tokens / seq-len, else micro-batch x world size)")
    precision: Precision = _flag(TrainConfig.precision, "train.precision: fp32, bf16 or fp16 (autocast over fp32 "
                                 "weights), bf16-pure, or auto (bf16 on a GPU, fp32 on --hardware cpu) (default: the run's)")
    optimizer: Optimizer = _flag(TrainConfig.optimizer, "train.optimizer: adamw, or muon (Muon for the blocks' "
                                 "matrices, AdamW for the rest) (default: the run's)")
    checkpointing: bool = _flag(TrainConfig.activation_checkpointing,
                                "recompute each block's activations in backward (train.activation_checkpointing)")
    attention: Literal["sdpa", "eager"] = _flag("sdpa", "sdpa (flash / memory-efficient: what gptforge runs) or "
                                                "eager, to plan other code")
    parallel: Parallel = _flag(TrainConfig.parallel, "train.parallel: auto (ddp when --world-size > 1), none, ddp "
                               "or fsdp (default: the run's)")
    fsdp_strategy: FsdpStrategy = _flag(TrainConfig.fsdp_strategy, "train.fsdp_strategy, with fsdp: full_shard "
                                        "(ZeRO-3-like) or shard_grad_op (ZeRO-2-like) (default: the run's)")
    world_size: int = _flag(1, "devices in all, as torchrun's --nproc x nodes")
    nodes: int = _flag(1, "machines the devices are spread over")
    hardware: str = _flag("h100-sxm", "a100-40gb, a100-80gb, h100-sxm, h100-pcie, h200, l4, a10g, rtx-4090, "
                          "rtx-3090, cpu (this machine, measured), or custom:memory=GIB,bf16=TFLOPS,bandwidth=GBS,"
                          "cost=USD (default {default}; with --measure, the device measured on)")
    tokens: int | None = None  # training budget; None: Chinchilla, 20 tokens per parameter
    # prior: PaLM reached 46% MFU (Chowdhery et al. 2022, table 3), Megatron 54% with selective recompute on 1T
    # models (Korthikanti et al. 2022, table 5); smaller models on one GPU reach less, so 40%.
    mfu: float = _flag(0.40, "model FLOPs utilisation to assume")

    def __post_init__(self) -> None:
        check_choices(self)
        if self.seq_len is None:
            self.seq_len = self.model.block_size
        for name in ("seq_len", "micro_batch", "world_size", "nodes"):
            if getattr(self, name) < 1:
                raise GptforgeError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.seq_len > self.model.block_size:
            raise GptforgeError(f"seq-len ({self.seq_len}) exceeds the model's block_size ({self.model.block_size}); "
                                f"give --seq-len {self.model.block_size} or less")
        self._resolve_like_train()
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

    def _resolve_like_train(self) -> None:
        """precision and parallel `auto` as precision.resolve_precision and train resolve them; the combinations
        train refuses are refused here with its words."""
        if self.precision == "auto":  # bf16 autocast on a GPU, fp32 on a CPU
            self.precision = "fp32" if self.hardware == "cpu" else "bf16"
        if self.precision == "fp16" and self.hardware == "cpu":
            raise GptforgeError("precision fp16 needs a CUDA device (gptforge's GradScaler path); use bf16 or fp32")
        if self.parallel == "auto":
            self.parallel = "ddp" if self.world_size > 1 else "none"
        if self.parallel == "none" and self.world_size > 1:
            raise GptforgeError(f"parallel none runs one process but world size is {self.world_size}; use ddp or fsdp")
        check_optimizer_parallel(self.optimizer, self.parallel, self.world_size)

    @property
    def accum_steps(self) -> int:
        return self.global_batch // (self.micro_batch * self.world_size)


@dataclass(frozen=True)
class BenchConfig:
    """`gptforge bench`'s settings: bench.bench's keyword arguments take their defaults from these fields."""

    device: str = _flag("cpu", "cpu, cuda or cuda:N")
    precision: str = _flag(TrainConfig.precision, "train.precision: auto (bf16 on CUDA, fp32 on a CPU), fp32, bf16 "
                                                  "or fp16 (autocast), bf16-pure")
    micro_batch: int = _flag(4, "sequences per training step")
    seq_len: int | None = _flag(None, "tokens per sequence (default: the model's block_size)")
    steps: int = _flag(3, "timed training steps, after one warm-up")
    decode_tokens: int = _flag(32, "tokens to decode for the decode figure")
    hardware: str | None = _flag(None, "the planner's hardware to compare with (default: recognised from the device)")
    mfu: float = _flag(PlanConfig.mfu, "the MFU prior the plan's tokens/s uses")

@dataclass(frozen=True)
class EvalConfig:
    """`gptforge eval`'s settings: eval.evaluate_tasks' (benchmark tasks) and compress.evaluate.eval_checkpoints'
    (the validation table) keyword defaults are these fields."""

    limit: int | None = _flag(None, "score only each task's first N examples")
    shots: int = _flag(0, "few-shot examples before each question")
    seed: int = _flag(1234, "draws the few-shot examples and the built task")
    batches: int = _flag(8, "validation batches")
    batch_size: int = _flag(8, "sequences per batch")
    seq_len: int | None = _flag(None, "tokens per sequence (default: the smallest block_size)")
    decode_tokens: int = _flag(64, "tokens to decode for the speed column; 0 skips it")

    def __post_init__(self) -> None:
        for name in ("batches", "batch_size"):  # 0 batches would divide by zero
            if getattr(self, name) < 1:
                raise GptforgeError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class DemoConfig:
    """`gptforge demo`'s settings: demo.run_demo's defaults are these fields."""

    out: str = _flag("runs/demo", "directory for the data and the run")
    minutes: float = _flag(6.0, "training time budget in minutes")


# --- the sections a checkpoint's config records about how its weights were made ------------------------------
# gptforge.loader reads them to build the model the weights fit: quantized modules, a pruned shape, LoRA adapters,
# a class head. Fields left None are not written, so config.yaml holds what the command did and nothing else.

def _section_dict(obj: Any) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if value is None:
            continue
        if dataclasses.is_dataclass(value):
            value = _section_dict(value)
        elif isinstance(value, tuple):
            value = list(value)  # YAML's safe dumper writes lists, not tuples
        out[f.name] = value
    return out


INT4_GROUP_SIZES = (32, 64, 128)  # input columns sharing one int4 scale and minimum
INT4_GROUP_SIZE = 32  # the default: the finest, so the least error


@dataclass
class QuantizationConfig:
    """What `gptforge quantize` did (compress/quantize.py)."""

    method: Literal["int8", "int4", "bf16", "fp16"]
    group_size: int | None = None  # int4: input columns per scale and minimum
    packing: str | None = None  # int4: the layout of the codes, checked on load (a layout change is refused)

    def to_dict(self) -> dict[str, Any]:
        return _section_dict(self)


@dataclass
class PruningConfig:
    """What `gptforge prune` did (compress/prune.py); the counts "before->after" are a record, not a recipe:
    a structured model's smaller shape is in the `model` section."""

    method: Literal["magnitude", "wanda", "structured"]
    sparsity: float  # the share of block Linear weights asked to be removed
    measured_sparsity: float | None = None
    pattern: str | None = None  # N:M, e.g. "2:4"
    heads: str | None = None  # structured: attention heads per layer, "before->after"
    mlp_channels: str | None = None  # structured: MLP width, "before->after"
    params: str | None = None  # structured: parameters, "before->after"
    recover_steps: int | None = None  # steps of recovery training after pruning

    def to_dict(self) -> dict[str, Any]:
        return _section_dict(self)


@dataclass
class CompressionConfig:
    """The `compression` section: pruning, quantization, or both (pruned first)."""

    quantization: QuantizationConfig | None = None
    pruning: PruningConfig | None = None

    @property
    def quantized(self) -> bool:
        """Weights stored as integer codes (int8, int4), not floats."""
        return self.quantization is not None and self.quantization.method in ("int8", "int4")

    def to_dict(self) -> dict[str, Any]:
        return _section_dict(self)


# Linear modules of a GPT by their attribute name; LoRA's target list picks among these.
LORA_TARGETS = ("qkv", "proj", "gate", "up", "down", "lm_head")


@dataclass
class LoRAConfig:
    """LoRA's rank, scale, dropout and target modules (finetune/lora.py applies it)."""

    rank: int = _flag(8, "LoRA rank r")
    # the update is scaled by alpha / rank, so changing the rank keeps its size
    alpha: float = _flag(16.0, "LoRA alpha; the update is scaled by alpha/r")
    dropout: float = _flag(0.0, "dropout on the LoRA input")
    # Every Linear of the blocks: adapting all of them matches full fine-tuning more closely than
    # attention alone (Dettmers et al. 2023, QLoRA, section 4).
    targets: tuple[str, ...] = _flag(("qkv", "proj", "gate", "up", "down"), "comma-separated Linear names to "
                                     f"adapt: {', '.join(LORA_TARGETS)} (default {{default}}: all of the blocks')")

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            self.targets = tuple(t.strip() for t in self.targets.split(",") if t.strip())
        self.targets = tuple(self.targets)
        if self.rank < 1:
            raise GptforgeError(f"LoRA rank must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise GptforgeError(f"LoRA alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise GptforgeError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        if unknown or not self.targets:
            raise GptforgeError(f"unknown LoRA target(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(LORA_TARGETS)}")

    def to_dict(self) -> dict[str, Any]:
        return _section_dict(self)


FINETUNE_METHODS = ("full", "lora")
FINETUNE_TASKS = ("lm", "chat", "classify")


@dataclass
class FinetuneConfig:
    """The `finetune` section: how `gptforge finetune` made the checkpoint (finetune/run.py).

    method lora: model.safetensors holds only the adapters (and a class head), `base` names the base checkpoint.
    task classify: the output head is a (len(labels), d_model) matrix, read at a text's last token."""

    method: Literal["full", "lora"] = "full"
    task: Literal["lm", "chat", "classify"] = "lm"
    labels: list[str] | None = None  # classify: the class names, in the head's row order
    lora: LoRAConfig | None = None  # method lora
    base: str | None = None  # method lora: the base checkpoint the adapters were trained on

    def __post_init__(self) -> None:
        if self.method == "lora" and (self.lora is None or self.base is None):
            raise GptforgeError("finetune: method lora needs its lora settings and its base checkpoint")
        if self.task == "classify" and not self.labels:
            raise GptforgeError("finetune: task classify needs its labels")

    @property
    def classifier(self) -> bool:
        return self.task == "classify"

    def to_dict(self) -> dict[str, Any]:
        return _section_dict(self)


@dataclass
class FinetuneSpec:
    """What `gptforge finetune` is asked to do (finetune/run.py): the method, the task, LoRA's settings and the
    validation split. The checkpoint records what was done in its FinetuneConfig section."""

    method: str = _flag("full", "full (every weight trains) or lora (low-rank adapters only)")
    task: str = _flag("lm", "lm, chat or classify")
    lora: LoRAConfig = field(default_factory=LoRAConfig)  # the --lora-* flags
    val_fraction: float = _flag(0.1, "share of --data held out when no --val-data")

    def __post_init__(self) -> None:
        for name, choices in (("method", FINETUNE_METHODS), ("task", FINETUNE_TASKS)):
            if getattr(self, name) not in choices:
                raise GptforgeError(f"unknown --{name} {getattr(self, name)!r}; use one of {', '.join(choices)}")


@dataclass
class DistillConfig:
    """The distillation objective's settings (compress/distill.py): `gptforge distill` flags, one field each."""

    # softens both distributions so the teacher's ranking of wrong tokens shows
    temperature: float = _flag(2.0, "softmax temperature of both distributions")
    kl_weight: float = _flag(0.5, "weight of the T^2-scaled KL term")  # T^2 * KL(teacher || student)
    ce_weight: float = _flag(0.5, "weight of cross-entropy on the data")  # on the data's next tokens

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise GptforgeError(f"distillation temperature must be > 0, got {self.temperature}")
        if self.kl_weight < 0 or self.ce_weight < 0 or self.kl_weight + self.ce_weight == 0:
            raise GptforgeError(f"distillation weights must be >= 0 and not both 0, got kl {self.kl_weight}, ce {self.ce_weight}")

@dataclass
class RunConfig:
    """Everything a `gptforge train` run reads: the model, the loop, and where data and outputs live."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: str | None = None  # directory written by `gptforge prepare`
    out: str | None = None  # run directory: checkpoints and logs
    compression: CompressionConfig | None = None  # what gptforge quantize/prune did; None: a plain model
    finetune: FinetuneConfig | None = None  # how gptforge finetune made it; None: not fine-tuned

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for name in ("compression", "finetune"):
            section = getattr(self, name)
            out[name] = None if section is None else section.to_dict()
        return out

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


# --- building configs from mappings, files and command-line overrides -------------------------------------

SECTIONS: dict[str, type] = {"model": ModelConfig, "train": TrainConfig}


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting command-line strings; name `key` on failure."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except GptforgeError as e:
                errors.append(str(e))
        raise GptforgeError(errors[0] if errors else f"{key}: cannot be null")
    if dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else section_from_dict(tp, value, key)
    if origin in (list, tuple):
        item = typing.get_args(tp)[0]
        if not isinstance(value, (list, tuple)):
            raise GptforgeError(f"{key}: expected a list, got {value!r}")
        return origin(_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise GptforgeError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise GptforgeError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise GptforgeError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise GptforgeError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise GptforgeError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise GptforgeError(f"{key}: expected a string, got {value!r}")
    raise TypeError(f"unsupported config annotation {tp!r} for {key}")  # a bug in this file, not user input


def check_choices(obj: Any, where: str = "") -> None:
    """Raise, naming the field and its allowed values, if a Literal-typed field of dataclass `obj` holds another
    value (what `--section.field` overrides are checked with, for dataclasses built directly)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        if typing.get_origin(hints[f.name]) is Literal:
            _coerce(getattr(obj, f.name), hints[f.name], f"{where}{f.name}")


def _unknown_key(key: str, valid: list[str], where: str) -> GptforgeError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return GptforgeError(f"unknown key {where}{key!r}{hint}; valid keys: {', '.join(valid)}")


def update_dataclass(obj: Any, values: dict[str, Any], where: str) -> Any:
    """A copy of dataclass `obj` with `values` applied, each checked against the field's type."""
    hints = typing.get_type_hints(type(obj))
    valid = [f.name for f in dataclasses.fields(obj)]
    changes = {}
    for key, value in values.items():
        if key not in valid:
            raise _unknown_key(key, valid, where)
        changes[key] = _coerce(value, hints[key], f"{where}{key}")
    return dataclasses.replace(obj, **changes)


def section_from_dict(cls: type, raw: Any, where: str) -> Any:
    """Dataclass `cls` from a mapping, each value checked against its field's type; a missing required field, an
    unknown key or a wrong type is an error naming `where`.key."""
    if not isinstance(raw, dict):
        raise GptforgeError(f"{where}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    valid = [f.name for f in fields]
    values = {}
    for key, value in raw.items():
        if key not in valid:
            raise _unknown_key(key, valid, f"{where}.")
        values[key] = _coerce(value, hints[key], f"{where}.{key}")
    missing = [f.name for f in fields if f.name not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise GptforgeError(f"{where}: {', '.join(missing)} missing")
    return cls(**values)


def run_config_from_dict(raw: dict[str, Any], base: RunConfig | None = None, source: str = "config") -> RunConfig:
    """Apply a nested mapping ({"model": {...}, "train": {...}, "data": ..., "out": ...}) onto `base`.

    `model` may also be a preset name, or a mapping with a `preset` key whose fields are applied on top.
    """
    if not isinstance(raw, dict):
        raise GptforgeError(f"{source}: expected a mapping of sections (model, train, data, out), got {type(raw).__name__}")
    cfg = base or RunConfig()
    valid = [f.name for f in dataclasses.fields(RunConfig)]
    for key in raw:
        if key not in valid:
            raise _unknown_key(key, valid, f"{source}: ")
    model_raw = raw.get("model")
    if isinstance(model_raw, str):
        cfg = dataclasses.replace(cfg, model=model_preset(model_raw))
    elif isinstance(model_raw, dict):
        model_raw = dict(model_raw)
        if "preset" in model_raw:
            cfg = dataclasses.replace(cfg, model=model_preset(str(model_raw.pop("preset"))))
        cfg = dataclasses.replace(cfg, model=update_dataclass(cfg.model, model_raw, "model."))
    elif model_raw is not None:
        raise GptforgeError(f"{source}: 'model' must be a preset name or a mapping")
    train_raw = raw.get("train")
    if train_raw is not None:
        if not isinstance(train_raw, dict):
            raise GptforgeError(f"{source}: 'train' must be a mapping")
        cfg = dataclasses.replace(cfg, train=update_dataclass(cfg.train, train_raw, "train."))
    for key, cls, writer in (("compression", CompressionConfig, "gptforge quantize / prune"),
                             ("finetune", FinetuneConfig, "gptforge finetune")):
        if raw.get(key) is not None:
            try:
                cfg = dataclasses.replace(cfg, **{key: section_from_dict(cls, raw[key], key)})
            except GptforgeError as e:
                raise GptforgeError(f"{source}: {e} (the section {writer} writes)") from None
    for key in ("data", "out"):
        if key in raw:
            cfg = dataclasses.replace(cfg, **{key: _coerce(raw[key], str | None, key)})
    return cfg


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise GptforgeError(f"config file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise GptforgeError(f"{p}: not valid YAML: {e}") from None
    return raw or {}


def parse_overrides(args: list[str]) -> dict[str, dict[str, str]]:
    """`["--train.lr", "3e-4", "--model.n_layer=4"]` -> {"train": {"lr": "3e-4"}, "model": {"n_layer": "4"}}."""
    out: dict[str, dict[str, str]] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg:
            raise GptforgeError(f"unrecognized argument {arg!r}; overrides look like --train.lr 3e-4 or --model.n_layer=4")
        name, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise GptforgeError(f"override {arg} needs a value, e.g. {arg} VALUE")
            value = args[i + 1]
            i += 1
        section, _, key = name.partition(".")
        if section not in SECTIONS:
            raise _unknown_key(section, list(SECTIONS), "section ")
        out.setdefault(section, {})[key.replace("-", "_")] = value
        i += 1
    return out


def build_run_config(
    config_file: str | Path | None = None,
    preset: str | None = None,
    overrides: list[str] | None = None,
) -> RunConfig:
    """Preset, then the YAML file, then `--section.field value` overrides; later layers win.

    A `--model` preset given on the command line replaces the YAML's own preset name, but the YAML's
    explicit model fields still apply on top of it.
    """
    cfg = RunConfig() if preset is None else RunConfig(model=model_preset(preset))
    if config_file is not None:
        raw = load_yaml(config_file)
        if preset is not None and isinstance(raw, dict):
            model_raw = raw.get("model")
            if isinstance(model_raw, str):
                raw = {k: v for k, v in raw.items() if k != "model"}
            elif isinstance(model_raw, dict):
                raw = {**raw, "model": {k: v for k, v in model_raw.items() if k != "preset"}}
        cfg = run_config_from_dict(raw, cfg, source=str(config_file))
    for section, values in parse_overrides(overrides or []).items():
        cfg = dataclasses.replace(cfg, **{section: update_dataclass(getattr(cfg, section), values, f"{section}.")})
    return cfg


@dataclass(frozen=True)
class SamplingParams:
    """How `gptforge generate` and gptforge.generate pick each next token, and when they stop; names follow the
    OpenAI / Hugging Face ones. Each default is set here once: the library functions and the CLI's flags read
    it (the server keeps OpenAI's documented defaults, docs/serve.md). Torch-free, so that the CLI reads the
    defaults without importing torch; gptforge.sampling applies them."""

    max_new_tokens: int = _flag(200, "tokens to generate at most")
    temperature: float = _flag(0.8, "sampling temperature; 0 is greedy")
    top_k: int | None = _flag(None, "sample among the K most likely tokens (default: every token)")
    # Holtzman et al. 2019
    top_p: float = _flag(1.0, "nucleus sampling: keep the most likely tokens until their probability reaches P; "
                              "1 keeps all")
    # Nguyen et al. 2024
    min_p: float = _flag(0.0, "drop tokens less likely than MIN_P x the most likely one; 0 drops none")
    # CTRL's (Keskar et al. 2019): logits of tokens seen, prompt included
    repetition_penalty: float = _flag(1.0, "CTRL-style penalty > 1 on every token already in the prompt or output; "
                                           "1 is none")
    presence_penalty: float = _flag(0.0, "OpenAI-style: subtract this from the logit of every token generated so "
                                         "far, -2..2")
    frequency_penalty: float = _flag(0.0, "OpenAI-style: subtract this times each token's count so far, -2..2")
    seed: int | None = _flag(None, "seed for reproducible sampling")
    stop: tuple[str, ...] = ()  # strings that end a sequence (matched on decoded text, left out of it)
    stop_at_eos: bool = True  # the tokenizer's end-of-text id ends a sequence
    logprobs: bool = False  # log-probabilities of the chosen tokens...
    top_logprobs: int = 0  # ...and of this many most likely alternatives at each step
    truncate_prompt: bool = _flag(False, "keep the end of a prompt longer than the context instead of failing")

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> GptforgeError:
            return GptforgeError(f"{name} must be {rule}, got {getattr(self, name)!r}")

        if self.max_new_tokens < 0:
            raise bad("max_new_tokens", ">= 0")
        if self.temperature < 0:
            raise bad("temperature", ">= 0 (0 is greedy)")
        if self.top_k is not None and self.top_k < 1:
            raise bad("top_k", ">= 1 (or None for no limit)")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "in (0, 1] (1 keeps every token)")
        if not 0.0 <= self.min_p < 1.0:
            raise bad("min_p", "in [0, 1) (0 keeps every token)")
        if self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "> 0 (1 is no penalty)")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise bad("presence_penalty", "in [-2, 2], as in the OpenAI API")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise bad("frequency_penalty", "in [-2, 2], as in the OpenAI API")
        if isinstance(self.stop, str):  # a bare string would be taken as a tuple of its characters
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        if any(not s for s in self.stop):
            raise GptforgeError("stop strings must not be empty")
        if self.top_logprobs < 0:
            raise bad("top_logprobs", ">= 0")

    @property
    def penalized(self) -> bool:
        """Whether any penalty is on (then the counts of generated tokens are kept)."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0 or self.frequency_penalty != 0

    @property
    def policy(self) -> tuple:
        """The fields that shape the distribution a token is drawn from: rows equal here sample as one batch."""
        return (self.temperature, self.top_k, self.top_p, self.min_p, self.repetition_penalty,
                self.presence_penalty, self.frequency_penalty)


# --- the verbs' own settings: `gptforge VERB`'s flags are built from these fields (cli.add_field_flags), so each
# default lives here once, for the library and the command alike. Torch-free: `gptforge --help` reads them.

@dataclass(frozen=True)
class ServeConfig:
    """The server's settings (gptforge.serve): `gptforge serve` flags, one field each."""

    # loopback only unless asked: an open port on all interfaces is a decision
    host: str = _flag("127.0.0.1", "address to bind (default {default}: this machine only)")
    port: int = _flag(8000, "port to listen on; 0 takes any free one (the one bound is printed)")
    model_name: str | None = _flag(None, "the model id clients send (default: the checkpoint folder's name)")
    api_key: str | None = _flag(None, "require 'Authorization: Bearer KEY' on /v1 (default: $GPTFORGE_API_KEY, "
                                      "else none)")
    max_batch: int = _flag(16, "sequences decoded together (KV-cache rows)")
    max_queue: int = _flag(64, "sequences waiting for a batch slot before new requests get 429")
    max_prompt_tokens: int | None = _flag(None, "longest prompt accepted (default: the context minus one)")
    # Chunked prefill: a wave of new requests then delays each running stream's next token by one such prefill,
    # not by all of them. None: no limit (each wave is prefilled at once).
    max_prefill_tokens: int | None = _flag(64, "prompt tokens prefilled between two decode steps; longer prompts "
                                               "and waves of requests are prefilled in chunks over several steps, "
                                               "so running streams keep flowing")
    max_tokens: int | None = _flag(None, "most completion tokens per choice (default: the context)")
    max_n: int = 16  # most choices per request
    max_body_bytes: int = _flag(1_000_000, "largest request body in bytes")
    request_timeout: float = _flag(600.0, "seconds a request may take, queueing included, before it is cancelled")
    shutdown_timeout: float = _flag(30.0, "on SIGTERM, seconds in-flight requests get to finish before they are "
                                          "cancelled")

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> GptforgeError:  # named as the field and as its flag
            return GptforgeError(f"{name} (--{name.replace('_', '-')}) must be {rule}, got {getattr(self, name)}")

        for name, low in [("max_batch", 1), ("max_queue", 1), ("max_n", 1), ("max_body_bytes", 1)]:
            if getattr(self, name) < low:
                raise bad(name, f">= {low}")
        for name in ("max_prompt_tokens", "max_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise bad(name, ">= 1 (or unset: the model's context)")
        if self.max_prefill_tokens is not None and self.max_prefill_tokens < 1:
            raise bad("max_prefill_tokens", ">= 1 (or None: no limit)")
        if self.request_timeout <= 0:
            raise bad("request_timeout", "> 0 seconds")
        if self.shutdown_timeout < 0:
            raise bad("shutdown_timeout", ">= 0 seconds")
        if not 0 <= self.port <= 65535:
            raise bad("port", "in 0..65535 (0: any free port)")


# `gptforge curate` (and `prepare --curate`): every rule's threshold, once. The thresholds are the published ones:
# Gopher's quality and repetition rules (Rae et al. 2021, appendix A) and C4's line rules (Raffel et al. 2020, 2.2).

# Document rules, in the order they run: a removed document is counted under the first rule it fails.
RULES = ("length", "mean_word_length", "symbol_ratio", "alnum_ratio", "bullet_lines", "ellipsis_lines",
         "alpha_words", "stop_words", "dup_lines", "dup_paragraphs", "top_ngrams", "dup_ngrams",
         "c4", "language", "perplexity")
# Off by default: c4 rewrites lines (and drops code, verse and lists), language and perplexity need a library
# or a checkpoint, and alnum_ratio is not one of the published rules.
DEFAULT_RULES = tuple(r for r in RULES if r not in ("c4", "language", "perplexity", "alnum_ratio"))
DEDUP_STEPS = ("exact", "near", "boilerplate")


@dataclass(frozen=True)
class CurateConfig:
    """What `curate` does and with which thresholds. Build it from flags with `from_flags` (validated)."""

    rules: tuple[str, ...] = _flag(DEFAULT_RULES, "quality rules to run: a list replaces the default set; "
                                   "+name/-name adds to or removes from it (e.g. +c4,-dup_ngrams)", flag=False)
    dedup: tuple[str, ...] = _flag(DEDUP_STEPS, "dedup steps to run", flag=False)
    # dedup
    jaccard: float = _flag(0.8, "near-duplicate threshold: documents whose word 5-gram sets overlap at least this much "
                           "(Jaccard, estimated by MinHash) are one group, the first is kept")
    num_perm: int = _flag(128, "MinHash permutations (more is a finer Jaccard estimate, slower)")
    shingle_words: int = _flag(5, "words per shingle for near-duplicate detection")
    boilerplate_min_chars: int = _flag(60, "a line this long or longer seen in --boilerplate-min-docs documents is "
                                       "boilerplate: kept where first seen, removed from the others")
    boilerplate_min_docs: int = _flag(3, "documents a long line must appear in to count as boilerplate")
    # Gopher quality
    min_words: int = _flag(50, "length: fewest words in a document")
    max_words: int = _flag(100_000, "length: most words in a document")
    min_mean_word_length: float = _flag(3.0, "mean_word_length: lower bound (characters)")
    max_mean_word_length: float = _flag(10.0, "mean_word_length: upper bound (characters)")
    max_symbol_ratio: float = _flag(0.1, "symbol_ratio: most '#' and '...' per word")
    min_alnum_ratio: float = _flag(0.5, "alnum_ratio: least share of non-space characters that are letters or digits")
    max_bullet_lines: float = _flag(0.9, "bullet_lines: most share of lines starting with a bullet")
    max_ellipsis_lines: float = _flag(0.3, "ellipsis_lines: most share of lines ending with an ellipsis")
    min_alpha_words: float = _flag(0.8, "alpha_words: least share of words holding a letter")
    min_stop_words: int = _flag(2, "stop_words: fewest distinct English stop words (the, be, to, of, and, that, have, with)")
    # Gopher repetition
    max_dup_line_fraction: float = _flag(0.3, "dup_lines: most share of lines that are repeats")
    max_dup_line_chars: float = _flag(0.2, "dup_lines: most share of characters in repeated lines")
    max_dup_para_fraction: float = _flag(0.3, "dup_paragraphs: most share of paragraphs that are repeats")
    max_dup_para_chars: float = _flag(0.2, "dup_paragraphs: most share of characters in repeated paragraphs")
    max_top_ngram: tuple[float, ...] = _flag((0.20, 0.18, 0.16), "top_ngrams: most share of characters in the most "
                                             "frequent 2-, 3- and 4-gram (three numbers)")
    max_dup_ngram: tuple[float, ...] = _flag((0.15, 0.14, 0.13, 0.12, 0.11, 0.10), "dup_ngrams: most share of "
                                             "characters in repeated 5- to 10-grams (six numbers)")
    # C4
    c4_min_line_words: int = _flag(3, "c4: fewest words in a kept line")
    c4_min_sentences: int = _flag(3, "c4: fewest sentences in a kept document")
    # language and perplexity
    languages: tuple[str, ...] = _flag(("en",), "language: ISO 639-1 codes to keep")
    min_language_score: float = _flag(0.65, "language: least probability of the detected language")
    perplexity_model: str | None = _flag(None, "perplexity: a gptforge checkpoint to score documents with")
    max_perplexity: float = _flag(1000.0, "perplexity: most perplexity per token under --perplexity-model")
    # privacy
    pii: tuple[str, ...] = _flag(("email", "phone", "ip", "key"), "PII kinds to redact", flag=False)
    keep: tuple[str, ...] = _flag((), "strings never redacted (false positives)", flag=False)

    def __post_init__(self):
        unknown = [r for r in self.rules if r not in RULES]
        if unknown:
            raise GptforgeError(f"unknown rule {unknown[0]!r}; rules: {', '.join(RULES)}")
        bad = [d for d in self.dedup if d not in DEDUP_STEPS]
        if bad:
            raise GptforgeError(f"unknown dedup step {bad[0]!r}; steps: {', '.join(DEDUP_STEPS)} (or none)")
        if not 0.0 < self.jaccard <= 1.0:
            raise GptforgeError(f"--jaccard must be in (0, 1], got {self.jaccard}")
        if len(self.max_top_ngram) != 3 or len(self.max_dup_ngram) != 6:
            raise GptforgeError("--max-top-ngram takes 3 numbers (n=2,3,4) and --max-dup-ngram 6 (n=5..10)")
        if self.num_perm < 16 or self.num_perm % 8:
            raise GptforgeError(f"--num-perm must be a multiple of 8 and >= 16, got {self.num_perm}")
        if self.shingle_words < 1:
            raise GptforgeError(f"--shingle-words must be >= 1, got {self.shingle_words}")
        if "perplexity" in self.rules and not self.perplexity_model:
            raise GptforgeError("the perplexity rule needs a model: add --perplexity-model CKPT")


def parse_rules(spec: str | None, default: tuple[str, ...] = DEFAULT_RULES, what: str = "rule",
                known: tuple[str, ...] = RULES) -> tuple[str, ...]:
    """`a,b` is exactly those; `+a,-b` edits `default`; `none` is the empty set. Unknown names are an error."""
    if spec is None:
        return default
    items = [s.strip() for s in spec.split(",") if s.strip()]
    if items == ["none"]:
        return ()
    signed = [s[0] in "+-" for s in items]
    if any(signed) and not all(signed):
        raise GptforgeError(f"{spec!r}: give either {what}s by name (the whole set) or +name/-name edits, not both")
    for s in items:
        name = s.lstrip("+-")
        if name not in known:
            raise GptforgeError(f"unknown {what} {name!r}; {what}s: {', '.join(known)}")
    if not all(signed):
        return tuple(n for n in known if n in items)
    chosen = set(default) | {s[1:] for s in items if s[0] == "+"}
    chosen -= {s[1:] for s in items if s[0] == "-"}
    return tuple(n for n in known if n in chosen)


def threshold_fields() -> list:
    """The fields that become one CLI flag each (`--min-words`, ...)."""
    return [f for f in dataclasses.fields(CurateConfig) if f.metadata.get("flag", True)]
