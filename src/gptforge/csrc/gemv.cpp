// Few-row matrix products for CPU decoding: y (M, N) = x (M, K) @ W^T for M <= 16 rows of fp32 activations and
// a weight W (N, K) stored as fp32, bf16, fp16, int8 (one scale per row) or int4 (codes in groups, gptforge's
// "group-halves" packing, fp16 scale and minimum per group).
//
// Why by hand: decoding multiplies one to a few rows by every weight matrix, so its speed is the rate at which
// the weights stream from memory. PyTorch's CPU GEMMs re-pack the weight on every call and its weight-only
// low-bit kernels run 5-10x below the fp32 GEMV here (docs/compress.md); a torch.compile'd reduction widens the
// codes in registers but keeps one accumulator chain per row (latency-bound, ~5 G multiply-adds/s/core). Here
// each weight is read once per call, widened to fp32 in registers, and multiplied into several independent
// accumulators (8 rows at a time for one input row, 4 rows x 4 inputs otherwise), which keeps the FMA units
// busy enough to stay at the memory bandwidth. Threads split the output rows through at::parallel_for (torch's
// own pool and thread count).
//
// Built at first use for the machine it runs on (-march=native), see gptforge/gemv.py. AVX-512 paths where the
// compiler targets AVX-512F, a plain loop otherwise (which the compiler vectorizes as far as the target allows).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <cstring>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define GF_AVX512 1
#endif

namespace {

constexpr int64_t kMaxRows = 16;  // input rows per call; the Python side sends more to F.linear

inline float bf16_to_f32(uint16_t v) {
  uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float f16_to_f32(uint16_t h) {  // IEEE half, scalar path only (the AVX-512 path uses vcvtph2ps)
  return static_cast<float>(c10::Half(h, c10::Half::from_bits()));
}

// --- widening 16 weights to fp32 --------------------------------------------------------------------------------
struct F32 { using T = float; };
struct BF16 { using T = uint16_t; };
struct F16 { using T = uint16_t; };
struct I8 { using T = int8_t; };

#ifdef GF_AVX512
inline __m512 load16(const float* p, F32) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p, BF16) {
  __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));  // bf16 is the top half of an fp32
}
inline __m512 load16(const uint16_t* p, F16) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline __m512 load16(const int8_t* p, I8) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
#endif

inline float widen(float v, F32) { return v; }
inline float widen(uint16_t v, BF16) { return bf16_to_f32(v); }
inline float widen(uint16_t v, F16) { return f16_to_f32(v); }
inline float widen(int8_t v, I8) { return static_cast<float>(v); }

// What is done to each finished sum: times the row's scale (int8), plus the bias; either may be absent.
struct Epilogue {
  const float* scale;
  const float* bias;
  float operator()(float acc, int64_t n) const { return acc * (scale ? scale[n] : 1.f) + (bias ? bias[n] : 0.f); }
};

// --- dense weights: y[m, n] = out(sum_k x[m, k] w[n, k], n) --------------------------------------------------------
template <class Kind>
void dense_rows(const float* x, int64_t M, int64_t K, const typename Kind::T* w, Epilogue out,
                float* y, int64_t N, int64_t n0, int64_t n1) {
  int64_t n = n0;
#ifdef GF_AVX512
  if (K % 16 == 0) {
    if (M == 1) {  // 8 rows at a time: 8 independent FMA chains sharing each load of x
      for (; n + 8 <= n1; n += 8) {
        // fp32 rows are read a whole line per step, which the hardware prefetcher follows; narrower ones are not.
        const bool prefetch = sizeof(typename Kind::T) < 4 && n + 16 <= n1;
        __m512 acc[8];
        for (int r = 0; r < 8; ++r) acc[r] = _mm512_setzero_ps();
        for (int64_t k = 0; k < K; k += 16) {
          __m512 xv = _mm512_loadu_ps(x + k);
          // The same line of the next block's rows, a block ahead.
          if (prefetch && (k * sizeof(typename Kind::T)) % 64 == 0)
            for (int r = 0; r < 8; ++r) _mm_prefetch(reinterpret_cast<const char*>(w + (n + 8 + r) * K + k), _MM_HINT_T0);
          for (int r = 0; r < 8; ++r) acc[r] = _mm512_fmadd_ps(load16(w + (n + r) * K + k, Kind{}), xv, acc[r]);
        }
        for (int r = 0; r < 8; ++r) y[n + r] = out(_mm512_reduce_add_ps(acc[r]), n + r);
      }
    }
    // 4 weight rows x up to 4 input rows: each widened weight vector feeds 4 FMAs. The 4 rows (4K elements)
    // stay in L1/L2 while the next group of input rows passes over them, so memory is read once per call.
    for (; n + 4 <= n1; n += 4) {
      for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const int mb = static_cast<int>(M - m0 < 4 ? M - m0 : 4);
        __m512 acc[4][4];
        for (int r = 0; r < 4; ++r)
          for (int i = 0; i < 4; ++i) acc[r][i] = _mm512_setzero_ps();
        const bool prefetch = m0 == 0 && n + 8 <= n1;
        for (int64_t k = 0; k < K; k += 16) {
          if (prefetch && (k * sizeof(typename Kind::T)) % 64 == 0)
            for (int r = 0; r < 4; ++r) _mm_prefetch(reinterpret_cast<const char*>(w + (n + 4 + r) * K + k), _MM_HINT_T0);
          __m512 wv[4];
          for (int r = 0; r < 4; ++r) wv[r] = load16(w + (n + r) * K + k, Kind{});
          for (int i = 0; i < mb; ++i) {
            __m512 xv = _mm512_loadu_ps(x + (m0 + i) * K + k);
            for (int r = 0; r < 4; ++r) acc[r][i] = _mm512_fmadd_ps(wv[r], xv, acc[r][i]);
          }
        }
        for (int i = 0; i < mb; ++i)
          for (int r = 0; r < 4; ++r)
            y[(m0 + i) * N + n + r] = out(_mm512_reduce_add_ps(acc[r][i]), n + r);
      }
    }
  }
