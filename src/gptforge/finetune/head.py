"""The classification head as a module swap: a GPT whose output head scores classes instead of tokens."""

from __future__ import annotations

import torch.nn as nn

from gptforge.model import GPT


def attach_class_head(model: GPT, n_classes: int) -> GPT:
    """Swap the GPT's output head for a (n_classes, d_model) one (in place): forward then returns class
    scores at every position, and the loss reads the last. The tied embedding stays as the input table."""
    w = model.tok_emb.weight
    head = nn.Linear(model.config.d_model, n_classes, bias=False, device=w.device, dtype=w.dtype)
    nn.init.normal_(head.weight, std=0.02)
    model.lm_head = head
    return model
