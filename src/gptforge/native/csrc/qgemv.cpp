// Products of int8 / int4 weights with dynamically quantized int8 activations, on the CPU's integer dot-product
// instructions: y (M, N) = dequant(x_q) @ dequant(W)^T, the activations quantized when the call is made.
//
// Why: the weight-only kernels of gemv.cpp widen every code to fp32 and multiply in fp32; at 1-16 rows they are
// bound by that arithmetic (~6.5 G int8 weights/s/core), not by the memory that streams the weights. Quantizing the
// activations too (llama.cpp's Q8_0/Q4_0 and CTranslate2 do the same) lets one vpdpbusd multiply-add 64 byte
// pairs into 16 int32 sums, and the products are exact integers until one fp32 scaling per sum (int8) or per
// group (int4).
//
// Numerics (the test reference, tests/test_gemv.py): per input row m, int8 weights take xq = round(x / s_m),
// s_m = max|x_m| / 127 (symmetric, clamped to [-127, 127]); int4 weights take one such scale per group of g
// inputs (the weight's group). Then
//   int8: y[m, n] = (sum_k xq[m, k] q[n, k]) * s_m * scale[n] + bias[n]        (the sum exact in int32)
//   int4: y[m, n] = sum_g s[m, g] (scale[n, g] sum_{k in g} xq q + lo[n, g] sum_{k in g} xq) + bias[n]
// i.e. the fp32 product of the quantize-dequantized activations with the dequantized weights, up to the order of
// the fp32 sums (exactly the integer sums; int4 adds G fp32 terms per output).
//
// Paths, picked at run time from the CPU (cpuid) and forceable for tests (`set_isa`): AVX-512 VNNI (vpdpbusd on
// 64 bytes; u8 x s8, so int8 activations are offset by 128 and 128 * sum(q[n]) is subtracted), AVX-VNNI (the same
// on 32 bytes), AVX2 (vpmaddubsw + vpmaddwd, int8 through the sign trick: |q| x sign(q) * xq never saturates), and
// a scalar loop. Each vector path is compiled under its own `#pragma GCC target` (qgemv_body.h, included once per
// path), so one library built anywhere holds them all. More than kMaxRows rows (a prefill) with int8 weights run
// on AMX tiles where the CPU has them, else on the packed kernels (each panel of output rows laid out once per call
// for broadcast activations, qgemv_body.h), or on oneDNN's at::_int_mm (plain AVX2, where it measured faster):
// the same quantized activations and the same exact int32 sums on every path. Before AMX tiles, prefills ran on
// oneDNN everywhere: 1.4-1.9x slower on this CPU, and its first call left ~5 MB of code and buffers resident.
//
// int4 weights are read in their own layout, made once per matrix by int4_pack from the checkpoint's tensors: tiles
// of 16 output rows whose 4-byte runs interleave, so a vector's int32 lanes are 16 (or 8) output rows and the
// activations are broadcast (the row-major layout needed a scale per 4-byte lane and a 16-lane sum per row).

#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/_int_mm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "kernels.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace {

constexpr int64_t kMaxRows = 16;      // rows through the few-row kernels; more go to at::_int_mm (int8)
constexpr int64_t kMaxGroups = 4096;  // int4 groups per row the kernels take

// What the kernels read: the prepared activations, the weights, and where the results go.
struct I8Args {
  const uint8_t* xs;  // (M, Kp) prepared activations, zero-padded to Kp (a multiple of 64)
  int64_t M, K, Kp, N;
  const int8_t* w;       // (N, K)
  const float* sx;       // (M,) activation scales
  const float* sw;       // (N,) weight scales
  const int32_t* wsum;   // (N,) sum of each weight row (the VNNI offset's correction)
  const float* bias;     // (N,) or null
  float* y;              // (M, N)
};

// The int4 kernels' activations, per block of kActRows input rows and per group, one record of 64 (1 + h/4) bytes:
// each row's (s[m, g], s[m, g] * sum of the group's xq) as two fp32, then per 4-byte chunk c of the group's packed
// bytes, each row's 4 codes of the first half (xa) and 4 of the second (xb): what one tile step reads sits in one
// record, at offsets fixed at compile time.
constexpr int kActRows = 8;
// How far ahead of the tile step the int4 kernels prefetch (into L2): a matrix is one stream of tiles and the
// hardware prefetchers stop at each 4 KB page. Out of cache, 1 row, A/B in one process (shared machine): none
// 0.89x, 1 KB into L1 1.00x, 2 KB into L2 1.09x (twice), 4 KB 0.95x; 8 rows within +-5%.
constexpr int64_t kPrefetch = 2048;

struct I4Args {
  const uint8_t* act;           // (ceil(M / kActRows), G, arec) the activation records
  int64_t M, G, h, N, rec, arec;  // h = g / 2 bytes per group; rec = 64 + 16 h bytes per tile and group
  const uint8_t* p;             // (ceil(N / 16), G, rec) the packed tiles (int4_pack)
  const float* bias;
  float* y;
};

// What the many-row int8 kernels read (int8_gemm in qgemv_body.h, amx::int8_gemm).
struct GemmArgs {
  const uint8_t* xs;  // (M, Kp) prepared activations, zero-padded to Kp (a multiple of 64; AMX: M to a multiple of 32)
  int64_t M, K, Kp, N;
  const int8_t* w;      // (N, K)
  const float* sx;      // (M,)
  const float* sw;      // (N,)
  const int32_t* wsum;  // (N,)
  const float* bias;    // (N,) or null
  float* y;             // (M, N)
};

