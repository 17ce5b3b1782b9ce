// One transformer block of a CPU decode step as one op: the same ATen calls as model.Block's forward (so the same
// results, bit for bit), with the matmuls on the few-row kernels (gemv.cpp) and the attention on attention.cpp.
//
// Why: a decode step of a small model is bound by the cost of issuing ops, not by arithmetic or memory. The demo
// model's Python block issues ~20 ops per layer, each paying Python's and the dispatcher's fixed cost (~5-10 us at
// one thread against ~40 us of matmul per layer); issued from C++, the same ops cost about 1 us each.
//
// Parameters come as one list in a fixed order (see gptforge.gemv.DecodeBlock, which builds it), None where a
// variant has none:
//   0 norm1.weight  1 norm1.bias  2 qkv.weight  3 qkv.bias  4 proj.weight  5 proj.bias  6 q_norm.weight
//   7 k_norm.weight  8 value_gate  9 norm2.weight  10 norm2.bias  11 up.weight  12 up.bias  13 down.weight
//   14 down.bias  15 gate.weight  16 gate.bias
// layout: n_head, n_kv_head, head_dim, norm (0 LayerNorm, 1 RMSNorm), mlp (0 GELU, 1 SwiGLU, 2 ReLU²).

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

#include <optional>
#include <vector>

#include "kernels.h"

namespace {

using Params = c10::List<std::optional<at::Tensor>>;
constexpr int64_t kParams = 17;

std::optional<at::Tensor> opt(const Params& p, int64_t i) { return p.get(i); }

at::Tensor req(const Params& p, int64_t i) {
  std::optional<at::Tensor> t = p.get(i);
  TORCH_CHECK(t.has_value(), "decode block: parameter ", i, " is required");
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
  TORCH_CHECK(layout.size() == 5, "decode block: layout must be (n_head, n_kv_head, head_dim, norm, mlp)");
  TORCH_CHECK(x.dim() == 3, "decode block: x must be (B, T, D)");
  TORCH_CHECK(cos.has_value() == sin.has_value(), "decode block: rotary cos and sin come together");
  // The op is for inference on frozen weights (DecodeBlock calls it for an eval-mode decode step), so the ops it
  // issues skip the dispatcher's autograd and view-tracking layers: ~9 us less a block at one thread.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Block blk{layout[0], layout[1], layout[2], layout[3], layout[4], eps};
  const int64_t B = x.size(0), T = x.size(1), H = blk.H, Kh = blk.Kh, Hd = blk.Hd;

  // Attention: x + proj(attend(rotary(norm(q)), rotary(norm(k)), v)).
  at::Tensor h = blk.normed(x, req(p, 0), opt(p, 1));
  at::Tensor fused = gptforge::linear(h, req(p, 2), opt(p, 3));  // (B, T, (H + 2K) * Hd)
  std::vector<at::Tensor> qkv = fused.split_with_sizes({H * Hd, Kh * Hd, Kh * Hd}, -1);
  at::Tensor q = qkv[0], k = qkv[1], v = qkv[2];
  if (ve.has_value()) v = v + req(p, 8) * *ve;  // (B, T, K*Hd)
  q = q.view({B, T, H, Hd});
  k = k.view({B, T, Kh, Hd});
  if (auto w = opt(p, 6)) q = at::rms_norm(q, {Hd}, *w, eps);
  if (auto w = opt(p, 7)) k = at::rms_norm(k, {Hd}, *w, eps);
  q = q.transpose(1, 2);  // (B, H, T, Hd)
  k = k.transpose(1, 2);  // (B, K, T, Hd)
  v = v.view({B, T, Kh, Hd}).transpose(1, 2);
  if (cos.has_value()) {
    q = Block::rotary(q, *cos, *sin);
    k = Block::rotary(k, *cos, *sin);
  }
  at::Tensor y = gptforge::decode_attention(q, k, v, kc, vc, slots, mask);  // (B, H, T, Hd)
  y = y.transpose(1, 2).reshape({B, T, H * Hd});
  at::Tensor out = x + gptforge::linear(y, req(p, 4), opt(p, 5));

  // MLP: out + down(act(up(norm(out)))).
  h = blk.normed(out, req(p, 9), opt(p, 10));
  at::Tensor a;
  if (blk.mlp == 0) {
    a = at::gelu(gptforge::linear(h, req(p, 11), opt(p, 12)), "tanh");
  } else if (blk.mlp == 1) {
    a = at::silu(gptforge::linear(h, req(p, 15), opt(p, 16))) * gptforge::linear(h, req(p, 11), opt(p, 12));
  } else {
    a = at::square(at::relu(gptforge::linear(h, req(p, 11), opt(p, 12))));
  }
  return out + gptforge::linear(a, req(p, 13), opt(p, 14));
}

}  // namespace

TORCH_LIBRARY(gptforge_decode, m) {
  m.def("block(Tensor x, Tensor?[] params, int[] layout, float eps, Tensor(a!) k_cache, Tensor(b!) v_cache, "
        "Tensor slots, Tensor mask, Tensor? cos, Tensor? sin, Tensor? ve) -> Tensor");
}

TORCH_LIBRARY_IMPL(gptforge_decode, CPU, m) { m.impl("block", &decode_block); }
