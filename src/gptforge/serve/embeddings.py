"""`/v1/embeddings`: a text's vector is the served model's final-norm hidden states, pooled (the mean over its
tokens, or its last token's state: `--embedding-pooling`) and L2-normalised.

Inputs are embedded in right-padded batches: attention is causal, so a row's real positions never see its
padding, and each vector is what the model computes for that input alone (up to the float rounding of batched
matmuls). `dimensions` keeps the first N components and normalises again (what OpenAI's text-embedding-3 models
do, Matryoshka-style); `encoding_format: base64` sends little-endian float32 bytes, which the official client
asks for by default and decodes itself.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import json
import threading
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from gptforge.tokenizer import Tokenizer

from .protocol import APIError

MAX_INPUTS = 2048  # OpenAI's limit on the inputs of one request
BATCH_TOKENS = 4096  # padded positions per forward: bounds the activations of a large request
_FIELDS = {"model", "input", "encoding_format", "dimensions", "user"}


def encoder(model: nn.Module) -> nn.Module:
    """`model` without its output head: the same modules (every parameter shared, nothing copied), whose forward
    returns the final-norm hidden states (B, T, D) instead of logits."""
    enc = copy.copy(model)  # a new Module object over a copy of the children's table, not of the children
    enc._modules = dict(model._modules)
    enc.lm_head, enc.softcap = nn.Identity(), nn.Identity()
    return enc


@torch.no_grad()
def embed(enc: nn.Module, seqs: list[list[int]], pooling: str, batch_tokens: int = BATCH_TOKENS) -> torch.Tensor:
    """(N, D) float32 unit vectors: each sequence's hidden states (from `encoder`) pooled by `pooling` (mean | last).
    Sequences are batched by length (about `batch_tokens` padded positions per forward), right-padded."""
    device = next(enc.parameters()).device
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = torch.empty(len(seqs), enc.config.d_model)
    start = 0
    while start < len(order):
        end = start + 1
        while end < len(order) and (end - start + 1) * len(seqs[order[end]]) <= batch_tokens:
            end += 1
        rows = [seqs[i] for i in order[start:end]]
        T = max(len(s) for s in rows)
        idx = torch.tensor([s + [0] * (T - len(s)) for s in rows], device=device)  # (B, T)
        lens = torch.tensor([len(s) for s in rows], device=device)  # (B,)
        h = enc(idx).float()  # (B, T, D)
        if pooling == "last":
            pooled = h[torch.arange(len(rows), device=device), lens - 1]  # (B, D)
        else:
            real = (torch.arange(T, device=device) < lens[:, None]).float()  # (B, T)
            pooled = (h * real[:, :, None]).sum(1) / lens[:, None]  # (B, D)
        out[order[start:end]] = F.normalize(pooled, dim=-1).cpu()
        start = end
    return out


@dataclass
class EmbeddingRequest:
    """A validated /v1/embeddings body."""

    model: str
    inputs: list[list[int]]
    base64: bool
    dimensions: int | None


def _is_ids(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in v)


class Embedder:
    """Validates /v1/embeddings bodies and answers them with `embed`, one request's forwards at a time on a
    worker thread (the decode loop keeps its own thread)."""

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, pooling: str):
        self.enc, self.tok, self.pooling = encoder(model), tokenizer, pooling
        self.block, self.dim = model.config.block_size, model.config.d_model
        self.lock = threading.Lock()

    def parse(self, body: dict) -> EmbeddingRequest:
        extra = sorted(k for k, v in body.items() if k not in _FIELDS and v is not None)
        if extra:
            raise APIError(400, f"unsupported parameter(s): {', '.join(extra)}", param=extra[0], code="unsupported")
        model = body.get("model")
        if not isinstance(model, str):
            raise APIError(400, "'model' is required (a string)", param="model",
                           code="missing_field" if model is None else "invalid_type")
        fmt = body.get("encoding_format") or "float"
        if fmt not in ("float", "base64"):
            raise APIError(400, f"'encoding_format' must be float or base64, got {json.dumps(fmt)[:40]}",
                           param="encoding_format", code="invalid_value")
        dims = body.get("dimensions")
        if dims is not None and (not isinstance(dims, int) or isinstance(dims, bool) or not 1 <= dims <= self.dim):
            raise APIError(400, f"'dimensions' must be an integer in 1..{self.dim} (this model's width), got "
                                f"{json.dumps(dims)[:40]}", param="dimensions", code="invalid_value")
        return EmbeddingRequest(model, self._inputs(body.get("input")), fmt == "base64", dims)

    def _inputs(self, v: Any) -> list[list[int]]:
        """`input` as token ids: a string, an array of strings, token ids, or an array of token-id arrays."""
        if v is None:
            raise APIError(400, "'input' is required", param="input", code="missing_field")
        if isinstance(v, str) or _is_ids(v) and v:
            v = [v]
        if not isinstance(v, list) or not v or not (all(isinstance(x, str) for x in v) or all(_is_ids(x) for x in v)):
            raise APIError(400, "'input' must be a non-empty string, an array of them, token ids, or an array of "
                                "token-id arrays", param="input", code="invalid_type")
        if len(v) > MAX_INPUTS:
            raise APIError(400, f"'input' holds {len(v)} items; at most {MAX_INPUTS} are accepted per request",
                           param="input", code="invalid_value")
        vocab, seqs = self.tok.vocab_size, []
        for i, x in enumerate(v):
            ids = self.tok.encode(x) if isinstance(x, str) else x
            if not ids:
                raise APIError(400, f"input[{i}] is empty; every input needs at least one token", param="input",
                               code="invalid_value")
            if any(not 0 <= t < vocab for t in ids):
                raise APIError(400, f"input[{i}] holds a token id outside 0..{vocab - 1}", param="input",
                               code="invalid_value")
            if len(ids) > self.block:
                raise APIError(400, f"input[{i}] is {len(ids)} tokens; this model's maximum context length is "
                                    f"{self.block}; shorten it", param="input", code="context_length_exceeded")
            seqs.append(list(ids))
        return seqs

    def _vectors(self, req: EmbeddingRequest, adapter: Callable[[], contextlib.AbstractContextManager]) -> np.ndarray:
        with self.lock, adapter():
            vecs = embed(self.enc, req.inputs, self.pooling)
        if req.dimensions is not None:
            vecs = F.normalize(vecs[:, : req.dimensions], dim=-1)
        return vecs.numpy().astype("<f4")

    async def answer(self, req: EmbeddingRequest,
                     adapter: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> dict:
        """OpenAI's response; the forwards run inside `adapter()` (the requested adapter's selection on the worker
        thread, or nothing for the base)."""
        vecs = await asyncio.to_thread(self._vectors, req, adapter)
        data = [{"object": "embedding", "index": i,
                 "embedding": base64.b64encode(v.tobytes()).decode() if req.base64 else v.tolist()}
                for i, v in enumerate(vecs)]
        tokens = sum(len(s) for s in req.inputs)
        return {"object": "list", "data": data, "model": req.model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