// Rows [n0, n0 + 16) of w (N, K) packed for the many-row kernels into out (Kq 64-byte records): record kq holds
// each row's codes 4 kq .. 4 kq + 3 at byte 4 r (zero past K and past N). Kq is a multiple of 16.
void pack16(const int8_t* w, int64_t N, int64_t K, int64_t n0, int64_t Kq, uint8_t* out);

inline float half_to_float(uint16_t v) { return static_cast<float>(c10::Half(v, c10::Half::from_bits())); }

// --- scalar: the plain loops, for CPUs without AVX2 and as a forced path in the tests ---------------------------
namespace scalar {
void int8_rows(const I8Args& a, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t m = 0; m < a.M; ++m) {
      int64_t d = 0;
      const uint8_t* xs = a.xs + m * a.Kp;
      for (int64_t k = 0; k < a.K; ++k) d += static_cast<int64_t>(static_cast<int8_t>(xs[k])) * a.w[n * a.K + k];
      a.y[m * a.N + n] = static_cast<float>(d) * (a.sx[m] * a.sw[n]) + (a.bias ? a.bias[n] : 0.f);
    }
}

void int4_rows(const I4Args& a, int64_t t0, int64_t t1) {
  for (int64_t n = t0 * 16; n < std::min(a.N, t1 * 16); ++n) {
    const uint8_t* tile = a.p + (n / 16) * a.G * a.rec;
    const int64_t r = n % 16;
    for (int64_t m = 0; m < a.M; ++m) {
      float s = 0, z = 0;
      for (int64_t g = 0; g < a.G; ++g) {
        const uint8_t* p = tile + g * a.rec;
        const uint8_t* x = a.act + ((m / kActRows) * a.G + g) * a.arec + 8 * (m % kActRows);
        uint16_t sc, lz;
        float sz[2];
        std::memcpy(&sc, p + 2 * r, 2);
        std::memcpy(&lz, p + 32 + 2 * r, 2);
        std::memcpy(sz, x, 8);
        int32_t d = 0;
        for (int64_t j = 0; j < a.h; ++j) {
          const uint8_t b = p[64 + 64 * (j / 4) + 4 * r + j % 4];
          const auto* xq = reinterpret_cast<const int8_t*>(x + 64 * (j / 4 + 1));
          d += (b >> 4) * xq[j % 4] + (b & 15) * xq[4 + j % 4];
        }
        s += static_cast<float>(d) * (half_to_float(sc) * sz[0]);
        z += half_to_float(lz) * sz[1];
      }
      a.y[m * a.N + n] = (s + z) + (a.bias ? a.bias[n] : 0.f);
    }
  }
}
void pack16(const int8_t* w, int64_t N, int64_t K, int64_t n0, int64_t Kq, uint8_t* out) {
  std::memset(out, 0, static_cast<size_t>(Kq * 64));
  for (int64_t r = 0; r < 16 && n0 + r < N; ++r)
    for (int64_t k = 0; k < K; ++k) out[(k / 4) * 64 + 4 * r + k % 4] = static_cast<uint8_t>(w[(n0 + r) * K + k]);
}
}  // namespace scalar

