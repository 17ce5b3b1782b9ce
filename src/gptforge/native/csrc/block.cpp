// One transformer block of a CPU decode step as one op: the same ATen calls as model.Block's forward (so the same
// results, bit for bit), with the matmuls on the few-row kernels (gemv.cpp) and the attention on attention.cpp.
//
// Why: a decode step of a small model is bound by the cost of issuing ops, not by arithmetic or memory. The demo
// model's Python block issues ~20 ops per layer, each paying Python's and the dispatcher's fixed cost (~5-10 us at
// one thread against ~40 us of matmul per layer); issued from C++, the same ops cost about 1 us each.
//
// The parameter schema is named, and written in two places that are checked against each other: `Param` below
// (the order of the `params` list) and gptforge/native/schema.py's BlockParams (the fields, in the same order),
// which builds the list. `param_fields()` and `layout_fields()` return the names here; schema.py compares them with
// its own when the library is loaded, so a change on one side only is an error, not a silent misreading.
// A parameter a variant does not have is None.
//
// LoRA adapters served per row (finetune/lora.py's MultiLoRALinear): such a Linear hands the op its fused weight
// (W with every adapter's A stacked under it, (out + n R, in)) and its `lora_bt` (every adapter's B^T, pre-scaled,
// (n R, out)); the op's `lora_mask` (B, 1, n R) or (1, 1, n R) holds each row's adapter as a block of ones (None:
// every row is the base's, whose result is then the base's own, bit for bit).
//
// Quantized Linears (compress/quantize.py's QuantLinear): a Linear's `kind` in the layout says which product
// compress.quantize would run for it, and its weight / scale / aux parameters are that product's tensors:
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
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/layer_norm.h>
#include <ATen/ops/relu.h>
#include <ATen/ops/rms_norm.h>
#include <ATen/ops/silu.h>
#include <ATen/ops/square.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <iterator>
#include <optional>
#include <string>
#include <vector>

#include "kernels.h"

namespace {

using Params = c10::List<std::optional<at::Tensor>>;

// The params list, in order (schema.py's BlockParams).
enum Param : int64_t {
  kNorm1Weight, kNorm1Bias, kQkvWeight, kQkvBias, kProjWeight, kProjBias, kQNormWeight, kKNormWeight, kValueGate,
  kNorm2Weight, kNorm2Bias, kUpWeight, kUpBias, kDownWeight, kDownBias, kGateWeight, kGateBias,
  kQkvLora, kProjLora, kUpLora, kDownLora, kGateLora, kQkvScale, kQkvAux, kProjScale, kProjAux, kUpScale, kUpAux,
  kDownScale, kDownAux, kGateScale, kGateAux, kParams
};
const char* const kParamFields[kParams] = {
    "norm1_weight", "norm1_bias", "qkv_weight", "qkv_bias", "proj_weight", "proj_bias", "q_norm_weight",
    "k_norm_weight", "value_gate", "norm2_weight", "norm2_bias", "up_weight", "up_bias", "down_weight", "down_bias",
    "gate_weight", "gate_bias", "qkv_lora", "proj_lora", "up_lora", "down_lora", "gate_lora", "qkv_scale", "qkv_aux",
    "proj_scale", "proj_aux", "up_scale", "up_aux", "down_scale", "down_aux", "gate_scale", "gate_aux"};

// The layout list, in order (schema.py's BlockLayout): norm 0 LayerNorm, 1 RMSNorm; mlp 0 GELU, 1 SwiGLU, 2 ReLU²;
// hidden the MLP's width; each Linear's kind (above).
enum Layout : int64_t { kNHead, kNKvHead, kHeadDim, kNorm, kMlp, kHidden, kQkvKind, kProjKind, kUpKind, kDownKind,
                        kGateKind, kLayout };
const char* const kLayoutFields[kLayout] = {"n_head", "n_kv_head", "head_dim", "norm", "mlp", "hidden", "qkv_kind",
                                            "proj_kind", "up_kind", "down_kind", "gate_kind"};

// One Linear's entries in the params and layout lists.
struct Lin {
  Param w, b, lora, scale, aux;
  Layout kind;
};
constexpr Lin kQkv{kQkvWeight, kQkvBias, kQkvLora, kQkvScale, kQkvAux, kQkvKind};
constexpr Lin kProj{kProjWeight, kProjBias, kProjLora, kProjScale, kProjAux, kProjKind};
constexpr Lin kUp{kUpWeight, kUpBias, kUpLora, kUpScale, kUpAux, kUpKind};
constexpr Lin kDown{kDownWeight, kDownBias, kDownLora, kDownScale, kDownAux, kDownKind};
constexpr Lin kGate{kGateWeight, kGateBias, kGateLora, kGateScale, kGateAux, kGateKind};
enum Kind : int64_t { kFloat, kInt8Dynamic, kInt4Dynamic, kInt8WeightOnly, kInt4WeightOnly };

std::vector<std::string> param_fields() { return {std::begin(kParamFields), std::end(kParamFields)}; }
std::vector<std::string> layout_fields() { return {std::begin(kLayoutFields), std::end(kLayoutFields)}; }

std::optional<at::Tensor> opt(const Params& p, Param i) { return p.get(i); }

at::Tensor req(const Params& p, Param i) {
  std::optional<at::Tensor> t = p.get(i);
  TORCH_CHECK(t.has_value(), "decode block: parameter ", kParamFields[i], " is required");
  return *t;
}

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

namespace {

struct Block {
  int64_t H, Kh, Hd, norm, mlp;
  double eps;
  const Params& p;
  at::IntArrayRef layout;
  const std::optional<at::Tensor>& lora_mask;

