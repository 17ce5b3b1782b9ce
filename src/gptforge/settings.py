"""Each verb's own settings: one typed dataclass (or constant) per `gptforge VERB`, its fields holding the defaults.

The CLI builds each verb's flags from these fields (cli.add_field_flags reads a field's type, its default and the
help in its metadata, written with config.flag_field), and the library functions behind the verbs take their
keyword defaults from the same fields, so every default and its help is written once. Torch-free, like config.py,
so that `gptforge --help` reads them without importing the library. The run config a checkpoint records (the model,
the training loop, the compression and finetune sections) is config.py's; this module holds what a command is asked
to do.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Literal

from gptforge.config import (TrainConfig, FsdpStrategy, LoRAConfig, ModelConfig, Optimizer, Parallel, Precision,
                             check_choices, check_optimizer_parallel, flag_field)
from gptforge.errors import GptforgeError


# --- prepare and curate ----------------------------------------------------------------------------------------

TEXT_FIELD = "text"  # the JSONL field that holds a document's text, for prepare and curate alike


@dataclass(frozen=True)
class PrepareConfig:
    """`gptforge prepare`'s settings: data.prepare's keyword arguments take their defaults from these fields."""

    vocab_size: int = flag_field(4096, "train a new byte-level BPE of this many tokens")
    val_fraction: float = flag_field(0.05, "share of documents held out for validation")
    seed: int = flag_field(1337, "seed of the document split")
    text_field: str = flag_field(TEXT_FIELD, "JSONL field, or parquet or arrow column, that holds the text")
    dataset_split: str = flag_field("train", "the split read from a datasets DatasetDict folder (save_to_disk)")
    shard_tokens: int = flag_field(100_000_000, "most tokens per shard file")
    include: tuple[str, ...] = flag_field((), "PATTERN (repeatable): a folder source contributes the files whose name "
                                          "matches one (fnmatch, e.g. '*.py'; with a '/', the path below the folder), any "
                                          "extension; default: text, JSONL and parquet files, plain or .gz/.zst",
                                          flag=False)


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
CURATE_SEED = 0  # curate's seed of mixing and of the removed-document samples


@dataclass(frozen=True)
class CurateConfig:
    """What `curate` does and with which thresholds. Build it from flags with `from_flags` (validated)."""

    rules: tuple[str, ...] = flag_field(DEFAULT_RULES, "quality rules to run: a list replaces the default set; "
                                        "+name/-name adds to or removes from it (e.g. +c4,-dup_ngrams)", flag=False)
    dedup: tuple[str, ...] = flag_field(DEDUP_STEPS, "dedup steps to run", flag=False)
    # dedup
    jaccard: float = flag_field(0.8, "near-duplicate threshold: documents whose word 5-gram sets overlap at least "
                                "this much (Jaccard, estimated by MinHash) are one group, the first is kept")
    num_perm: int = flag_field(128, "MinHash permutations (more is a finer Jaccard estimate, slower)")
    shingle_words: int = flag_field(5, "words per shingle for near-duplicate detection")
    boilerplate_min_chars: int = flag_field(60, "a line this long or longer seen in --boilerplate-min-docs "
                                            "documents is boilerplate: kept where first seen, removed from the others")
    boilerplate_min_docs: int = flag_field(3, "documents a long line must appear in to count as boilerplate")
    # Gopher quality
    min_words: int = flag_field(50, "length: fewest words in a document")
    max_words: int = flag_field(100_000, "length: most words in a document")
    min_mean_word_length: float = flag_field(3.0, "mean_word_length: lower bound (characters)")
    max_mean_word_length: float = flag_field(10.0, "mean_word_length: upper bound (characters)")
    max_symbol_ratio: float = flag_field(0.1, "symbol_ratio: most '#' and '...' per word")
    min_alnum_ratio: float = flag_field(0.5, "alnum_ratio: least share of non-space characters that are letters or "
                                             "digits")
    max_bullet_lines: float = flag_field(0.9, "bullet_lines: most share of lines starting with a bullet")
    max_ellipsis_lines: float = flag_field(0.3, "ellipsis_lines: most share of lines ending with an ellipsis")
    min_alpha_words: float = flag_field(0.8, "alpha_words: least share of words holding a letter")
    min_stop_words: int = flag_field(2, "stop_words: fewest distinct English stop words (the, be, to, of, and, "
                                        "that, have, with)")
    # Gopher repetition
    max_dup_line_fraction: float = flag_field(0.3, "dup_lines: most share of lines that are repeats")
    max_dup_line_chars: float = flag_field(0.2, "dup_lines: most share of characters in repeated lines")
    max_dup_para_fraction: float = flag_field(0.3, "dup_paragraphs: most share of paragraphs that are repeats")
    max_dup_para_chars: float = flag_field(0.2, "dup_paragraphs: most share of characters in repeated paragraphs")
    max_top_ngram: tuple[float, ...] = flag_field((0.20, 0.18, 0.16), "top_ngrams: most share of characters in "
                                                  "the most frequent 2-, 3- and 4-gram (three numbers)")
    max_dup_ngram: tuple[float, ...] = flag_field((0.15, 0.14, 0.13, 0.12, 0.11, 0.10), "dup_ngrams: most share of "
                                                  "characters in repeated 5- to 10-grams (six numbers)")
    # C4
    c4_min_line_words: int = flag_field(3, "c4: fewest words in a kept line")
    c4_min_sentences: int = flag_field(3, "c4: fewest sentences in a kept document")
    # language and perplexity
    languages: tuple[str, ...] = flag_field(("en",), "language: ISO 639-1 codes to keep")
    min_language_score: float = flag_field(0.65, "language: least probability of the detected language")
    perplexity_model: str | None = flag_field(None, "perplexity: a gptforge checkpoint to score documents with")
    max_perplexity: float = flag_field(1000.0, "perplexity: most perplexity per token under --perplexity-model")
    # privacy
    pii: tuple[str, ...] = flag_field(("email", "phone", "ip", "key"), "PII kinds to redact", flag=False)
    keep: tuple[str, ...] = flag_field((), "strings never redacted (false positives)", flag=False)

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


# --- generate and serve ----------------------------------------------------------------------------------------

# Where generate, serve and gptforge.load put a checkpoint's weights unless told: auto is CUDA, then MPS, then the
# CPU (hardware.resolve_device), in bfloat16 on CUDA and float32 elsewhere (loader.resolve_dtype).
LOAD_DEVICE = "auto"
LOAD_DTYPE = "auto"
# How generate and serve store the KV cache (kvcache.KVCache): auto is the weights' dtype; bf16 halves an fp32
# cache, int8 (one scale per token and head) quarters it; read back as the weights' dtype (docs/generate.md).
KVDtype = Literal["auto", "fp32", "bf16", "int8"]
KV_DTYPE = "auto"


@dataclass(frozen=True)
class SamplingParams:
    """How `gptforge generate` and gptforge.generate pick each next token, and when they stop; names follow the
    OpenAI / Hugging Face ones. Each default is set here once: the library functions and the CLI's flags read
    it (the server keeps OpenAI's documented defaults, docs/serve.md). Torch-free, so that the CLI reads the
    defaults without importing torch; gptforge.sampling applies them."""

    max_new_tokens: int = flag_field(200, "tokens to generate at most")
    temperature: float = flag_field(0.8, "sampling temperature; 0 is greedy")
    top_k: int | None = flag_field(None, "sample among the K most likely tokens (default: every token)")
    # Holtzman et al. 2019
    top_p: float = flag_field(1.0, "nucleus sampling: keep the most likely tokens until their probability reaches P; "
                                   "1 keeps all")
    # Nguyen et al. 2024
    min_p: float = flag_field(0.0, "drop tokens less likely than MIN_P x the most likely one; 0 drops none")
    # CTRL's (Keskar et al. 2019): logits of tokens seen, prompt included
    repetition_penalty: float = flag_field(1.0, "CTRL-style penalty > 1 on every token already in the prompt or "
                                                "output; 1 is none")
    presence_penalty: float = flag_field(0.0, "OpenAI-style: subtract this from the logit of every token generated so "
                                              "far, -2..2")
    frequency_penalty: float = flag_field(0.0, "OpenAI-style: subtract this times each token's count so far, -2..2")
    seed: int | None = flag_field(None, "seed for reproducible sampling")
    stop: tuple[str, ...] = ()  # strings that end a sequence (matched on decoded text, left out of it)
    stop_at_eos: bool = True  # the tokenizer's end-of-text id ends a sequence
    logprobs: bool = False  # log-probabilities of the chosen tokens...
    top_logprobs: int = 0  # ...and of this many most likely alternatives at each step
    truncate_prompt: bool = flag_field(False, "keep the end of a prompt longer than the context instead of failing")

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


@dataclass(frozen=True)
class ServeConfig:
    """The server's settings (gptforge.serve): `gptforge serve` flags, one field each."""

    # loopback only unless asked: an open port on all interfaces is a decision
    host: str = flag_field("127.0.0.1", "address to bind (default {default}: this machine only)")
    port: int = flag_field(8000, "port to listen on; 0 takes any free one (the one bound is printed)")
    model_name: str | None = flag_field(None, "the model id clients send (default: the checkpoint folder's name)")
    api_key: str | None = flag_field(None, "require 'Authorization: Bearer KEY' on /v1 (default: $GPTFORGE_API_KEY, "
                                           "else none)")
    max_batch: int = flag_field(16, "sequences decoded together (KV-cache rows)")
    max_queue: int = flag_field(64, "sequences waiting for a batch slot before new requests get 429")
    max_prompt_tokens: int | None = flag_field(None, "longest prompt accepted (default: the context minus one)")
    # Chunked prefill: a wave of new requests then delays each running stream's next token by one such prefill,
    # not by all of them. None: no limit (each wave is prefilled at once).
    max_prefill_tokens: int | None = flag_field(64, "prompt tokens prefilled between two decode steps; longer prompts "
                                                    "and waves of requests are prefilled in chunks over several steps, "
                                                    "so running streams keep flowing")
    # Automatic prefix caching (engine.py, prefix_cache.py): a prompt opening with blocks of 16 tokens seen
    # before reuses their keys and values; bytes per token: 2 x layers x kv heads x head size x the KV dtype's.
    prefix_cache_tokens: int = flag_field(8192, "tokens of prompt keys/values kept for reuse by later prompts "
                                                "sharing a prefix (least recently used dropped first); 0 turns "
                                                "the prefix cache off")
    kv_dtype: KVDtype = flag_field(KV_DTYPE, "how the KV cache stores keys and values: auto (the weights' dtype; "
                                             "bf16 for an int8/int4 model), fp32, bf16 or int8 (less memory, a "
                                             "little perplexity)")
    max_tokens: int | None = flag_field(None, "most completion tokens per choice (default: the context)")
    max_n: int = 16  # most choices per request
    max_body_bytes: int = flag_field(1_000_000, "largest request body in bytes")
    request_timeout: float = flag_field(600.0, "seconds a request may take, queueing included, before it is cancelled")
    shutdown_timeout: float = flag_field(30.0, "on SIGTERM, seconds in-flight requests get to finish before they are "
                                               "cancelled")
    # LoRA fine-tunes of the served checkpoint, each a model id of its own; requests for different ones share a batch
    adapter: tuple[str, ...] = flag_field((), "NAME=LORA_CKPT (repeatable): serve a LoRA fine-tune of CKPT as model "
                                              "NAME beside the base (default: none)", repeat=True, metavar="NAME=LORA_CKPT")
    # /v1/embeddings: how a text's final-norm hidden states become one vector (then L2-normalised)
    embedding_pooling: Literal["mean", "last"] = flag_field("mean", "pooling of /v1/embeddings: mean over the "
                                                                    "tokens or the last token's state")

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> GptforgeError:  # named as the field and as its flag
            return GptforgeError(f"{name} (--{name.replace('_', '-')}) must be {rule}, got {getattr(self, name)}")

        for name, low in [("max_batch", 1), ("max_queue", 1), ("max_n", 1), ("max_body_bytes", 1),
                          ("prefix_cache_tokens", 0)]:
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
        check_choices(self)
        object.__setattr__(self, "adapter", tuple(self.adapter))  # the CLI's --adapter list (frozen dataclass)
        names = [a.partition("=")[0] for a in self.adapter]
        for a, name in zip(self.adapter, names):
            if not name or not a.partition("=")[2] or not re.fullmatch(r"[\w.:/-]+", name):
                raise GptforgeError(f"--adapter {a!r}: write NAME=LORA_CKPT (a name of letters, digits, _.:/-)")
        if len(set(names)) < len(names):
            raise GptforgeError(f"--adapter: the name {next(n for n in names if names.count(n) > 1)!r} is given twice")

    @property
    def adapters(self) -> list[tuple[str, str]]:
        """The --adapter pairs: (model id, LoRA checkpoint path)."""
        return [(name, path) for name, _, path in (a.partition("=") for a in self.adapter)]


# --- quantize, prune, distill, finetune ------------------------------------------------------------------------

INT4_GROUP_SIZES = (32, 64, 128)  # input columns sharing one int4 scale and minimum
INT4_GROUP_SIZE = 32  # the default: the finest, so the least error


@dataclass(frozen=True)
class PruneConfig:
    """`gptforge prune`'s settings with a default: compress.run.prune_checkpoint's keyword defaults are these."""

    recover_steps: int = flag_field(0, "fine-tune the pruned model for N steps on --data through the training loop")


GgufType = Literal["f32", "f16", "bf16", "q8_0", "q4_0"]
GGUF_TYPES: tuple[str, ...] = GgufType.__args__  # the choices, for messages


@dataclass(frozen=True)
class ExportGgufConfig:
    """`gptforge export-gguf`'s settings: gguf_export.export_gguf's keyword default is this field."""

    # f16 is convert_hf_to_gguf.py's classic default: half the bytes of f32 at a negligible change in the logits
    type: GgufType = flag_field("f16", "tensor type of the matrices: f32, f16, bf16, q8_0 or q4_0 (llama.cpp's 8- "
                                       "and 4-bit blocks of 32)")

    def __post_init__(self) -> None:
        if self.type not in GGUF_TYPES:
            raise GptforgeError(f"unknown --type {self.type!r}; use one of {', '.join(GGUF_TYPES)}")


@dataclass
class DistillConfig:
    """The distillation objective's settings (compress/distill.py): `gptforge distill` flags, one field each."""

    # softens both distributions so the teacher's ranking of wrong tokens shows
    temperature: float = flag_field(2.0, "softmax temperature of both distributions")
    kl_weight: float = flag_field(0.5, "weight of the T^2-scaled KL term")  # T^2 * KL(teacher || student)
    ce_weight: float = flag_field(0.5, "weight of cross-entropy on the data")  # on the data's next tokens

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise GptforgeError(f"distillation temperature must be > 0, got {self.temperature}")
        if self.kl_weight < 0 or self.ce_weight < 0 or self.kl_weight + self.ce_weight == 0:
            raise GptforgeError(f"distillation weights must be >= 0 and not both 0, got kl {self.kl_weight}, ce {self.ce_weight}")


FINETUNE_METHODS = ("full", "lora")
FINETUNE_TASKS = ("lm", "chat", "classify")


@dataclass
class FinetuneSpec:
    """What `gptforge finetune` is asked to do (finetune/run.py): the method, the task, LoRA's settings and the
    validation split. The checkpoint records what was done in its FinetuneConfig section."""

    method: str = flag_field("full", "full (every weight trains) or lora (low-rank adapters only)")
    task: str = flag_field("lm", "lm, chat or classify")
    lora: LoRAConfig = field(default_factory=LoRAConfig)  # the --lora-* flags
    val_fraction: float = flag_field(0.1, "share of --data held out when no --val-data")

    def __post_init__(self) -> None:
        for name, choices in (("method", FINETUNE_METHODS), ("task", FINETUNE_TASKS)):
            if getattr(self, name) not in choices:
                raise GptforgeError(f"unknown --{name} {getattr(self, name)!r}; use one of {', '.join(choices)}")


# --- eval, plan, bench, demo ----------------------------------------------------------------------------------

@dataclass
class PlanConfig:
    """What `gptforge plan` estimates: the model, the batch, numerics, parallelism, the device and the budget.

    The settings a training run also has take TrainConfig's names, types and defaults (plan.plan_config_from_run
    fills them from a run); precision and parallel `auto` resolve as train resolves them, for the planned
    hardware and world size.
    """

    model: ModelConfig
    seq_len: int | None = flag_field(None, "tokens per sequence (default: the run's train.seq_len, else the model's "
                                           "block_size)")
    micro_batch: int = flag_field(TrainConfig.micro_batch, "sequences per device per forward/backward (default: "
                                  f"the run's train.micro_batch, {TrainConfig.micro_batch} unless set)")
    global_batch: int | None = flag_field(None, "sequences per optimizer step over all devices (default: the run's "
                                                "train.batch_tokens / seq-len, else micro-batch x world size)")
    precision: Precision = flag_field(TrainConfig.precision, "train.precision: fp32, bf16 or fp16 (autocast over "
                                      "fp32 weights), bf16-pure, or auto (bf16 on a GPU, fp32 on --hardware cpu) "
                                      "(default: the run's)")
    optimizer: Optimizer = flag_field(TrainConfig.optimizer, "train.optimizer: adamw, or muon (Muon for the blocks' "
                                      "matrices, AdamW for the rest) (default: the run's)")
    checkpointing: bool = flag_field(TrainConfig.activation_checkpointing,
                                     "recompute each block's activations in backward (train.activation_checkpointing)")
    attention: Literal["sdpa", "eager"] = flag_field("sdpa", "sdpa (flash / memory-efficient: what gptforge runs) or "
                                                     "eager, to plan other code")
    parallel: Parallel = flag_field(TrainConfig.parallel, "train.parallel: auto (ddp when --world-size > 1), none, ddp "
                                    "or fsdp (default: the run's)")
    fsdp_strategy: FsdpStrategy = flag_field(TrainConfig.fsdp_strategy, "train.fsdp_strategy, with fsdp: full_shard "
                                             "(ZeRO-3-like) or shard_grad_op (ZeRO-2-like) (default: the run's)")
    world_size: int = flag_field(1, "devices in all, as torchrun's --nproc x nodes")
    nodes: int = flag_field(1, "machines the devices are spread over")
    hardware: str = flag_field("h100-sxm", "a100-40gb, a100-80gb, h100-sxm, h100-pcie, h200, l4, a10g, rtx-4090, "
                               "rtx-3090, cpu (this machine, measured), or custom:memory=GIB,bf16=TFLOPS,bandwidth=GBS,"
                               "cost=USD (default {default}; with --measure, the device measured on)")
    tokens: int | None = None  # training budget; None: Chinchilla, 20 tokens per parameter
    # prior: PaLM reached 46% MFU (Chowdhery et al. 2022, table 3), Megatron 54% with selective recompute on 1T
    # models (Korthikanti et al. 2022, table 5); smaller models on one GPU reach less, so 40%.
    mfu: float = flag_field(0.40, "model FLOPs utilisation to assume")

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

    device: str = flag_field("cpu", "cpu, cuda or cuda:N")
    precision: str = flag_field(TrainConfig.precision, "train.precision: auto (bf16 on CUDA, fp32 on a CPU), fp32, "
                                "bf16 or fp16 (autocast), bf16-pure")
    micro_batch: int = flag_field(4, "sequences per training step")
    seq_len: int | None = flag_field(None, "tokens per sequence (default: the model's block_size)")
    steps: int = flag_field(3, "timed training steps, after one warm-up")
    decode_tokens: int = flag_field(32, "tokens to decode for the decode figure")
    hardware: str | None = flag_field(None, "the planner's hardware to compare with (default: recognised from the "
                                            "device)")
    mfu: float = flag_field(PlanConfig.mfu, "the MFU prior the plan's tokens/s uses")


@dataclass(frozen=True)
class EvalConfig:
    """`gptforge eval`'s settings: eval.evaluate_tasks' (benchmark tasks) and compress.evaluate.eval_checkpoints'
    (the validation table) keyword defaults are these fields."""

    limit: int | None = flag_field(None, "score only each task's first N examples")
    shots: int = flag_field(0, "few-shot examples before each question")
    seed: int = flag_field(1234, "draws the few-shot examples and the built task")
    batches: int = flag_field(8, "validation batches")
    batch_size: int = flag_field(8, "sequences per batch")
    seq_len: int | None = flag_field(None, "tokens per sequence (default: the smallest block_size)")
    decode_tokens: int = flag_field(64, "tokens to decode for the speed column; 0 skips it")

    def __post_init__(self) -> None:
        for name in ("batches", "batch_size"):  # 0 batches would divide by zero
            if getattr(self, name) < 1:
                raise GptforgeError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class DemoConfig:
    """`gptforge demo`'s settings: demo.run_demo's defaults are these fields."""

    out: str = flag_field("runs/demo", "directory for the data and the run")
    minutes: float = flag_field(6.0, "training time budget in minutes")