// --- AVX-512 VNNI -------------------------------------------------------------------------------------------------
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")
namespace avx512vnni {
constexpr int W = 64, kRegs = 32;
constexpr bool kOffset = true;
using VI = __m512i;
using VF = __m512;
inline VI zero() { return _mm512_setzero_si512(); }
inline VF zerof() { return _mm512_setzero_ps(); }
inline VI loadb(const void* p) { return _mm512_loadu_si512(p); }
inline VF tof(VI v) { return _mm512_cvtepi32_ps(v); }
inline VF mulf(VF a, VF b) { return _mm512_mul_ps(a, b); }
inline VF fmaf(VF a, VF b, VF c) { return _mm512_fmadd_ps(a, b, c); }
inline int32_t hsum(VI v) { return _mm512_reduce_add_epi32(v); }
inline VF addf(VF a, VF b) { return _mm512_add_ps(a, b); }
inline VI subi(VI a, VI b) { return _mm512_sub_epi32(a, b); }
inline VF loadf(const float* p) { return _mm512_loadu_ps(p); }
inline VF setf(float s) { return _mm512_set1_ps(s); }
inline void storef(float* p, VF v) { _mm512_storeu_ps(p, v); }
inline VI dot8(VI acc, VI w, VI xs) { return _mm512_dpbusd_epi32(acc, xs, w); }
inline VI dot4(VI acc, VI c, VI xq) { return _mm512_dpbusd_epi32(acc, c, xq); }
inline VI nib_hi(VI v) { return _mm512_and_si512(_mm512_srli_epi16(v, 4), _mm512_set1_epi8(15)); }
inline VI nib_lo(VI v) { return _mm512_and_si512(v, _mm512_set1_epi8(15)); }
inline VI bcast4(const void* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}
inline VF halves(const void* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
// The activations' quantization, 16 at a time (the same IEEE division and round-half-even as the scalar code).
inline float amax(const float* x, int64_t n) {
  __m512 m = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(x + k)));
  float r = _mm512_reduce_max_ps(m);
  for (; k < n; ++k) r = std::max(r, std::fabs(x[k]));
  return r;
}
inline void codes(const float* x, int64_t n, float s, uint8_t flip, uint8_t* out) {
  const __m512 sv = _mm512_set1_ps(s), lo = _mm512_set1_ps(-127.f), hi = _mm512_set1_ps(127.f);
  const __m128i f = _mm_set1_epi8(static_cast<char>(flip));
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) {
    __m512 v = _mm512_roundscale_ps(_mm512_div_ps(_mm512_loadu_ps(x + k), sv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + k), _mm_xor_si128(_mm512_cvtepi32_epi8(_mm512_cvtps_epi32(v)), f));
  }
  for (; k < n; ++k) out[k] = static_cast<uint8_t>(static_cast<int8_t>(std::clamp(std::nearbyint(x[k] / s), -127.f, 127.f))) ^ flip;
}
// 16 rows of 16 int32 each -> 16 columns: r[j] becomes lane j of every input (4-byte runs of the weights' codes).
inline void transpose16(__m512i (&r)[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int g = 0; g < 16; g += 4) {  // u[g + d], 128-bit lane l: lane 4 l + d of rows g .. g + 3
    u[g] = _mm512_unpacklo_epi64(t[g], t[g + 2]);
    u[g + 1] = _mm512_unpackhi_epi64(t[g], t[g + 2]);
    u[g + 2] = _mm512_unpacklo_epi64(t[g + 1], t[g + 3]);
    u[g + 3] = _mm512_unpackhi_epi64(t[g + 1], t[g + 3]);
  }
  for (int d = 0; d < 4; ++d) {
    const __m512i v0 = _mm512_shuffle_i32x4(u[d], u[4 + d], 0x88), v1 = _mm512_shuffle_i32x4(u[d], u[4 + d], 0xdd);
    const __m512i v2 = _mm512_shuffle_i32x4(u[8 + d], u[12 + d], 0x88);
    const __m512i v3 = _mm512_shuffle_i32x4(u[8 + d], u[12 + d], 0xdd);
    r[d] = _mm512_shuffle_i32x4(v0, v2, 0x88);
    r[4 + d] = _mm512_shuffle_i32x4(v1, v3, 0x88);
    r[8 + d] = _mm512_shuffle_i32x4(v0, v2, 0xdd);
    r[12 + d] = _mm512_shuffle_i32x4(v1, v3, 0xdd);
  }
}
// pack16 (qgemv.cpp) 64 inputs at a time: 16 rows' 64 bytes loaded (masked past K), transposed as 4-byte runs.
void pack16(const int8_t* w, int64_t N, int64_t K, int64_t n0, int64_t Kq, uint8_t* out) {
  for (int64_t kb = 0; kb < Kq; kb += 16) {
    const int64_t k = 4 * kb, bytes = std::clamp<int64_t>(K - k, 0, 64);
    const __mmask64 mask = bytes == 64 ? ~__mmask64{0} : (__mmask64{1} << bytes) - 1;
    __m512i r[16];
    for (int i = 0; i < 16; ++i)
      r[i] = n0 + i < N ? _mm512_maskz_loadu_epi8(mask, w + (n0 + i) * K + k) : _mm512_setzero_si512();
    transpose16(r);
    for (int j = 0; j < 16; ++j) _mm512_storeu_si512(out + (kb + j) * 64, r[j]);
  }
}
#include "qgemv_body.h"
}  // namespace avx512vnni
#pragma GCC pop_options

// --- AVX-VNNI (the VEX-encoded 256-bit vpdpbusd of CPUs without AVX-512, and of those with it) ----------------------
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avxvnni")
namespace avxvnni {
constexpr int W = 32, kRegs = 16;
constexpr bool kOffset = true;
using VI = __m256i;
using VF = __m256;
#include "qgemv_avx256.h"
inline VI dot8(VI acc, VI w, VI xs) { return _mm256_dpbusd_avx_epi32(acc, xs, w); }
inline VI dot4(VI acc, VI c, VI xq) { return _mm256_dpbusd_avx_epi32(acc, c, xq); }
#include "qgemv_body.h"
}  // namespace avxvnni
#pragma GCC pop_options

// --- AVX2: vpmaddubsw (u8 x s8 -> pairs summed in s16) + vpmaddwd (-> int32) ----------------------------------------
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
constexpr int W = 32, kRegs = 16;
constexpr bool kOffset = false;  // the sign trick needs no offset
using VI = __m256i;
using VF = __m256;
#include "qgemv_avx256.h"
// |q| <= 127 and |xq| <= 127, so a pair sums to at most 2 * 127 * 127 < 32767: vpmaddubsw never saturates.
inline VI dot8(VI acc, VI w, VI xq) {
  const VI p = _mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(xq, w));
  return _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
}
inline VI dot4(VI acc, VI c, VI xq) {  // codes <= 15: pairs <= 2 * 15 * 127
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(c, xq), _mm256_set1_epi16(1)));
}
#include "qgemv_body.h"
}  // namespace avx2
#pragma GCC pop_options

