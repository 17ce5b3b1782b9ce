"""Building a ready model from a checkpoint folder: the one loading path of every verb (generate, serve, eval,
quantize, prune, distill's teacher, export-hf, finetune's base, demo, classify).

checkpoint.py owns the folder's format; this module turns one into a model, in four steps:
  1. read the typed config (`checkpoint.read_config`) and the tokenizer;
  2. build the GPT of the `model` section on the meta device (no memory, no init); a structured-pruned model's
     smaller shape is already that section's;
  3. apply the transforms the other sections name: quantized module swaps (`compression.quantization`), a class
     head (`finetune.task: classify`);
  4. `load_state_dict(assign=True)`: the file's tensors, read straight onto the device, become the model's;
     then the dtype, if one is asked for.
A LoRA checkpoint holds only its adapters (and a class head): its base is loaded first through this same path,
the adapters are swapped in and loaded on top, then merged into plain Linears.

(Named `loader`, not `load`: importing a submodule `gptforge.load` would replace the package's `gptforge.load()`.)
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open

from gptforge.checkpoint import MODEL_FILE, TOKENIZER_FILE, load_sharded, read_config, resolve_checkpoint
from gptforge.compress.quantize import apply_compression
from gptforge.config import FinetuneConfig, RunConfig
from gptforge.errors import GptforgeError
from gptforge.finetune.head import attach_class_head
from gptforge.finetune.lora import apply_lora, is_lora_key, merge_lora
from gptforge.hardware import resolve_device
from gptforge.model import GPT
from gptforge.tokenizer import Tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def apply_finetune(model: nn.Module, section: FinetuneConfig) -> nn.Module:
    """The transforms a `finetune` section names, in place: LoRA adapters (method lora), then a class head (task
    classify; after the LoRA swap, so that the new head is trained, not adapted)."""
    if section.method == "lora":
        apply_lora(model, section.lora)
    if section.classifier:
        attach_class_head(model, len(section.labels))
    return model


def build_model(cfg: RunConfig) -> nn.Module:
    """The meta-device model whose state dict a full (not LoRA) checkpoint with config `cfg` holds."""
    with torch.device("meta"):
        model = GPT(cfg.model)
    apply_compression(model, cfg.compression)
    if cfg.finetune is not None and cfg.finetune.classifier:
        attach_class_head(model, len(cfg.finetune.labels))
    return model


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype | None:
    """None keeps the stored dtypes; auto is bf16 on CUDA (decoding is bound by the bytes read per token) and fp32
    elsewhere (on CPUs without AMX, bf16 matmuls are slower; docs/BENCHMARKS.md)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    if dtype not in DTYPES:
        raise GptforgeError(f"unknown dtype {dtype!r}; use auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _weights(ckpt: Path, device: torch.device) -> dict[str, torch.Tensor]:
    """The file's tensors on `device`. On CPU each is a private (copy-on-write) memory map of its own bytes in the
    file, read when first touched: a later cast (load_checkpoint's dtype) converts one tensor at a time and frees
    its fp32 pages, so an fp32 file loaded as bf16 peaks at the bf16 model plus one fp32 tensor. (safetensors'
    load_file maps the file once for every tensor, which kept each page read resident to the end: `gpt2` fp32
    loaded as bf16 peaked at 1,103 MB that way, 638 MB this way.)"""
    path = str(ckpt / MODEL_FILE)
    try:
        with safe_open(path, framework="pt", device=str(device)) as f:
            keys = list(f.keys())
        out = {}
        for key in keys:
            with safe_open(path, framework="pt", device=str(device)) as f:
                out[key] = f.get_tensor(key)
        return out
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise GptforgeError(f"{ckpt / MODEL_FILE}: cannot read weights ({e})") from None


def _assign(model: nn.Module, state: dict[str, torch.Tensor], ckpt: Path, strict: bool = True) -> None:
    try:
        model.load_state_dict(state, strict=strict, assign=strict)
    except RuntimeError as e:
        raise GptforgeError(f"{ckpt / MODEL_FILE} does not match its config.yaml: {e}") from None


def _base_path(ckpt: Path, section: FinetuneConfig) -> Path:
    base = Path(section.base)
    for cand in (base, ckpt / base):
        if cand.exists():
            return resolve_checkpoint(cand)
    raise GptforgeError(f"{ckpt} is a LoRA adapter whose base checkpoint {base} is not there; "
                        "put the base back (or fine-tune with --method full for a self-contained checkpoint)")


def _load_lora(ckpt: Path, cfg: RunConfig, device: torch.device) -> nn.Module:
    """The base model (loaded as any checkpoint), the adapters swapped in and loaded on top, then merged."""
    section = cfg.finetune
    state = _weights(ckpt, device)
    model, _, base_cfg = load_checkpoint(_base_path(ckpt, section), device=device)
    if base_cfg.model != cfg.model:
        raise GptforgeError(f"{ckpt}: its base checkpoint's model config differs from the adapter's; was the base replaced?")
    apply_finetune(model, section)
    _assign(model, state, ckpt, strict=False)  # copied into the adapters apply_lora made on the base's device
    expected = {k for k in model.state_dict() if is_lora_key(k) or k == "lm_head.weight" and section.classifier}
    if expected != set(state):
        raise GptforgeError(f"{ckpt / MODEL_FILE}: adapter keys do not match the LoRA config "
                            f"(missing {sorted(expected - set(state))[:3]}, extra {sorted(set(state) - expected)[:3]})")
    return merge_lora(model)


def _load_model(ckpt: Path, cfg: RunConfig, device: torch.device) -> nn.Module:
    if cfg.finetune is not None and cfg.finetune.method == "lora":
        return _load_lora(ckpt, cfg, device)
    if not (ckpt / MODEL_FILE).is_file():  # a sharded (dcp/) checkpoint, consolidated in memory
        model = GPT(cfg.model)
        load_sharded(ckpt, model)
        return model.to(device)
    model = build_model(cfg)
    _assign(model, _weights(ckpt, device), ckpt)
    return model


def _open(path: str | Path) -> tuple[Path, RunConfig, Tokenizer]:
    ckpt = resolve_checkpoint(path)
    cfg = read_config(ckpt)
    if not (ckpt / TOKENIZER_FILE).is_file():
        raise GptforgeError(f"checkpoint {ckpt} is incomplete: {TOKENIZER_FILE} is missing")
    tokenizer = Tokenizer.load(ckpt / TOKENIZER_FILE)
    if tokenizer.vocab_size > cfg.model.padded_vocab_size:
        raise GptforgeError(f"checkpoint {ckpt}: tokenizer has {tokenizer.vocab_size} tokens but the model only {cfg.model.padded_vocab_size} rows")
    return ckpt, cfg, tokenizer


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu",
                    dtype: str | torch.dtype | None = None) -> tuple[nn.Module, Tokenizer, RunConfig]:
    """Model (eval mode), tokenizer and run config of a language-model checkpoint (a folder or a run directory).

    Weights go straight to `device` (a torch.device, or a name: auto, cpu, cuda, cuda:N, mps); `dtype` (auto or
    a name of DTYPES) casts the model after loading, None keeps what the file holds. A classifier is refused:
    load it with `load_classifier`.
    """
    ckpt, cfg, tokenizer = _open(path)
    if cfg.finetune is not None and cfg.finetune.classifier:
        raise GptforgeError(f"{ckpt} is a classifier, not a language model; use gptforge classify {ckpt}")
    dev = resolve_device(device) if isinstance(device, str) else device
    cast = resolve_dtype(dtype, dev)
    model = _load_model(ckpt, cfg, dev)
    return (model if cast is None else model.to(cast)).eval(), tokenizer, cfg


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, Tokenizer, RunConfig]:
    """Model (eval mode), tokenizer and run config of a classifier checkpoint (`gptforge finetune --task classify`)."""
    ckpt, cfg, tokenizer = _open(path)
    if cfg.finetune is None or not cfg.finetune.classifier:
        raise GptforgeError(f"{ckpt} is not a classifier; train one with gptforge finetune --task classify")
    dev = resolve_device(device) if isinstance(device, str) else device
    return _load_model(ckpt, cfg, dev).eval(), tokenizer, cfg
