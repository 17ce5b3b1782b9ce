"""The static KV cache of a decode: keys and values of every layer for B rows of S positions, allocated once.

Decoding one token of a batch-1 request reads every weight once, so its speed is bound by memory bandwidth;
the keys and values of earlier tokens therefore live here and are never recomputed. Both schedules use it:
the static batch (generate.py, every row writing the same slot per step, left-padded) and BatchEngine
(engine.py, each row at its own slot). Shapes: B rows, K key/value heads, S cache length, Hd head size.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptforge import native
from gptforge.compress.quantize import QuantizedMatrix
from gptforge.errors import GptforgeError

# What `kv_dtype` names (settings.KV_DTYPES): the dtype the keys and values are stored in; None is the model's.
STORAGE = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.int8}


def resolve_kv_dtype(model: nn.Module, kv_dtype: str) -> str:
    """The kv_dtype a generation's cache stores for `model`: "auto" is bf16 for a model whose matrix products are
    quantized (int8, int4) and compute in fp32, else the weights' own dtype ("auto" as KVCache reads it); any other
    name is returned as given.

    Why bf16 for a quantized model: its weights are a quarter or an eighth of fp32's, so an fp32 cache is a large
    share of its memory (gpt2 int8 at 288 positions: 21 MB of a 385 MB process) and of the bytes each step reads.
    The native decode attention reads a bf16 cache under fp32 queries (csrc/attention.cpp), and llama.cpp keeps
    f16 keys and values beside Q8_0 / Q4_0 weights too. Δ perplexity against an fp32 cache: docs/generate.md."""
    if kv_dtype != "auto":
        return kv_dtype
    weight = next(model.parameters(), None)
    if weight is not None and weight.dtype == torch.float32 and any(
            isinstance(m, QuantizedMatrix) for m in model.modules()):
        return "bf16"
    return "auto"


class KVCache:
    """Keys and values of every layer for B rows of S positions, allocated once for the whole generation.

    `prepare(slots, real)` is called before each forward: it records which slots this forward writes and
    builds the attention mask, which each layer's `update` hands to SDPA with the full key/value buffers.
    With `static=True` attention always spans all S slots (unwritten ones masked), so every decode step has
    the same shapes and can be captured once as a CUDA graph; otherwise it spans only the slots written so
    far, which reads less memory per step in eager mode.

    kv_dtype stores the keys and values in another dtype than the model's (settings.KV_DTYPES): "bf16" halves
    an fp32 model's cache, "int8" quarters it (one fp32 scale per token and head, absmax / 127, as KIVI and
    llama.cpp's q8_0 cache keep one per group). They are widened back to the model's dtype when read, so the
    attention math is the model's own (fp32 for an fp32 model); only the stored values are rounded.
    """

    def __init__(self, cfg, batch: int, length: int, *, device: torch.device, dtype: torch.dtype, static: bool,
                 kv_dtype: str = "auto"):
        if kv_dtype not in STORAGE:
            raise GptforgeError(f"kv_dtype must be one of {', '.join(STORAGE)}, got {kv_dtype!r}")
        store = STORAGE[kv_dtype] or dtype
        shape = (batch, cfg.kv_heads, length, cfg.head_dim)

        def buffers() -> list[torch.Tensor]:  # keys, values, and with int8 a scale per token and head (B, K, S, 1)
            kv = [torch.zeros(shape, device=device, dtype=store) for _ in range(2)]
            scales = [torch.zeros(shape[:-1] + (1,), device=device) for _ in range(2)] if store == torch.int8 else []
            return kv + scales

        self.layers = [_LayerKV(self, *buffers()) for _ in range(cfg.n_layer)]
        self.valid = torch.zeros(batch, length, dtype=torch.bool, device=device)  # slot holds a real token
        self.length, self.static, self.dtype, self.store = length, static, dtype, store
        self.window = cfg.sliding_window  # a sliding attention window (Mistral) in the mask; None: causal only
        # csrc/attention.cpp reads and writes the model's dtype, or bf16 under an fp32 model (rounded on write,
        # widened on read, as `update` does); int8 takes the PyTorch path (native/layout.py's DecodeBlock and
        # native/step.py check this flag too).
        self.native = (device.type == "cpu" and not static and native.available()
                       and (store == dtype or (dtype == torch.float32 and store == torch.bfloat16)))
        self.slots = torch.zeros(1, dtype=torch.long, device=device)
        self._zero = torch.zeros((), dtype=dtype, device=device)
        self.mask = self.valid[:, None, None, :]
        self.end = length
        if static and device.type == "cuda":
            # Buffers at fixed addresses are what lets a CUDA graph replay write into them (HF StaticCache does
            # the same); without this, cudagraph trees would copy them on every step or refuse to capture.
            for t in [self.valid] + [b for kv in self.layers for b in kv.buffers()]:
                torch._dynamo.mark_static_address(t)

    def prepare(self, slots: torch.Tensor, real: torch.Tensor | None, end: int | None = None) -> None:
        """This forward writes slots (T,) for every row, or slots (B, T) of its own for each row (continuous
        batching: rows at different lengths); real (B, T) says which of them hold real tokens (not padding),
        None that all do. `end` (eager only) is one past the last slot written."""
        self.slots = slots
        self.end = self.length if self.static or end is None else end
        if real is None and slots.shape == (1,) and not self.static:
            # An eager decode step (the caller's slot is end - 1): one real token per row, which sees every valid
            # slot. Three ops instead of the general mask's dozen; with the penalty bookkeeping skipped when no
            # penalty is on, the demo model decoded 7% faster.
            self.valid.index_fill_(1, slots, True)
            allowed = self.valid[:, None, None, : self.end]  # (B, 1, 1, end)
            if self.window is not None:
                allowed = allowed & (torch.arange(self.end, device=slots.device) > slots - self.window)
            self.mask = torch.where(allowed, self._zero, float("-inf"))
            return
        if real is None:
            real = torch.ones(self.valid.shape[0], slots.shape[-1], dtype=torch.bool, device=slots.device)
        if slots.dim() == 1:
            self.valid.index_copy_(1, slots, real)
        else:
            self.valid.scatter_(1, slots, real)
        s = torch.arange(self.end, device=slots.device)
        causal = s <= slots[..., None]  # (T, end) or (B, T, end)
        if self.window is not None:  # the latest `window` slots only, the query's own included (slots are positions)
            causal = causal & (s > slots[..., None] - self.window)
        # A padding query may see only itself: a row of all-masked keys would make SDPA return NaN, and the
        # NaN would reach real tokens through 0 * NaN in the next layer's attention over the cached values.
        allowed = (self.valid[:, None, : self.end] & causal) | (s == slots[..., None])  # (B, T, end)
        # An additive float mask: CPU SDPA measured 2-4x faster with it than with a boolean one at decode shapes.
        self.mask = torch.where(allowed, self._zero, float("-inf"))[:, None]  # (B, 1, T, end): the same for every head

    def rows(self, r: slice) -> KVCache:
        """A view of rows `r` sharing this cache's storage: a forward over it reads and writes only those rows
        (BatchEngine prefills a new sequence into its row this way, and decodes only the occupied rows)."""
        return self._select(r)

    def copy_rows(self, index: torch.Tensor) -> KVCache:
        """A new cache whose row r is a copy of row index[r] of this one: a prompt prefilled once, then continued
        differently in each copy (eval scores every choice of a question after one pass over its context)."""
        return self._select(index)

    def _select(self, r: slice | torch.Tensor) -> KVCache:
        # Indexing by a slice gives views of the storage (rows), by a tensor of indices copies (copy_rows).
        out = KVCache.__new__(KVCache)
        out.layers = [_LayerKV(out, *(b[r] for b in kv.buffers())) for kv in self.layers]
        out.valid = self.valid[r]
        out.length, out.static, out.dtype, out.native = self.length, self.static, self.dtype, self.native
        out.store = self.store
        out.window = self.window
        out._zero = self._zero
        out.slots, out.mask, out.end = self.slots, out.valid[:, None, None, :], self.end
        return out

    def span(self, row: int, start: int, stop: int) -> list[torch.Tensor]:
        """Copies of row `row`'s slots start..stop-1, every layer stacked: one (L, K, n, Hd) tensor per buffer
        (keys, values, then with int8 their scales (L, K, n, 1)), in the storage dtype (the prefix cache's
        blocks)."""
        return [torch.stack(bufs) for bufs in zip(*(kv.buffers(row, start, stop) for kv in self.layers))]

    def put_span(self, row: int, start: int, parts: list[torch.Tensor]) -> None:
        """Write `span`'s tensors into row `row` from slot `start` on, and mark those slots valid."""
        n = parts[0].shape[2]
        for i, kv in enumerate(self.layers):
            for buf, part in zip(kv.buffers(row, start, start + n), parts):
                buf.copy_(part[i])
        self.valid[row, start: start + n] = True


