"""Checkpoint directories: save unwrapped state atomically, find the latest, load onto a meta-device model.

A run directory keeps `checkpoints/step-00000500/` folders, each holding
    model.safetensors   weights, unwrapped (no `_orig_mod.` / `module.` prefixes: nanoGPT issue #325)
    config.yaml         the full run config (model shape included)
    tokenizer.json      the tokenizer the model was trained with
    trainer_state.pt    optimizer, step, tokens seen, sampler position, RNG states (tensors and plain values
                        only, so it loads with torch.load(weights_only=True))
and `checkpoints/latest`, a one-line file naming the newest. A checkpoint is written under a temporary name,
fsynced and renamed into place, so a crash leaves either the old set or the new one, never half a file.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from gptforge.config import RunConfig, load_yaml, run_config_from_dict
from gptforge.errors import GptforgeError
from gptforge.model import GPT
from gptforge.tokenizer import Tokenizer

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
TOKENIZER_FILE = "tokenizer.json"
STATE_FILE = "trainer_state.pt"
CHECKPOINTS = "checkpoints"
LATEST = "latest"


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside torch.compile's and DDP's wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint(dest: Path, model: nn.Module, cfg: RunConfig, tokenizer: Tokenizer,
                     trainer_state: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint folder at `dest` atomically (temp folder, fsync, rename)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".tmp-{dest.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    state = {k: v.detach().contiguous().cpu() for k, v in unwrap(model).state_dict().items()}
    save_file(state, str(tmp / MODEL_FILE), metadata={"format": "pt"})
    cfg.save(tmp / CONFIG_FILE)
    tokenizer.save(tmp / TOKENIZER_FILE)
    if trainer_state is not None:
        torch.save(trainer_state, tmp / STATE_FILE)
    for f in tmp.iterdir():
        _fsync_file(f)
    _fsync_dir(tmp)
    if dest.exists():  # re-saving the same step: move the old one aside first, drop it once the new one is in
        old = dest.parent / f".old-{dest.name}-{os.getpid()}"
        os.rename(dest, old)
        os.rename(tmp, dest)
        shutil.rmtree(old)
    else:
        os.rename(tmp, dest)
    _fsync_dir(dest.parent)
    return dest


def save_checkpoint(run_dir: str | Path, step: int, model: nn.Module, cfg: RunConfig, tokenizer: Tokenizer,
                    trainer_state: dict[str, Any], keep: int) -> Path:
    """Save `checkpoints/step-N`, point `latest` at it, and keep only the newest `keep` step folders."""
    root = Path(run_dir) / CHECKPOINTS
    dest = write_checkpoint(root / f"step-{step:08d}", model, cfg, tokenizer, trainer_state)
    tmp = root / f".{LATEST}.tmp"
    tmp.write_text(dest.name + "\n")
    _fsync_file(tmp)
    os.replace(tmp, root / LATEST)
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return dest


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from itself, or from a run directory (its `latest`, else its newest step)."""
    p = Path(path)
    if not p.exists():
        raise GptforgeError(f"checkpoint not found: {p}")
    if (p / MODEL_FILE).is_file():
        return p
    root = p / CHECKPOINTS if (p / CHECKPOINTS).is_dir() else p
    latest = root / LATEST
    if latest.is_file():
        named = root / latest.read_text().strip()
        if (named / MODEL_FILE).is_file():
            return named
    steps = sorted(d for d in root.glob("step-*") if (d / MODEL_FILE).is_file())
    if steps:
        return steps[-1]
    raise GptforgeError(f"{p} holds no checkpoint ({MODEL_FILE} not found); give a checkpoint folder or a run directory from gptforge train")


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, Tokenizer, RunConfig]:
    """Model (eval mode), tokenizer and run config of a checkpoint; weights go straight to `device`.

    The model is built on the meta device (no memory, no init) and the tensors are assigned in place.
    """
    ckpt = resolve_checkpoint(path)
    for name in (CONFIG_FILE, TOKENIZER_FILE):
        if not (ckpt / name).is_file():
            raise GptforgeError(f"checkpoint {ckpt} is incomplete: {name} is missing")
    cfg = run_config_from_dict(load_yaml(ckpt / CONFIG_FILE), source=str(ckpt / CONFIG_FILE))
    tokenizer = Tokenizer.load(ckpt / TOKENIZER_FILE)
    if tokenizer.vocab_size > cfg.model.padded_vocab_size:
        raise GptforgeError(f"checkpoint {ckpt}: tokenizer has {tokenizer.vocab_size} tokens but the model only {cfg.model.padded_vocab_size} rows")
    with torch.device("meta"):
        model = GPT(cfg.model)
    try:
        state = load_file(str(ckpt / MODEL_FILE), device=str(device))
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise GptforgeError(f"{ckpt / MODEL_FILE}: cannot read weights ({e})") from None
    try:
        model.load_state_dict(state, assign=True)
    except RuntimeError as e:
        raise GptforgeError(f"{ckpt / MODEL_FILE} does not match its config.yaml: {e}") from None
    return model.eval(), tokenizer, cfg


def load_trainer_state(path: str | Path) -> dict[str, Any]:
    f = resolve_checkpoint(path) / STATE_FILE
    if not f.is_file():
        raise GptforgeError(f"{f.parent} has no {STATE_FILE}: it can be loaded for inference but not resumed")
    return torch.load(f, map_location="cpu", weights_only=True)
