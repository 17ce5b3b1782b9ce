"""The perplexity rule (CCNet, Wenzek et al. 2019): score each document with a small gptforge model trained on
text you trust, and drop what it finds too surprising. One model per worker process, on the CPU."""

from __future__ import annotations

import math

import torch

from gptforge.loader import load_checkpoint

WINDOWS = 4  # at most this many seq_len windows from the start of each document are scored


class PerplexityScorer:
    """exp(mean next-token loss) of a document's first WINDOWS x seq_len tokens under a checkpoint."""

    def __init__(self, checkpoint: str):
        self.model, self.tokenizer, cfg = load_checkpoint(checkpoint, device="cpu")
        self.seq_len = min(cfg.model.block_size, 512)

    @torch.no_grad()
    def __call__(self, text: str) -> float:
        ids = [self.tokenizer.eos_id] + self.tokenizer.encode(text)[: WINDOWS * self.seq_len]
        if len(ids) < 2:
            return float("inf")
        total, count = 0.0, 0
        for start in range(0, len(ids) - 1, self.seq_len):
            chunk = torch.tensor(ids[start:start + self.seq_len + 1])[None]
            logits = self.model(chunk[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits[0].float(), chunk[0, 1:], reduction="sum")
            total += float(loss)
            count += chunk.shape[1] - 1
        return math.exp(min(total / count, 50.0))