// --- AMX (Sapphire Rapids and later): int8 tiles for the many-row products -----------------------------------------
// Where the CPU has AMX-INT8 and the kernel grants the tile state (arch_prctl, once per process), a prefill's int8
// products run on tiles: one tdpbssd multiplies 16 rows x 64 codes by 64 codes x 16 output rows into 16 x 16 int32
// sums (1,024 products a cycle against VNNI's 64). The weights come packed by pack16, whose records are exactly
// the B tile's rows; activations are plain int8 (signed x signed: no offset).
#pragma GCC push_options
#pragma GCC target("amx-tile,amx-int8,avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")
namespace amx {
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Panels of 32 output rows [p0, p1) for every input row, 32 input rows at a time (a.xs padded to a multiple of 32
// rows with zero codes): 4 accumulator tiles from 2 tiles of activations and the panel's 2 packed blocks.
void int8_gemm(const GemmArgs& a, int64_t p0, int64_t p1) {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) cfg.rows[t] = 16, cfg.colsb[t] = 64;
  _tile_loadconfig(&cfg);
  const int64_t Kq = a.Kp / 4;
  thread_local std::vector<uint8_t> packed;
  packed.resize(static_cast<size_t>(2 * Kq * 64));
  const uint8_t* b0 = packed.data();
  const uint8_t* b1 = b0 + Kq * 64;
  alignas(64) int32_t c[32 * 32];
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t c0 = p * 32, nc = std::min<int64_t>(32, a.N - c0);
    pack16(a.w, a.N, a.K, c0, Kq, packed.data());
    pack16(a.w, a.N, a.K, c0 + 16, Kq, packed.data() + Kq * 64);
    alignas(64) float sw[32] = {}, bias[32] = {};
    for (int64_t j = 0; j < nc; ++j) sw[j] = a.sw[c0 + j], bias[j] = a.bias ? a.bias[c0 + j] : 0.f;
    const __m512 swv[2] = {_mm512_load_ps(sw), _mm512_load_ps(sw + 16)};
    const __m512 bv[2] = {_mm512_load_ps(bias), _mm512_load_ps(bias + 16)};
    const __mmask16 keep[2] = {static_cast<__mmask16>(nc >= 16 ? 0xffff : (1u << nc) - 1),
                               static_cast<__mmask16>(nc >= 32 ? 0xffff : nc <= 16 ? 0 : (1u << (nc - 16)) - 1)};
    for (int64_t m0 = 0; m0 < a.M; m0 += 32) {
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      const uint8_t* x0 = a.xs + m0 * a.Kp;
      const uint8_t* x1 = x0 + 16 * a.Kp;
      for (int64_t k = 0; k < a.Kp; k += 64) {
        _tile_loadd(4, x0 + k, a.Kp);
        _tile_loadd(5, x1 + k, a.Kp);
        _tile_loadd(6, b0 + 16 * k, 64);
        _tile_loadd(7, b1 + 16 * k, 64);
        _tile_dpbssd(0, 4, 6);
        _tile_dpbssd(1, 4, 7);
        _tile_dpbssd(2, 5, 6);
        _tile_dpbssd(3, 5, 7);
      }
      _tile_stored(0, c, 128);
      _tile_stored(1, c + 16, 128);
      _tile_stored(2, c + 16 * 32, 128);
      _tile_stored(3, c + 16 * 32 + 16, 128);
      for (int64_t i = 0; i < std::min<int64_t>(32, a.M - m0); ++i) {
        const __m512 sx = _mm512_set1_ps(a.sx[m0 + i]);
        float* y = a.y + (m0 + i) * a.N + c0;
        for (int v = 0; v < 2; ++v) {
          const __m512 sums = _mm512_cvtepi32_ps(_mm512_load_si512(c + i * 32 + 16 * v));
          __m512 r = _mm512_mul_ps(sums, _mm512_mul_ps(sx, swv[v]));
          if (a.bias) r = _mm512_add_ps(r, bv[v]);
          _mm512_mask_storeu_ps(y + 16 * v, keep[v], r);
        }
      }
    }
  }
  _tile_release();
}
}  // namespace amx
#pragma GCC pop_options

// --- choosing a path ----------------------------------------------------------------------------------------------
enum Isa : int { kScalar, kAvx2, kAvxVnni, kAvx512Vnni };
const char* const kIsaNames[] = {"scalar", "avx2", "avxvnni", "avx512vnni"};

bool supported(Isa isa) {
  __builtin_cpu_init();
  switch (isa) {
    case kAvx512Vnni:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("f16c") && __builtin_cpu_supports("fma");
    case kAvxVnni:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("avxvnni") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("f16c");
    case kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    default:
      return true;
  }
}

Isa best() {
  for (Isa i : {kAvx512Vnni, kAvxVnni, kAvx2})
    if (supported(i)) return i;
  return kScalar;
}

Isa g_isa = best();

std::string isa() { return kIsaNames[g_isa]; }

std::vector<std::string> isas() {  // the paths this CPU can run, best first
  std::vector<std::string> out;
  for (Isa i : {kAvx512Vnni, kAvxVnni, kAvx2, kScalar})
    if (supported(i)) out.push_back(kIsaNames[i]);
  return out;
}

// The tests' hook: run every later call on `name` ("auto": the best this CPU has). Returns the previous path.
std::string set_isa(const std::string& name) {
  const std::string before = isa();
  if (name == "auto") {
    g_isa = best();
    return before;
  }
  for (int i = 0; i < 4; ++i)
    if (name == kIsaNames[i]) {
      TORCH_CHECK(supported(static_cast<Isa>(i)), "qgemv: this CPU lacks the instructions of the ", name, " path");
      g_isa = static_cast<Isa>(i);
      return before;
    }
  TORCH_CHECK(false, "qgemv: unknown path ", name, "; use auto, avx512vnni, avxvnni, avx2 or scalar");
  return before;
}

