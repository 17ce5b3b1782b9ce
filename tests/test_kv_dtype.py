"""The KV cache stored in bf16 or int8 (kvcache.KVCache kv_dtype): the rounding bound of what is stored, the memory
it saves, perplexity on a trained model within a stated bound of the fp32 cache's, and generation, the engine
and the native decode path (bypassed for another storage dtype) all running on it."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gptforge.config import RunConfig, TrainConfig, model_preset
from gptforge.data import TokenData
from gptforge.engine import BatchEngine
from gptforge.errors import GptforgeError
from gptforge.generate import complete, load
from gptforge.kvcache import KVCache, resolve_kv_dtype
from gptforge.model import GPT
from gptforge.sampling import SamplingParams
from gptforge.train import train

CPU = torch.device("cpu")


def cache_of(model, kv_dtype: str, batch: int = 1, length: int = 64) -> KVCache:
    return KVCache(model.config, batch, length, device=CPU, dtype=torch.float32, static=False, kv_dtype=kv_dtype)


@pytest.fixture(scope="module")
def trained(prepared, tmp_path_factory):
    """The tiny preset trained for 150 steps on the prepared plays (its val perplexity falls from ~500 to ~60)."""
    tc = TrainConfig(micro_batch=8, seq_len=64, max_steps=150, warmup_steps=10, lr=3e-3, eval_every=1000,
                     eval_batches=1, log_every=1000, save_every=1000, seed=3, tensorboard=False)
    vocab = TokenData(prepared).vocab_size
    cfg = RunConfig(model=dataclasses.replace(model_preset("tiny"), vocab_size=vocab), train=tc, data=str(prepared),
                    out=str(tmp_path_factory.mktemp("kvrun")))
    r = train(cfg, progress=False)
    torch.set_num_threads(1)
    return load(r.checkpoint, device="cpu")


def perplexity(model, tokens: np.ndarray, kv_dtype: str, windows: int = 24) -> float:
    """Next-token perplexity of `windows` windows of the model's context, each run as one prefill through a cache of
    `kv_dtype`: every layer's attention then reads all its keys and values back from the cache, as a decode does."""
    W = model.config.block_size
    x = torch.as_tensor(tokens[: windows * W].astype(np.int64)).view(windows, W)
    cache = cache_of(model, kv_dtype, windows, W)
    cache.prepare(torch.arange(W), None, end=W)
    with torch.no_grad():
        logits = model(x, torch.arange(W), cache)
    return math.exp(F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), x[:, 1:].flatten()).item())


def test_int8_storage_is_within_half_a_step_and_bf16_rounds():
    torch.manual_seed(0)
    model = GPT(model_preset("tiny")).eval()
    k, v = torch.randn(2, 4, 5, 16) * 3, torch.randn(2, 4, 5, 16)
    for kv_dtype, bound in (("int8", lambda x: x.abs().amax(-1, keepdim=True) / 127 / 2 + 1e-6),
                            ("bf16", lambda x: x.abs() * 2 ** -8 + 1e-30)):
        cache = cache_of(model, kv_dtype, batch=2, length=8)
        cache.prepare(torch.arange(5), None, end=5)
        got_k, got_v = cache.layers[0].update(k, v)  # what attention reads: the stored values, widened to fp32
        assert got_k.dtype == torch.float32
        for x, got in ((k, got_k), (v, got_v)):
            assert ((got - x).abs() <= bound(x)).all(), kv_dtype
            assert not torch.equal(got, x)


def test_bytes_per_token():
    model = GPT(model_preset("tiny")).eval()
    size = {d: sum(b.numel() * b.element_size() for kv in cache_of(model, d).layers for b in kv.buffers())
            for d in ("fp32", "bf16", "int8")}
    hd = model.config.head_dim
    assert size["bf16"] * 2 == size["fp32"]
    assert size["int8"] / size["fp32"] == pytest.approx((hd + 4) / (4 * hd))  # int8 values + an fp32 scale per head


