// Few-row matrix products for CPU decoding: y (M, N) = x (M, K) @ W^T for M <= 16 rows of fp32 activations and
// a weight W (N, K) stored as fp32, bf16, fp16, int8 (one scale per row) or int4 (codes in groups, gptforge's
// "group-halves" packing, fp16 scale and minimum per group).
//
// Why by hand: decoding multiplies one to a few rows by every weight matrix, so its speed is the rate at which
// the weights stream from memory. PyTorch's CPU GEMMs re-pack the weight on every call and its weight-only
// low-bit kernels run 5-10x below the fp32 GEMV here (docs/compress.md); a torch.compile'd reduction widens the
// codes in registers but keeps one accumulator chain per row (latency-bound, ~5 G multiply-adds/s/core). Here
// each weight is read once per call, widened to fp32 in registers, and multiplied into a register tile of
// independent accumulators (8 weight rows for one input row, down to 3 weight rows x 8 input rows), which keeps
// the FMA units busy enough to stay at the memory bandwidth. bf16 inputs with bf16 weights may instead use
// AVX512-BF16 dot products. Threads split the output rows through at::parallel_for (torch's own pool and thread
// count).
//
// Built at first use for the machine it runs on (-march=native), see gptforge/native/build.py. AVX-512 paths where the
// compiler targets AVX-512F, a plain loop otherwise (which the compiler vectorizes as far as the target allows).

#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "kernels.h"

#include <cstdint>
#include <optional>
#include <cstring>
#include <type_traits>
#include <vector>

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
// T: the weight's storage; X: the input rows' (fp32, except for BF16Dot); kStep: inputs per step of a tile.
struct F32 { using T = float; using X = float; static constexpr int kStep = 16; };
struct BF16 { using T = uint16_t; using X = float; static constexpr int kStep = 16; };
struct F16 { using T = uint16_t; using X = float; static constexpr int kStep = 16; };
struct I8 { using T = int8_t; using X = float; static constexpr int kStep = 16; };
// bf16 weights times bf16 inputs (a bf16 model's activations, already rounded to bf16) with AVX512-BF16's
// vdpbf16ps: 32 products of bf16 pairs summed into 16 fp32 lanes per instruction, a whole 64-byte line of a weight
// row per load, no widening. `linear` uses it for one row, where it streamed faster (`gpt2` bf16 at batch 1: 39 ->
// 41-48 tokens/s); from 2 rows it measured slower than widening + FMA (docs/BENCHMARKS.md).
struct BF16Dot { using T = uint16_t; using X = uint16_t; static constexpr int kStep = 32; };

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
#ifdef GF_AVX512
// R weight rows x MB input rows, over the whole of K: each widened weight vector feeds MB FMAs and each input vector
// R, into R x MB independent accumulators. R and MB are template parameters so that the accumulators are registers:
// with a run-time input count (the first version's 4 x 4 block) the compiler kept them in memory, and 8 rows ran at
// ~55 GFLOP/s, a third of this core's FMA rate. `next`, when given, is the next tile's first row: the same line of
// each of its rows is prefetched a tile ahead, for the formats the hardware prefetcher does not keep up with.
template <class Kind, int R, int MB>
inline void tile(const typename Kind::X* x, int64_t K, const typename Kind::T* w, Epilogue out, float* y, int64_t N, int64_t n,
                 const typename Kind::T* next) {
  __m512 acc[R][MB];
#pragma GCC unroll 32
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 32
    for (int i = 0; i < MB; ++i) acc[r][i] = _mm512_setzero_ps();
  const typename Kind::T* wn = w + n * K;
  for (int64_t k = 0; k < K; k += Kind::kStep) {
    if (next && (k * sizeof(typename Kind::T)) % 64 == 0)
#pragma GCC unroll 32
      for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(next + r * K + k), _MM_HINT_T0);
    if constexpr (std::is_same_v<Kind, BF16Dot>) {
#ifdef __AVX512BF16__
      __m512bh wv[R];
#pragma GCC unroll 32
      for (int r = 0; r < R; ++r) wv[r] = (__m512bh)_mm512_loadu_si512(wn + r * K + k);
#pragma GCC unroll 32
      for (int i = 0; i < MB; ++i) {
        const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + i * K + k);
#pragma GCC unroll 32
        for (int r = 0; r < R; ++r) acc[r][i] = _mm512_dpbf16_ps(acc[r][i], wv[r], xv);
      }
#endif
    } else {
      __m512 wv[R];
#pragma GCC unroll 32
      for (int r = 0; r < R; ++r) wv[r] = load16(wn + r * K + k, Kind{});
#pragma GCC unroll 32
      for (int i = 0; i < MB; ++i) {
        const __m512 xv = _mm512_loadu_ps(x + i * K + k);
#pragma GCC unroll 32
        for (int r = 0; r < R; ++r) acc[r][i] = _mm512_fmadd_ps(wv[r], xv, acc[r][i]);
      }
    }
  }