// --- the activations: per-row (int8) or per-group (int4) symmetric int8 -------------------------------------------
// xq = round-half-even(x / s), s = max(max|x| / 127, 1e-12): bit for bit what compress/quantize.quantize_activations
// computes, so the tests' reference sees the same codes.
// (The AVX-512 code where the CPU has it, whichever path multiplies: both give the same codes.)
const bool kVectorCodes = supported(kAvx512Vnni);

inline float act_scale(const float* x, int64_t n) {
  float m = 0;
  if (kVectorCodes) {
    m = avx512vnni::amax(x, n);
  } else {
    for (int64_t k = 0; k < n; ++k) m = std::max(m, std::fabs(x[k]));
  }
  return std::max(m / 127.f, 1e-12f);
}

// codes of x[0, n) at scale s, each XOR flip (0x80: as u8, xq + 128).
inline void act_codes(const float* x, int64_t n, float s, uint8_t flip, uint8_t* out) {
  if (kVectorCodes) return avx512vnni::codes(x, n, s, flip, out);
  for (int64_t k = 0; k < n; ++k)
    out[k] = static_cast<uint8_t>(static_cast<int8_t>(std::clamp(std::nearbyint(x[k] / s), -127.f, 127.f))) ^ flip;
}

void pack16(const int8_t* w, int64_t N, int64_t K, int64_t n0, int64_t Kq, uint8_t* out) {
  if (kVectorCodes) return avx512vnni::pack16(w, N, K, n0, Kq, out);
  scalar::pack16(w, N, K, n0, Kq, out);
}

// --- the many-row int8 product: AMX tiles, the packed kernels of the current path, or oneDNN -----------------------
enum Gemm : int { kGemmOnednn, kGemmPacked, kGemmAmx };
const char* const kGemmNames[] = {"onednn", "packed", "amx"};

// AMX-INT8 on the CPU (cpuid leaf 7: AMX-TILE, AMX-INT8) and the tile state granted by the kernel (Linux 5.16+).
bool amx_usable() {
  static const bool ok = [] {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) || !((edx >> 24) & 1) || !((edx >> 25) & 1)) return false;
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return supported(kAvx512Vnni) && syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

bool gemm_supported(Gemm g) { return g != kGemmAmx || amx_usable(); }

// The default, by measurement on the CI CPU (docs/BENCHMARKS.md, "int8 prefills on AMX tiles"; oneDNN held to each
// instruction set with ONEDNN_MAX_CPU_ISA): AMX tiles 1.4-1.9x oneDNN's AMX GEMM from 17 to 512 rows; without AMX
// the packed kernels 1.05-1.4x oneDNN's on AVX-512 VNNI and 1.0-1.5x on AVX-VNNI, but 0.8-0.94x on plain AVX2 from
// 32 rows (no integer dot product there), where oneDNN stays.
Gemm default_gemm() {
  if (amx_usable()) return kGemmAmx;
  const Isa isa = best();
  return isa == kAvx512Vnni || isa == kAvxVnni ? kGemmPacked : kGemmOnednn;
}

Gemm g_gemm = default_gemm();

std::string gemm() { return kGemmNames[g_gemm]; }

std::vector<std::string> gemms() {  // the many-row paths this CPU can run
  std::vector<std::string> out;
  for (Gemm g : {kGemmAmx, kGemmPacked, kGemmOnednn})
    if (gemm_supported(g)) out.push_back(kGemmNames[g]);
  return out;
}

// The tests' and benchmarks' hook for products of more than kMaxRows rows ("auto": the default). Returns the
// previous one.
std::string set_gemm(const std::string& name) {
  const std::string before = gemm();
  if (name == "auto") {
    g_gemm = default_gemm();
    return before;
  }
  for (int i = 0; i < 3; ++i)
    if (name == kGemmNames[i]) {
      TORCH_CHECK(gemm_supported(static_cast<Gemm>(i)), "qgemv: this CPU (or its kernel) lacks AMX-INT8 tiles");
      g_gemm = static_cast<Gemm>(i);
      return before;
    }
  TORCH_CHECK(false, "qgemv: unknown many-row path ", name, "; use auto, amx, packed or onednn");
  return before;
}

int64_t round_up(int64_t v, int64_t to) { return (v + to - 1) / to * to; }

int64_t grain(int64_t bytes_per_row) { return std::max<int64_t>(8, (int64_t{1} << 16) / std::max<int64_t>(bytes_per_row, 1)); }

at::Tensor rows_of(const at::Tensor& x, int64_t K) {
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K, "qgemv: x has ", x.size(-1), " columns, the weight ", K);
  TORCH_CHECK(x.device().is_cpu() && at::isFloatingType(x.scalar_type()), "qgemv: x must be a floating CPU tensor");
  return x.reshape({-1, K}).to(at::kFloat).contiguous();
}

at::Tensor shaped(const at::Tensor& y, const at::Tensor& x) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = y.size(1);
  return y.to(x.scalar_type()).view(shape);
}

const float* bias_of(const std::optional<at::Tensor>& bias, int64_t N, std::optional<at::Tensor>& keep) {
  if (!bias.has_value()) return nullptr;
  TORCH_CHECK(bias->numel() == N, "qgemv: bias must have ", N, " elements");
  keep = bias->to(at::kFloat).contiguous();
  return keep->data_ptr<float>();
}

