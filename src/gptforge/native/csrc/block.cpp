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

#include <ATen/TensorOperators.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/layer_norm.h>
#include <ATen/ops/relu.h>
#include <ATen/ops/rms_norm.h>
#include <ATen/ops/silu.h>
#include <ATen/ops/square.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

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
  kNorm2Weight, kNorm2Bias, kUpWeight, kUpBias, kDownWeight, kDownBias, kGateWeight, kGateBias, kParams
};
const char* const kParamFields[kParams] = {
    "norm1_weight", "norm1_bias", "qkv_weight", "qkv_bias", "proj_weight", "proj_bias", "q_norm_weight",
    "k_norm_weight", "value_gate", "norm2_weight", "norm2_bias", "up_weight", "up_bias", "down_weight", "down_bias",
    "gate_weight", "gate_bias"};

// The layout list, in order (schema.py's BlockLayout): norm 0 LayerNorm, 1 RMSNorm; mlp 0 GELU, 1 SwiGLU, 2 ReLU².
enum Layout : int64_t { kNHead, kNKvHead, kHeadDim, kNorm, kMlp, kLayout };
const char* const kLayoutFields[kLayout] = {"n_head", "n_kv_head", "head_dim", "norm", "mlp"};

std::vector<std::string> param_fields() { return {std::begin(kParamFields), std::end(kParamFields)}; }
std::vector<std::string> layout_fields() { return {std::begin(kLayoutFields), std::end(kLayoutFields)}; }

std::optional<at::Tensor> opt(const Params& p, Param i) { return p.get(i); }

at::Tensor req(const Params& p, Param i) {
  std::optional<at::Tensor> t = p.get(i);
  TORCH_CHECK(t.has_value(), "decode block: parameter ", kParamFields[i], " is required");
  return *t;
}

struct Block {
  int64_t H, Kh, Hd, norm, mlp;
  double eps;

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
                        const std::optional<at::Tensor>& ve) {
  TORCH_CHECK(p.size() == kParams, "decode block: expected ", kParams, " parameters, got ", p.size());
  TORCH_CHECK(layout.size() == kLayout, "decode block: layout must be (n_head, n_kv_head, head_dim, norm, mlp)");
  TORCH_CHECK(x.dim() == 3, "decode block: x must be (B, T, D)");
  TORCH_CHECK(cos.has_value() == sin.has_value(), "decode block: rotary cos and sin come together");
  // The op is for inference on frozen weights (native.DecodeBlock calls it for an eval-mode decode step), so the ops it
  // issues skip the dispatcher's autograd and view-tracking layers: ~9 us less a block at one thread.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Block blk{layout[kNHead], layout[kNKvHead], layout[kHeadDim], layout[kNorm], layout[kMlp], eps};
  const int64_t B = x.size(0), T = x.size(1), H = blk.H, Kh = blk.Kh, Hd = blk.Hd;

  // Attention: x + proj(attend(rotary(norm(q)), rotary(norm(k)), v)).
  at::Tensor h = blk.normed(x, req(p, kNorm1Weight), opt(p, kNorm1Bias));
  at::Tensor fused = gptforge::linear(h, req(p, kQkvWeight), opt(p, kQkvBias));  // (B, T, (H + 2K) * Hd)
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
  at::Tensor out = x + gptforge::linear(y, req(p, kProjWeight), opt(p, kProjBias));

  // MLP: out + down(act(up(norm(out)))).
  h = blk.normed(out, req(p, kNorm2Weight), opt(p, kNorm2Bias));
  at::Tensor a;
  if (blk.mlp == 0) {
    a = at::gelu(gptforge::linear(h, req(p, kUpWeight), opt(p, kUpBias)), "tanh");
  } else if (blk.mlp == 1) {
    a = at::silu(gptforge::linear(h, req(p, kGateWeight), opt(p, kGateBias))) * gptforge::linear(h, req(p, kUpWeight), opt(p, kUpBias));
  } else {
    a = at::square(at::relu(gptforge::linear(h, req(p, kUpWeight), opt(p, kUpBias))));
  }
  return out + gptforge::linear(a, req(p, kDownWeight), opt(p, kDownBias));
}

}  // namespace

TORCH_LIBRARY(gptforge_decode, m) {
  m.def("block(Tensor x, Tensor?[] params, int[] layout, float eps, Tensor(a!) k_cache, Tensor(b!) v_cache, "
        "Tensor slots, Tensor mask, Tensor? cos, Tensor? sin, Tensor? ve) -> Tensor");
  m.def("param_fields() -> str[]", &param_fields);
  m.def("layout_fields() -> str[]", &layout_fields);
}

TORCH_LIBRARY_IMPL(gptforge_decode, CPU, m) { m.impl("block", &decode_block); }