  // x W^T + b through the product of the Linear's kind (n its output width), plus the rows' LoRA updates where
  // the Linear holds adapters.
  at::Tensor linear(const at::Tensor& x, const Lin& l, int64_t n) const {
    return gptforge::block_linear(x, layout[l.kind], req(p, l.w), opt(p, l.b), opt(p, l.scale), opt(p, l.aux), n,
                                  opt(p, l.lora), lora_mask);
  }

  at::Tensor normed(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b) const {
    const int64_t D = x.size(-1);
    if (norm == 0) return at::layer_norm(x, {D}, w, b, eps);
    return at::rms_norm(x, {D}, w, eps);
  }

  // model.apply_rotary: (x * cos + rotate_half(x) * sin) in fp32, back to x's dtype.
  static at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
    std::vector<at::Tensor> half = x.chunk(2, -1);
    at::Tensor rotated = at::cat({-half[1], half[0]}, -1);
    return (x.to(at::kFloat) * cos + rotated.to(at::kFloat) * sin).to(x.scalar_type());
  }
};

at::Tensor decode_block(const at::Tensor& x, const Params& p, at::IntArrayRef layout, double eps, const at::Tensor& kc,
                        const at::Tensor& vc, const at::Tensor& slots, const at::Tensor& mask,
                        const std::optional<at::Tensor>& cos, const std::optional<at::Tensor>& sin,
                        const std::optional<at::Tensor>& ve, const std::optional<at::Tensor>& lora_mask) {
  TORCH_CHECK(p.size() == kParams, "decode block: expected ", kParams, " parameters, got ", p.size());
  TORCH_CHECK(layout.size() == kLayout, "decode block: layout must have ", kLayout, " entries (schema.py's BlockLayout)");
  TORCH_CHECK(x.dim() == 3, "decode block: x must be (B, T, D)");
  TORCH_CHECK(cos.has_value() == sin.has_value(), "decode block: rotary cos and sin come together");
  // The op is for inference on frozen weights (native.DecodeBlock calls it for an eval-mode decode step), so the ops it
  // issues skip the dispatcher's autograd and view-tracking layers: ~9 us less a block at one thread.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Block blk{layout[kNHead], layout[kNKvHead], layout[kHeadDim], layout[kNorm], layout[kMlp], eps, p, layout,
                  lora_mask};
  const int64_t B = x.size(0), T = x.size(1), H = blk.H, Kh = blk.Kh, Hd = blk.Hd;

  // Attention: x + proj(attend(rotary(norm(q)), rotary(norm(k)), v)).
  at::Tensor h = blk.normed(x, req(p, kNorm1Weight), opt(p, kNorm1Bias));
  at::Tensor fused = blk.linear(h, kQkv, (H + 2 * Kh) * Hd);  // (B, T, (H + 2K) * Hd)
  std::vector<at::Tensor> qkv = fused.split_with_sizes({H * Hd, Kh * Hd, Kh * Hd}, -1);
  at::Tensor q = qkv[0], k = qkv[1], v = qkv[2];
  if (ve.has_value()) v = v + req(p, kValueGate) * *ve;  // (B, T, K*Hd)
  q = q.view({B, T, H, Hd});
  k = k.view({B, T, Kh, Hd});
  if (auto w = opt(p, kQNormWeight)) q = at::rms_norm(q, {Hd}, *w, eps);
  if (auto w = opt(p, kKNormWeight)) k = at::rms_norm(k, {Hd}, *w, eps);
  q = q.transpose(1, 2);  // (B, H, T, Hd)
  k = k.transpose(1, 2);  // (B, K, T, Hd)
  v = v.view({B, T, Kh, Hd}).transpose(1, 2);
  if (cos.has_value()) {
    q = Block::rotary(q, *cos, *sin);
    k = Block::rotary(k, *cos, *sin);
  }
  at::Tensor y = gptforge::decode_attention(q, k, v, kc, vc, slots, mask);  // (B, H, T, Hd)
  y = y.transpose(1, 2).reshape({B, T, H * Hd});
  at::Tensor out = x + blk.linear(y, kProj, x.size(-1));

  // MLP: out + down(act(up(norm(out)))).
  h = blk.normed(out, req(p, kNorm2Weight), opt(p, kNorm2Bias));
  at::Tensor a;
  if (blk.mlp == 0) {
    a = at::gelu(blk.linear(h, kUp, layout[kHidden]), "tanh");
  } else if (blk.mlp == 1) {
    a = at::silu(blk.linear(h, kGate, layout[kHidden])) * blk.linear(h, kUp, layout[kHidden]);
  } else {
    a = at::square(at::relu(blk.linear(h, kUp, layout[kHidden])));
  }
  return out + blk.linear(a, kDown, x.size(-1));
}

}  // namespace

TORCH_LIBRARY(gptforge_decode, m) {
  m.def("block(Tensor x, Tensor?[] params, int[] layout, float eps, Tensor(a!) k_cache, Tensor(b!) v_cache, "
        "Tensor slots, Tensor mask, Tensor? cos, Tensor? sin, Tensor? ve, Tensor? lora_mask=None) -> Tensor");
  m.def("param_fields() -> str[]", &param_fields);
  m.def("layout_fields() -> str[]", &layout_fields);
}

TORCH_LIBRARY_IMPL(gptforge_decode, CPU, m) { m.impl("block", &decode_block); }
