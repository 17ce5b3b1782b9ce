"""`gptforge quantize` and `gptforge prune`: read a checkpoint through gptforge.loader, transform it (quantize.py,
prune.py), write the same directory format with the `compression` section saying what was done.

These verbs sit a layer above the transforms they run: they load checkpoints, and pruning's recovery trains
through the one loop (`gptforge.train.train`).
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import torch

from gptforge.checkpoint import unwrap, write_checkpoint
from gptforge.compress.prune import apply_masks, calibration_batches, check_args, parse_pattern, prune_model
from gptforge.compress.quantize import check_activations, check_method, quantize_model
from gptforge.config import CompressionConfig, RunConfig, section_from_dict
from gptforge.data import TokenData
from gptforge.errors import GptforgeError
from gptforge.loader import load_checkpoint
from gptforge.outputs import check_out, is_artifact
from gptforge.settings import PruneConfig
from gptforge.train import next_token_loss, train


def quantize_checkpoint(src: str, method: str, out: str, group_size: int | None = None,
                        overwrite: bool = False, activations: str | None = None) -> tuple[Any, dict]:
    """Read a checkpoint, quantize it, write the same directory format (no trainer state: it is for inference).
    `out` follows outputs.check_out: refused if it is `src` or any non-empty folder but an earlier checkpoint
    with `overwrite`. `activations` (int8/int4: dynamic or weight-only) is recorded when given."""
    check_method(method, group_size)
    if activations is not None:
        check_activations(activations, method)
    check_out(out, "checkpoint", overwrite=overwrite, inputs=[src])
    model, tokenizer, cfg = load_checkpoint(src)
    if cfg.compression is not None and cfg.compression.quantization is not None:
        raise GptforgeError(f"{src} is already quantized ({cfg.compression.quantization.to_dict()}); quantize its fp32 parent")
    model = model.float()
    _, section, state = quantize_model(model, method, group_size, activations)
    section = {**(cfg.compression.to_dict() if cfg.compression else {}), **section}
    compression = section_from_dict(CompressionConfig, section, "compression")
    dest = write_checkpoint(Path(out), dataclasses.replace(cfg, compression=compression), tokenizer, model_state=state)
    return dest, section


def masked_loss(masks: dict[str, torch.Tensor]):
    """The default objective, with the pruned weights zeroed again before every forward: recovery training
    through the one loop keeps the sparsity (the optimizer moves masked weights; they are re-zeroed before
    they are used, and once more on the final weights)."""
    def loss_fn(model, x, y):
        apply_masks(unwrap(model), masks)
        return next_token_loss(model, x, y)

    return loss_fn


def prune_checkpoint(src: str, method: str, out: str, sparsity: float | None = None, pattern: str | None = None,
                     data: str | None = None, recover_steps: int = PruneConfig.recover_steps, calib_batches: int = 8,
                     progress: bool = True, overwrite: bool = False) -> tuple[Any, dict, Any]:
    """Prune a checkpoint into `out` (a checkpoint folder); with `recover_steps`, fine-tune it first through
    the one training loop on `data` (the run's logs land in OUT-recover, next to OUT). Returns (dest, section, TrainResult).
    `out` (and OUT-recover) follow outputs.check_out: `overwrite` replaces only earlier outputs of the same kind."""
    check_args(method, sparsity, parse_pattern(pattern))
    if recover_steps < 0:
        raise GptforgeError(f"--recover-steps must be >= 0, got {recover_steps}")
    check_out(out, "checkpoint", overwrite=overwrite, inputs=[src, data])
    recover_dir = Path(out).parent / f"{Path(out).name}-recover"
    if recover_steps:
        check_out(recover_dir, "run", overwrite=overwrite, inputs=[src, data])
    if (recover_steps or method == "wanda") and data is None:
        raise GptforgeError(f"{'--recover-steps' if recover_steps else 'wanda'} needs --data DIR (a directory from gptforge prepare)")
    model, tokenizer, cfg = load_checkpoint(src)
    if cfg.compression is not None and cfg.compression.quantization is not None:
        raise GptforgeError(f"{src} is quantized; prune its fp32 parent, then quantize")
    model = model.float()
    batches = None
    if data is not None:
        if TokenData(data).fingerprint != tokenizer.fingerprint:
            raise GptforgeError(f"{data} was prepared with another tokenizer than {src}; prepare it with --tokenizer {src}/tokenizer.json")
        seq = min(cfg.train.seq_len or cfg.model.block_size, cfg.model.block_size)
        batches = calibration_batches(data, calib_batches, 8, seq)
    model, section, masks = prune_model(model, method, sparsity, pattern, batches)
    before = cfg.compression.to_dict() if cfg.compression else {}
    out_cfg = dataclasses.replace(cfg, model=model.config,
                                  compression=section_from_dict(CompressionConfig, {**before, **section}, "compression"))
    dest = write_checkpoint(Path(out), out_cfg, tokenizer, model_state=model.state_dict())
    if not recover_steps:
        return dest, section, None
    t = cfg.train
    rcfg = RunConfig(model=model.config, data=data, out=str(recover_dir), train=dataclasses.replace(
        t, max_steps=recover_steps, warmup_steps=max(1, recover_steps // 10), lr=t.lr / 4, min_lr=t.lr / 40,
        eval_every=recover_steps, save_every=recover_steps, keep_last=1, max_time=None, max_tokens=None,
        tensorboard=False, early_stop_patience=None))
    if is_artifact(recover_dir, "run"):  # an earlier recovery run, which check_out let --overwrite replace
        shutil.rmtree(recover_dir)
    result = train(rcfg, init_from=str(dest), loss_fn=next_token_loss if masks is None else masked_loss(masks),
                   progress=progress)
    recovered, _, _ = load_checkpoint(result.checkpoint)
    if masks is not None:
        apply_masks(recovered, masks)  # the last optimizer step moved masked weights; zero them for good
    section["pruning"]["recover_steps"] = recover_steps
    out_cfg = dataclasses.replace(out_cfg, compression=section_from_dict(CompressionConfig, {**before, **section},
                                                                         "compression"))
    dest = write_checkpoint(Path(out), out_cfg, tokenizer, model_state=recovered.state_dict())
    return dest, section, result
