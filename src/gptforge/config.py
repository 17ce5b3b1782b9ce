"""Typed configs: the model's shape, the training run, exact-name presets, YAML files and dotted overrides.

A config is built in one direction only: preset -> YAML file -> `--section.field value` overrides, each layer
checked against the dataclass fields (an unknown key or a wrong type names the key and the valid choices).
Values that follow from others (head size, padded vocab, MLP width when left unset) are properties, so that
overriding `d_model` on a preset never leaves a stale derived value behind. Besides the run (ModelConfig,
TrainConfig) a run config holds the typed sections a checkpoint records about how its weights were made
(compression, finetune). Each verb's own settings are gptforge.settings'.
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
    # Variants of imported families (docs/interop.md); the defaults build the plain GPT above.
    qkv_bias: bool = False  # biases on the query/key/value projection even when `bias` is off (Qwen2)
    sliding_window: int | None = None  # each query sees only the latest this-many positions, itself included (Mistral)
    rope_factor: float | None = None  # Llama 3 RoPE frequency scaling (rope_type llama3); None: plain RoPE
    rope_low_freq_factor: float = 1.0  # llama3 scaling: wavelengths above original_context / this are divided by factor
    rope_high_freq_factor: float = 4.0  # llama3 scaling: wavelengths below original_context / this are kept
    rope_original_context: int = 8192  # llama3 scaling: the context the model was pretrained at

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
        if self.sliding_window is not None and self.sliding_window < 1:
            raise GptforgeError(f"model.sliding_window must be >= 1 or null, got {self.sliding_window}")
        if self.rope_factor is not None and not (self.rope_factor > 0 and self.rope_original_context >= 1
                                                 and 0 < self.rope_low_freq_factor < self.rope_high_freq_factor):
            raise GptforgeError("model.rope_factor needs rope_factor > 0, rope_original_context >= 1 and "
                                "0 < rope_low_freq_factor < rope_high_freq_factor")
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
        attn = d * qkv_out + int(self.bias or self.qkv_bias) * qkv_out + self.n_head * hd * d + b * d
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
        matmul cost; 12*L*d*T is attention's QK^T and AV products over a context of T = seq_len tokens (at most
        sliding_window of them when the window is shorter).
        """
        t = self.block_size if seq_len is None else seq_len
        t = t if self.sliding_window is None else min(t, self.sliding_window)
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


def flag_field(default: Any, help: str, **meta: Any) -> Any:
    """A dataclass field that its verb offers as --NAME (LoRAConfig here, the verbs' settings in gptforge.settings):
    cli.add_field_flags builds the flag from the field's type, this help and the default (added to the help as
    "(default X)" unless the help speaks of its default itself). `flag=False` in `meta`: help, but no flag of its
    own (the verb parses it itself)."""
    return field(default=default, metadata={"help": help, **meta})


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


@dataclass
class QuantizationConfig:
    """What `gptforge quantize` did (compress/quantize.py)."""

    method: Literal["int8", "int4", "bf16", "fp16"]
    group_size: int | None = None  # int4: input columns per scale and minimum
    packing: str | None = None  # int4: the layout of the codes, checked on load (a layout change is refused)
    # int8/int4 on CPU: "dynamic" quantizes each row's activations to int8 and multiplies on the integer dot
    # products (the default, also when absent); "weight-only" keeps fp32 activations (compress/quantize.py)
    activations: Literal["dynamic", "weight-only"] | None = None

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

    rank: int = flag_field(8, "LoRA rank r")
    # the update is scaled by alpha / rank, so changing the rank keeps its size
    alpha: float = flag_field(16.0, "LoRA alpha; the update is scaled by alpha/r")
    dropout: float = flag_field(0.0, "dropout on the LoRA input")
    # Every Linear of the blocks: adapting all of them matches full fine-tuning more closely than
    # attention alone (Dettmers et al. 2023, QLoRA, section 4).
    targets: tuple[str, ...] = flag_field(("qkv", "proj", "gate", "up", "down"), "comma-separated Linear names to "
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