// Sum of each int8 weight row (the VNNI paths' offset correction): computed once per matrix by the caller. A plain
// loop: q.sum(1, dtype=int32) widened the whole matrix to int32 first (+154 MB of peak memory for `gpt2`'s head).
at::Tensor int8_row_sums(const at::Tensor& q) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kChar && q.is_contiguous() && q.device().is_cpu(),
              "int8_row_sums: q must be contiguous int8 (N, K) on CPU");
  const int64_t N = q.size(0), K = q.size(1);
  at::Tensor out = at::empty({N}, q.options().dtype(at::kInt));
  const int8_t* p = q.data_ptr<int8_t>();
  int32_t* o = out.data_ptr<int32_t>();
  at::parallel_for(0, N, grain(K), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      int32_t total = 0;
      for (int64_t k = 0; k < K; ++k) total += p[n * K + k];
      o[n] = total;
    }
  });
  return out;
}

// Each of M rows of x (M, K) quantized to int8 (scale sp[m]) into qp (M, Kp), zero-padded past K; offset by 128
// for the VNNI paths' unsigned operand.
void int8_activations(const float* xp, int64_t M, int64_t K, int64_t Kp, bool offset, uint8_t* qp, float* sp) {
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const float s = act_scale(xp + m * K, K);
      sp[m] = s;
      act_codes(xp + m * K, K, s, offset ? 0x80 : 0, qp + m * Kp);
      for (int64_t k = K; k < Kp; ++k) qp[m * Kp + k] = 0;
    }
  });
}

void check_int8(const at::Tensor& q, const at::Tensor& scale, const at::Tensor& wsum) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kChar && q.is_contiguous() && q.device().is_cpu(),
              "int8_linear: q must be contiguous int8 (N, K) on CPU");
  const int64_t N = q.size(0);
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.numel() == N && scale.is_contiguous(), "int8_linear: scale must be fp32 (N,)");
  TORCH_CHECK(wsum.scalar_type() == at::kInt && wsum.numel() == N && wsum.is_contiguous(), "int8_linear: wsum must be int32 (N,)");
}

// y (M, N) = x @ dequant(q)^T (+ bias) for 1..kMaxRows rows of contiguous fp32 x on the few-row kernels, the
// activations quantized into a per-thread buffer (kept between calls).
void int8_few_rows(const float* xp, int64_t M, const at::Tensor& q, const at::Tensor& scale, const at::Tensor& wsum,
                   const float* bp, float* yp) {
  const int64_t N = q.size(0), K = q.size(1), Kp = round_up(K, 64);
  const Isa isa = g_isa;
  thread_local std::vector<uint8_t> codes;
  thread_local std::vector<float> scales;
  codes.resize(static_cast<size_t>(M * Kp));
  scales.resize(static_cast<size_t>(M));
  int8_activations(xp, M, K, Kp, isa == kAvx512Vnni || isa == kAvxVnni, codes.data(), scales.data());
  const I8Args a{codes.data(), M, K, Kp, N, q.data_ptr<int8_t>(), scales.data(), scale.data_ptr<float>(),
                 wsum.data_ptr<int32_t>(), bp, yp};
  at::parallel_for(0, N, grain(K * M), [&](int64_t n0, int64_t n1) {
    switch (isa) {
      case kAvx512Vnni: avx512vnni::int8_rows(a, n0, n1); break;
      case kAvxVnni: avxvnni::int8_rows(a, n0, n1); break;
      case kAvx2: avx2::int8_rows(a, n0, n1); break;
      default: scalar::int8_rows(a, n0, n1); break;
    }
  });
}

// More rows (a prefill): oneDNN's int8 GEMM, the same quantized activations and the same exact int32 sums.
void int8_many_rows(const float* xp, int64_t M, const at::Tensor& q, const at::Tensor& scale, const float* bp,
                    float* yp) {
  const int64_t N = q.size(0), K = q.size(1);
  at::Tensor xq = at::empty({M, K}, q.options());
  std::vector<float> sx(static_cast<size_t>(M));
  int8_activations(xp, M, K, K, false, reinterpret_cast<uint8_t*>(xq.data_ptr<int8_t>()), sx.data());
  at::Tensor acc = at::_int_mm(xq, q.t());
  const int32_t* ap = acc.data_ptr<int32_t>();
  const float* sp = sx.data();
  const float* sw = scale.data_ptr<float>();
  at::parallel_for(0, M, 4, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const int32_t* am = ap + m * N;
      float* ym = yp + m * N;
      const float sm = sp[m];
      if (bp) {
        for (int64_t n = 0; n < N; ++n) ym[n] = static_cast<float>(am[n]) * (sm * sw[n]) + bp[n];
      } else {
        for (int64_t n = 0; n < N; ++n) ym[n] = static_cast<float>(am[n]) * (sm * sw[n]);
      }
    }
  });
}

