"""Text generation: temperature and top-k sampling, token by token.

This is the minimal engine: each step reruns the model over the (cropped) context, without a KV cache. Its
interface (`generate_tokens`, `generate`, `stream`) is what the fast engine will keep behind it.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn as nn

from gptforge.errors import GptforgeError
from gptforge.tokenizer import Tokenizer


@torch.no_grad()
def generate_tokens(model: nn.Module, prompt_ids: list[int], *, max_new_tokens: int, vocab_size: int,
                    temperature: float = 1.0, top_k: int | None = None, seed: int | None = None,
                    stop_ids: tuple[int, ...] = ()) -> Iterator[int]:
    """Yield up to `max_new_tokens` sampled ids, stopping after any id in `stop_ids`.

    temperature 0 is greedy decoding; top_k keeps the k most likely tokens before sampling. Logits of the
    padding rows above `vocab_size` (the tokenizer's true size) are never sampled.
    """
    if max_new_tokens < 0:
        raise GptforgeError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise GptforgeError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise GptforgeError(f"top_k must be >= 1, got {top_k}")
    if not prompt_ids:
        raise GptforgeError("the prompt encodes to no tokens")
    device = next(model.parameters()).device
    block_size = model.config.block_size
    gen = torch.Generator(device=device)
    if seed is not None:
        gen.manual_seed(seed)
    else:
        gen.seed()
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # (1, T)
    for _ in range(max_new_tokens):
        logits = model(ids[:, -block_size:])[:, -1, :].float()  # (1, V)
        logits[:, vocab_size:] = float("-inf")
        if temperature == 0:
            next_id = logits.argmax(dim=-1, keepdim=True)  # (1, 1)
        else:
            logits = logits / temperature
            if top_k is not None and top_k < vocab_size:
                kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (1, 1)
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.softmax(logits, dim=-1)
            next_id = torch.multinomial(probs, 1, generator=gen)  # (1, 1)
        token = int(next_id)
        yield token
        if token in stop_ids:
            return
        ids = torch.cat((ids, next_id), dim=1)


def _prompt_ids(tokenizer: Tokenizer, prompt: str) -> list[int]:
    # An empty prompt starts a new document: the model saw EOS before every document in training.
    return tokenizer.encode(prompt) if prompt else [tokenizer.eos_id]


def stream(model: nn.Module, tokenizer: Tokenizer, prompt: str, *, max_new_tokens: int = 200,
           temperature: float = 0.8, top_k: int | None = 200, seed: int | None = None,
           stop_at_eos: bool = True) -> Iterator[str]:
    """Yield the continuation of `prompt` as text deltas, each one valid UTF-8."""
    ids = generate_tokens(model, _prompt_ids(tokenizer, prompt), max_new_tokens=max_new_tokens,
                          vocab_size=tokenizer.vocab_size, temperature=temperature, top_k=top_k, seed=seed,
                          stop_ids=(tokenizer.eos_id,) if stop_at_eos else ())
    yield from tokenizer.decode_stream(i for i in ids if not (stop_at_eos and i == tokenizer.eos_id))


def generate(model: nn.Module, tokenizer: Tokenizer, prompt: str, **kwargs) -> str:
    """The continuation of `prompt` as one string (same arguments as `stream`)."""
    return "".join(stream(model, tokenizer, prompt, **kwargs))
