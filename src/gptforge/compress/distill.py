"""Knowledge distillation as an objective for the one training loop: `train(cfg, loss_fn=DistillLoss(...))`.

The loss mixes the temperature-scaled KL divergence from the teacher's next-token distribution to the
student's (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network") with ordinary cross-entropy on
the data. The T^2 factor keeps the KL term's gradient scale independent of the temperature (Hinton et al.,
section 2). Teacher and student may differ in depth and width but must share the tokenizer: a KL between
distributions over different vocabularies means nothing.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptforge.data import TokenData
from gptforge.errors import GptforgeError
from gptforge.hardware import resolve_device
from gptforge.loader import load_checkpoint
from gptforge.settings import DistillConfig
from gptforge.train import claim_run_dir, next_token_loss, train

IGNORE_INDEX = -100  # as in train.py: targets with this value never count


class DistillLoss:
    """loss_fn(student, x, y) -> (summed loss over target tokens, number of targets), as train() expects."""

    def __init__(self, teacher: nn.Module, vocab_size: int, cfg: DistillConfig = DistillConfig()):
        self.teacher = teacher.eval().requires_grad_(False)
        self.vocab_size, self.cfg = vocab_size, cfg

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v, c = self.vocab_size, self.cfg
        if not model.training:  # evaluation (train.evaluate sets eval mode): the data's cross-entropy, so a
            return next_token_loss(model, x, y)  # distilled run's val loss compares with any other run's
        logits = model(x)[..., :v].flatten(0, 1)  # (B*T, V): the padding rows are never targets
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 at least (fp64 stays: tests)
        with torch.no_grad():
            t_logits = self.teacher(x)[..., :v].flatten(0, 1).to(logits.dtype)  # (B*T, V)
        keep = y.flatten() != IGNORE_INDEX
        loss = logits.new_zeros(())
        if c.ce_weight:
            loss = loss + c.ce_weight * F.cross_entropy(logits, y.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
        if c.kl_weight:
            log_p_s = F.log_softmax(logits[keep] / c.temperature, dim=-1)
            log_p_t = F.log_softmax(t_logits[keep] / c.temperature, dim=-1)
            kl = F.kl_div(log_p_s, log_p_t, log_target=True, reduction="sum")  # sum over tokens of KL(t || s)
            loss = loss + c.kl_weight * c.temperature**2 * kl
        return loss, keep.sum()


def check_same_tokenizer(teacher_fp: str, student_fp: str, where: str) -> None:
    if teacher_fp != student_fp:
        raise GptforgeError(f"teacher and student tokenizers differ (teacher {teacher_fp}, {where} {student_fp}); "
                            "distillation compares next-token distributions, so prepare the data with "
                            "--tokenizer TEACHER/tokenizer.json")


def distill(cfg, teacher_path: str, dcfg: DistillConfig = DistillConfig(), progress: bool = True):
    """Train `cfg.model` on `cfg.data` through the one loop, against the teacher checkpoint's logits."""

    if cfg.data is None or cfg.out is None:
        raise GptforgeError("distill needs --data DIR (from gptforge prepare) and --out DIR")
    claim_run_dir(Path(cfg.out), None, (cfg.data, teacher_path), verb="distill")  # its refusal names no --resume
    device = resolve_device(cfg.train.device, flag="--train.device")
    teacher, tok, tcfg = load_checkpoint(teacher_path, device=device)
    check_same_tokenizer(tok.fingerprint, TokenData(cfg.data).fingerprint, f"data {cfg.data}")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=tok.vocab_size))
    return train(cfg, loss_fn=DistillLoss(teacher, tok.vocab_size, dcfg), progress=progress, claimed=True)