#endif
  for (; n < n1; ++n) {  // the rows left over (and every row without AVX-512 or with K % 16 != 0)
    const typename Kind::T* wr = w + n * K;
    for (int64_t m = 0; m < M; ++m) {
      const float* xr = x + m * K;
      float acc[16] = {0};
      int64_t k = 0;
      for (; k + 16 <= K; k += 16)
        for (int j = 0; j < 16; ++j) acc[j] += xr[k + j] * widen(wr[k + j], Kind{});
      float s = 0;
      for (int j = 0; j < 16; ++j) s += acc[j];
      for (; k < K; ++k) s += xr[k] * widen(wr[k], Kind{});
      y[m * N + n] = out(s, n);
    }
  }
}

// --- int4: w[n, k] = code * scale[n, g] + lo[n, g] for k in group g -----------------------------------------------
// Byte j of a group holds code j in its high nibble and code j + group/2 in its low one (quantize.int4_codes), so
// each nibble plane multiplies a contiguous half of the group's inputs. Per group:
//   sum_k x_k w_k = scale_g * sum_k x_k code_k + lo_g * sum_k x_k,
// and the last sums (xsum, one per input row and group) are computed once per call.
constexpr int64_t kMaxGroups = 1024;  // per row; more (K > 32768 at group 32) takes the plain loop

// The fp16 scales and minima of `rows` rows from row n, as fp32 (rows x G each).
inline void widen_groups(const uint16_t* scale, const uint16_t* lo, int64_t G, int64_t n, int rows, float* sc, float* lz) {
  int64_t i = 0;
#ifdef GF_AVX512
  for (; i + 16 <= rows * G; i += 16) {
    _mm512_storeu_ps(sc + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(scale + n * G + i))));
    _mm512_storeu_ps(lz + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(lo + n * G + i))));
  }
#endif
  for (; i < rows * G; ++i) {
    sc[i] = f16_to_f32(scale[n * G + i]);
    lz[i] = f16_to_f32(lo[n * G + i]);
  }
}

