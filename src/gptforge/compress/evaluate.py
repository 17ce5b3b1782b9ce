"""`gptforge eval`: one table comparing checkpoints on the same validation windows.

Per checkpoint: parameters, file size, val loss and perplexity, and against the first checkpoint (the
reference, usually the uncompressed parent): relative perplexity change, mean KL(reference || this) per token
and top-1 agreement of the next-token argmax; then batch-1 greedy decode speed and the bytes the loaded
weights take. All models see the same windows batch by batch, so the KL needs no stored reference logits.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from gptforge.checkpoint import MODEL_FILE, resolve_checkpoint
from gptforge.compress.quantize import QuantizedMatrix
from gptforge.errors import GptforgeError, not_one_string
from gptforge.loader import load_checkpoint
from gptforge.native import decode_layout
from gptforge.settings import EvalConfig


def logical_params(model: torch.nn.Module) -> int:
    """Weights the model represents: a quantized matrix counts its N x K entries, not its bytes."""
    n = sum(p.numel() for p in model.parameters())
    return n + sum(m.shape.numel() for m in model.modules() if isinstance(m, QuantizedMatrix))


def memory_bytes(model: torch.nn.Module) -> int:
    """Bytes of every tensor the loaded model holds (parameters and buffers)."""
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


@torch.no_grad()
def decode_speed(model, vocab_size: int, tokens: int, prompt_len: int = 16) -> float:
    """Greedy batch-1 decode tokens/s through gptforge.generate, after a short warm-up: the tokens after the
    first over the time after the first, so that the prompt's prefill (time to first token) is not in it."""
    from gptforge.generate import generate_tokens

    prompt = list(range(1, prompt_len + 1))
    for _ in generate_tokens(model, prompt, max_new_tokens=4, vocab_size=vocab_size, temperature=0.0):
        pass
    n, t0 = 0, 0.0
    for _ in generate_tokens(model, prompt, max_new_tokens=tokens + 1, vocab_size=vocab_size, temperature=0.0,
                             stop_at_eos=False):
        if n == 0:
            t0 = time.perf_counter()
        n += 1
    return (n - 1) / (time.perf_counter() - t0)


@torch.no_grad()
def eval_checkpoints(paths: list[str], data_dir: str, *, batches: int = EvalConfig.batches,
                     batch_size: int = EvalConfig.batch_size, seq_len: int | None = EvalConfig.seq_len,
                     decode_tokens: int = EvalConfig.decode_tokens) -> list[dict]:
    """Rows of the comparison table, the first checkpoint being the reference (defaults: EvalConfig's)."""
    from gptforge.data import BatchSampler, TokenData
    from gptforge.eval import bits_per_byte, token_byte_lengths
    from gptforge.train import EVAL_SEED

    if not not_one_string(paths, "eval_checkpoints' paths"):
        raise GptforgeError("give at least one checkpoint to evaluate")
    data = TokenData(data_dir)
    loaded = []
    for p in paths:
        ckpt = resolve_checkpoint(p)
        model, tok, cfg = load_checkpoint(ckpt)
        model = decode_layout(model)  # as `gptforge generate` lays weights out on CPU, so speeds match it
        if tok.fingerprint != data.fingerprint:
            raise GptforgeError(f"{ckpt} uses tokenizer {tok.fingerprint} but {data_dir} was prepared with {data.fingerprint}; "
                                f"evaluate on data prepared with --tokenizer {ckpt}/tokenizer.json")
        loaded.append((ckpt, model, tok, cfg))
    vocab = loaded[0][2].vocab_size
    t = seq_len or min(c.model.block_size for *_, c in loaded)
    sampler = BatchSampler(data.shards("val"), batch_size, t, seed=EVAL_SEED)
    n_tok, n_bytes, byte_lengths = 0, 0, token_byte_lengths(loaded[0][2])
    loss = [0.0] * len(loaded)
    kl = [0.0] * len(loaded)
    agree = [0] * len(loaded)
    for b in range(batches):
        x, y = sampler.batch(b)
        ref_logp, ref_top = None, None
        for i, (_, model, _, _) in enumerate(loaded):
            logits = model(x)[..., :vocab].float().flatten(0, 1)  # (B*T, V)
            logp = F.log_softmax(logits, dim=-1)
            loss[i] += float(F.nll_loss(logp, y.flatten(), reduction="sum"))
            if ref_logp is None:
                ref_logp, ref_top = logp, logp.argmax(-1)
            kl[i] += float(F.kl_div(logp, ref_logp, log_target=True, reduction="sum"))
            agree[i] += int((logp.argmax(-1) == ref_top).sum())
        n_tok += y.numel()
        n_bytes += int(byte_lengths[y].sum())
    rows = []
    for i, (ckpt, model, tok, cfg) in enumerate(loaded):
        val = loss[i] / n_tok
        ppl = math.exp(val)
        row = {
            "checkpoint": str(ckpt),
            "compression": cfg.compression.to_dict() if cfg.compression else None,
            "params": logical_params(model),
            "file_bytes": (Path(ckpt) / MODEL_FILE).stat().st_size,
            "val_loss": val,
            "perplexity": ppl,
            "val_bpb": bits_per_byte(val, n_tok, n_bytes),
            "delta_ppl_pct": 100 * (ppl / math.exp(loss[0] / n_tok) - 1),
            "mean_kl": kl[i] / n_tok,
            "top1_agreement_pct": 100 * agree[i] / n_tok,
            "eval_tokens": n_tok,
        }
        if decode_tokens:
            row["decode_tokens_per_s"] = decode_speed(model, tok.vocab_size, decode_tokens)
        row["weights_memory_bytes"] = memory_bytes(model)
        rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"vs {rows[0]['checkpoint']} on {rows[0]['eval_tokens']:,} val tokens")
    for col in ("checkpoint", "method", "params", "file MB", "val loss", "ppl", "bits/byte", "Δppl", "mean KL", "top-1 agree",
                "decode tok/s", "weights MB"):
        table.add_column(col, justify="left" if col in ("checkpoint", "method") else "right")
    for r in rows:
        comp = r["compression"] or {}
        what = comp.get("quantization") or comp.get("pruning") or {}
        method = " ".join(str(v) for k, v in what.items() if k in ("method", "group_size", "sparsity", "pattern")) or "-"
        table.add_row(
            "/".join(Path(r["checkpoint"]).parts[-2:]), method,
            f"{r['params'] / 1e6:.2f}M", f"{r['file_bytes'] / 1e6:.2f}", f"{r['val_loss']:.4f}", f"{r['perplexity']:.2f}",
            f"{r['val_bpb']:.4f}",
            f"{r['delta_ppl_pct']:+.2f}%", f"{r['mean_kl']:.4f}", f"{r['top1_agreement_pct']:.1f}%",
            f"{r['decode_tokens_per_s']:.0f}" if "decode_tokens_per_s" in r else "-",
            f"{r['weights_memory_bytes'] / 1e6:.2f}")
    console = Console()
    if not console.is_terminal:  # piped into a file or a doc: do not squeeze the columns to 80
        console = Console(width=180)
    console.print(table)
