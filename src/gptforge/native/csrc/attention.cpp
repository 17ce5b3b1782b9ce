// Attention of one decode step over a static KV cache, on CPU: the new keys and values are written into the cache
// at their slots, then each query attends to the first E slots under an additive mask. One op instead of the eager
// path's five per layer (two index_copy_, two slices, SDPA), whose fixed costs (~22 us a layer at one thread, 5.6 us
// here) were ~15% of the demo model's decode step, for a few thousand multiply-adds per head.
//
// Shapes (gptforge.generate.KVCache): q (B, H, T, Hd); k, v (B, Kh, T, Hd) with H a multiple of Kh (grouped-query
// attention: query head h reads kv head h / (H / Kh)); caches (B, Kh, S, Hd), possibly a view of some rows of a
// larger cache; slots (T,) shared by every row, or (B, T) per row; mask (B, 1, T, E) additive (0 or -inf).
// Tensors may be strided (q and k come out of a transpose); the head dimension must be contiguous. The caches are in
// q's dtype, or bf16/fp16 under an fp32 q (an fp32 or quantized model over a half-size cache, kvcache's kv_dtype):
// the new keys and values are rounded into them (to nearest even, as .to() rounds) and widened on every read.
//
// Where the time goes: in a decode step the weights' products evict the cache, so the keys and values stream from
// L3 and the arithmetic overlaps with that: a bf16 cache, half the bytes, took 1.5-1.8x less time at 160-512 slots
// (benchmarks/decode_attention.py); software prefetch (next keys, next head) measured no gain. The scores are computed
// 16 keys at a time into separate accumulators reduced together, the values 4 slots at a time over the unmasked
// slots only: ~10% faster than one key at a time when the cache is warm, the same when cold.

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
#include <type_traits>
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

