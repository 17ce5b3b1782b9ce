"""The few-row CPU kernels (gemv.py / csrc/gemv.cpp) against PyTorch's matmul on the same weights."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from gptforge import gemv
from gptforge.compress.quantize import dequantize, int4_codes, int8_codes

pytestmark = pytest.mark.skipif(not gemv.available(), reason="the native kernels could not be built here")

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
        torch.testing.assert_close(gemv.linear(x, w, b), expected, rtol=1e-5, atol=_tol(k))


@pytest.mark.parametrize("n,k", SHAPES)
def test_int8_matches_dequantized_matmul(threads, n, k):
    torch.manual_seed(n + k)
    q, s = int8_codes(torch.randn(n, k))
    for m in (1, 5, 16):
        x = torch.randn(1, m, k)  # leading dims are kept
        y = gemv.linear_int8(x, q, s)
        assert y.shape == (1, m, n)
        torch.testing.assert_close(y, x @ dequantize(q, s, None).t(), rtol=1e-5, atol=_tol(k))


@pytest.mark.parametrize("n,k,group", [(384, 256, 32), (37, 128, 64), (13, 256, 128), (3, 64, 32)])
def test_int4_matches_dequantized_matmul(threads, n, k, group):
    torch.manual_seed(n + k + group)
    q, s, lo = int4_codes(torch.randn(n, k), group)
    for m in (1, 4, 7, 16):
        x = torch.randn(m, k)
        torch.testing.assert_close(gemv.linear_int4(x, q, s, lo), x @ dequantize(q, s, lo).t(), rtol=1e-5, atol=_tol(k))


def test_bad_arguments_are_refused_with_the_reason():
    w = torch.randn(8, 32)
    with pytest.raises(RuntimeError, match="1 to 16 rows"):
        torch.ops.gptforge_gemv.gemv(torch.randn(17, 32), w)
    with pytest.raises(RuntimeError, match="columns"):
        torch.ops.gptforge_gemv.gemv(torch.randn(1, 31), w)
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.gptforge_gemv.gemv(torch.randn(1, 32), w.double())


def test_decode_weight_routes_few_rows_and_stays_a_plain_tensor_elsewhere():
    torch.manual_seed(0)
    w = torch.randn(64, 48)
    dw = gemv.DecodeWeight.wrap(w)
    for rows in (1, gemv.MAX_ROWS, gemv.MAX_ROWS + 1):  # the last one goes to PyTorch's GEMM
        x = torch.randn(rows, 48)
        y = F.linear(x, dw)
        assert type(y) is torch.Tensor
        torch.testing.assert_close(y, F.linear(x, w), rtol=1e-5, atol=1e-5)
    emb = F.embedding(torch.tensor([3, 5]), dw)  # the tied token table is also looked up
    assert type(emb) is torch.Tensor and torch.equal(emb, w[[3, 5]])
    assert not dw.requires_grad


def _run(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120)


def test_without_a_compiler_decoding_falls_back_with_one_warning(tmp_path):
    """A failed build is a warning, not an error: available() is False and decode_layout keeps PyTorch's path."""
    code = ("import warnings, torch\n"
            "from gptforge import gemv\n"
            "from gptforge.generate import decode_layout\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    ok = gemv.available(); gemv.available()\n"
            "lin = torch.nn.Linear(8, 4)\n"
            "decode_layout(torch.nn.Sequential(lin))\n"
            "print(ok, len(w), type(lin.weight).__name__, str(w[0].message)[:90] if w else '')\n")
    out = _run(code, XDG_CACHE_HOME=str(tmp_path), CXX="/bin/false")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[:3] == ["False", "1", "Parameter"], out.stdout
    assert "could not be built" in out.stdout
    out = _run(code, GPTFORGE_NATIVE_KERNELS="0")
    assert out.stdout.split()[:3] == ["False", "0", "Parameter"], out.stdout
