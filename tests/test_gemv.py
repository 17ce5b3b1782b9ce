"""The native CPU kernels (gptforge/native, csrc/*.cpp) against PyTorch's ops on the same weights."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from gptforge import native
from gptforge.compress.quantize import dequantize, int4_codes, int8_codes, quantize_activations
from gptforge.config import ModelConfig
from gptforge.model import GPT, Block, CausalSelfAttention

pytestmark = pytest.mark.skipif(not native.available(), reason="the native kernels could not be built here")

# (N, K): tails of every blocking (8 and 4 output rows, 16 inputs), and K not a multiple of 16 (the plain loop)
SHAPES = [(384, 256), (37, 64), (13, 96), (5, 40), (1, 16)]


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def _tol(k: int) -> float:  # fp32 sums of k products in another order
    return 1e-5 * k ** 0.5 * 4


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dense_weights_match_matmul(threads, n, k, dtype):
    torch.manual_seed(n * k)
    w = torch.randn(n, k).to(dtype)
    b = torch.randn(n)
    for m in (1, 2, 3, 8, 16):
        x = torch.randn(m, k)
        expected = x @ w.float().t() + b
        torch.testing.assert_close(native.linear(x, w, b), expected, rtol=1e-5, atol=_tol(k))


@pytest.mark.parametrize("n,k", SHAPES)
def test_int8_matches_dequantized_matmul(threads, n, k):
    torch.manual_seed(n + k)
    q, s = int8_codes(torch.randn(n, k))
    for m in (1, 5, 16):
        x = torch.randn(1, m, k)  # leading dims are kept
        y = native.linear_int8(x, q, s)
        assert y.shape == (1, m, n)
        torch.testing.assert_close(y, x @ dequantize(q, s, None).t(), rtol=1e-5, atol=_tol(k))


@pytest.mark.parametrize("n,k,group", [(384, 256, 32), (37, 128, 64), (13, 256, 128), (3, 64, 32)])
def test_int4_matches_dequantized_matmul(threads, n, k, group):
    torch.manual_seed(n + k + group)
    q, s, lo = int4_codes(torch.randn(n, k), group)
    for m in (1, 4, 7, 16):
        x = torch.randn(m, k)
        torch.testing.assert_close(native.linear_int4(x, q, s, lo), x @ dequantize(q, s, lo).t(), rtol=1e-5, atol=_tol(k))


# --- int8 activations (csrc/qgemv.cpp) on every instruction-set path -------------------------------------------
# The reference: the float64 product of the quantize-dequantized activations (quantize_activations: the same codes
# the kernels make) with the dequantized weights. The kernels' sums are exact integers, scaled in fp32: int8 rounds
# ~4 times per output, int4 in two chains of G fp32 terms (scaled sums, minima) added at the end, so |y - ref| <=
# (G + 16) u T with u = 2^-24, G the groups per row (1 for int8) and T = sum_k |x_k| (|w_k| + 2 |lo_k|) + |b|.
QUANT_PATHS = ["avx512vnni", "avxvnni", "avx2", "scalar"]


@pytest.fixture(params=QUANT_PATHS)
def quant_path(request):
    if request.param not in native.ops.quant_paths():
        pytest.skip(f"this CPU lacks the instructions of the {request.param} path")
    with native.ops.forced_quant_path(request.param):
        assert native.ops.quant_path() == request.param
        yield request.param


def _assert_within_summation_bound(y, ref, terms, groups):
    bound = (groups + 16) * 2.0 ** -24 * terms
    err = (y.double() - ref).abs()
    assert (err <= bound).all(), f"max error {err.max().item():.3g} over the bound {bound[err > bound].min().item():.3g}"


# (N, K): output-row tails of every tile (8, 6, 5, 4, 2, 1), K not a multiple of 64 or 32 (a zero-padded last vector)
INT8_SHAPES = [(384, 256), (37, 96), (13, 40), (7, 768), (1, 16), (9, 100)]


@pytest.mark.parametrize("n,k", INT8_SHAPES)
def test_int8_dynamic_matches_quantized_activations_reference(quant_path, threads, n, k):
    torch.manual_seed(n * k)
    q, s = int8_codes(torch.randn(n, k))
    b = torch.randn(n)
    sums = native.ops.int8_row_sums(q)
    assert torch.equal(sums, q.sum(1, dtype=torch.int32))
    w = dequantize(q, s, None).double()
    for m in (1, 2, 3, 4, 5, 8, 16, 17, 40):  # 17 and 40: more rows than the kernels take, gemm_path's
        x = torch.randn(1, m, k) * 3
        y = native.ops.linear_int8_dynamic(x, q, s, sums, b)
        assert y.shape == (1, m, n) and y.dtype == torch.float32
        xq = quantize_activations(x).double()
        _assert_within_summation_bound(y, xq @ w.t() + b.double(), xq.abs() @ w.abs().t() + b.abs().double(), 1)


# More rows than the few-row kernels take (a prefill): AMX tiles, the packed kernels on every instruction-set path and
# oneDNN, each against the same reference. Rows around the AMX tiles' 16 and 32 and the packed kernels' passes of 12
# (4 on 256-bit paths); (N, K) with panel tails (32 and 16 output rows) and K not a multiple of 64 (masked loads).
GEMM_SHAPES = [(384, 256), (37, 96), (13, 40), (50, 200), (1, 16), (33, 65)]
GEMM_VARIANTS = [("amx", None), *(("packed", isa) for isa in QUANT_PATHS), ("onednn", None)]


@pytest.mark.parametrize("gemm,isa", GEMM_VARIANTS, ids=[f"{g}-{i}" if i else g for g, i in GEMM_VARIANTS])
@pytest.mark.parametrize("n,k", GEMM_SHAPES)
def test_int8_many_rows_match_the_reference_on_every_path(threads, gemm, isa, n, k):
    if gemm not in native.ops.gemm_paths():
        pytest.skip(f"this CPU (or its kernel) lacks the {gemm} path")
    if isa is not None and isa not in native.ops.quant_paths():
        pytest.skip(f"this CPU lacks the instructions of the {isa} path")
    torch.manual_seed(n * k + 1)
    q, s = int8_codes(torch.randn(n, k))
    b = torch.randn(n)
    sums = native.ops.int8_row_sums(q)
    w = dequantize(q, s, None).double()
    with native.ops.forced_gemm_path(gemm), native.ops.forced_quant_path(isa or native.ops.quant_path()):
        assert native.ops.gemm_path() == gemm
        for m in (17, 24, 31, 32, 33, 40, 64, 77):
            x = torch.randn(1, m, k) * 3
            xq = quantize_activations(x).double()
            for bias in (b, None):
                y = native.ops.linear_int8_dynamic(x, q, s, sums, bias)
                assert y.shape == (1, m, n) and y.dtype == torch.float32
                ref = xq @ w.t() + (b.double() if bias is not None else 0)
                _assert_within_summation_bound(y, ref, xq.abs() @ w.abs().t() + b.abs().double(), 1)


def test_gemm_paths_follow_the_cpu_and_a_missing_one_is_refused():
    paths, flags = native.ops.gemm_paths(), native.build.cpu_flags().split()
    assert "packed" in paths and "onednn" in paths
    if "amx" in paths:  # AMX tiles are the default wherever the CPU has them and the kernel grants them
        assert "amx_int8" in flags and native.ops.gemm_path() == "amx" == native.ops.gemm_label()
    else:
        with pytest.raises(RuntimeError, match="lacks AMX-INT8"):
            torch.ops.gptforge_qgemv.set_gemm("amx")
    with pytest.raises(RuntimeError, match="unknown many-row path"):
        torch.ops.gptforge_qgemv.set_gemm("gpu")
    before = native.ops.gemm_path()
    with native.ops.forced_gemm_path("packed"):
        assert native.ops.gemm_label() == f"packed-{native.ops.quant_path()}"
    assert native.ops.gemm_path() == before


@pytest.mark.parametrize("n,k,group", [(384, 256, 32), (37, 128, 64), (13, 256, 128), (3, 64, 32), (7, 96, 32),
                                       (5, 768, 32), (6, 384, 128), (9, 512, 256), (4, 192, 96)])
def test_int4_dynamic_matches_quantized_activations_reference(quant_path, threads, n, k, group):
    torch.manual_seed(n + k + group)
    q, s, lo = int4_codes(torch.randn(n, k) + 0.3, group)
    b = torch.randn(n)
    w = dequantize(q, s, lo).double()
    lo_k = lo.double().repeat_interleave(group, dim=1)
    packed = native.ops.int4_pack(q, s, lo)
    for m in (1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 40):  # 17 and 40: a prefill, the same kernels
        x = torch.randn(m, k)
        x[0, :group] *= 100  # one group far larger than the others: its own activation scale
        y = native.ops.linear_int4_dynamic(x, packed, n, b)
        xq = quantize_activations(x, group).double()
        _assert_within_summation_bound(y, xq @ w.t() + b.double(), xq.abs() @ (w.abs() + 2 * lo_k.abs()).t() + b.abs().double(),
                                       k // group)


def test_int4_tiles_hold_the_same_bytes_and_a_mismatch_is_refused():
    q, s, lo = int4_codes(torch.randn(20, 64), 32)
    packed = native.ops.int4_pack(q, s, lo)
    assert packed.shape == (2, 2, 64 + 8 * 32) and packed.dtype == torch.uint8
    q32, s32, lo32 = int4_codes(torch.randn(32, 64), 32)  # no padding rows: exactly the checkpoint's bytes
    assert native.ops.int4_pack(q32, s32, lo32).numel() == q32.numel() + 2 * (s32.numel() + lo32.numel())
    with pytest.raises(RuntimeError, match="int4_pack"):
        native.ops.linear_int4_dynamic(torch.randn(1, 64), packed, 40)


def test_dynamic_activation_codes_are_the_reference_codes():
    """Round half to even at exact halves, the clamp, a zero row and a bf16 input: the kernels quantize exactly as
    quantize_activations does (a one-hot weight reads single codes back)."""
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, 63.5, -127.0], [0.0] * 8])
    q, s = torch.eye(8, dtype=torch.int8), torch.ones(8)
    y = native.ops.linear_int8_dynamic(x, q, s, native.ops.int8_row_sums(q))
    assert torch.equal(y, quantize_activations(x))
    assert torch.equal(y[0], torch.tensor([127.0, 0.0, 2.0, 2.0, -0.0, -2.0, 64.0, -127.0]))
    yb = native.ops.linear_int8_dynamic(x.bfloat16(), q, s, native.ops.int8_row_sums(q))
    assert yb.dtype == torch.bfloat16


def test_quant_paths_are_chosen_from_the_cpu_and_a_missing_one_is_refused():
    paths = native.ops.quant_paths()
    assert paths[-1] == "scalar" and native.ops.quant_path() == paths[0]
    flags = native.build.cpu_flags().split()
    assert ("avx512vnni" in paths) == all(f in flags for f in ("avx512f", "avx512bw", "avx512vl", "avx512_vnni"))
    assert ("avx2" in paths) == ("avx2" in flags)
    missing = [p for p in QUANT_PATHS if p not in paths]
    if missing:
        with pytest.raises(RuntimeError, match="lacks the instructions"):
            torch.ops.gptforge_qgemv.set_isa(missing[0])
    with pytest.raises(RuntimeError, match="unknown path"):
        torch.ops.gptforge_qgemv.set_isa("avx9000")
    assert native.ops.quant_path() == paths[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_op_matches_f_linear_for_any_rows(threads, dtype):
    """The one-call op: kernels up to MAX_ROWS rows, PyTorch's GEMM beyond, leading dims and x's dtype kept; bf16
    inputs with bf16 weights take the AVX512-BF16 dot-product path where the CPU has it."""
    torch.manual_seed(7)
    w, b = torch.randn(200, 96).to(dtype), torch.randn(200).to(dtype)
    for rows in range(1, native.MAX_ROWS + 2):
        x = torch.randn(1, rows, 96).to(dtype)
        y = native.linear(x, w, b)
        assert y.shape == (1, rows, 200) and y.dtype == dtype
        ref = x.float() @ w.float().t() + b.float()
        tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: one rounding of the result
        torch.testing.assert_close(y.float(), ref, rtol=tol, atol=tol * 10)


def test_decode_linear_is_the_same_linear(threads):
    torch.manual_seed(3)
    lin = torch.nn.Linear(64, 48)
    dl = native.DecodeLinear.of(lin)
    assert isinstance(dl, torch.nn.Linear) and not dl.weight.requires_grad
    for rows in (1, 3, 40):
        x = torch.randn(rows, 64)
        torch.testing.assert_close(dl(x), lin(x), rtol=1e-5, atol=1e-5)


def _eager_attention(q, k, v, kc, vc, slots, mask):
    """What KVCache does without the op: write the new keys and values, then SDPA over the first E slots."""
    if slots.dim() == 1:
        kc.index_copy_(2, slots, k)
        vc.index_copy_(2, slots, v)
    else:
        at = slots[:, None, :, None].expand_as(k)
        kc.scatter_(2, at, k)
        vc.scatter_(2, at, v)
    E = mask.shape[-1]
    return F.scaled_dot_product_attention(q, kc[:, :, :E], vc[:, :, :E], attn_mask=mask,
                                          enable_gqa=q.shape[1] != k.shape[1])


def _assert_attention_is_the_eager_one(q, k, v, kc, vc, slots, mask):
    """The op's cache writes equal _eager_attention's exactly and its output within fp32 (bf16) rounding."""
    kc2, vc2 = kc.clone(), vc.clone()
    ours = torch.ops.gptforge_attn.decode_attention(q, k, v, kc, vc, slots, mask)
    ref = _eager_attention(q, k, v, kc2, vc2, slots, mask)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)
    tol = 1e-5 if q.dtype == torch.float32 else 1e-2
    torch.testing.assert_close(ours.float(), ref.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 4, 64), (8, 2, 32), (2, 1, 24)])
@pytest.mark.parametrize("per_row", [False, True], ids=["shared-slot", "per-row-slots"])
def test_decode_attention_matches_cache_write_and_sdpa(threads, dtype, heads, kv_heads, head_dim, per_row):
    """The decode step's attention op equals index_copy_/scatter_ + SDPA: the same cache contents and outputs,
    with grouped-query heads, masked (padding) slots, a head size off the vector width, and q/k/v as the model
    passes them (transposed views)."""
    torch.manual_seed(heads * head_dim)
    B, S, E = 3, 40, 23
    qkv = torch.randn(B, 1, (heads + 2 * kv_heads) * head_dim).to(dtype)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q = q.view(B, 1, heads, head_dim).transpose(1, 2)  # (B, H, 1, Hd), strided like the model's
    k = k.view(B, 1, kv_heads, head_dim).transpose(1, 2)
    v = v.view(B, 1, kv_heads, head_dim).transpose(1, 2)
    kc, vc = torch.randn(B, kv_heads, S, head_dim).to(dtype), torch.randn(B, kv_heads, S, head_dim).to(dtype)
    slots = torch.tensor([[E - 1], [E - 3], [E - 1]]) if per_row else torch.tensor([E - 1])
    allowed = torch.rand(B, 1, 1, E) > 0.3
    allowed[torch.arange(B), 0, 0, slots.view(-1).expand(B)] = True  # a query always sees its own slot
    mask = torch.where(allowed, torch.zeros((), dtype=dtype), float("-inf"))
    _assert_attention_is_the_eager_one(q, k, v, kc, vc, slots, mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_row", [False, True], ids=["shared-slots", "per-row-slots"])
def test_prompt_attention_matches_cache_write_and_sdpa(threads, dtype, per_row):
    """A short prompt's attention (T queries a row, native.ops.PROMPT_TOKENS): the same op over a causal mask with
    left padding equals index_copy_/scatter_ + SDPA, grouped-query heads included."""
    torch.manual_seed(3)
    B, T, H, Kh, Hd, S = 2, 7, 8, 2, 32, 16
    q = torch.randn(B, T, H, Hd).to(dtype).transpose(1, 2)  # (B, H, T, Hd), strided as the model's
    k, v = (torch.randn(B, T, Kh, Hd).to(dtype).transpose(1, 2) for _ in range(2))
    kc, vc = torch.zeros(B, Kh, S, Hd).to(dtype), torch.zeros(B, Kh, S, Hd).to(dtype)
    slots = torch.arange(T).repeat(B, 1) if per_row else torch.arange(T)
    real = torch.ones(B, T, dtype=torch.bool)
    real[1, :3] = False  # row 1 left-padded by 3: its real tokens see only each other
    allowed = torch.ones(T, T).tril().bool()[None] & real[:, None, :]
    allowed |= torch.eye(T, dtype=torch.bool)[None]  # a query always sees its own slot
    mask = torch.where(allowed[:, None], torch.zeros((), dtype=dtype), float("-inf"))  # (B, 1, T, T)
    _assert_attention_is_the_eager_one(q, k, v, kc, vc, slots, mask)


def test_decode_attention_refuses_bad_shapes():
    q, kv = torch.randn(1, 3, 1, 16), torch.randn(1, 2, 1, 16)
    cache, mask = torch.randn(1, 2, 8, 16), torch.zeros(1, 1, 1, 4)
    with pytest.raises(RuntimeError, match="not a multiple"):
        torch.ops.gptforge_attn.decode_attention(q, kv, kv, cache, cache.clone(), torch.tensor([3]), mask)
    q = torch.randn(1, 4, 1, 16)
    with pytest.raises(RuntimeError, match="slots"):
        torch.ops.gptforge_attn.decode_attention(q, kv, kv, cache, cache.clone(), torch.tensor([3.0]), mask)
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.gptforge_attn.decode_attention(q, kv, kv, cache, cache.clone(), torch.tensor([3]), mask.double())
    with pytest.raises(RuntimeError, match="outside the cache"):
        torch.ops.gptforge_attn.decode_attention(q, kv, kv, cache, cache.clone(), torch.tensor([8]), mask)


def test_bad_arguments_are_refused_with_the_reason():
    w = torch.randn(8, 32)
    with pytest.raises(RuntimeError, match="1 to 16 rows"):
        torch.ops.gptforge_gemv.gemv(torch.randn(17, 32), w)
    with pytest.raises(RuntimeError, match="columns"):
        torch.ops.gptforge_gemv.gemv(torch.randn(1, 31), w)
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.gptforge_gemv.gemv(torch.randn(1, 32), w.double())


def test_decode_tied_head_routes_few_rows_and_the_table_stays_a_plain_tensor():
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, n_head=2, d_model=48, vocab_size=64, block_size=16)).eval()
    w = model.tok_emb.weight.detach().clone()
    native.decode_layout(model)
    assert type(model.lm_head) is native.DecodeTiedHead and model.lm_head.table is model.tok_emb
    for rows in (1, native.MAX_ROWS, native.MAX_ROWS + 1):  # the last one goes to PyTorch's GEMM
        x = torch.randn(rows, 48)
        y = model.lm_head(x)
        assert type(y) is torch.Tensor
        torch.testing.assert_close(y, F.linear(x, w), rtol=1e-5, atol=1e-5)
    emb = model.tok_emb(torch.tensor([3, 5]))  # the tied token table is also looked up
    assert type(emb) is torch.Tensor and torch.equal(emb, w[[3, 5]])
    assert type(model.tok_emb.weight) is torch.nn.Parameter and not model.tok_emb.weight.requires_grad


def _run(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120)


def test_without_a_compiler_decoding_falls_back_with_one_warning(tmp_path):
    """A failed build is a warning, not an error: available() is False and decode_layout keeps PyTorch's path."""
    code = ("import warnings, torch\n"
            "from gptforge import native\n"
            "from gptforge.native import decode_layout\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    ok = native.available(); native.available()\n"
            "lin = torch.nn.Linear(8, 4)\n"
            "decode_layout(torch.nn.Sequential(lin))\n"
            "print(ok, len(w), type(lin.weight).__name__, str(w[0].message)[:90] if w else '')\n")
    out = _run(code, XDG_CACHE_HOME=str(tmp_path), CXX="/bin/false")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[:3] == ["False", "1", "Parameter"], out.stdout
    assert "could not be built" in out.stdout
    out = _run(code, GPTFORGE_NATIVE_KERNELS="0")
    assert out.stdout.split()[:3] == ["False", "0", "Parameter"], out.stdout


