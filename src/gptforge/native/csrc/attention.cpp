// Attention of one decode step over a static KV cache, on CPU: the new keys and values are written into the cache
// at their slots, then each query attends to the first E slots under an additive mask. One op instead of the eager
// path's five per layer (two index_copy_, two slices, SDPA), whose fixed costs (~22 us a layer at one thread, 5.6 us
// here) were ~15% of the demo model's decode step, for a few thousand multiply-adds per head.
//
// Shapes (gptforge.generate.KVCache): q (B, H, T, Hd); k, v (B, Kh, T, Hd) with H a multiple of Kh (grouped-query
// attention: query head h reads kv head h / (H / Kh)); caches (B, Kh, S, Hd), possibly a view of some rows of a
// larger cache; slots (T,) shared by every row, or (B, T) per row; mask (B, 1, T, E) additive (0 or -inf).
// Tensors may be strided (q and k come out of a transpose); the head dimension must be contiguous.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "kernels.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define GF_AVX512 1
#endif

namespace {

template <class T>
inline float f32(T v) { return static_cast<float>(v); }

#ifdef GF_AVX512
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {  // bf16 is the top half of an fp32
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
inline __m512 load16(const c10::Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }

// e^x for 16 lanes, relative error ~1e-7: 2^(x log2 e) split into an integer n and a fraction f in [-1/2, 1/2],
// 2^f by its degree-6 Taylor polynomial, scaled by 2^n (vscalefps). Lanes below -87 (a masked slot's -inf among
// them) give 0. std::exp, one lane at a time, was most of the op's time at batch 8.
inline __m512 exp16(__m512 x) {
  const __mmask16 tiny = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_LT_OQ);
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.693147181f));  // (t - n) ln 2, |f| <= 0.35
  __m512 p = _mm512_set1_ps(1.0f / 720);
  for (float c : {1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f}) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
  return _mm512_maskz_mov_ps(static_cast<__mmask16>(~tiny), _mm512_scalef_ps(p, n));
}
#endif

// Softmax-weighted sum for one query row: out[d] = sum_s softmax(q.k_s * scale + m_s) v_s[d], in fp32.
// keys/values: E rows of D at a stride of `row`; mask: E additive values at a stride of `mstride`.
template <class Scalar>
void attend_row(const float* q, const Scalar* keys, const Scalar* values, int64_t row, const Scalar* mask,
                int64_t mstride, int64_t E, int64_t D, float* p, float* out) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  float top = kNegInf;
  int64_t s = 0;
#ifdef GF_AVX512
  if (D % 16 == 0 && D <= 256) {
    const int nv = static_cast<int>(D / 16);
    __m512 qv[16];
    for (int j = 0; j < nv; ++j) qv[j] = _mm512_loadu_ps(q + 16 * j);
    for (; s < E; ++s) {
      const float m = f32(mask[s * mstride]);
      if (m == kNegInf) { p[s] = kNegInf; continue; }
      const Scalar* kr = keys + s * row;
      __m512 acc = _mm512_mul_ps(qv[0], load16(kr));
      for (int j = 1; j < nv; ++j) acc = _mm512_fmadd_ps(qv[j], load16(kr + 16 * j), acc);
      p[s] = _mm512_reduce_add_ps(acc) + m;
      top = std::max(top, p[s]);
    }
    __m512 sum = _mm512_setzero_ps();
    const __m512 topv = _mm512_set1_ps(top);
    int64_t e = 0;
    for (; e + 16 <= E; e += 16) {
      const __m512 w = exp16(_mm512_sub_ps(_mm512_loadu_ps(p + e), topv));
      _mm512_storeu_ps(p + e, w);
      sum = _mm512_add_ps(sum, w);
    }
    if (e < E) {
      const __mmask16 rest = static_cast<__mmask16>((1u << (E - e)) - 1);
      const __m512 w = _mm512_maskz_mov_ps(rest, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(rest, p + e), topv)));
      _mm512_mask_storeu_ps(p + e, rest, w);
      sum = _mm512_add_ps(sum, w);
    }
    const float inv = 1.0f / _mm512_reduce_add_ps(sum);
    __m512 acc[16];
    for (int j = 0; j < nv; ++j) acc[j] = _mm512_setzero_ps();
    for (int64_t t = 0; t < E; ++t) {
      if (p[t] == 0.0f) continue;  // a masked slot
      const __m512 w = _mm512_set1_ps(p[t]);
      const Scalar* vr = values + t * row;
      for (int j = 0; j < nv; ++j) acc[j] = _mm512_fmadd_ps(w, load16(vr + 16 * j), acc[j]);
    }
    for (int j = 0; j < nv; ++j) _mm512_storeu_ps(out + 16 * j, _mm512_mul_ps(acc[j], _mm512_set1_ps(inv)));
    return;
  }
#endif
  for (; s < E; ++s) {
    const float m = f32(mask[s * mstride]);
    float dot = m;
    if (m != kNegInf) {
      const Scalar* kr = keys + s * row;
      for (int64_t d = 0; d < D; ++d) dot += q[d] * f32(kr[d]);
    }
    p[s] = dot;
    top = std::max(top, dot);
  }
  float sum = 0;
  for (s = 0; s < E; ++s) sum += (p[s] = std::exp(p[s] - top));  // a masked slot: exp(-inf) = 0
  std::fill(out, out + D, 0.0f);
  for (s = 0; s < E; ++s) {
    if (p[s] == 0.0f) continue;
    const Scalar* vr = values + s * row;
    for (int64_t d = 0; d < D; ++d) out[d] += p[s] * f32(vr[d]);
  }
  for (int64_t d = 0; d < D; ++d) out[d] /= sum;
}

