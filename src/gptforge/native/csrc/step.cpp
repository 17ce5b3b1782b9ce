// A whole CPU decode step as one op: token embedding, every block, the final norm and the head, for B <= 16 rows
// of one new token each, over the native KV cache. The products run on the few-row kernels (gemv.cpp) and the
// attention on attention.cpp, as in the block op (block.cpp); what this op does differently is everything between
// them: norms, rotary, activations and residual adds are loops over the rows' few hundred floats, written into
// buffers, instead of ATen ops (each ~1-8 us of dispatch, allocation and TensorIterator setup for a few hundred
// multiply-adds), and the step is one call from Python instead of one per block plus the model's module calls.
//
// Why: at the 6-layer, 384-wide shape (weights in cache) a step's products take ~2 ms at one thread, and the block
// op's ATen ops (~110 us a block) with the Python around them (~0.2 ms) added another ~0.9 ms: llama.cpp's whole
// step is ~2.3 ms (docs/BENCHMARKS.md, "Per-token cost outside the products").
//
// fp32 models only (native/step.py checks). The math is the model's (model.py): the same operations in fp32, so
// results equal the PyTorch path's up to the order of the norms' sums (a few ulps); rotary is computed exactly as
// model.apply_rotary does (no fused multiply-add), from tables the caller computed once with model.rotary_tables.
//
// Tensors: `layers` holds, per layer, the fields `layer_fields()` names (native/step.py builds the list in that
// order and checks it); a field a variant does not have is None. `globals` holds the token table, the learned
// position table or None, the rotary cos and sin tables (positions x Hd) or None, the final norm's weight and bias,
// and the head's weight (the token table itself when tied).

#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <iterator>
#include <optional>
#include <string>
#include <vector>

#include "kernels.h"

