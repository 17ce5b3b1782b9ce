"""The block op (native/csrc/step.cpp) on blocks that hold more than plain Linears: LoRA adapters served per row
(finetune.lora.MultiLoRALinear). Its decode steps equal the Python block's within fp32 rounding, each row
decodes what its adapter merged into the base alone decodes, and base rows are the base's, bit for bit."""

from __future__ import annotations

import threading

import pytest
import torch

from gptforge import native
from gptforge.config import LoRAConfig, ModelConfig
from gptforge.finetune.lora import apply_adapters, apply_lora, is_lora_key, merge_lora
from gptforge.generate import KVCache
from gptforge.model import GPT, Block

pytestmark = pytest.mark.skipif(not native.available(), reason="the native library could not be built here")

VARIANTS = {
    "gpt2": dict(n_layer=2, n_head=4, d_model=64, vocab_size=300, block_size=48, tie_embeddings=False),
    "llama": dict(n_layer=2, n_head=4, n_kv_head=2, d_model=64, vocab_size=300, block_size=48,
                  pos_encoding="rotary", norm="rmsnorm", mlp="swiglu", bias=False),
}
# three adapters: other ranks and alphas, one leaving the attention's output and the MLP's down out (zero blocks)
LORAS = [LoRAConfig(rank=4, alpha=8.0), LoRAConfig(rank=8, alpha=16.0, targets=("qkv", "up", "gate")),
         LoRAConfig(rank=2, alpha=2.0, targets=("proj", "down"))]
ROWS = [-1, 0, 1, 2, 0, -1]  # the base, a, b, c, a, the base
PROMPT = [5, 6, 7, 8, 9, 10]
STEPS = 4
# The op sums each row's update in its own order (a loop over that adapter's columns) where the Python path's
# addmm sums over every adapter's: fp32 rounding apart (equal on the CI CPU; logits here are ~1 in size).
OP_VS_PYTHON = 1e-5
MERGED = 1e-5  # W + B A folded once vs x W^T + (x A^T) B^T: rounding too (seen: 2e-7; the served-adapter tests' bound)


def _adapters(cfg: ModelConfig) -> list[tuple[str, LoRAConfig, dict[str, torch.Tensor]]]:
    out = []
    for j, lora in enumerate(LORAS):
        torch.manual_seed(10 + j)
        targets = lora.targets if "gate" in cfg.mlp or "gate" not in lora.targets else \
            tuple(t for t in lora.targets if t != "gate")  # a GELU MLP has no gate
        lora = LoRAConfig(rank=lora.rank, alpha=lora.alpha, targets=targets)
        state = {k: (torch.randn_like(v) * 0.2 if k.endswith("lora_b") else v)
                 for k, v in apply_lora(GPT(cfg), lora).state_dict().items() if is_lora_key(k)}
        out.append((f"ad{j}", lora, state))
    return out


def _base(cfg: ModelConfig) -> GPT:
    torch.manual_seed(0)
    return GPT(cfg).eval()


def _merged(cfg: ModelConfig, lora: LoRAConfig, state: dict) -> GPT:
    """The base with one adapter folded in, as gptforge.loader loads a LoRA checkpoint alone."""
    model = apply_lora(_base(cfg), lora)
    model.load_state_dict(state, strict=False)
    return native.decode_layout(merge_lora(model).eval())


def _decode(model: GPT, rows: list[int], aset=None, steps: int = STEPS) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits (steps, B, V) of greedy decode steps after a prefill of PROMPT in every row (row i on adapter
    rows[i]), and the KV cache's final contents."""
    B, T = len(rows), len(PROMPT)
    cache = KVCache(model.config, B, T + steps, device=torch.device("cpu"), dtype=torch.float32, static=False)
    cache.prepare(torch.arange(T), None, end=T)
    use = aset.use(rows) if aset is not None else torch.no_grad()
    with torch.no_grad(), use:
        logits, out = model(torch.tensor([PROMPT] * B), None, cache)[:, -1], []
        for n in range(steps):
            cache.prepare(torch.tensor([T + n]).repeat(B)[:, None], None, T + n + 1)  # per-row slots, as the engine
            logits = model(logits.argmax(-1)[:, None], torch.tensor([T + n]), cache)[:, -1]
            out.append(logits)
    return torch.stack(out), [t.clone() for kv in cache.layers for t in (kv.k, kv.v)]


@pytest.fixture(scope="module", params=list(VARIANTS))
def setup(request):
    torch.set_num_threads(1)
    cfg = ModelConfig(**VARIANTS[request.param])
    adapters = _adapters(cfg)
    model = _base(cfg)
    aset = apply_adapters(model, adapters)
    return cfg, adapters, native.decode_layout(model), aset


def test_blocks_holding_adapters_decode_through_the_op(setup, monkeypatch):
    _, _, model, aset = setup
    assert all(type(b) is native.DecodeBlock for b in model.blocks)
    assert model.blocks[0].params.qkv_lora is model.blocks[0].attn.qkv.lora_bt
    calls = []
    real = Block.forward
    monkeypatch.setattr(Block, "forward", lambda self, x, *a: calls.append(x.shape[1]) or real(self, x, *a))
    _decode(model, ROWS, aset)
    assert calls == [len(PROMPT)] * len(model.blocks)  # the prefill only: every decode step ran the op


