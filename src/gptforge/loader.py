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

import json
import math
import mmap
from pathlib import Path

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

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


class _SkipInit(TorchFunctionMode):
    """torch.nn.init's initialisers do nothing while a model is built on the meta device: there is nothing to
    fill, and normal_ on a meta tensor goes through torch._refs, whose import pulls in torch._dynamo, sympy and
    triton (~130 MB of resident memory in every process that loads a model, measured on gpt2 int8)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))


def build_model(cfg: RunConfig) -> nn.Module:
    """The meta-device model whose state dict a full (not LoRA) checkpoint with config `cfg` holds."""
    with torch.device("meta"), _SkipInit():
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


# safetensors' dtype names (its format's header) -> torch
_FILE_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                "BOOL": torch.bool}


def _weights(ckpt: Path, device: torch.device) -> dict[str, torch.Tensor]:
    """The file's tensors on `device`. On CPU each is a private (copy-on-write) memory map of its own pages of
    the file, read when first touched, so the process holds each weight page once and only once it is used: a
    later cast (load_checkpoint's dtype) converts one tensor at a time and frees its fp32 pages with its map.
    (safetensors' safe_open maps the whole file for each open, and a tensor's first touch mapped its neighbours'
    pages too: gpt2 int8 held 163 MB of its 107 MB file that way; load_file kept every page read resident.)"""
    path = ckpt / MODEL_FILE
    try:
        tensors = _mapped(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise GptforgeError(f"{path}: cannot read weights ({e}): the file is truncated or not safetensors; "
                            "write the checkpoint again") from None
    if device.type != "cpu":
        for key in list(tensors):  # one tensor's pages on the host at a time
            tensors[key] = tensors[key].to(device)
    return tensors


def _mapped(path: Path) -> dict[str, torch.Tensor]:
    """Each tensor of a safetensors file (8-byte header length, a JSON header of dtype, shape and byte range per
    tensor, then the data) as a tensor over a map of exactly its byte range."""
    out = {}
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        size = path.stat().st_size
        if not 0 < n <= size - 8:
            raise ValueError(f"header length {n} does not fit a file of {size} bytes")
        header = json.loads(f.read(n))
        for key, info in header.items():
            if key == "__metadata__":
                continue
            if info["dtype"] not in _FILE_DTYPES:
                raise GptforgeError(f"{path}: tensor {key} is {info['dtype']}, which gptforge does not load; save "
                                    f"the weights as one of {', '.join(_FILE_DTYPES)}")
            dtype, shape, (begin, end) = _FILE_DTYPES[info["dtype"]], info["shape"], info["data_offsets"]
            count = end - begin
            if begin < 0 or 8 + n + end > size or count != dtype.itemsize * math.prod(shape):
                raise ValueError(f"tensor {key} is truncated or its size does not match its shape")
            if count == 0:
                out[key] = torch.empty(shape, dtype=dtype)
                continue
            start = 8 + n + begin
            lead = start % mmap.ALLOCATIONGRANULARITY  # a map starts on a page boundary
            buf = mmap.mmap(f.fileno(), count + lead, access=mmap.ACCESS_COPY, offset=start - lead)
            out[key] = torch.frombuffer(buf, dtype=dtype, count=count // dtype.itemsize, offset=lead).view(shape)
    return out


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