# --- DecodeBlock: a block's decode step as one op (csrc/step.cpp) -----------------------------------------------
BLOCK_VARIANTS = {
    # GPT-2: LayerNorm with biases, GELU, learned positions
    "gpt2": dict(n_layer=2, n_head=4, d_model=64, vocab_size=300, block_size=48),
    # Llama / the demo: RMSNorm, SwiGLU, rotary, grouped-query attention, no biases
    "llama": dict(n_layer=2, n_head=4, n_kv_head=2, d_model=64, vocab_size=300, block_size=48,
                  pos_encoding="rotary", norm="rmsnorm", mlp="swiglu", bias=False),
    # modded-nanogpt's: ReLU², QK-norm, value embeddings, LayerNorm without biases
    "speedrun": dict(n_layer=2, n_head=2, n_kv_head=1, d_model=64, vocab_size=300, block_size=48,
                     pos_encoding="rotary", mlp="relu2", qk_norm=True, value_embeds=1, bias=False),
}


def _decode_logits(model, prompts: list[list[int]], steps: int, per_row: bool):
    """Logits of `steps` greedy decode steps after a left-padded prefill, and the caches' final contents; per_row
    writes each step at slots (B, 1) as BatchEngine does, else at the shared slot (1,)."""
    from gptforge.generate import KVCache

    B, T = len(prompts), max(map(len, prompts))
    idx = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
    real = torch.tensor([[i >= T - len(p) for i in range(T)] for p in prompts])
    pos = (torch.arange(T)[None] - (T - real.sum(1))[:, None]).clamp(min=0)
    cache = KVCache(model.config, B, T + steps, device=torch.device("cpu"), dtype=next(model.parameters()).dtype,
                    static=False)
    cache.prepare(torch.arange(T), real, end=T)
    logits, out = model(idx, pos, cache)[:, -1], []
    for n in range(steps):
        ids, slot = logits.argmax(-1)[:, None], torch.tensor([T + n])
        if per_row:
            cache.prepare(slot.repeat(B)[:, None], None, T + n + 1)
        else:
            cache.prepare(slot, None, T + n + 1)
        logits = model(ids, pos[:, -1:] + 1 + n, cache)[:, -1]
        out.append(logits)
    return torch.stack(out), [t.clone() for kv in cache.layers for t in (kv.k, kv.v)]


