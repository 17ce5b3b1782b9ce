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
// fp32 and bf16 models (native/step.py checks). The math is the model's (model.py) in its dtype: the PyTorch path's
// ops in the same order, each bf16 result rounded where that path's op rounds it, so results equal that path's up
// to the order of the norms' sums (a few ulps); rotary is computed exactly as model.apply_rotary does (no fused
// multiply-add), from tables the caller computed once with model.rotary_tables.
//
// Tensors: `layers` holds, per layer, the fields `layer_fields()` names (native/step.py builds the list in that
// order and checks it); a field a variant does not have is None. `globals` holds the token table, the learned
// position table or None, the rotary cos and sin tables (positions x Hd) or None, the final norm's weight and bias,
// and the head's weight (the token table itself when tied).

#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <iterator>
#include <optional>
#include <string>
#include <vector>

#include "kernels.h"

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define GF_AVX512 1
#endif

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

template <class T>
const T* ptr(const std::optional<at::Tensor>& t) { return t.has_value() ? t->data_ptr<T>() : nullptr; }

// v as the model's dtype holds it: bf16 rounds (to nearest even, as every bf16 op of the PyTorch path rounds its
// result), fp32 keeps it.
template <class T>
inline float as(float v) { return static_cast<float>(static_cast<T>(v)); }

// y = norm(x) over each of B rows of D, as nn.LayerNorm / nn.RMSNorm compute it in the model's dtype T: LayerNorm in
// fp32, rounded once; RMSNorm as PyTorch's composite does, x * rsqrt(mean(x^2) + eps) rounded to T, then times w.
template <class T>
void norm_rows(const float* x, T* y, int64_t B, int64_t D, const T* w, const T* b, bool rms, float eps) {
  for (int64_t r = 0; r < B; ++r, x += D, y += D) {
    float mean = 0;
    if (!rms) {
      for (int64_t i = 0; i < D; ++i) mean += x[i];
      mean /= static_cast<float>(D);
    }
    float ss = 0;
    for (int64_t i = 0; i < D; ++i) ss += (x[i] - mean) * (x[i] - mean);
    const float inv = 1.0f / std::sqrt(ss / static_cast<float>(D) + eps);
    for (int64_t i = 0; i < D; ++i) {
      const float v = (x[i] - mean) * inv;
      y[i] = static_cast<T>(rms ? as<T>(v) * static_cast<float>(w[i])
                                : v * static_cast<float>(w[i]) + (b ? static_cast<float>(b[i]) : 0.0f));
    }
  }
}

// model.apply_rotary on `heads` heads of Hd at x: (x * cos + rotate_half(x) * sin) in fp32, rounded to T once, each
// product rounded on its own as PyTorch's separate mul and add round them (no contraction into a fused multiply-add).
template <class T>
__attribute__((optimize("fp-contract=off"))) void rotary(T* x, int64_t heads, int64_t Hd, const float* cos,
                                                            const float* sin) {
  const int64_t half = Hd / 2;
  for (int64_t h = 0; h < heads; ++h, x += Hd)
    for (int64_t i = 0; i < half; ++i) {
      const float x1 = static_cast<float>(x[i]), x2 = static_cast<float>(x[i + half]);
      const float a = x1 * cos[i], b = -x2 * sin[i];
      const float c = x2 * cos[i + half], d = x1 * sin[i + half];
      x[i] = static_cast<T>(a + b);
      x[i + half] = static_cast<T>(c + d);
    }
}

#ifdef GF_AVX512
// e^x for 16 lanes, relative error ~1e-7 (the approximation attention.cpp's softmax uses): 2^(x log2 e) as 2^n times
// a degree-6 polynomial of the fraction; lanes below -87 give 0, above 88 +inf.
inline __m512 exp16(__m512 x) {
  const __mmask16 tiny = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_LT_OQ);
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.693147181f));
  __m512 p = _mm512_set1_ps(1.0f / 720);
  for (float c : {1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f}) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
  return _mm512_maskz_mov_ps(static_cast<__mmask16>(~tiny), _mm512_scalef_ps(p, n));
}

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {  // bf16 is the top half of an fp32
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}
#endif

// silu(g) = g / (1 + e^-g) of n values into out (fp32): 16 lanes at a time where AVX-512 is there (scalar expf was
// ~1.5% of the small shape's step).
template <class T>
void silu(const T* g, float* out, int64_t n) {
  int64_t i = 0;
#ifdef GF_AVX512
  const __m512 one = _mm512_set1_ps(1.0f);
  for (; i + 16 <= n; i += 16) {
    const __m512 v = load16(g + i);
    _mm512_storeu_ps(out + i, _mm512_div_ps(v, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), v)))));
  }