class _LayerKV:
    """One layer's view of the cache: what CausalSelfAttention calls `kv.attend(q, k, v)` on."""

    def __init__(self, cache: KVCache, k: torch.Tensor, v: torch.Tensor, k_scale: torch.Tensor | None = None,
                 v_scale: torch.Tensor | None = None):
        # Weakly: the cache holds its layers, and a strong reference back would make a cycle, which frees a
        # generation's buffers only at the next full cyclic collection (repeated generate calls kept every cache).
        self._cache = weakref.ref(cache)
        self.k, self.v = k, v
        self.k_scale, self.v_scale = k_scale, v_scale  # int8 storage only: (B, K, S, 1)

    @property
    def cache(self) -> KVCache:
        return self._cache()

    def buffers(self, row: int | None = None, start: int = 0, stop: int | None = None) -> list[torch.Tensor]:
        """The stored tensors (keys, values, and with int8 their scales), or views of one row's slots."""
        bufs = [self.k, self.v] + ([self.k_scale, self.v_scale] if self.k_scale is not None else [])
        return bufs if row is None else [b[row, :, start:stop] for b in bufs]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Write this call's k, v (B, K, T, Hd) at the cache's slots; attention of q (B, H, T, Hd) over the
        cached keys and values up to `cache.end`, under its mask: (B, H, T, Hd)."""
        c = self.cache
        if c.native and q.shape[2] <= native.ops.PROMPT_TOKENS and not torch.compiler.is_compiling():
            # A CPU decode step or short prompt: one native op (csrc/attention.cpp) for the cache writes and the
            # attention (the block op's own, so the two paths stay equal bit for bit).
            return torch.ops.gptforge_attn.decode_attention(q, k, v, self.k, self.v, c.slots, c.mask)
        k, v = self.update(k, v)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=c.mask, enable_gqa=q.shape[1] != k.shape[1])

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, K, T, Hd) at the cache's slots; the cached keys and values up to `cache.end`, in k's
        dtype (widened from the storage dtype when that is another one)."""
        c, dtype = self.cache, k.dtype
        if c.store == torch.int8:
            (k, ks), (v, vs) = _quantize(k), _quantize(v)
            self._write(self.k_scale, ks)
            self._write(self.v_scale, vs)
        self._write(self.k, k.to(c.store))
        self._write(self.v, v.to(c.store))
        k, v = self.k[:, :, : c.end].to(dtype), self.v[:, :, : c.end].to(dtype)  # no copy if stored in dtype
        if c.store == torch.int8:
            return k * self.k_scale[:, :, : c.end].to(dtype), v * self.v_scale[:, :, : c.end].to(dtype)
        return k, v

    def _write(self, buf: torch.Tensor, x: torch.Tensor) -> None:
        slots = self.cache.slots
        if slots.dim() == 1:
            buf.index_copy_(2, slots, x)  # (B, K, S, X) <- (B, K, T, X) at slots
        else:  # each row at its own slots (B, T)
            buf.scatter_(2, slots[:, None, :, None].expand_as(x), x)


def _quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, K, T, Hd) as int8 and one fp32 scale per token and head (B, K, T, 1): round(x / scale), with
    scale = absmax / 127, so every value is within half a step of x."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-8) / 127  # (B, K, T, 1)
    return (x.float() / scale).round().clamp(-127, 127).to(torch.int8), scale