@pytest.mark.parametrize("variant", BLOCK_VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_decode_block_step_is_the_block_bit_for_bit(threads, variant, dtype, monkeypatch):
    """The op issues Block.forward's own ATen ops (and both attend through csrc/attention.cpp), so its prompt and
    decode steps (logits and cache writes) equal the Python block's exactly, for every variant, with left padding,
    for shared and per-row slots; and it is what runs."""
    torch.manual_seed(0)
    model = native.decode_layout(GPT(ModelConfig(**BLOCK_VARIANTS[variant])).eval().to(dtype))
    assert all(type(b) is native.DecodeBlock for b in model.blocks)
    prompts = [[5, 6, 7, 8, 9], [10, 11]]
    calls = []
    real_attn = CausalSelfAttention.forward
    monkeypatch.setattr(CausalSelfAttention, "forward",
                        lambda self, x, *a: calls.append(x.shape) or real_attn(self, x, *a))
    with torch.no_grad():
        for per_row in (False, True):
            calls.clear()
            fused, fused_cache = _decode_logits(model, prompts, 4, per_row)
            assert calls == []  # the prompt (5 <= PROMPT_TOKENS tokens) and every step ran the op
            with monkeypatch.context() as m:
                m.setattr(native.DecodeBlock, "forward", Block.forward)
                plain, plain_cache = _decode_logits(model, prompts, 4, per_row)
            assert torch.equal(fused, plain)
            assert all(torch.equal(a, b) for a, b in zip(fused_cache, plain_cache))


def test_a_prompt_longer_than_prompt_tokens_keeps_the_python_block_and_sdpa(monkeypatch):
    """Past native.ops.PROMPT_TOKENS a prompt runs Block.forward (SDPA: faster there than the op's per-query
    attention), and its decode steps still run the op; at the limit the prompt runs the op."""
    torch.manual_seed(0)
    model = native.decode_layout(GPT(ModelConfig(**BLOCK_VARIANTS["llama"])).eval())
    calls, real_attn = [], CausalSelfAttention.forward
    monkeypatch.setattr(CausalSelfAttention, "forward", lambda self, x, *a: calls.append(x.shape[1]) or real_attn(self, x, *a))
    monkeypatch.setattr(native.ops, "PROMPT_TOKENS", 4)
    with torch.no_grad():
        _decode_logits(model, [[5, 6, 7, 8, 9]], 2, False)
        assert calls == [5] * len(model.blocks)  # the prompt only
        calls.clear()
        _decode_logits(model, [[5, 6, 7, 8]], 2, False)
        assert calls == []


def test_decode_block_is_swapped_only_where_the_op_can_run_it():
    """Quantized Linears on a kernel the op lacks (and any other kind) keep the Python block; state dict keys never
    change. (Quantized blocks on the native kernels run the op: tests/test_decode_block.py.)"""
    from gptforge.compress.quantize import QuantLinear, quantize_model

    torch.manual_seed(0)
    model = GPT(ModelConfig(**BLOCK_VARIANTS["llama"])).eval()
    keys = list(model.state_dict())
    assert list(native.decode_layout(model).state_dict()) == keys
    assert all(type(b) is native.DecodeBlock for b in model.blocks)
    quantized = quantize_model(GPT(ModelConfig(**BLOCK_VARIANTS["llama"])).eval(), "int8")[0]
    for m in quantized.modules():
        if isinstance(m, QuantLinear):
            m.kernel = "dequant"
    assert all(type(b) is Block for b in native.decode_layout(quantized).blocks)
    mixed = GPT(ModelConfig(**BLOCK_VARIANTS["speedrun"])).eval()
    mixed.blocks[0].attn.q_norm.eps = 1e-3  # a QK-norm whose eps differs from the block's norms: one eps per op
    native.decode_layout(mixed)
    assert [type(b) for b in mixed.blocks] == [Block, native.DecodeBlock]


@pytest.mark.skipif("OpenMP" not in torch.__config__.parallel_info().split("parallel backend:")[-1],
                    reason="torch's parallel backend here is not OpenMP")
def test_the_library_is_built_with_openmp():
    """at::parallel_for is a header template: a library built without -fopenmp runs its loops on one thread
    whatever torch.set_num_threads says (the kernels did until 2026-12; docs/BENCHMARKS.md has the cost)."""
    if shutil.which("readelf") is None:
        pytest.skip("readelf is not available here")
    out = subprocess.run(["readelf", "-d", str(native.library_path())], capture_output=True, text=True, check=True)
    assert "libgomp" in out.stdout


def test_block_op_schema_is_named_and_the_same_on_both_sides():
    """The block op's inputs are named once per side (schema.py's dataclasses, csrc/step.cpp's enums): the names
    agree, in order, and a DecodeBlock's fields are its block's own tensors."""
    import dataclasses

    assert [f.name for f in dataclasses.fields(native.BlockParams)] == list(torch.ops.gptforge_decode.param_fields())
    assert [f.name for f in dataclasses.fields(native.BlockLayout)] == list(torch.ops.gptforge_decode.layout_fields())
    model = native.decode_layout(GPT(ModelConfig(**BLOCK_VARIANTS["speedrun"])).eval())
    block = model.blocks[0]
    assert type(block) is native.DecodeBlock
    p, layout = block.params, block.layout
    assert p.qkv_weight is block.attn.qkv.weight and p.value_gate is block.attn.value_gate
    assert p.q_norm_weight is block.attn.q_norm.weight and p.gate_weight is None and p.norm1_bias is None
    assert (layout.n_head, layout.n_kv_head, layout.head_dim, layout.norm, layout.mlp) == (2, 1, 32, 0, 2)