namespace {

using Opts = c10::List<std::optional<at::Tensor>>;

enum Field : int64_t {
  kNorm1W, kNorm1B, kQkvW, kQkvB, kProjW, kProjB, kNorm2W, kNorm2B, kUpW, kUpB, kDownW, kDownB, kGateW, kGateB, kFields
};
const char* const kFieldNames[kFields] = {"norm1_weight", "norm1_bias", "qkv_weight", "qkv_bias", "proj_weight",
                                          "proj_bias", "norm2_weight", "norm2_bias", "up_weight", "up_bias",
                                          "down_weight", "down_bias", "gate_weight", "gate_bias"};
enum Global : int64_t { kTokEmb, kPosEmb, kCos, kSin, kNormFW, kNormFB, kHeadW, kGlobals };
const char* const kGlobalNames[kGlobals] = {"tok_emb", "pos_emb", "rope_cos", "rope_sin", "norm_f_weight",
                                            "norm_f_bias", "head_weight"};
// layout: n_layer, n_head, n_kv_head, head_dim, norm (0 LayerNorm, 1 RMSNorm), mlp (0 GELU, 1 SwiGLU, 2 ReLU²).
enum Layout : int64_t { kNLayer, kNHead, kNKvHead, kHeadDim, kNorm, kMlp, kLayout };

std::vector<std::string> layer_fields() { return {std::begin(kFieldNames), std::end(kFieldNames)}; }
std::vector<std::string> global_fields() { return {std::begin(kGlobalNames), std::end(kGlobalNames)}; }

const float* ptr(const std::optional<at::Tensor>& t) { return t.has_value() ? t->data_ptr<float>() : nullptr; }

// y = norm(x) over each of B rows of D: LayerNorm (mean and biased variance) or RMSNorm, as nn.LayerNorm / nn.RMSNorm.
void norm_rows(const float* x, float* y, int64_t B, int64_t D, const float* w, const float* b, bool rms, float eps) {
  for (int64_t r = 0; r < B; ++r, x += D, y += D) {
    float mean = 0;
    if (!rms) {
      for (int64_t i = 0; i < D; ++i) mean += x[i];
      mean /= static_cast<float>(D);
    }
    float ss = 0;
    for (int64_t i = 0; i < D; ++i) ss += (x[i] - mean) * (x[i] - mean);
    const float inv = 1.0f / std::sqrt(ss / static_cast<float>(D) + eps);
    for (int64_t i = 0; i < D; ++i) y[i] = (x[i] - mean) * inv * w[i] + (b ? b[i] : 0.0f);
  }
}

// model.apply_rotary on `heads` heads of Hd at x: (x * cos + rotate_half(x) * sin), each product rounded on its own
// as PyTorch's separate mul and add round them (no contraction into a fused multiply-add).
__attribute__((optimize("fp-contract=off"))) void rotary(float* x, int64_t heads, int64_t Hd, const float* cos,
                                                            const float* sin) {
  const int64_t half = Hd / 2;
  for (int64_t h = 0; h < heads; ++h, x += Hd)
    for (int64_t i = 0; i < half; ++i) {
      const float x1 = x[i], x2 = x[i + half];
      const float a = x1 * cos[i], b = -x2 * sin[i];
      const float c = x2 * cos[i + half], d = x1 * sin[i + half];
      x[i] = a + b;
      x[i + half] = c + d;
    }
}

at::Tensor decode_step(const at::Tensor& ids, const at::Tensor& positions, const Opts& globals, const Opts& layers,
                       at::IntArrayRef layout, double eps, double softcap, const std::vector<at::Tensor>& k_caches,
                       const std::vector<at::Tensor>& v_caches, const at::Tensor& slots, const at::Tensor& mask) {
  TORCH_CHECK(layout.size() == kLayout, "decode step: layout must be (n_layer, n_head, n_kv_head, head_dim, norm, mlp)");
  TORCH_CHECK(globals.size() == kGlobals, "decode step: expected ", kGlobals, " global tensors, got ", globals.size());
  const int64_t L = layout[kNLayer], H = layout[kNHead], Kh = layout[kNKvHead], Hd = layout[kHeadDim];
  const bool rms = layout[kNorm] == 1;
  const int64_t mlp = layout[kMlp];
  TORCH_CHECK(static_cast<int64_t>(layers.size()) == L * kFields, "decode step: expected ", L * kFields,
              " layer tensors, got ", layers.size());
  TORCH_CHECK(static_cast<int64_t>(k_caches.size()) == L && static_cast<int64_t>(v_caches.size()) == L,
              "decode step: one key and one value cache per layer");
  TORCH_CHECK(ids.dim() == 1 && ids.scalar_type() == at::kLong && positions.sizes() == ids.sizes() &&
                  positions.scalar_type() == at::kLong && ids.is_contiguous() && positions.is_contiguous(),
              "decode step: ids and positions must be contiguous int64 (B,)");
  const at::Tensor tok = *globals.get(kTokEmb);
  TORCH_CHECK(tok.scalar_type() == at::kFloat && tok.is_contiguous(), "decode step: fp32 weights only");
  const int64_t B = ids.size(0), D = tok.size(1), V = tok.size(0), R = (H + 2 * Kh) * Hd;
  TORCH_CHECK(B >= 1 && B <= 16, "decode step: 1 to 16 rows, got ", B);
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // frozen weights, inference only (as block.cpp)
  const auto f32 = ids.options().dtype(at::kFloat);
  at::Tensor x = at::empty({B, D}, f32), h = at::empty({B, D}, f32);
  float* xp = x.data_ptr<float>();
  float* hp = h.data_ptr<float>();
  const int64_t* id = ids.data_ptr<int64_t>();
  const int64_t* pos = positions.data_ptr<int64_t>();

  // Embedding (and learned positions).
  const float* pe = ptr(globals.get(kPosEmb));
  for (int64_t r = 0; r < B; ++r) {
    TORCH_CHECK(id[r] >= 0 && id[r] < V, "decode step: token id ", id[r], " is outside the table's ", V);
    std::memcpy(xp + r * D, tok.data_ptr<float>() + id[r] * D, D * sizeof(float));
    if (pe)
      for (int64_t i = 0; i < D; ++i) xp[r * D + i] += pe[pos[r] * D + i];
  }
  const float* cos = ptr(globals.get(kCos));
  const float* sin = ptr(globals.get(kSin));
  const int64_t table = cos ? globals.get(kCos)->size(0) : 0;
  for (int64_t r = 0; cos && r < B; ++r)
    TORCH_CHECK(pos[r] >= 0 && pos[r] < table, "decode step: position ", pos[r], " is outside the rotary tables");

  auto linear = [](const at::Tensor& in, const std::optional<at::Tensor>& w, const std::optional<at::Tensor>& b) {
    return gptforge::linear(in, *w, b);
  };
  for (int64_t l = 0; l < L; ++l) {
    auto f = [&](Field i) { return layers.get(l * kFields + i); };
    // Attention: x + proj(attend(rotary(q), rotary(k), v)) over norm1(x).
    norm_rows(xp, hp, B, D, ptr(f(kNorm1W)), ptr(f(kNorm1B)), rms, static_cast<float>(eps));
    at::Tensor qkv = linear(h, f(kQkvW), f(kQkvB));  // (B, R): q, k, v of each row side by side
    float* qp = qkv.data_ptr<float>();
    for (int64_t r = 0; cos && r < B; ++r)  // q's H heads and k's Kh are adjacent: one pass over H + Kh heads
      rotary(qp + r * R, H + Kh, Hd, cos + pos[r] * Hd, sin + pos[r] * Hd);
    at::Tensor q = qkv.as_strided({B, H, 1, Hd}, {R, Hd, R, 1});
    at::Tensor k = qkv.as_strided({B, Kh, 1, Hd}, {R, Hd, R, 1}, H * Hd);
    at::Tensor v = qkv.as_strided({B, Kh, 1, Hd}, {R, Hd, R, 1}, (H + Kh) * Hd);
    at::Tensor y = gptforge::decode_attention(q, k, v, k_caches[l], v_caches[l], slots, mask);  // (B, H, 1, Hd)
    at::Tensor o = linear(y.view({B, H * Hd}), f(kProjW), f(kProjB));
    const float* op = o.data_ptr<float>();
    for (int64_t i = 0; i < B * D; ++i) xp[i] += op[i];

    // MLP: x + down(act(up(norm2(x)))).
    norm_rows(xp, hp, B, D, ptr(f(kNorm2W)), ptr(f(kNorm2B)), rms, static_cast<float>(eps));
    at::Tensor a = linear(h, f(kUpW), f(kUpB));
    float* ap = a.data_ptr<float>();
    const int64_t F = a.size(1);
    if (mlp == 1) {  // silu(gate) * up
      at::Tensor g = linear(h, f(kGateW), f(kGateB));
      const float* gp = g.data_ptr<float>();
      for (int64_t i = 0; i < B * F; ++i) ap[i] *= gp[i] / (1.0f + std::exp(-gp[i]));
    } else if (mlp == 0) {  // GELU, tanh approximation
      for (int64_t i = 0; i < B * F; ++i) {
        const float u = ap[i];
        ap[i] = 0.5f * u * (1.0f + std::tanh(0.7978845608f * (u + 0.044715f * u * u * u)));
      }
    } else {  // relu(u)^2
      for (int64_t i = 0; i < B * F; ++i) ap[i] = ap[i] > 0 ? ap[i] * ap[i] : 0.0f;
    }
    at::Tensor d = linear(a, f(kDownW), f(kDownB));
    const float* dp = d.data_ptr<float>();
    for (int64_t i = 0; i < B * D; ++i) xp[i] += dp[i];
  }
  norm_rows(xp, hp, B, D, ptr(globals.get(kNormFW)), ptr(globals.get(kNormFB)), rms, static_cast<float>(eps));
  at::Tensor logits = gptforge::linear(h, *globals.get(kHeadW), std::nullopt);  // (B, V)
  if (softcap > 0) {
    float* lp = logits.data_ptr<float>();
    const float cap = static_cast<float>(softcap);
    for (int64_t i = 0; i < logits.numel(); ++i) lp[i] = cap * std::tanh(lp[i] / cap);
  }
  return logits;
}

}  // namespace

TORCH_LIBRARY(gptforge_step, m) {
  m.def("decode(Tensor ids, Tensor positions, Tensor?[] globals, Tensor?[] layers, int[] layout, float eps, "
        "float softcap, Tensor(a!)[] k_caches, Tensor(b!)[] v_caches, Tensor slots, Tensor mask) -> Tensor");
  m.def("layer_fields() -> str[]", &layer_fields);
  m.def("global_fields() -> str[]", &global_fields);
}

TORCH_LIBRARY_IMPL(gptforge_step, CPU, m) { m.impl("decode", &decode_step); }