// More rows on our own kernels: the activations quantized once, then panels of output rows (AMX tiles, or the
// packed kernels of the current path) spread over the threads.
void int8_gemm_rows(const float* xp, int64_t M, const at::Tensor& q, const at::Tensor& scale, const at::Tensor& wsum,
                    const float* bp, float* yp) {
  const Isa isa = g_isa;
  const bool amx = g_gemm == kGemmAmx;
  if (!amx && isa == kScalar) return int8_few_rows(xp, M, q, scale, wsum, bp, yp);  // the plain loops take any M
  const int64_t N = q.size(0), K = q.size(1), Kp = round_up(K, 64), Mp = amx ? round_up(M, 32) : M;
  at::Tensor codes = at::empty({Mp, Kp}, q.options().dtype(at::kByte));
  std::vector<float> sx(static_cast<size_t>(M));
  uint8_t* cp = codes.data_ptr<uint8_t>();
  int8_activations(xp, M, K, Kp, !amx && (isa == kAvx512Vnni || isa == kAvxVnni), cp, sx.data());
  if (Mp > M) std::memset(cp + M * Kp, 0, static_cast<size_t>((Mp - M) * Kp));
  const GemmArgs a{cp, M, K, Kp, N, q.data_ptr<int8_t>(), sx.data(), scale.data_ptr<float>(),
                   wsum.data_ptr<int32_t>(), bp, yp};
  const int64_t panel = amx ? 32 : isa == kAvx512Vnni ? avx512vnni::kPanel : avx2::kPanel;
  at::parallel_for(0, (N + panel - 1) / panel, 1, [&](int64_t p0, int64_t p1) {
    if (amx) return amx::int8_gemm(a, p0, p1);
    switch (isa) {
      case kAvx512Vnni: avx512vnni::int8_gemm(a, p0, p1); break;
      case kAvxVnni: avxvnni::int8_gemm(a, p0, p1); break;
      default: avx2::int8_gemm(a, p0, p1); break;
    }
  });
}

// y = x @ dequant(q)^T (+ bias) with x quantized per row; any number of rows.
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale, const at::Tensor& wsum,
                       const std::optional<at::Tensor>& bias) {
  check_int8(q, scale, wsum);
  const int64_t N = q.size(0), K = q.size(1);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  at::Tensor xf = rows_of(x, K);
  const int64_t M = xf.size(0);
  std::optional<at::Tensor> keep;
  const float* bp = bias_of(bias, N, keep);
  at::Tensor y = at::empty({M, N}, xf.options());
  if (M <= kMaxRows) int8_few_rows(xf.data_ptr<float>(), M, q, scale, wsum, bp, y.data_ptr<float>());
  else if (g_gemm == kGemmOnednn) int8_many_rows(xf.data_ptr<float>(), M, q, scale, bp, y.data_ptr<float>());
  else int8_gemm_rows(xf.data_ptr<float>(), M, q, scale, wsum, bp, y.data_ptr<float>());
  return shaped(y, x);
}

// The load-time layout of an int4 matrix for int4_linear: the checkpoint's codes (N, K/2, group-halves packing) and
// fp16 scales / minima (N, G) regrouped into tiles of 16 output rows (qgemv_body.h says why), the same bytes per
// weight (0.5 + 4 / g): (ceil(N / 16), G, 64 + 8 g) uint8, rows past N zero. The checkpoint's tensors stay the
// format; this is derived from them once per matrix.
at::Tensor int4_pack(const at::Tensor& q, const at::Tensor& scale, const at::Tensor& lo) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kByte && q.is_contiguous() && q.device().is_cpu(),
              "int4_pack: q must be contiguous uint8 (N, K/2) on CPU");
  const int64_t N = q.size(0), Kh = q.size(1), K = 2 * Kh;
  TORCH_CHECK(scale.dim() == 2 && scale.size(0) == N && scale.scalar_type() == at::kHalf && scale.is_contiguous() &&
                  lo.sizes() == scale.sizes() && lo.scalar_type() == at::kHalf && lo.is_contiguous(),
              "int4_pack: scale and lo must be contiguous fp16 (N, groups)");
  const int64_t G = scale.size(1);
  TORCH_CHECK(G >= 1 && G <= kMaxGroups && K % G == 0 && (K / G) % 32 == 0,
              "int4_pack: ", G, " groups of ", K, " columns: the kernels take groups of a multiple of 32, at most ", kMaxGroups);
  const int64_t h = Kh / G, rec = 64 + 16 * h, T = (N + 15) / 16;
  at::Tensor out = at::zeros({T, G, rec}, q.options());
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const auto *sp = static_cast<const uint8_t*>(scale.data_ptr()), *lp = static_cast<const uint8_t*>(lo.data_ptr());
  uint8_t* op = out.data_ptr<uint8_t>();
  at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t r = 0; r < 16 && t * 16 + r < N; ++r) {
        const int64_t n = t * 16 + r;
        for (int64_t g = 0; g < G; ++g) {
          uint8_t* p = op + (t * G + g) * rec;
          std::memcpy(p + 2 * r, sp + 2 * (n * G + g), 2);
          std::memcpy(p + 32 + 2 * r, lp + 2 * (n * G + g), 2);
          for (int64_t c = 0; c < h; c += 4) std::memcpy(p + 64 + 16 * c + 4 * r, qp + n * Kh + g * h + c, 4);
        }
      }
  });
  return out;
}

void check_int4(const at::Tensor& packed, int64_t n) {
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == at::kByte && packed.is_contiguous() && packed.device().is_cpu() &&
                  packed.size(2) > 64 && (packed.size(2) - 64) % 256 == 0 && packed.size(0) == (n + 15) / 16,
              "int4_linear: packed must be int4_pack's (ceil(n / 16), groups, 64 + 8 g) uint8 tiles of a matrix of ", n,
              " rows; pack the codes with int4_pack");
}

