"""An imported model's quantized quality, built here (no hub): a Hugging Face Llama trained briefly on the bundled
plays with plain PyTorch, then brought in by import_hf, quantized and decoded as a user's `gptforge.generate.load`
decodes. tests/test_compress.py asserts the bounds on it; run as a script for the figures of a longer-trained one:

    PYTHONPATH=src python tests/hfquant.py [steps, default 600]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from gptforge import native
from gptforge.compress.quantize import QuantLinear
from gptforge.compress.run import quantize_checkpoint
from gptforge.corpora import load_corpus
from gptforge.data import BatchSampler, TokenData, prepare
from gptforge.generate import load
from gptforge.interop import import_hf
from gptforge.kvcache import KVCache
from gptforge.native.step import DecodeStep


def train_hf_llama(prepared, folder, steps: int = 80) -> float:
    """A Hugging Face Llama (2 layers, d 64, 4:2 GQA, SwiGLU, untied head; the prepared plays' 512-token BPE) trained
    with plain PyTorch for `steps` steps of 16 x 64 tokens, written to `folder` (save_pretrained and the tokenizer):
    its held-out loss (80 steps: ~4.0, from uniform's 6.24)."""
    import transformers  # only here: the tests that use it skip without it

    data = TokenData(prepared)
    tok = data.tokenizer()
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=tok.vocab_size, max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False))
    opt = torch.optim.AdamW(hf.parameters(), lr=5e-3, weight_decay=0.0)
    train, val = BatchSampler(data.shards("train"), 16, 64, seed=1), BatchSampler(data.shards("val"), 32, 64, seed=5)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny products: one thread ran ~6x faster than two on the shared cores
    try:
        for k in range(steps):
            x, y = train.batch(k)
            loss = F.cross_entropy(hf(x).logits.flatten(0, 1), y.flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
        hf.eval()
        with torch.no_grad():
            x, y = val.batch(0)
            val_loss = F.cross_entropy(hf(x).logits.flatten(0, 1), y.flatten()).item()
    finally:
        torch.set_num_threads(threads)
    hf.save_pretrained(folder)
    tok.save(Path(folder) / "tokenizer.json")
    return val_loss


def decode_perplexity(model, windows: torch.Tensor) -> tuple[float, float]:
    """Perplexity of the windows (B <= 16, L) as a user's decode computes it, teacher-forced: the first token
    prefilled, then every next true token fed through one decode step over the KV cache (the native whole-step op
    where it covers the model, as generate_steps runs it); and the same windows as one prefill (the many-row
    paths). Returns (decode, prefill)."""
    B, L = windows.shape
    cpu = torch.device("cpu")
    with torch.no_grad():
        cache = KVCache(model.config, B, L, device=cpu, dtype=torch.float32, static=False)
        cache.prepare(torch.arange(1), None, end=1)
        steps = [model(windows[:, :1], torch.zeros(B, 1, dtype=torch.long), cache)[:, -1]]
        whole = DecodeStep.of(model)
        if native.available():  # the path generate takes on CPU: the whole step in one native call
            assert whole is not None and whole.usable(cache, B)
        for n in range(1, L - 1):
            ids, pos = windows[:, n : n + 1].contiguous(), torch.full((B, 1), n)
            if whole is not None:  # the op marks its slot and builds its mask
                steps.append(whole(ids, pos, cache, torch.arange(n, n + 1), n + 1))
            else:
                cache.prepare(torch.arange(n, n + 1), None, end=n + 1)
                steps.append(model(ids, pos, cache)[:, -1])
        logits = torch.stack(steps, 1)  # (B, L - 1, V)
        full = model(windows[:, :-1])
    target = windows[:, 1:].flatten()
    vocab = model.config.vocab_size
    return tuple(F.cross_entropy(lg[..., :vocab].flatten(0, 1).float(), target).exp().item() for lg in (logits, full))


def quantized_deltas(ckpt, prepared, out, method: str, group: int | None) -> tuple[tuple[float, float], dict]:
    """The fp32 checkpoint's (decode, prefill) perplexity on 16 held-out windows of 64 tokens (decode_perplexity,
    after gptforge.generate.load), and Δ perplexity % of its quantize_checkpoint products, per activations mode:
    {"dynamic": [decode, prefill], "weight-only": [...]}."""
    windows = BatchSampler(TokenData(prepared).shards("val"), 16, 64, seed=7).batch(0)[0]
    threads = torch.get_num_threads()
    # One thread: on the shared 2-core test machine a 2-thread step of this tiny model spent ~50x longer waiting for
    # its second thread than computing; the numbers do not depend on the thread count.
    torch.set_num_threads(1)
    try:
        fp32 = decode_perplexity(load(ckpt, device="cpu")[0], windows)
        got = {}
        for acts in ("dynamic", "weight-only"):
            dest, _ = quantize_checkpoint(str(ckpt), method, str(Path(out) / acts), group, activations=acts)
            model, _ = load(dest, device="cpu")
            assert {m.activations for m in model.modules() if isinstance(m, QuantLinear)} == {acts}
            got[acts] = [100 * (q / f - 1) for q, f in zip(decode_perplexity(model, windows), fp32)]
    finally:
        torch.set_num_threads(threads)
    return fp32, got


def main(steps: int) -> None:
    """Print the fp32 perplexity and the Δ perplexity % table of the Llama trained `steps` steps on four plays."""
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        (d / "plays").mkdir()
        for doc in load_corpus("shakespeare")[:4]:  # conftest.prepared's data
            (d / "plays" / Path(doc.name).name).write_text(doc.text, encoding="utf-8")
        prepare([str(d / "plays")], d / "data", vocab_size=512, val_fraction=0.5, seed=0, progress=False)
        print(f"{steps} steps, held-out loss {train_hf_llama(d / 'data', d / 'hf', steps):.3f}")
        ckpt = import_hf(d / "hf", d / "ckpt")
        print("| format | dynamic (decode / prefill) | weight-only (decode / prefill) |")
        for method, group in (("int8", None), ("int4", 32)):
            fp32, got = quantized_deltas(ckpt, d / "data", d / method, method, group)
            cells = " | ".join(" / ".join(f"{x:+.3f}" for x in got[a]) for a in ("dynamic", "weight-only"))
            print(f"| {method}{' g32' if group else ''} | {cells} |   (fp32 perplexity {fp32[0]:.2f})")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 600)