#pragma GCC unroll 32
  for (int i = 0; i < MB; ++i)
#pragma GCC unroll 32
    for (int r = 0; r < R; ++r) y[i * N + n + r] = out(_mm512_reduce_add_ps(acc[r][i]), n + r);
}

// tile<Kind, R, mb> for a run-time mb in 1..8 (only the shapes that fit the 32 vector registers are built).
template <class Kind, int R, int MB = 1>
inline void tile_of(int mb, const typename Kind::X* x, int64_t K, const typename Kind::T* w, Epilogue out, float* y, int64_t N,
                    int64_t n, const typename Kind::T* next) {
  if constexpr (MB <= 8) {
    if constexpr (R * MB <= 24 || R == 1) {
      if (mb == MB) return tile<Kind, R, MB>(x, K, w, out, y, N, n, next);
    }
    tile_of<Kind, R, MB + 1>(mb, x, K, w, out, y, N, n, next);
  }
}

// Weight rows per tile for a chunk of mb input rows: as many as keep R x mb accumulators, R weights and an input
// within the 32 registers.
constexpr int tile_rows(int mb) { return mb <= 2 ? 8 : mb == 3 ? 6 : mb == 4 ? 5 : mb <= 6 ? 4 : 3; }

// Rows n.. of [n, n1) in tiles of R, each tile over every chunk of input rows while its weights are in L1, so the
// weights are read from memory once per call. Returns the first row not done (fewer than R were left).
template <class Kind, int R>
int64_t tiled_rows(const typename Kind::X* x, int64_t K, const typename Kind::T* w, Epilogue out, float* y, int64_t N,
                   int64_t n, int64_t n1, int chunks, int hi, int big, bool prefetch) {
  for (; n + R <= n1; n += R) {
    const typename Kind::T* next = prefetch && n + 2 * R <= n1 ? w + (n + R) * K : nullptr;
    int64_t m0 = 0;
    for (int c = 0; c < chunks; ++c) {
      const int mb = c < big ? hi : hi - 1;
      tile_of<Kind, R>(mb, x + m0 * K, K, w, out, y + m0 * N, N, n, c == 0 ? next : nullptr);
      m0 += mb;
    }
  }
  return n;
}