// y (M, n) = x @ dequant(W)^T (+ bias) for M rows of contiguous fp32 x (M, K) and the int4_pack tiles of W.
void int4_rows_of(const float* xp, int64_t M, const at::Tensor& packed, int64_t n, const float* bp, float* yp) {
  const int64_t N = n, G = packed.size(1), rec = packed.size(2), h = (rec - 64) / 16, Kh = G * h, K = 2 * Kh;
  const int64_t g = 2 * h;
  // The activations, quantized per group into the kernels' records (a per-thread buffer, kept between calls).
  const int64_t arec = 64 * (1 + h / 4);
  thread_local std::vector<uint8_t> records;
  records.assign(static_cast<size_t>((M + kActRows - 1) / kActRows * G * arec), 0);
  uint8_t* rp = records.data();
  at::parallel_for(0, M, 8, [&](int64_t m0, int64_t m1) {
    std::vector<int8_t> codes(g);
    int8_t* q = codes.data();
    for (int64_t m = m0; m < m1; ++m)
      for (int64_t gi = 0; gi < G; ++gi) {
        const float* xg = xp + m * K + gi * g;
        const float s = act_scale(xg, g);
        act_codes(xg, g, s, 0, reinterpret_cast<uint8_t*>(q));
        int32_t total = 0;
        for (int64_t j = 0; j < g; ++j) total += q[j];
        uint8_t* rec0 = rp + ((m / kActRows) * G + gi) * arec + 8 * (m % kActRows);
        const float sz[2] = {s, s * static_cast<float>(total)};
        std::memcpy(rec0, sz, 8);
        for (int64_t c = 0; c < h / 4; ++c) {
          std::memcpy(rec0 + 64 * (c + 1), q + 4 * c, 4);
          std::memcpy(rec0 + 64 * (c + 1) + 4, q + h + 4 * c, 4);
        }
      }
  });
  const I4Args a{records.data(), M, G, h, N, rec, arec, packed.data_ptr<uint8_t>(), bp, yp};
  const Isa isa = g_isa;
  // Tiles per thread: at least ~64 KB of weights (a smaller share costs more in the hand-off than it saves).
  const int64_t grain_tiles = std::max<int64_t>(1, (int64_t{1} << 16) / (G * rec * M));
  at::parallel_for(0, packed.size(0), grain_tiles, [&](int64_t t0, int64_t t1) {
    switch (isa) {
      case kAvx512Vnni: avx512vnni::int4_rows(a, t0, t1); break;
      case kAvxVnni: avxvnni::int4_rows(a, t0, t1); break;
      case kAvx2: avx2::int4_rows(a, t0, t1); break;
      default: scalar::int4_rows(a, t0, t1); break;
    }
  });
}

// y (M, n) = x @ dequant(W)^T (+ bias) for the int4 matrix of n output rows that int4_pack laid out, x quantized
// per group; any number of rows (a prefill too: every input row passes over a tile while it is in L1, 3.4x the
// fp32 GEMM on the dequantized matrix at 512 rows, which had to dequantize it first).
at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& packed, int64_t n, const std::optional<at::Tensor>& bias) {
  check_int4(packed, n);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  at::Tensor xf = rows_of(x, 2 * packed.size(1) * ((packed.size(2) - 64) / 16));
  const int64_t M = xf.size(0);
  std::optional<at::Tensor> keep;
  const float* bp = bias_of(bias, n, keep);
  at::Tensor y = at::empty({M, n}, xf.options());
  int4_rows_of(xf.data_ptr<float>(), M, packed, n, bp, y.data_ptr<float>());
  return shaped(y, x);
}

}  // namespace

namespace gptforge {

void int8_linear_into(const float* x, int64_t M, const at::Tensor& q, const at::Tensor& scale, const at::Tensor& wsum,
                      const float* bias, float* y) {
  check_int8(q, scale, wsum);
  TORCH_CHECK(M >= 1 && M <= kMaxRows, "int8_linear_into: 1 to ", kMaxRows, " rows, got ", M);
  int8_few_rows(x, M, q, scale, wsum, bias, y);
}

void int4_linear_into(const float* x, int64_t M, const at::Tensor& packed, int64_t n, const float* bias, float* y) {
  check_int4(packed, n);
  int4_rows_of(x, M, packed, n, bias, y);
}

}  // namespace gptforge

TORCH_LIBRARY(gptforge_qgemv, m) {
  m.def("int8_linear(Tensor x, Tensor q, Tensor scale, Tensor wsum, Tensor? bias=None) -> Tensor");
  m.def("int4_linear(Tensor x, Tensor packed, int n, Tensor? bias=None) -> Tensor");
  m.def("int4_pack(Tensor q, Tensor scale, Tensor lo) -> Tensor");
  m.def("int8_row_sums(Tensor q) -> Tensor");
  m.def("isa() -> str", &isa);
  m.def("isas() -> str[]", &isas);
  m.def("set_isa(str name) -> str", &set_isa);
  m.def("gemm() -> str", &gemm);
  m.def("gemms() -> str[]", &gemms);
  m.def("set_gemm(str name) -> str", &set_gemm);
}

TORCH_LIBRARY_IMPL(gptforge_qgemv, CPU, m) {
  m.impl("int8_linear", &int8_linear);
  m.impl("int4_linear", &int4_linear);
  m.impl("int4_pack", &int4_pack);
  m.impl("int8_row_sums", &int8_row_sums);
}