void int4_rows(const float* x, int64_t M, int64_t K, const uint8_t* q, const uint16_t* scale, const uint16_t* lo,
               int64_t G, const float* xsum, Epilogue out, float* y, int64_t N, int64_t n0, int64_t n1) {
  const int64_t g = K / G, half = g / 2;
  int64_t n = n0;
#ifdef GF_AVX512
  if (half % 16 == 0 && G <= kMaxGroups) {
    const __m512i low4 = _mm512_set1_epi32(15);
    float sc[4 * kMaxGroups], lz[4 * kMaxGroups];
    // Widen 16 codes of row n + r at group gi, offset j, into their two nibble planes.
    auto planes = [&](int64_t row, int64_t gi, int64_t j, __m512& hi, __m512& lw) {
      __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + row * (K / 2) + gi * half + j)));
      hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4));
      lw = _mm512_cvtepi32_ps(_mm512_and_si512(b, low4));
    };
    auto zero_term = [&](int r, int64_t m) {
      float z = 0;
      for (int64_t gi = 0; gi < G; ++gi) z += lz[r * G + gi] * xsum[m * G + gi];
      return z;
    };
    if (M == 1) {  // 4 rows, each nibble plane in its own chain: 8 independent FMA chains per step
      for (; n + 4 <= n1; n += 4) {
        widen_groups(scale, lo, G, n, 4, sc, lz);
        __m512 tot[4];
        for (int r = 0; r < 4; ++r) tot[r] = _mm512_setzero_ps();
        for (int64_t gi = 0; gi < G; ++gi) {
          __m512 dh[4], dl[4];
          for (int r = 0; r < 4; ++r) dh[r] = dl[r] = _mm512_setzero_ps();
          for (int64_t j = 0; j < half; j += 16) {
            if (n + 8 <= n1 && j % 64 == 0)
              for (int r = 0; r < 4; ++r) _mm_prefetch(reinterpret_cast<const char*>(q + (n + 4 + r) * (K / 2) + gi * half + j), _MM_HINT_T0);
            __m512 xa = _mm512_loadu_ps(x + gi * g + j), xb = _mm512_loadu_ps(x + gi * g + half + j);
            for (int r = 0; r < 4; ++r) {
              __m512 hi, lw;
              planes(n + r, gi, j, hi, lw);
              dh[r] = _mm512_fmadd_ps(hi, xa, dh[r]);
              dl[r] = _mm512_fmadd_ps(lw, xb, dl[r]);
            }
          }
          for (int r = 0; r < 4; ++r) tot[r] = _mm512_fmadd_ps(_mm512_add_ps(dh[r], dl[r]), _mm512_set1_ps(sc[r * G + gi]), tot[r]);
        }
        for (int r = 0; r < 4; ++r) y[n + r] = out(_mm512_reduce_add_ps(tot[r]) + zero_term(r, 0), n + r);
      }
    }
    for (; n + 2 <= n1; n += 2) {  // 2 rows x up to 4 input rows
      widen_groups(scale, lo, G, n, 2, sc, lz);
      for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const int mb = static_cast<int>(M - m0 < 4 ? M - m0 : 4);
        __m512 tot[2][4];
        for (int r = 0; r < 2; ++r)
          for (int i = 0; i < 4; ++i) tot[r][i] = _mm512_setzero_ps();
        for (int64_t gi = 0; gi < G; ++gi) {
          __m512 dot[2][4];
          for (int r = 0; r < 2; ++r)
            for (int i = 0; i < 4; ++i) dot[r][i] = _mm512_setzero_ps();
          for (int64_t j = 0; j < half; j += 16) {
            __m512 hi[2], lw[2];
            for (int r = 0; r < 2; ++r) planes(n + r, gi, j, hi[r], lw[r]);
            for (int i = 0; i < mb; ++i) {
              const float* xg = x + (m0 + i) * K + gi * g + j;
              __m512 xa = _mm512_loadu_ps(xg), xb = _mm512_loadu_ps(xg + half);
              for (int r = 0; r < 2; ++r) dot[r][i] = _mm512_fmadd_ps(lw[r], xb, _mm512_fmadd_ps(hi[r], xa, dot[r][i]));
            }
          }
          for (int r = 0; r < 2; ++r) {
            __m512 sv = _mm512_set1_ps(sc[r * G + gi]);
            for (int i = 0; i < mb; ++i) tot[r][i] = _mm512_fmadd_ps(dot[r][i], sv, tot[r][i]);
          }
        }
        for (int i = 0; i < mb; ++i)
          for (int r = 0; r < 2; ++r)
            y[(m0 + i) * N + n + r] = out(_mm512_reduce_add_ps(tot[r][i]) + zero_term(r, m0 + i), n + r);
      }
    }
  }
#endif
  for (; n < n1; ++n) {
    const uint8_t* qr = q + n * (K / 2);
    for (int64_t m = 0; m < M; ++m) {
      const float* xr = x + m * K;
      float s = 0;
      for (int64_t gi = 0; gi < G; ++gi) {
        float d = 0;
        for (int64_t j = 0; j < half; ++j) {
          uint8_t b = qr[gi * half + j];
          d += static_cast<float>(b >> 4) * xr[gi * g + j] + static_cast<float>(b & 15) * xr[gi * g + half + j];
        }
        s += d * f16_to_f32(scale[n * G + gi]) + f16_to_f32(lo[n * G + gi]) * xsum[m * G + gi];
      }
      y[m * N + n] = out(s, n);
    }
  }
}

