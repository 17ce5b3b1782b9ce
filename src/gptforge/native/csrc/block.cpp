// One Linear of a block as the decode ops multiply it (gptforge::block_linear, kernels.h): its product by its kind,
// plus the rows' LoRA updates where it serves adapters per row. The block op and the whole-step op (step.cpp: one
// layer's math, written once, which the block op runs on one layer) call it for every Linear.
//
// LoRA adapters served per row (finetune/lora.py's MultiLoRALinear): such a Linear hands the op its fused weight
// (W with every adapter's A stacked under it, (out + n R, in)) and its `lora_bt` (every adapter's B^T, pre-scaled,
// (n R, out)); the op's `lora_mask` (B, 1, n R) or (1, 1, n R) holds each row's adapter as a block of ones (None:
// every row is the base's, whose result is then the base's own, bit for bit).
//
// Quantized Linears (compress/quantize.py's QuantLinear): a Linear's `kind` (native/schema.py's LINEAR_KIND) says
// which product compress.quantize would run for it, and its weight / scale / aux parameters are that product's tensors:
//   0 float              weight (N, K), the few-row kernels (gemv.cpp's linear)
//   1 int8, dynamic      codes int8 (N, K), scale fp32 (N,), aux the codes' int32 row sums: qgemv.cpp int8_linear
//   2 int4, dynamic      codes in int4_pack's tiles, N from the layout: qgemv.cpp int4_linear
//   3 int8, weight-only  codes, scale fp32 (N,): gemv.cpp gemv_int8
//   4 int4, weight-only  packed codes (N, K/2), scale and aux (the minima) fp16 (N, groups): gemv.cpp gemv_int4
// Those kernels are torch ops of the same library, called through the dispatcher (one handle each, looked up
// once: ~0.3 us a call) rather than declared in kernels.h, so their sources can change without this one.

#include <ATen/TensorOperators.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "kernels.h"

namespace {

enum Kind : int64_t { kFloat, kInt8Dynamic, kInt4Dynamic, kInt8WeightOnly, kInt4WeightOnly };

// z = [x W^T + b | x A^T] of a Linear holding adapters (M rows, out + nR columns): its first `out` columns plus
// each row's low-rank update, ((x A^T) * mask) B^T, as MultiLoRALinear.forward computes it. In fp32 the update is
// a loop over the columns each row's mask keeps (R of its n R: one adapter's), fused with the copy out of z: the
// two ATen calls it replaces (a mask multiply and an addmm over all n R columns) cost more in fixed overhead than
// these ~B R out multiply-adds (8 x 8 x 1024 for an MLP's up at batch 8). Within fp32 rounding of that path
// (the order of the sum differs).
at::Tensor lora_update(const at::Tensor& z, const at::Tensor& bt, const at::Tensor& mask) {
  const int64_t nR = bt.size(0), out = bt.size(1);
  TORCH_CHECK(z.size(-1) == out + nR, "decode block: a LoRA Linear's fused product has ", z.size(-1),
              " columns, its lora_bt ", nR, " x ", out);
  const int64_t M = z.numel() / (out + nR), Mm = mask.numel() / std::max<int64_t>(nR, 1);
  TORCH_CHECK(mask.size(-1) == nR && (Mm == 1 || Mm == M), "decode block: lora_mask must be (B, 1, ", nR,
              ") or (1, 1, ", nR, ")");
  std::vector<int64_t> shape(z.sizes().begin(), z.sizes().end());
  shape.back() = out;
  if (z.scalar_type() != at::kFloat || bt.scalar_type() != at::kFloat || mask.scalar_type() != at::kFloat) {
    at::Tensor h = z.narrow(-1, out, nR) * mask;  // other dtypes: MultiLoRALinear.forward's own two ops
    return at::addmm(z.narrow(-1, 0, out).reshape({M, out}), h.reshape({M, nR}), bt).view(shape);
  }
  at::Tensor zc = z.contiguous(), btc = bt.contiguous(), mc = mask.contiguous();
  at::Tensor y = at::empty(shape, z.options());
  const float* zp = zc.data_ptr<float>();
  const float* bp = btc.data_ptr<float>();
  const float* mp = mc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  std::vector<float> acc(out);
  for (int64_t m = 0; m < M; ++m) {
    const float* zr = zp + m * (out + nR);
    const float* mr = mp + (Mm == 1 ? 0 : m) * nR;
    float* __restrict a = acc.data();
    std::fill(a, a + out, 0.0f);
    for (int64_t r = 0; r < nR; ++r) {
      if (mr[r] == 0.0f) continue;  // another adapter's column (or a base row): its product is +0
      const float c = zr[out + r] * mr[r];
      const float* __restrict br = bp + r * out;
      for (int64_t o = 0; o < out; ++o) a[o] += c * br[o];
    }
    float* __restrict yr = yp + m * out;
    for (int64_t o = 0; o < out; ++o) yr[o] = zr[o] + a[o];  // as addmm: the update summed first, then added
  }
  return y;
}

using Opt = std::optional<at::Tensor>;

// The quantized products, as compress.quantize's QuantizedMatrix.matmul calls them (ops.py's wrappers included).
at::Tensor int8_dynamic(const at::Tensor& x, const at::Tensor& q, const at::Tensor& s, const at::Tensor& sums, const Opt& b) {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("gptforge_qgemv::int8_linear", "")
      .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const Opt&)>();
  return op.call(x, q, s, sums, b);
}