// One input row (fp32 weights, or bf16/fp16 widened): a tile of 4 weight rows from each half of [n, n1) at once
// (8 accumulators, as one 8-row tile). Two regions of the matrix, and so two pages, stream at once: fp32 3% less time
// than one 8-row tile for the `small` shape's matrices (in L3, not L2) and for gpt2's (out of L3), bf16 7% less, in
// one process (docs/BENCHMARKS.md, "fp32 one-row products"). The 2-byte formats prefetch the next tiles as
// tiled_rows does; for fp32 that prefetch measured no faster. Each row's sum is formed in the same order as in
// `tile`. Returns the first row not done (fewer than 8 were left).
template <class Kind>
int64_t halves_rows(const float* x, int64_t K, const typename Kind::T* w, Epilogue out, float* y, int64_t n, int64_t n1) {
  constexpr int H = 4;
  constexpr bool kPrefetch = sizeof(typename Kind::T) < 4;  // as in tiled_rows: for bf16/fp16, not fp32
  const int64_t len = (n1 - n) / (2 * H) * H;  // rows per half
  for (int64_t t = 0; t < len; t += H) {
    const typename Kind::T* wp[2] = {w + (n + t) * K, w + (n + len + t) * K};
    const bool prefetch = kPrefetch && t + H < len;
    __m512 acc[2][H];
#pragma GCC unroll 8
    for (int h = 0; h < 2; ++h)
#pragma GCC unroll 8
      for (int r = 0; r < H; ++r) acc[h][r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
      if (prefetch && (k * sizeof(typename Kind::T)) % 64 == 0)
#pragma GCC unroll 8
        for (int h = 0; h < 2; ++h)
#pragma GCC unroll 8
          for (int r = 0; r < H; ++r) _mm_prefetch(reinterpret_cast<const char*>(wp[h] + (H + r) * K + k), _MM_HINT_T0);
      const __m512 xv = _mm512_loadu_ps(x + k);
#pragma GCC unroll 8
      for (int h = 0; h < 2; ++h)
#pragma GCC unroll 8
        for (int r = 0; r < H; ++r) acc[h][r] = _mm512_fmadd_ps(load16(wp[h] + r * K + k, Kind{}), xv, acc[h][r]);
    }
#pragma GCC unroll 8
    for (int h = 0; h < 2; ++h)
#pragma GCC unroll 8
      for (int r = 0; r < H; ++r) {
        const int64_t row = n + h * len + t + r;
        y[row] = out(_mm512_reduce_add_ps(acc[h][r]), row);
      }
  }
  return n + 2 * len;
}
#endif

template <class Kind>
void dense_rows(const typename Kind::X* x, int64_t M, int64_t K, const typename Kind::T* w, Epilogue out,
                float* y, int64_t N, int64_t n0, int64_t n1) {
  int64_t n = n0;
#ifdef GF_AVX512
  if (K % Kind::kStep == 0) {
    // Input rows in chunks of at most 8, as even as possible: `big` chunks of hi rows, the others hi - 1.
    const int chunks = static_cast<int>((M + 7) / 8), hi = static_cast<int>((M + chunks - 1) / chunks);
    const int big = static_cast<int>(M - chunks * (hi - 1));
    if constexpr (std::is_same_v<Kind, F32> || std::is_same_v<Kind, BF16> || std::is_same_v<Kind, F16>)
      if (M == 1) n = halves_rows<Kind>(x, K, w, out, y, n, n1);
    // fp32 rows of one input row are read a whole line per step, which the hardware prefetcher follows.
    const bool prefetch = sizeof(typename Kind::T) < 4 || M > 1;
    auto rows = [&]<int R>() { n = tiled_rows<Kind, R>(x, K, w, out, y, N, n, n1, chunks, hi, big, prefetch); };
    switch (tile_rows(hi)) {
      case 8: rows.template operator()<8>(); break;
      case 6: rows.template operator()<6>(); break;
      case 5: rows.template operator()<5>(); break;
      case 4: rows.template operator()<4>(); break;
      default: rows.template operator()<3>(); break;
    }
    n = tiled_rows<Kind, 1>(x, K, w, out, y, N, n, n1, chunks, hi, big, false);  // the last few rows
  }
#endif
  if constexpr (std::is_same_v<Kind, BF16Dot>) {
    TORCH_CHECK(n == n1, "gemv: the bf16 dot-product path needs AVX512-BF16 and K % 32 == 0");
    return;
  } else
  for (; n < n1; ++n) {  // every row without AVX-512 or with K % 16 != 0
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

void check_w(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.device().is_cpu(), "gemv: w must be a contiguous 2-D CPU tensor");
  const auto dtype = w.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "gemv: weight dtype must be float32, bfloat16 or float16, got ", dtype);
}