def test_perplexity_within_bounds_of_the_fp32_cache(trained, prepared):
    model, _ = trained
    val = np.concatenate(TokenData(prepared).shards("val"))
    ref = perplexity(model, val, "fp32")
    assert ref < 150  # trained: far below the 512-token vocabulary's uniform perplexity
    assert perplexity(model, val, "auto") == ref
    for kv_dtype, bound in (("bf16", 0.005), ("int8", 0.01)):
        delta = perplexity(model, val, kv_dtype) / ref - 1
        assert abs(delta) < bound, (kv_dtype, delta)


@pytest.mark.parametrize("kv_dtype", ["bf16", "int8"])
def test_generate_and_the_engine_run_on_it(trained, kv_dtype):
    model, tok = trained
    prompts = ["ROMEO:\nWhat light through yonder window breaks?",
               "KING HENRY:\nOnce more unto the breach, dear friends"]
    sizes = [len(tok.encode(q)) for q in prompts]
    assert all(17 <= n <= 48 for n in sizes), sizes  # a whole block to reuse, room for 16 new tokens
    got = complete(model, tok, prompts, max_new_tokens=16, temperature=0, stop_at_eos=False, kv_dtype=kv_dtype)
    engine = BatchEngine(model, tok, max_batch=2, kv_dtype=kv_dtype, prefix_cache_tokens=256)
    # The native decode op reads a bf16 cache under the fp32 model (csrc/attention.cpp); int8 takes the PyTorch path.
    assert engine.cache.native == (kv_dtype == "bf16")
    p = SamplingParams(max_new_tokens=16, temperature=0, stop_at_eos=False)
    out = {}
    for _ in range(2):  # the second time from the prefix cache, whose blocks are stored in the same dtype
        seqs = engine.add_many([(tok.encode(q), p, ()) for q in prompts])
        toks = {s: [] for s in seqs}
        while engine.live:
            for ev in engine.step():
                toks[ev.seq].append(ev.token)
        out.setdefault("runs", []).append([toks[s] for s in seqs])
    assert engine.prefix.hit_tokens >= 2 * 16
    # The same ids as the static batch (left-padded, one forward per step) on the same cache dtype.
    assert out["runs"][0] == out["runs"][1] == [g.token_ids for g in got]



@pytest.mark.parametrize("method", ["int8", "int4"])
def test_auto_is_bf16_for_a_quantized_model_computing_in_fp32(trained, method):
    """kv_dtype auto: a quantized model's cache stores bf16 (resolve_kv_dtype), so generate with auto decodes the
    same ids and log-probabilities as with bf16 asked for, and the engine's cache is bf16 (on the native path);
    a float model keeps its own dtype, and a name given explicitly is kept."""
    from gptforge.compress.quantize import quantize_model
    from gptforge.native import decode_layout

    model, tok = trained
    quantized = lambda: decode_layout(quantize_model(model, method, 32 if method == "int4" else None)[0])  # noqa: E731
    quant = quantized()
    assert (resolve_kv_dtype(quant, "auto"), resolve_kv_dtype(model, "auto")) == ("bf16", "auto")
    assert resolve_kv_dtype(quant, "fp32") == "fp32"
    assert resolve_kv_dtype(quantized().to(torch.bfloat16), "auto") == "auto"  # computing in bf16: its own dtype
    prompts = ["ROMEO:\nWhat light", "KING HENRY:\nOnce more"]
    runs = [complete(quant, tok, prompts, max_new_tokens=12, temperature=0, stop_at_eos=False, logprobs=True,
                     kv_dtype=kv) for kv in ("auto", "bf16", "fp32")]
    assert [c.token_ids for c in runs[0]] == [c.token_ids for c in runs[1]]
    assert [c.logprobs for c in runs[0]] == [c.logprobs for c in runs[1]]
    assert [c.logprobs for c in runs[0]] != [c.logprobs for c in runs[2]]  # the fp32 cache is not what auto ran
    engine = BatchEngine(quant, tok, max_batch=2)
    assert engine.cache.store == torch.bfloat16 and engine.cache.native
    assert BatchEngine(model, tok, max_batch=2).cache.store == torch.float32

def test_unknown_kv_dtype_is_a_clear_error():
    with pytest.raises(GptforgeError, match="kv_dtype must be one of auto, fp32, bf16, int8"):
        cache_of(GPT(model_preset("tiny")), "fp8")