template <class Scalar>
void attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& kc, const at::Tensor& vc,
            const at::Tensor& slots, const at::Tensor& mask, at::Tensor& y) {
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), Kh = kc.size(1), E = mask.size(3);
  const int64_t group = H / Kh;
  const Scalar* qp = q.data_ptr<Scalar>();
  const Scalar* kp = k.data_ptr<Scalar>();
  const Scalar* vp = v.data_ptr<Scalar>();
  Scalar* kcp = kc.data_ptr<Scalar>();
  Scalar* vcp = vc.data_ptr<Scalar>();
  const int64_t* sp = slots.data_ptr<int64_t>();
  const Scalar* mp = mask.data_ptr<Scalar>();
  Scalar* yp = y.data_ptr<Scalar>();
  const bool per_row = slots.dim() == 2;
  auto slot = [&](int64_t b, int64_t t) { return per_row ? sp[b * slots.stride(0) + t * slots.stride(1)] : sp[t * slots.stride(0)]; };

  // 1. The new keys and values into their slots (every row, every kv head).
  for (int64_t b = 0; b < B; ++b)
    for (int64_t g = 0; g < Kh; ++g)
      for (int64_t t = 0; t < T; ++t) {
        const int64_t s = slot(b, t);
        TORCH_CHECK(s >= 0 && s < kc.size(2), "decode_attention: slot ", s, " is outside the cache's ", kc.size(2));
        std::memcpy(kcp + b * kc.stride(0) + g * kc.stride(1) + s * kc.stride(2),
                    kp + b * k.stride(0) + g * k.stride(1) + t * k.stride(2), D * sizeof(Scalar));
        std::memcpy(vcp + b * vc.stride(0) + g * vc.stride(1) + s * vc.stride(2),
                    vp + b * v.stride(0) + g * v.stride(1) + t * v.stride(2), D * sizeof(Scalar));
      }

  // 2. Each (row, head) over its E cached slots: scores, softmax, the weighted sum of values, in fp32.
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const int64_t work = std::max<int64_t>(1, E * D * T);
  at::parallel_for(0, B * H, std::max<int64_t>(1, (int64_t{1} << 15) / work), [&](int64_t i0, int64_t i1) {
    std::vector<float> p(E + 16), out(D), qf(D);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / H, h = i % H, g = h / group;
      const Scalar* kb = kcp + b * kc.stride(0) + g * kc.stride(1);
      const Scalar* vb = vcp + b * vc.stride(0) + g * vc.stride(1);
      for (int64_t t = 0; t < T; ++t) {
        const Scalar* qr = qp + b * q.stride(0) + h * q.stride(1) + t * q.stride(2);
        for (int64_t d = 0; d < D; ++d) qf[d] = f32(qr[d]) * scale;
        attend_row(qf.data(), kb, vb, kc.stride(2), mp + b * mask.stride(0) + t * mask.stride(2), mask.stride(3), E, D,
                   p.data(), out.data());
        Scalar* yr = yp + ((b * H + h) * T + t) * D;
        for (int64_t d = 0; d < D; ++d) yr[d] = static_cast<Scalar>(out[d]);
      }
    }
  });
}

}  // namespace

namespace gptforge {

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& kc,
                            const at::Tensor& vc, const at::Tensor& slots, const at::Tensor& mask) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && kc.dim() == 4 && vc.dim() == 4 && mask.dim() == 4,
              "decode_attention: q, k, v, the caches and the mask must be 4-D");
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), Kh = kc.size(1);
  TORCH_CHECK(Kh >= 1 && H % Kh == 0, "decode_attention: ", H, " query heads are not a multiple of ", Kh, " kv heads");
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == B && k.size(1) == Kh && k.size(2) == T && k.size(3) == D,
              "decode_attention: k and v must be (B, kv heads, T, head dim)");
  TORCH_CHECK(kc.sizes() == vc.sizes() && kc.size(0) == B && kc.size(3) == D, "decode_attention: caches must be (B, kv heads, S, head dim)");
  TORCH_CHECK(mask.size(0) == B && mask.size(2) == T && mask.size(3) <= kc.size(2), "decode_attention: mask must be (B, 1, T, E <= S)");
  const auto dt = q.scalar_type();
  for (const at::Tensor* t : {&k, &v, &kc, &vc, &mask})
    TORCH_CHECK(t->scalar_type() == dt && t->device().is_cpu(), "decode_attention: every tensor must be a CPU tensor of q's dtype");
  for (const at::Tensor* t : {&q, &k, &v, &kc, &vc})
    TORCH_CHECK(t->stride(3) == 1, "decode_attention: the head dimension must be contiguous");
  TORCH_CHECK(slots.scalar_type() == at::kLong && (slots.dim() == 1 ? slots.size(0) == T : slots.dim() == 2 && slots.size(0) == B && slots.size(1) == T),
              "decode_attention: slots must be int64 (T,) or (B, T)");
  at::Tensor y = at::empty({B, H, T, D}, q.options());
  if (dt == at::kFloat) attend<float>(q, k, v, kc, vc, slots, mask, y);
  else if (dt == at::kBFloat16) attend<c10::BFloat16>(q, k, v, kc, vc, slots, mask, y);
  else if (dt == at::kHalf) attend<c10::Half>(q, k, v, kc, vc, slots, mask, y);
  else TORCH_CHECK(false, "decode_attention: dtype must be float32, bfloat16 or float16, got ", dt);
  return y;
}

}  // namespace gptforge

TORCH_LIBRARY(gptforge_attn, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slots, Tensor mask) -> Tensor");
}

TORCH_LIBRARY_IMPL(gptforge_attn, CPU, m) { m.impl("decode_attention", &gptforge::decode_attention); }