at::Tensor int4_dynamic(const at::Tensor& x, const at::Tensor& packed, int64_t n, const Opt& b) {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("gptforge_qgemv::int4_linear", "")
      .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, const Opt&)>();
  return op.call(x, packed, n, b);
}

// Weight-only: ops.linear_int8 / linear_int4, fp32 rows in, the result back in x's dtype and shape.
at::Tensor weight_only(const at::Tensor& x, int64_t kind, const at::Tensor& q, const at::Tensor& s, const Opt& lo,
                       const Opt& b) {
  static const auto i8 = c10::Dispatcher::singleton().findSchemaOrThrow("gptforge_gemv::gemv_int8", "")
      .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const Opt&)>();
  static const auto i4 = c10::Dispatcher::singleton().findSchemaOrThrow("gptforge_gemv::gemv_int4", "")
      .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const Opt&)>();
  at::Tensor xf = x.reshape({-1, x.size(-1)}).to(at::kFloat).contiguous();
  Opt bf;
  if (b.has_value()) bf = b->to(at::kFloat).contiguous();
  TORCH_CHECK(kind == kInt8WeightOnly || lo.has_value(), "decode block: an int4 Linear needs its minima (aux)");
  at::Tensor y = kind == kInt8WeightOnly ? i8.call(xf, q, s, bf) : i4.call(xf, q, s, *lo, bf);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = y.size(1);
  return y.to(x.scalar_type()).view(shape);
}

}  // namespace

namespace gptforge {

at::Tensor block_linear(const at::Tensor& x, int64_t kind, const at::Tensor& w, const Opt& b, const Opt& scale,
                        const Opt& aux, int64_t n, const Opt& lora, const Opt& lora_mask) {
  auto need = [](const Opt& t, const char* what) {
    TORCH_CHECK(t.has_value(), "decode block: a quantized Linear needs its ", what);
    return *t;
  };
  at::Tensor z;
  switch (kind) {
    case kFloat: z = gptforge::linear(x, w, b); break;
    case kInt8Dynamic: z = int8_dynamic(x, w, need(scale, "scales"), need(aux, "row sums"), b); break;
    case kInt4Dynamic: z = int4_dynamic(x, w, n, b); break;
    case kInt8WeightOnly:
    case kInt4WeightOnly: z = weight_only(x, kind, w, need(scale, "scales"), aux, b); break;
    default: TORCH_CHECK(false, "decode block: unknown Linear kind ", kind);
  }
  if (!lora.has_value()) return z;
  if (!lora_mask.has_value()) return z.narrow(-1, 0, lora->size(1));  // base rows only: a view, as the split is
  return lora_update(z, *lora, *lora_mask);
}

}  // namespace gptforge