#endif
  for (; i < n; ++i) {
    const float v = static_cast<float>(g[i]);
    out[i] = v / (1.0f + std::exp(-v));
  }
}

// The MLP's activation into a (B*F values of T), from up (in a) and, for SwiGLU, gate: silu(gate) * up, GELU (tanh
// approximation) or relu(up)^2; each PyTorch op's result rounded to T as the op would.
template <class T>
void activate(T* a, const T* gate, int64_t n, int64_t mlp) {
  if (mlp == 1) {
    std::vector<float> sg(n);
    silu(gate, sg.data(), n);
    for (int64_t i = 0; i < n; ++i) a[i] = static_cast<T>(as<T>(sg[i]) * static_cast<float>(a[i]));
  } else if (mlp == 0) {
    for (int64_t i = 0; i < n; ++i) {
      const float u = static_cast<float>(a[i]);
      a[i] = static_cast<T>(0.5f * u * (1.0f + std::tanh(0.7978845608f * (u + 0.044715f * u * u * u))));
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      const float u = std::max(static_cast<float>(a[i]), 0.0f);
      a[i] = static_cast<T>(u * u);
    }
  }
}

// x += y (B*D values; y of T), rounded to T as the residual add of the PyTorch path rounds.
template <class T>
void add_into(float* x, const at::Tensor& y, int64_t n) {
  const T* yp = y.data_ptr<T>();
  for (int64_t i = 0; i < n; ++i) x[i] = as<T>(x[i] + static_cast<float>(yp[i]));
}

struct Shape {
  int64_t L, H, Kh, Hd, mlp;
  bool rms;
  float eps;
};

template <class T>
at::Tensor run(const Shape& s, const at::Tensor& ids, const at::Tensor& positions, const Opts& globals,
               const Opts& layers, double softcap, const std::vector<at::Tensor>& k_caches,
               const std::vector<at::Tensor>& v_caches, const at::Tensor& slots, const at::Tensor& mask) {
  const at::Tensor tok = *globals.get(kTokEmb);
  const int64_t B = ids.size(0), D = tok.size(1), V = tok.size(0), H = s.H, Kh = s.Kh, Hd = s.Hd;
  const int64_t R = (H + 2 * Kh) * Hd;
  at::Tensor x = at::empty({B, D}, ids.options().dtype(at::kFloat)), h = at::empty({B, D}, tok.options());
  float* xp = x.data_ptr<float>();
  T* hp = h.data_ptr<T>();
  const int64_t* id = ids.data_ptr<int64_t>();
  const int64_t* pos = positions.data_ptr<int64_t>();

  // Embedding (and learned positions, added in T).
  const T* pe = ptr<T>(globals.get(kPosEmb));
  for (int64_t r = 0; r < B; ++r) {
    TORCH_CHECK(id[r] >= 0 && id[r] < V, "decode step: token id ", id[r], " is outside the table's ", V);
    const T* row = tok.data_ptr<T>() + id[r] * D;
    for (int64_t i = 0; i < D; ++i)
      xp[r * D + i] = pe ? as<T>(static_cast<float>(row[i]) + static_cast<float>(pe[pos[r] * D + i]))
                         : static_cast<float>(row[i]);
  }
  const float* cos = ptr<float>(globals.get(kCos));
  const float* sin = ptr<float>(globals.get(kSin));
  const int64_t table = cos ? globals.get(kCos)->size(0) : 0;
  for (int64_t r = 0; cos && r < B; ++r)
    TORCH_CHECK(pos[r] >= 0 && pos[r] < table, "decode step: position ", pos[r], " is outside the rotary tables");

  for (int64_t l = 0; l < s.L; ++l) {
    auto f = [&](Field i) { return layers.get(l * kFields + i); };
    auto linear = [&](const at::Tensor& in, Field w, Field b) { return gptforge::linear(in, *f(w), f(b)); };
    // Attention: x + proj(attend(rotary(q), rotary(k), v)) over norm1(x).
    norm_rows<T>(xp, hp, B, D, ptr<T>(f(kNorm1W)), ptr<T>(f(kNorm1B)), s.rms, s.eps);
    at::Tensor qkv = linear(h, kQkvW, kQkvB);  // (B, R): q, k, v of each row side by side
    T* qp = qkv.data_ptr<T>();
    for (int64_t r = 0; cos && r < B; ++r)  // q's H heads and k's Kh are adjacent: one pass over H + Kh heads
      rotary<T>(qp + r * R, H + Kh, Hd, cos + pos[r] * Hd, sin + pos[r] * Hd);
    at::Tensor q = qkv.as_strided({B, H, 1, Hd}, {R, Hd, R, 1});
    at::Tensor k = qkv.as_strided({B, Kh, 1, Hd}, {R, Hd, R, 1}, H * Hd);
    at::Tensor v = qkv.as_strided({B, Kh, 1, Hd}, {R, Hd, R, 1}, (H + Kh) * Hd);
    at::Tensor y = gptforge::decode_attention(q, k, v, k_caches[l], v_caches[l], slots, mask);  // (B, H, 1, Hd)
    add_into<T>(xp, linear(y.view({B, H * Hd}), kProjW, kProjB), B * D);

    // MLP: x + down(act(up(norm2(x)))).
    norm_rows<T>(xp, hp, B, D, ptr<T>(f(kNorm2W)), ptr<T>(f(kNorm2B)), s.rms, s.eps);
    at::Tensor a = linear(h, kUpW, kUpB);
    at::Tensor g = s.mlp == 1 ? linear(h, kGateW, kGateB) : a;
    activate<T>(a.data_ptr<T>(), g.data_ptr<T>(), a.numel(), s.mlp);
    add_into<T>(xp, linear(a, kDownW, kDownB), B * D);
  }
  norm_rows<T>(xp, hp, B, D, ptr<T>(globals.get(kNormFW)), ptr<T>(globals.get(kNormFB)), s.rms, s.eps);
  at::Tensor logits = gptforge::linear(h, *globals.get(kHeadW), std::nullopt);  // (B, V)
  if (softcap > 0) {  // SoftCap's three ops: divide, tanh, multiply, each rounded to T
    T* lp = logits.data_ptr<T>();
    const float cap = static_cast<float>(softcap);
    for (int64_t i = 0; i < logits.numel(); ++i)
      lp[i] = static_cast<T>(cap * as<T>(std::tanh(as<T>(static_cast<float>(lp[i]) / cap))));
  }
  return logits;
}