// Output rows per task: enough work (~64K weights) that a thread's share outweighs waking it.
int64_t grain(int64_t K) { return std::max<int64_t>(8, (int64_t{1} << 16) / std::max<int64_t>(K, 1)); }

void check_x(const at::Tensor& x, int64_t K) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.device().is_cpu(),
              "gemv: x must be a contiguous 2-D fp32 CPU tensor");
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= kMaxRows, "gemv: x must have 1 to ", kMaxRows, " rows, got ", x.size(0));
  TORCH_CHECK(x.size(1) == K, "gemv: x has ", x.size(1), " columns, the weight ", K);
}

const float* bias_of(const std::optional<at::Tensor>& bias, int64_t N) {
  if (!bias.has_value()) return nullptr;
  TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N,
              "gemv: bias must be a contiguous fp32 (N,) tensor");
  return bias->data_ptr<float>();
}

at::Tensor gemv(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.device().is_cpu(), "gemv: w must be a contiguous 2-D CPU tensor");
  const int64_t M = x.size(0), N = w.size(0), K = w.size(1);
  check_x(x, K);
  const auto dtype = w.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "gemv: weight dtype must be float32, bfloat16 or float16, got ", dtype);
  at::Tensor y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const Epilogue out{nullptr, bias_of(bias, N)};
  const void* wp = w.data_ptr();
  at::parallel_for(0, N, grain(K), [&](int64_t n0, int64_t n1) {
    if (dtype == at::kFloat) dense_rows<F32>(xp, M, K, static_cast<const float*>(wp), out, yp, N, n0, n1);
    else if (dtype == at::kBFloat16) dense_rows<BF16>(xp, M, K, static_cast<const uint16_t*>(wp), out, yp, N, n0, n1);
    else dense_rows<F16>(xp, M, K, static_cast<const uint16_t*>(wp), out, yp, N, n0, n1);
  });
  return y;
}

at::Tensor gemv_int8(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kChar && q.is_contiguous(), "gemv_int8: q must be contiguous int8 (N, K)");
  const int64_t M = x.size(0), N = q.size(0), K = q.size(1);
  check_x(x, K);
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.numel() == N && scale.is_contiguous(), "gemv_int8: scale must be fp32 (N,)");
  at::Tensor y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const int8_t* qp = q.data_ptr<int8_t>();
  const Epilogue out{scale.data_ptr<float>(), bias_of(bias, N)};
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, grain(K), [&](int64_t n0, int64_t n1) { dense_rows<I8>(xp, M, K, qp, out, yp, N, n0, n1); });
  return y;
}

at::Tensor gemv_int4(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale, const at::Tensor& lo,
                     const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kByte && q.is_contiguous(), "gemv_int4: q must be contiguous uint8 (N, K/2)");
  const int64_t M = x.size(0), N = q.size(0), K = 2 * q.size(1);
  check_x(x, K);
  TORCH_CHECK(scale.dim() == 2 && scale.size(0) == N && scale.scalar_type() == at::kHalf && scale.is_contiguous() &&
                  lo.sizes() == scale.sizes() && lo.scalar_type() == at::kHalf && lo.is_contiguous(),
              "gemv_int4: scale and lo must be contiguous fp16 (N, groups)");
  const int64_t G = scale.size(1);
  TORCH_CHECK(G >= 1 && K % G == 0 && (K / G) % 2 == 0, "gemv_int4: ", G, " groups do not split ", K, " columns in even groups");
  at::Tensor xsum = x.view({M, G, K / G}).sum(-1).contiguous();  // (M, G)
  at::Tensor y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const uint16_t* sp = static_cast<const uint16_t*>(scale.data_ptr());
  const uint16_t* lp = static_cast<const uint16_t*>(lo.data_ptr());
  const float* xs = xsum.data_ptr<float>();
  const Epilogue out{nullptr, bias_of(bias, N)};
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, grain(K), [&](int64_t n0, int64_t n1) { int4_rows(xp, M, K, qp, sp, lp, G, xs, out, yp, N, n0, n1); });
  return y;
}

}  // namespace

TORCH_LIBRARY(gptforge_gemv, m) {
  m.def("gemv(Tensor x, Tensor w, Tensor? bias=None) -> Tensor");
  m.def("gemv_int8(Tensor x, Tensor q, Tensor scale, Tensor? bias=None) -> Tensor");
  m.def("gemv_int4(Tensor x, Tensor q, Tensor scale, Tensor lo, Tensor? bias=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(gptforge_gemv, CPU, m) {
  m.impl("gemv", &gemv);
  m.impl("gemv_int8", &gemv_int8);
  m.impl("gemv_int4", &gemv_int4);
}