// y (M, N) = x (M, K) @ w^T (+ bias) for 1..kMaxRows contiguous fp32 rows.
void gemv_rows(const float* xp, int64_t M, const at::Tensor& w, const float* bias, float* yp) {
  const int64_t N = w.size(0), K = w.size(1);
  const auto dtype = w.scalar_type();
  const Epilogue out{nullptr, bias};
  const void* wp = w.data_ptr();
  at::parallel_for(0, N, grain(K), [&](int64_t n0, int64_t n1) {
    if (dtype == at::kFloat) dense_rows<F32>(xp, M, K, static_cast<const float*>(wp), out, yp, N, n0, n1);
    else if (dtype == at::kBFloat16) dense_rows<BF16>(xp, M, K, static_cast<const uint16_t*>(wp), out, yp, N, n0, n1);
    else dense_rows<F16>(xp, M, K, static_cast<const uint16_t*>(wp), out, yp, N, n0, n1);
  });
}

at::Tensor gemv(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  check_w(w);
  const int64_t M = x.size(0), N = w.size(0);
  check_x(x, w.size(1));
  at::Tensor y = at::empty({M, N}, x.options());
  gemv_rows(x.data_ptr<float>(), M, w, bias_of(bias, N), y.data_ptr<float>());
  return y;
}

}  // namespace

namespace gptforge {

// F.linear(x, w, bias) for x (..., K) of any float dtype, the result in x's dtype: up to kMaxRows rows through
// `gemv`, more through at::linear (a prefill, where the GEMM is faster). One call from Python does what was five
// (reshape, widen, contiguous, gemv, narrow back) behind a weight subclass's __torch_function__: ~6 us more per
// matmul, as long as the product itself for the demo model's matrices.
at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(w.dim() == 2, "linear: w must be 2-D (N, K)");
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K, "linear: x has ", x.size(-1), " columns, the weight ", K);
  const int64_t M = K ? x.numel() / K : 0;
  if (M < 1 || M > kMaxRows || !x.device().is_cpu()) return at::linear(x, w, bias);
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // frozen weights, no_grad: as in step.cpp
  std::optional<at::Tensor> bf;
  if (bias.has_value()) bf = bias->to(at::kFloat).contiguous();
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
#if defined(GF_AVX512) && defined(__AVX512BF16__)
  if (M == 1 && x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16 && K % BF16Dot::kStep == 0) {
    at::Tensor wc = w.contiguous(), xb = x.reshape({M, K}).contiguous();
    at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
    const auto* xp = static_cast<const uint16_t*>(xb.data_ptr());
    const auto* wp = static_cast<const uint16_t*>(wc.data_ptr());
    const Epilogue out{nullptr, bias_of(bf, N)};
    float* yp = y.data_ptr<float>();
    at::parallel_for(0, N, grain(K), [&](int64_t n0, int64_t n1) { dense_rows<BF16Dot>(xp, M, K, wp, out, yp, N, n0, n1); });
    return y.to(at::kBFloat16).view(shape);
  }
#endif
  at::Tensor xf = x.reshape({M, K}).to(at::kFloat).contiguous();
  return gemv(xf, w.contiguous(), bf).to(x.scalar_type()).view(shape);
}

void gemv_into(const float* x, int64_t M, const at::Tensor& w, const float* bias, float* y) {
  check_w(w);
  TORCH_CHECK(M >= 1 && M <= kMaxRows, "gemv_into: 1 to ", kMaxRows, " rows, got ", M);
  gemv_rows(x, M, w, bias, y);
}

}  // namespace gptforge

namespace {

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
  m.def("linear(Tensor x, Tensor w, Tensor? bias=None) -> Tensor");
  m.def("gemv_int8(Tensor x, Tensor q, Tensor scale, Tensor? bias=None) -> Tensor");
  m.def("gemv_int4(Tensor x, Tensor q, Tensor scale, Tensor lo, Tensor? bias=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(gptforge_gemv, CPU, m) {
  m.impl("gemv", &gemv);
  m.impl("linear", &gptforge::linear);
  m.impl("gemv_int8", &gemv_int8);
  m.impl("gemv_int4", &gemv_int4);
}