def test_mixed_rows_through_the_op_equal_the_python_block(setup, monkeypatch):
    _, _, model, aset = setup
    fused, fused_cache = _decode(model, ROWS, aset)
    with monkeypatch.context() as m:
        m.setattr(native.DecodeBlock, "forward", Block.forward)  # MultiLoRALinear.forward per Linear
        plain, plain_cache = _decode(model, ROWS, aset)
    torch.testing.assert_close(fused, plain, atol=OP_VS_PYTHON, rtol=0)
    for a, b in zip(fused_cache, plain_cache):
        torch.testing.assert_close(a, b, atol=OP_VS_PYTHON, rtol=0)
    assert (fused[:, 1] - fused[:, 0]).abs().max() > 1e-2  # the adapters do change the rows they serve


def test_each_row_decodes_what_its_adapter_merged_alone_does(setup):
    cfg, adapters, model, aset = setup
    mixed, _ = _decode(model, ROWS, aset)
    for j, (_, lora, state) in enumerate(adapters):
        alone, _ = _decode(_merged(cfg, lora, state), [-1])
        for i in (i for i, r in enumerate(ROWS) if r == j):
            torch.testing.assert_close(mixed[:, i], alone[:, 0], atol=MERGED, rtol=0)


def test_base_rows_are_the_base_bit_for_bit(setup):
    cfg, _, model, aset = setup
    base, base_cache = _decode(native.decode_layout(_base(cfg)), [-1] * len(ROWS))
    mixed, _ = _decode(model, ROWS, aset)
    for i in (i for i, r in enumerate(ROWS) if r < 0):
        assert torch.equal(mixed[:, i], base[:, i])
    only_base, only_base_cache = _decode(model, [-1] * len(ROWS), aset)  # no mask at all: the base's products
    assert torch.equal(only_base, base)
    assert all(torch.equal(a, b) for a, b in zip(only_base_cache, base_cache))


def test_the_op_reads_the_calling_threads_rows(setup):
    """The server's embeddings thread runs the same model while the decode loop holds a mask: each thread's
    forward takes its own rows."""
    _, _, model, aset = setup
    base, _ = _decode(model, [-1] * 2, aset)
    got = {}
    with aset.use([0, 1]):  # this thread's selection; the other thread has none
        worker = threading.Thread(target=lambda: got.update(other=_decode(model, [-1] * 2)[0]))
        worker.start()
        worker.join()
    assert torch.equal(got["other"], base)


# --- quantized Linears (compress.quantize): each product the one the module would run, called from C++ ---------
QUANTIZED = [("int8", "dynamic"), ("int8", "weight-only"), ("int4", "dynamic"), ("int4", "weight-only")]


def _quantized(variant: str, method: str, activations: str) -> GPT:
    from gptforge.compress.quantize import quantize_model

    torch.manual_seed(0)
    model = quantize_model(GPT(ModelConfig(**VARIANTS[variant])).eval(), method, 32 if method == "int4" else None,
                           activations=activations)[0]
    return native.decode_layout(model)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("method,activations", QUANTIZED, ids=[f"{m}-{a}" for m, a in QUANTIZED])
def test_quantized_blocks_decode_through_the_op_as_the_modules_do(variant, method, activations, monkeypatch):
    """The op calls the kernels QuantLinear's forward calls, with the same tensors: decode steps (logits and cache
    writes) equal the Python block's bit for bit, for gpt2- and llama-style blocks, every format and mode."""
    torch.set_num_threads(1)
    model = _quantized(variant, method, activations)
    assert all(type(b) is native.DecodeBlock for b in model.blocks)
    rows = [-1, -1, -1]
    calls = []
    real = Block.forward
    monkeypatch.setattr(Block, "forward", lambda self, x, *a: calls.append(x.shape[1]) or real(self, x, *a))
    fused, fused_cache = _decode(model, rows)
    # every decode step ran the op, and so did the prompt but where a weight-only Linear would meet more rows than
    # its kernels take (the prompt's 3 x 6; the module dequantizes those)
    assert calls == ([len(PROMPT)] * len(model.blocks) if activations == "weight-only" else [])
    monkeypatch.setattr(native.DecodeBlock, "forward", Block.forward)  # QuantLinear.forward per product
    plain, plain_cache = _decode(model, rows)
    assert torch.equal(fused, plain)
    assert all(torch.equal(a, b) for a, b in zip(fused_cache, plain_cache))



# --- the block op is the step op's layer (csrc/step.cpp) on one layer: its other callers' shapes and dtypes -------
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_block_op_takes_fp16_and_more_rows_than_the_kernels(dtype, monkeypatch):
    """fp16 blocks, and 20 rows (past the few-row kernels' 16: PyTorch's GEMM for the products), prompt and decode
    through the op bit-equal to the Python block (logits and cache writes), QK-norm and value embeddings included."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_gemv import BLOCK_VARIANTS, _decode_logits

    torch.manual_seed(0)
    model = native.decode_layout(GPT(ModelConfig(**BLOCK_VARIANTS["speedrun"])).eval().to(dtype))
    assert all(type(b) is native.DecodeBlock for b in model.blocks)
    from gptforge.model import CausalSelfAttention

    prompts = [[5 + i, 6, 7][: 1 + i % 3] for i in range(20)]
    calls, attend = [], CausalSelfAttention.forward
    monkeypatch.setattr(CausalSelfAttention, "forward", lambda self, x, *a: calls.append(x.shape[1]) or attend(self, x, *a))
    with torch.no_grad():
        fused, fused_cache = _decode_logits(model, prompts, 3, True)
    assert calls == []  # the prompt (20 rows x 3 tokens) and every decode step ran the op
    with torch.no_grad():
        monkeypatch.setattr(native.DecodeBlock, "forward", Block.forward)
        plain, plain_cache = _decode_logits(model, prompts, 3, True)
    assert torch.equal(fused, plain)
    assert all(torch.equal(a, b) for a, b in zip(fused_cache, plain_cache))