#ifdef GF_AVX512
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// 16 dot products, one per vector of a[16], as one vector: lane k = the sum of a[k]'s lanes. Four rounds of pairwise
// shuffles and adds (45 instructions) instead of 16 horizontal reductions, whose latency chained the score loop.
[[gnu::always_inline]] inline __m512 transpose_sum16(const __m512 (&a)[16]) {
  __m512 b[8], c[4], d[2];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: [x0+x2, y0+y2, x1+x3, y1+y3] of x = a[2i], y = a[2i+1]
    b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 4; ++i)  // per 128-bit lane: keys 4i..4i+3, one partial sum each
    c[i] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  for (int i = 0; i < 2; ++i)  // 128-bit lanes: keys 8i..8i+3 twice, keys 8i+4..8i+7 twice
    d[i] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(d[0], d[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(d[0], d[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

// q . k for the n <= 16 keys from kr on (a stride of `row`), nv vectors of 16 each: 16 independent accumulators, so
// the FMAs of different keys overlap. Lanes past n repeat the last key (in bounds; the caller masks them).
// NV > 0: the vector count known at compile time (head sizes 64 and 128), unrolled; 0: nv at run time.
template <int NV, class C>
[[gnu::always_inline]] inline __m512 dots16(const float* q, const C* kr, int64_t row, int64_t n, int64_t nv) {
  __m512 acc[16];
  if constexpr (NV > 0) nv = NV;
#pragma GCC unroll 16
  for (int k = 0; k < 16; ++k) {
    const C* r = kr + std::min<int64_t>(k, n - 1) * row;
    __m512 a = _mm512_mul_ps(_mm512_loadu_ps(q), load16(r));
#pragma GCC unroll 8
    for (int64_t j = 1; j < nv; ++j) a = _mm512_fmadd_ps(_mm512_loadu_ps(q + 16 * j), load16(r + 16 * j), a);
    acc[k] = a;
  }
  return transpose_sum16(acc);
}

// The additive mask of n <= 16 slots as 16 lanes (-inf past n).
template <class Q>
inline __m512 mask16(const Q* m, int64_t stride, int64_t n) {
  if (stride == 1 && n == 16) return load16(m);
  alignas(64) float buf[16];
  for (int64_t k = 0; k < 16; ++k) buf[k] = k < n ? f32(m[k * stride]) : kNegInf;
  return _mm512_load_ps(buf);
}

// Scores q . k_s + m_s of E slots into p (-inf where masked: a block of 16 masked slots costs one compare); the max.
template <class Q, class C>
float scores(const float* q, const C* keys, int64_t row, const Q* mask, int64_t mstride, int64_t E, int64_t D,
             float* p) {
  const __m512 ninf = _mm512_set1_ps(kNegInf);
  __m512 top = ninf;
  for (int64_t s = 0; s < E; s += 16) {
    const int64_t n = std::min<int64_t>(16, E - s);
    const __m512 m = mask16(mask + s * mstride, mstride, n);
    const __mmask16 live = _mm512_cmp_ps_mask(m, ninf, _CMP_NEQ_OQ);
    __m512 sc = ninf;
    if (live) {
      const C* kr = keys + s * row;
      const __m512 d = D == 64 ? dots16<4>(q, kr, row, n, 4) : D == 128 ? dots16<8>(q, kr, row, n, 8)
                                                                          : dots16<0>(q, kr, row, n, D / 16);
      sc = _mm512_mask_add_ps(ninf, live, d, m);
    }
    _mm512_storeu_ps(p + s, sc);  // p holds E + 16 floats
    top = _mm512_max_ps(top, sc);
  }
  return _mm512_reduce_max_ps(top);
}

// exp(p_s - top) of E scores, kept only where nonzero: their weights into w and slots into idx (a masked slot, or
// one whose weight underflows, drops out of the value pass). Returns how many; *sum = their sum.
inline int64_t weights(const float* p, int64_t E, float top, float* w, int32_t* idx, float* sum) {
  const __m512 topv = _mm512_set1_ps(top);
  __m512 total = _mm512_setzero_ps();
  __m512i at = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int64_t n = 0;
  for (int64_t s = 0; s < E; s += 16, at = _mm512_add_epi32(at, _mm512_set1_epi32(16))) {
    const __mmask16 in = E - s >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (E - s)) - 1);
    const __m512 e = _mm512_maskz_mov_ps(in, exp16(_mm512_sub_ps(_mm512_loadu_ps(p + s), topv)));
    const __mmask16 nz = _mm512_cmp_ps_mask(e, _mm512_setzero_ps(), _CMP_NEQ_OQ);
    _mm512_storeu_ps(w + n, _mm512_maskz_compress_ps(nz, e));  // w and idx hold E + 16
    _mm512_storeu_si512(idx + n, _mm512_maskz_compress_epi32(nz, at));
    n += _mm_popcnt_u32(nz);
    total = _mm512_add_ps(total, e);
  }
  *sum = _mm512_reduce_add_ps(total);
  return n;
}

// out[c0 .. c0 + 16 V) = inv * sum_i w_i v_{idx_i}: four slots at a time into separate accumulators (4 V chains).
template <int V, class C>
void accumulate(const C* values, int64_t row, const int32_t* idx, const float* w, int64_t n, int64_t c0, float inv,
                float* out) {
  __m512 a[4][V];
  for (int u = 0; u < 4; ++u)
    for (int j = 0; j < V; ++j) a[u][j] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 4 <= n; i += 4)
#pragma GCC unroll 4
    for (int u = 0; u < 4; ++u) {
      const __m512 wu = _mm512_set1_ps(w[i + u]);
      const C* r = values + idx[i + u] * row + c0;
      for (int j = 0; j < V; ++j) a[u][j] = _mm512_fmadd_ps(wu, load16(r + 16 * j), a[u][j]);
    }
  for (; i < n; ++i) {
    const __m512 wu = _mm512_set1_ps(w[i]);
    const C* r = values + idx[i] * row + c0;
    for (int j = 0; j < V; ++j) a[0][j] = _mm512_fmadd_ps(wu, load16(r + 16 * j), a[0][j]);
  }
  for (int j = 0; j < V; ++j) {
    const __m512 s = _mm512_add_ps(_mm512_add_ps(a[0][j], a[1][j]), _mm512_add_ps(a[2][j], a[3][j]));
    _mm512_storeu_ps(out + c0 + 16 * j, _mm512_mul_ps(s, _mm512_set1_ps(inv)));
  }
}

// attend_row for D a multiple of 16. scratch: 3 (E + 16) floats.
template <class Q, class C>
void attend_row16(const float* q, const C* keys, const C* values, int64_t row, const Q* mask, int64_t mstride,
                  int64_t E, int64_t D, float* scratch, float* out) {
  float* p = scratch;
  float* w = scratch + E + 16;
  int32_t* idx = reinterpret_cast<int32_t*>(w + E + 16);
  const float top = scores(q, keys, row, mask, mstride, E, D, p);
  float sum = 0;
  const int64_t n = top == kNegInf ? 0 : weights(p, E, top, w, idx, &sum);
  if (n == 0) { std::fill(out, out + D, 0.0f); return; }  // every slot masked
  const float inv = 1.0f / sum;
  int64_t c0 = 0;
  for (; c0 + 64 <= D; c0 += 64) accumulate<4>(values, row, idx, w, n, c0, inv, out);
  switch ((D - c0) / 16) {
    case 3: accumulate<3>(values, row, idx, w, n, c0, inv, out); break;
    case 2: accumulate<2>(values, row, idx, w, n, c0, inv, out); break;
    case 1: accumulate<1>(values, row, idx, w, n, c0, inv, out); break;
  }
}
#endif

// Softmax-weighted sum for one query row: out[d] = sum_s softmax(q.k_s + m_s) v_s[d], in fp32 (q already scaled).
// keys/values: E rows of D at a stride of `row`, in the cache's dtype C; mask: E additive values at a stride of
// `mstride`, in q's dtype Q. scratch: 3 (E + 16) floats.
template <class Q, class C>
void attend_row(const float* q, const C* keys, const C* values, int64_t row, const Q* mask, int64_t mstride,
                int64_t E, int64_t D, float* scratch, float* out) {
#ifdef GF_AVX512
  if (D % 16 == 0) return attend_row16(q, keys, values, row, mask, mstride, E, D, scratch, out);
#endif
  constexpr float ninf = -std::numeric_limits<float>::infinity();
  float* p = scratch;
  float top = ninf;
  for (int64_t s = 0; s < E; ++s) {
    const float m = f32(mask[s * mstride]);
    float dot = m;
    if (m != ninf) {
      const C* kr = keys + s * row;
      for (int64_t d = 0; d < D; ++d) dot += q[d] * f32(kr[d]);
    }
    p[s] = dot;
    top = std::max(top, dot);
  }
  std::fill(out, out + D, 0.0f);
  if (top == ninf) return;  // every slot masked
  float sum = 0;
  for (int64_t s = 0; s < E; ++s) sum += (p[s] = std::exp(p[s] - top));  // a masked slot: exp(-inf) = 0
  for (int64_t s = 0; s < E; ++s) {
    if (p[s] == 0.0f) continue;
    const C* vr = values + s * row;
    for (int64_t d = 0; d < D; ++d) out[d] += p[s] * f32(vr[d]);
  }
  for (int64_t d = 0; d < D; ++d) out[d] /= sum;
}

// The new keys or values (B, Kh, T, D) into the cache at their slots, rounded to the cache's dtype C.
template <class Q, class C, class Slot>
void write_cache(const at::Tensor& x, const at::Tensor& cache, const Slot& slot) {
  const Q* xp = x.data_ptr<Q>();
  C* cp = cache.data_ptr<C>();
  const int64_t B = x.size(0), Kh = x.size(1), T = x.size(2), D = x.size(3);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t g = 0; g < Kh; ++g)
      for (int64_t t = 0; t < T; ++t) {
        const int64_t s = slot(b, t);
        TORCH_CHECK(s >= 0 && s < cache.size(2), "decode_attention: slot ", s, " is outside the cache's ", cache.size(2));
        C* dst = cp + b * cache.stride(0) + g * cache.stride(1) + s * cache.stride(2);
        const Q* src = xp + b * x.stride(0) + g * x.stride(1) + t * x.stride(2);
        if constexpr (std::is_same_v<Q, C>) std::memcpy(dst, src, D * sizeof(C));
        else for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<C>(f32(src[d]));  // round to nearest even, as .to()
      }
}