at::Tensor decode_step(const at::Tensor& ids, const at::Tensor& positions, const Opts& globals, const Opts& layers,
                       at::IntArrayRef layout, double eps, double softcap, const std::vector<at::Tensor>& k_caches,
                       const std::vector<at::Tensor>& v_caches, const at::Tensor& slots, const at::Tensor& mask) {
  TORCH_CHECK(layout.size() == kLayout, "decode step: layout must be (n_layer, n_head, n_kv_head, head_dim, norm, mlp)");
  TORCH_CHECK(globals.size() == kGlobals, "decode step: expected ", kGlobals, " global tensors, got ", globals.size());
  const Shape s{layout[kNLayer], layout[kNHead], layout[kNKvHead], layout[kHeadDim], layout[kMlp], layout[kNorm] == 1,
                static_cast<float>(eps)};
  TORCH_CHECK(static_cast<int64_t>(layers.size()) == s.L * kFields, "decode step: expected ", s.L * kFields,
              " layer tensors, got ", layers.size());
  TORCH_CHECK(static_cast<int64_t>(k_caches.size()) == s.L && static_cast<int64_t>(v_caches.size()) == s.L,
              "decode step: one key and one value cache per layer");
  TORCH_CHECK(ids.dim() == 1 && ids.scalar_type() == at::kLong && positions.sizes() == ids.sizes() &&
                  positions.scalar_type() == at::kLong && ids.is_contiguous() && positions.is_contiguous(),
              "decode step: ids and positions must be contiguous int64 (B,)");
  TORCH_CHECK(ids.size(0) >= 1 && ids.size(0) <= 16, "decode step: 1 to 16 rows, got ", ids.size(0));
  const at::Tensor tok = *globals.get(kTokEmb);
  TORCH_CHECK(tok.is_contiguous(), "decode step: the token table must be contiguous");
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // frozen weights, inference only (as block.cpp)
  if (tok.scalar_type() == at::kFloat)
    return run<float>(s, ids, positions, globals, layers, softcap, k_caches, v_caches, slots, mask);
  TORCH_CHECK(tok.scalar_type() == at::kBFloat16, "decode step: fp32 or bf16 weights, got ", tok.scalar_type());
  return run<c10::BFloat16>(s, ids, positions, globals, layers, softcap, k_caches, v_caches, slots, mask);
}

}  // namespace

TORCH_LIBRARY(gptforge_step, m) {
  m.def("decode(Tensor ids, Tensor positions, Tensor?[] globals, Tensor?[] layers, int[] layout, float eps, "
        "float softcap, Tensor(a!)[] k_caches, Tensor(b!)[] v_caches, Tensor slots, Tensor mask) -> Tensor");
  m.def("layer_fields() -> str[]", &layer_fields);
  m.def("global_fields() -> str[]", &global_fields);
}

TORCH_LIBRARY_IMPL(gptforge_step, CPU, m) { m.impl("decode", &decode_step); }
