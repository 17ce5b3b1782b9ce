"""`gptforge serve BASE --adapter NAME=LORA_CKPT ...`: LoRA fine-tunes of the served checkpoint, each served as a
model id of its own, all in one batch.

Each adapter checkpoint is checked against the base (a LoRA fine-tune of it: the same model config and
tokenizer, a language model, not a classifier), its lora_a / lora_b tensors are stacked into the base's Linears
(finetune.lora.apply_adapters: every request row takes its own adapter's low-rank update, or none), and only
then is the CPU decode layout applied, which runs each block's decode step, adapters' updates included, as one
native op (native/csrc/block.cpp).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file

from gptforge.checkpoint import MODEL_FILE, TOKENIZER_FILE, read_config, resolve_checkpoint
from gptforge.config import RunConfig
from gptforge.errors import GptforgeError
from gptforge.finetune.lora import AdapterSet, apply_adapters, is_lora_key
from gptforge.hardware import resolve_device
from gptforge.loader import load_checkpoint
from gptforge.native import decode_layout
from gptforge.tokenizer import Tokenizer


def _first_difference(a, b) -> str:
    for name in a.__dataclass_fields__:
        if getattr(a, name) != getattr(b, name):
            return f"{name} {getattr(b, name)} vs the base's {getattr(a, name)}"
    return "?"


def read_adapter(name: str, path: str | Path, base: RunConfig, tokenizer: Tokenizer, device: torch.device):
    """(name, LoRA settings, lora tensors) of one --adapter, after checking that it is a LoRA fine-tune of `base`;
    a one-line error naming the adapter otherwise."""
    ckpt = resolve_checkpoint(path)
    cfg = read_config(ckpt)
    where = f"--adapter {name}={path}"
    ft = cfg.finetune
    if ft is None or ft.method != "lora":
        raise GptforgeError(f"{where}: not a LoRA fine-tune (its config has no finetune.method lora); serve a full "
                            "checkpoint on its own")
    if ft.classifier:
        raise GptforgeError(f"{where}: a classifier, not a language model; use gptforge classify")
    if cfg.model != base.model:
        raise GptforgeError(f"{where}: its base's model config differs from the served checkpoint's "
                            f"({_first_difference(base.model, cfg.model)}); serve it with the base it was trained on")
    own = ckpt / TOKENIZER_FILE
    if own.is_file() and Tokenizer.load(own).fingerprint != tokenizer.fingerprint:
        raise GptforgeError(f"{where}: its tokenizer differs from the served checkpoint's; serve it with its own base")
    try:
        state = load_file(str(ckpt / MODEL_FILE), device=str(device))
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise GptforgeError(f"{ckpt / MODEL_FILE}: cannot read the adapter's weights ({e})") from None
    foreign = sorted(k for k in state if not is_lora_key(k))
    if foreign or not state:
        raise GptforgeError(f"{where}: {ckpt / MODEL_FILE} holds {foreign[0] if foreign else 'no tensors'}, not "
                            "LoRA adapters")
    return name, ft.lora, state


def load_with_adapters(checkpoint: str | Path, adapters: list[tuple[str, str]], device: str,
                       dtype: str) -> tuple[nn.Module, Tokenizer, AdapterSet]:
    """The base model (eval mode) with every adapter of `adapters` ((name, LoRA checkpoint) pairs) stacked into it,
    its tokenizer, and the AdapterSet that selects them per row."""
    dev = resolve_device(device)
    model, tokenizer, cfg = load_checkpoint(checkpoint, device=dev, dtype=dtype)
    found = [read_adapter(name, path, cfg, tokenizer, dev) for name, path in adapters]
    aset = apply_adapters(model, found)
    return (decode_layout(model) if dev.type == "cpu" else model), tokenizer, aset