template <class Q, class C>
void attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& kc, const at::Tensor& vc,
            const at::Tensor& slots, const at::Tensor& mask, at::Tensor& y) {
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), Kh = kc.size(1), E = mask.size(3);
  const int64_t group = H / Kh;
  const Q* qp = q.data_ptr<Q>();
  const C* kcp = kc.data_ptr<C>();
  const C* vcp = vc.data_ptr<C>();
  const int64_t* sp = slots.data_ptr<int64_t>();
  const Q* mp = mask.data_ptr<Q>();
  Q* yp = y.data_ptr<Q>();
  const bool per_row = slots.dim() == 2;
  auto slot = [&](int64_t b, int64_t t) { return per_row ? sp[b * slots.stride(0) + t * slots.stride(1)] : sp[t * slots.stride(0)]; };

  // 1. The new keys and values into their slots (every row, every kv head).
  write_cache<Q, C>(k, kc, slot);
  write_cache<Q, C>(v, vc, slot);

  // 2. Each (row, head) over its E cached slots: scores, softmax, the weighted sum of values, in fp32.
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const int64_t work = std::max<int64_t>(1, E * D * T);
  at::parallel_for(0, B * H, std::max<int64_t>(1, (int64_t{1} << 15) / work), [&](int64_t i0, int64_t i1) {
    thread_local std::vector<float> buf;  // scores and weights, the output row, the scaled query: no malloc a call
    buf.resize(std::max<size_t>(buf.size(), 3 * (E + 16) + 2 * D));
    float *scratch = buf.data(), *out = scratch + 3 * (E + 16), *qf = out + D;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / H, h = i % H, g = h / group;
      const C* kb = kcp + b * kc.stride(0) + g * kc.stride(1);
      const C* vb = vcp + b * vc.stride(0) + g * vc.stride(1);
      for (int64_t t = 0; t < T; ++t) {
        const Q* qr = qp + b * q.stride(0) + h * q.stride(1) + t * q.stride(2);
        for (int64_t d = 0; d < D; ++d) qf[d] = f32(qr[d]) * scale;
        attend_row(qf, kb, vb, kc.stride(2), mp + b * mask.stride(0) + t * mask.stride(2), mask.stride(3), E, D,
                   scratch, out);
        Q* yr = yp + ((b * H + h) * T + t) * D;
        for (int64_t d = 0; d < D; ++d) yr[d] = static_cast<Q>(out[d]);
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
  const auto dt = q.scalar_type(), ct = kc.scalar_type();
  for (const at::Tensor* t : {&k, &v, &mask})
    TORCH_CHECK(t->scalar_type() == dt && t->device().is_cpu(), "decode_attention: k, v and the mask must be CPU tensors of q's dtype");
  // The caches are in q's dtype, or (an fp32 model over a bf16/fp16 cache) narrower: rounded on write, widened on read.
  TORCH_CHECK(vc.scalar_type() == ct && kc.device().is_cpu() && vc.device().is_cpu() &&
                  (ct == dt || (dt == at::kFloat && (ct == at::kBFloat16 || ct == at::kHalf))),
              "decode_attention: the caches must be CPU tensors of q's dtype, or bfloat16/float16 under a float32 q; got ",
              ct, " caches for a ", dt, " q");
  for (const at::Tensor* t : {&q, &k, &v, &kc, &vc})
    TORCH_CHECK(t->stride(3) == 1, "decode_attention: the head dimension must be contiguous");
  TORCH_CHECK(slots.scalar_type() == at::kLong && (slots.dim() == 1 ? slots.size(0) == T : slots.dim() == 2 && slots.size(0) == B && slots.size(1) == T),
              "decode_attention: slots must be int64 (T,) or (B, T)");
  at::Tensor y = at::empty({B, H, T, D}, q.options());
  if (dt == at::kFloat && ct == at::kBFloat16) attend<float, c10::BFloat16>(q, k, v, kc, vc, slots, mask, y);
  else if (dt == at::kFloat && ct == at::kHalf) attend<float, c10::Half>(q, k, v, kc, vc, slots, mask, y);
  else if (dt == at::kFloat) attend<float, float>(q, k, v, kc, vc, slots, mask, y);
  else if (dt == at::kBFloat16) attend<c10::BFloat16, c10::BFloat16>(q, k, v, kc, vc, slots, mask, y);
  else if (dt == at::kHalf) attend<c10::Half, c10::Half>(q, k, v, kc, vc, slots, mask, y);
  else TORCH_CHECK(false, "decode_attention: dtype must be float32, bfloat16 or float16, got ", dt);
  return y;
}

}  // namespace gptforge

TORCH_LIBRARY(gptforge_attn, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slots, Tensor mask) -> Tensor");
}

TORCH_LIBRARY_IMPL(gptforge_attn, CPU, m) { m.impl("decode_attention", &gptforge::decode_attention); }
