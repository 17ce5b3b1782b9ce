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
// path), so one library built anywhere holds them all. More than kMaxRows rows (a prefill) with int8 weights go
// to at::_int_mm (oneDNN: AMX or VNNI where the CPU has them) with the same quantized activations and the same
// exact int32 sums.

#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/_int_mm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
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

struct I4Args {
  const int8_t *xa, *xb;  // (M, Khp) the two planes of activations, laid out as the packed bytes, zero-padded
  const float* sxe;       // (M, Khp / 4) the activation scale of each 4-byte lane's group
  const float* zs;        // (M, G) s[m, g] * sum of xq over group g
  int64_t M, Kh, Khp, G, Gp, h, N;  // h = g / 2 bytes per group; Gp = G + 16 (padded scale rows)
  const uint8_t* q;                 // (N, Kh)
  const uint16_t *scale, *lo;       // (N, G) fp16
  const float* bias;
  float* y;
};

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

void int4_rows(const I4Args& a, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t m = 0; m < a.M; ++m) {
      float s = 0;
      for (int64_t g = 0; g < a.G; ++g) {
        int32_t d = 0;
        for (int64_t j = 0; j < a.h; ++j) {
          const int64_t k = g * a.h + j;
          const uint8_t b = a.q[n * a.Kh + k];
          d += (b >> 4) * a.xa[m * a.Khp + k] + (b & 15) * a.xb[m * a.Khp + k];
        }
        s += static_cast<float>(d) * half_to_float(a.scale[n * a.G + g]) * a.sxe[m * (a.Khp / 4) + g * a.h / 4] +
             half_to_float(a.lo[n * a.G + g]) * a.zs[m * a.G + g];
      }
      a.y[m * a.N + n] = s + (a.bias ? a.bias[n] : 0.f);
    }
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
inline VF loadf(const float* p) { return _mm512_loadu_ps(p); }
inline VF tof(VI v) { return _mm512_cvtepi32_ps(v); }
inline VF mulf(VF a, VF b) { return _mm512_mul_ps(a, b); }
inline VF fmaf(VF a, VF b, VF c) { return _mm512_fmadd_ps(a, b, c); }
inline int32_t hsum(VI v) { return _mm512_reduce_add_epi32(v); }
inline float hsumf(VF v) { return _mm512_reduce_add_ps(v); }
inline VF permf(VI idx, VF v) { return _mm512_permutexvar_ps(idx, v); }
inline VI dot8(VI acc, VI w, VI xs) { return _mm512_dpbusd_epi32(acc, xs, w); }
inline VI dot4(VI acc, VI c, VI xq) { return _mm512_dpbusd_epi32(acc, c, xq); }
inline VI nib_hi(VI v) { return _mm512_and_si512(_mm512_srli_epi16(v, 4), _mm512_set1_epi8(15)); }
inline VI nib_lo(VI v) { return _mm512_and_si512(v, _mm512_set1_epi8(15)); }
// A row's scales and minima, 16 at a time, the last few under a mask (a row of `gpt2` has 24 groups: per-row
// costs like these were most of the int4 product's time at K = 768, scalar).
inline void widen_halves(const uint16_t* s, const uint16_t* l, int64_t G, float* sc, float* lz) {
  for (int64_t g = 0; g < G; g += 16) {
    const __mmask16 k = G - g >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << (G - g)) - 1);
    _mm512_mask_storeu_ps(sc + g, k, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, s + g)));
    _mm512_mask_storeu_ps(lz + g, k, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, l + g)));
  }
}
inline float zterm(const float* lz, const float* zs, int64_t G) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; g += 16) {
    const __mmask16 k = G - g >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << (G - g)) - 1);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, lz + g), _mm512_maskz_loadu_ps(k, zs + g), acc);
  }
  return _mm512_reduce_add_ps(acc);
}
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

// y = x @ dequant(q)^T (+ bias) with x quantized per row; any number of rows.
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale, const at::Tensor& wsum,
                       const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kChar && q.is_contiguous() && q.device().is_cpu(),
              "int8_linear: q must be contiguous int8 (N, K) on CPU");
  const int64_t N = q.size(0), K = q.size(1);
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.numel() == N && scale.is_contiguous(), "int8_linear: scale must be fp32 (N,)");
  TORCH_CHECK(wsum.scalar_type() == at::kInt && wsum.numel() == N && wsum.is_contiguous(), "int8_linear: wsum must be int32 (N,)");
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  at::Tensor xf = rows_of(x, K);
  const int64_t M = xf.size(0);
  const Isa isa = M > kMaxRows ? kScalar : g_isa;  // (kScalar unused when M > kMaxRows: _int_mm below)
  const bool offset = M <= kMaxRows && (isa == kAvx512Vnni || isa == kAvxVnni);
  const int64_t Kp = M > kMaxRows ? K : round_up(K, 64);
  at::Tensor xq = at::empty({M, Kp}, xf.options().dtype(at::kChar));
  at::Tensor sx = at::empty({M}, xf.options());
  const float* xp = xf.data_ptr<float>();
  auto* qp = reinterpret_cast<uint8_t*>(xq.data_ptr<int8_t>());
  float* sp = sx.data_ptr<float>();
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const float s = act_scale(xp + m * K, K);
      sp[m] = s;
      act_codes(xp + m * K, K, s, offset ? 0x80 : 0, qp + m * Kp);
      for (int64_t k = K; k < Kp; ++k) qp[m * Kp + k] = 0;
    }
  });
  std::optional<at::Tensor> keep;
  const float* bp = bias_of(bias, N, keep);
  at::Tensor y = at::empty({M, N}, xf.options());
  float* yp = y.data_ptr<float>();
  const float* sw = scale.data_ptr<float>();
  if (M > kMaxRows) {  // a prefill: oneDNN's int8 GEMM, the same exact int32 sums
    at::Tensor acc = at::_int_mm(xq, q.t());
    const int32_t* ap = acc.data_ptr<int32_t>();
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
    return shaped(y, x);
  }
  const I8Args a{qp, M, K, Kp, N, q.data_ptr<int8_t>(), sp, sw, wsum.data_ptr<int32_t>(), bp, yp};
  at::parallel_for(0, N, grain(K * M), [&](int64_t n0, int64_t n1) {
    switch (isa) {
      case kAvx512Vnni: avx512vnni::int8_rows(a, n0, n1); break;
      case kAvxVnni: avxvnni::int8_rows(a, n0, n1); break;
      case kAvx2: avx2::int8_rows(a, n0, n1); break;
      default: scalar::int8_rows(a, n0, n1); break;
    }
  });
  return shaped(y, x);
}

// y = x @ dequant(q)^T (+ bias) for int4 codes in the group-halves packing, x quantized per group; up to
// kMaxRows rows (more: the caller's fp32 path on the same quantize-dequantized activations).
at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale, const at::Tensor& lo,
                       const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kByte && q.is_contiguous() && q.device().is_cpu(),
              "int4_linear: q must be contiguous uint8 (N, K/2) on CPU");
  const int64_t N = q.size(0), Kh = q.size(1), K = 2 * Kh;
  TORCH_CHECK(scale.dim() == 2 && scale.size(0) == N && scale.scalar_type() == at::kHalf && scale.is_contiguous() &&
                  lo.sizes() == scale.sizes() && lo.scalar_type() == at::kHalf && lo.is_contiguous(),
              "int4_linear: scale and lo must be contiguous fp16 (N, groups)");
  const int64_t G = scale.size(1);
  TORCH_CHECK(G >= 1 && G <= kMaxGroups && K % G == 0 && (K / G) % 32 == 0,
              "int4_linear: ", G, " groups of ", K, " columns: the kernels take groups of a multiple of 32, at most ", kMaxGroups);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  at::Tensor xf = rows_of(x, K);
  const int64_t M = xf.size(0), g = K / G, h = g / 2, Khp = round_up(Kh, 64);
  TORCH_CHECK(M >= 1 && M <= kMaxRows, "int4_linear: x must have 1 to ", kMaxRows, " rows, got ", M);
  at::Tensor planes = at::zeros({2, M, Khp}, xf.options().dtype(at::kChar));
  at::Tensor sxe = at::zeros({M, Khp / 4}, xf.options()), zs = at::empty({M, G}, xf.options());
  const float* xp = xf.data_ptr<float>();
  int8_t *xa = planes.data_ptr<int8_t>(), *xb = xa + M * Khp;
  float *ep = sxe.data_ptr<float>(), *zp = zs.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t gi = 0; gi < G; ++gi) {
      const float* xg = xp + m * K + gi * g;
      const float s = act_scale(xg, g);
      int8_t *a = xa + m * Khp + gi * h, *b = xb + m * Khp + gi * h;
      act_codes(xg, h, s, 0, reinterpret_cast<uint8_t*>(a));
      act_codes(xg + h, h, s, 0, reinterpret_cast<uint8_t*>(b));
      int32_t total = 0;
      for (int64_t j = 0; j < h; ++j) total += a[j] + b[j];
      for (int64_t l = gi * h / 4; l < (gi + 1) * h / 4; ++l) ep[m * (Khp / 4) + l] = s;
      zp[m * G + gi] = s * static_cast<float>(total);
    }
  std::optional<at::Tensor> keep;
  const float* bp = bias_of(bias, N, keep);
  at::Tensor y = at::empty({M, N}, xf.options());
  const I4Args a{xa, xb, ep, zp, M, Kh, Khp, G, G + 16, h, N, q.data_ptr<uint8_t>(),
                 static_cast<const uint16_t*>(scale.data_ptr()), static_cast<const uint16_t*>(lo.data_ptr()), bp,
                 y.data_ptr<float>()};
  const Isa isa = g_isa;
  at::parallel_for(0, N, grain(Kh * M), [&](int64_t n0, int64_t n1) {
    switch (isa) {
      case kAvx512Vnni: avx512vnni::int4_rows(a, n0, n1); break;
      case kAvxVnni: avxvnni::int4_rows(a, n0, n1); break;
      case kAvx2: avx2::int4_rows(a, n0, n1); break;
      default: scalar::int4_rows(a, n0, n1); break;
    }
  });
  return shaped(y, x);
}

}  // namespace

TORCH_LIBRARY(gptforge_qgemv, m) {
  m.def("int8_linear(Tensor x, Tensor q, Tensor scale, Tensor wsum, Tensor? bias=None) -> Tensor");
  m.def("int4_linear(Tensor x, Tensor q, Tensor scale, Tensor lo, Tensor? bias=None) -> Tensor");
  m.def("int8_row_sums(Tensor q) -> Tensor");
  m.def("isa() -> str", &isa);
  m.def("isas() -> str[]", &isas);
  m.def("set_isa(str name) -> str", &set_isa);
}

TORCH_LIBRARY_IMPL(gptforge_qgemv, CPU, m) {
  m.impl("int8_linear", &int8_linear);
  m.impl("int4_linear", &int4_linear);
  m.impl("int8_row_sums", &int8_row_sums);
}
