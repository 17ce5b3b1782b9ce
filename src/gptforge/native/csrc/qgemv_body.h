// The integer kernels of qgemv.cpp, written once over a small vector vocabulary that each instruction set's
// prelude defines (qgemv.cpp includes this file once per set, inside that set's `#pragma GCC target` region and
// namespace, so one build holds every path and the CPU picks at run time):
//   W            bytes per integer vector (64 or 32); kRegs: vector registers (32 or 16)
//   VI, VF       integer / fp32 vectors; zero(), zerof(), loadb(p), tof(v), mulf, fmaf, addf, hsum, setf(s), storef
//   dot8(acc, w, xs)   acc += the products of 4-byte runs of s8 weights with the prepared int8 activations xs
//                       (VNNI: xs = xq + 128 as u8, the caller subtracts 128 * sum(w); AVX2: xs = xq, sign trick)
//   dot4(acc, c, xq)   acc += products of u8 codes 0..15 with s8 activations, 4-byte runs (no overflow anywhere)
//   nib_hi(v), nib_lo(v)   the high / low nibble of each byte
//   bcast4(p)    the 4 bytes at p in every 32-bit lane; halves(p): W/4 fp16 values at p widened to fp32
// Everything here is exact integer arithmetic until the per-block fp32 scaling.

// R weight rows x MB input rows of int8 dot products over the whole of K (int32, exact).
template <int R, int MB>
inline void i8_tile(const uint8_t* xs, int64_t Kp, int64_t K, const int8_t* wn, const int8_t* next, int32_t* out) {
  VI acc[R][MB];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int i = 0; i < MB; ++i) acc[r][i] = zero();
  int64_t k = 0;
  for (; k + W <= K; k += W) {
    VI wv[R];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      if (next && k % 64 == 0) _mm_prefetch(reinterpret_cast<const char*>(next + r * K + k), _MM_HINT_T0);
      wv[r] = loadb(wn + r * K + k);
    }
#pragma GCC unroll 16
    for (int i = 0; i < MB; ++i) {
      const VI xv = loadb(xs + i * Kp + k);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) acc[r][i] = dot8(acc[r][i], wv[r], xv);
    }
  }
  if (k < K) {  // the last partial vector: weights copied into a zeroed buffer (the activations are padded)
    alignas(64) int8_t buf[R][W];
    std::memset(buf, 0, sizeof buf);
    for (int r = 0; r < R; ++r) std::memcpy(buf[r], wn + r * K + k, K - k);
    for (int i = 0; i < MB; ++i) {
      const VI xv = loadb(xs + i * Kp + k);
      for (int r = 0; r < R; ++r) acc[r][i] = dot8(acc[r][i], loadb(buf[r]), xv);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int i = 0; i < MB; ++i) out[r * MB + i] = hsum(acc[r][i]);
}

// Weight rows per tile for MB input rows: R x MB accumulators, R weights and one input within the registers.
constexpr int i8_rows(int mb) {
  return kRegs == 32 ? (mb <= 2 ? 8 : mb == 3 ? 6 : mb == 4 ? 5 : mb <= 6 ? 4 : 3) : (mb == 1 ? 6 : mb == 2 ? 4 : 3);
}
constexpr int kI8Rows = kRegs == 32 ? 8 : 4;  // input rows per chunk: each weight vector loaded once per chunk

template <int R, int MB>
void i8_block(const I8Args& a, int64_t m0, int64_t n, const int8_t* next) {
  int32_t dots[R * MB];
  i8_tile<R, MB>(a.xs + m0 * a.Kp, a.Kp, a.K, a.w + n * a.K, next, dots);
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < MB; ++i) {
      const int64_t m = m0 + i, c = n + r;
      const int64_t d = static_cast<int64_t>(dots[r * MB + i]) - (kOffset ? 128 * static_cast<int64_t>(a.wsum[c]) : 0);
      a.y[m * a.N + c] = static_cast<float>(d) * (a.sx[m] * a.sw[c]) + (a.bias ? a.bias[c] : 0.f);
    }
}

// Output rows [n0, n1) for input rows [m0, m0 + mb), mb <= MB.
template <int MB>
void i8_chunk(const I8Args& a, int64_t m0, int64_t mb, int64_t n0, int64_t n1) {
  if constexpr (MB > 1) {
    if (mb < MB) return i8_chunk<MB - 1>(a, m0, mb, n0, n1);
  }
  constexpr int R = i8_rows(MB);
  int64_t n = n0;
  for (; n + R <= n1; n += R) i8_block<R, MB>(a, m0, n, n + 2 * R <= n1 ? a.w + (n + R) * a.K : nullptr);
  for (; n < n1; ++n) i8_block<1, MB>(a, m0, n, nullptr);
}

void int8_rows(const I8Args& a, int64_t n0, int64_t n1) {
  // Blocks of output rows, each over every chunk of input rows while its weights are near (chunks of 8 rows on
  // AVX-512 rather than 4: +6-12% at 8-16 rows, A/B in one process; a block sized to L1 changed nothing).
  const int64_t step = 64;
  for (int64_t nb = n0; nb < n1; nb += step) {
    const int64_t nb1 = std::min(n1, nb + step);
    for (int64_t m0 = 0; m0 < a.M; m0 += kI8Rows) i8_chunk<kI8Rows>(a, m0, std::min<int64_t>(kI8Rows, a.M - m0), nb, nb1);
  }
}

// --- int4, packed by int4_pack (qgemv.cpp): tiles of 16 output rows; per tile and group a 64-byte record (the 16
// rows' fp16 scales, then their fp16 minima), then h/4 chunks of 64 bytes, row r's bytes [4c, 4c + 4) of the group
// at 4r. Byte j of a group holds code j (high nibble) and code j + g/2 (low nibble); the activations come as two
// planes (xa: each group's first half, xb: its second), so 4 activation bytes broadcast to every lane meet a
// vector of L rows' 4-byte runs and each int32 lane keeps one output row's sum: no horizontal sums, a group's
// scales are one vector load and one fp32 scaling serves L rows x 32 codes (the row-major layout before this
// scaled every 4-byte lane and reduced 16 lanes per row: 2x slower in cache, ~60% of the read bandwidth).
constexpr int L = W / 4;                          // output rows per vector
constexpr int kI4Rows = kRegs == 32 ? 8 : 4;      // input rows per pass over a tile (3 accumulators each)

// MB input rows (act: the first one's slot in the activation records) against the L output rows v of a tile. H: the
// group's bytes as a constant for the usual groups (32, 64, 128), else 0 (a.h).
template <int MB, int H>
inline void i4_tile(const I4Args& a, const uint8_t* tile, int v, const uint8_t* act, float* out) {
  VF acc[MB], accz[MB];  // the scaled sums and the minima's terms: two chains of G terms, not one of 2G
#pragma GCC unroll 8
  for (int i = 0; i < MB; ++i) acc[i] = zerof(), accz[i] = zerof();
  const int64_t h = H ? H : a.h;
  for (int64_t g = 0; g < a.G; ++g) {
    const uint8_t* p = tile + g * a.rec;
    const uint8_t* x = act + g * a.arec;
    for (int64_t o = 0; o < a.rec; o += 64) _mm_prefetch(reinterpret_cast<const char*>(p + kPrefetch + o), _MM_HINT_T1);
    const VF sc = halves(p + 2 * L * v), lz = halves(p + 32 + 2 * L * v);
    VI d[MB];
#pragma GCC unroll 8
    for (int i = 0; i < MB; ++i) d[i] = zero();
#pragma GCC unroll 16
    for (int64_t c = 0; c < h / 4; ++c) {
      const VI w = loadb(p + 64 + 64 * c + W * v);
      const VI hi = nib_hi(w), lo = nib_lo(w);
      const uint8_t* xc = x + 8 * kActRows * (c + 1);
#pragma GCC unroll 8
      for (int i = 0; i < MB; ++i) d[i] = dot4(dot4(d[i], hi, bcast4(xc + 8 * i)), lo, bcast4(xc + 8 * i + 4));
    }
    const float* sz = reinterpret_cast<const float*>(x);
#pragma GCC unroll 8
    for (int i = 0; i < MB; ++i) {
      acc[i] = fmaf(tof(d[i]), mulf(sc, setf(sz[2 * i])), acc[i]);
      accz[i] = fmaf(lz, setf(sz[2 * i + 1]), accz[i]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MB; ++i) storef(out + i * 16 + L * v, addf(acc[i], accz[i]));
}

template <int MB>
void i4_pass(const I4Args& a, const uint8_t* tile, int v, const uint8_t* act, float* out) {
  switch (a.h) {
    case 16: return i4_tile<MB, 16>(a, tile, v, act, out);
    case 32: return i4_tile<MB, 32>(a, tile, v, act, out);
    case 64: return i4_tile<MB, 64>(a, tile, v, act, out);
    default: return i4_tile<MB, 0>(a, tile, v, act, out);
  }
}

// mb <= MB input rows from slot `slot` of the activation records against one tile, into out (mb x 16).
template <int MB>
void i4_rows_of_tile(const I4Args& a, const uint8_t* tile, const uint8_t* act, int64_t mb, float* out) {
  if constexpr (MB > 1) {
    if (mb < MB) return i4_rows_of_tile<MB - 1>(a, tile, act, mb, out);
  }
  for (int v = 0; v < 16 / L; ++v) i4_pass<MB>(a, tile, v, act, out);
}

// Output rows of tiles [t0, t1) for every input row, each tile's bytes read once from memory (in L1 for later passes).
void int4_rows(const I4Args& a, int64_t t0, int64_t t1) {
  alignas(64) float out[kI4Rows * 16];
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* tile = a.p + t * a.G * a.rec;
    const int64_t n0 = t * 16, nn = std::min<int64_t>(16, a.N - n0);
    for (int64_t m0 = 0; m0 < a.M; m0 += kI4Rows) {
      const int64_t mb = std::min<int64_t>(kI4Rows, a.M - m0);
      // rows m0.. sit in record block m0 / kActRows, from slot m0 % kActRows (kI4Rows divides kActRows)
      const uint8_t* act = a.act + (m0 / kActRows) * a.G * a.arec + 8 * (m0 % kActRows);
      i4_rows_of_tile<kI4Rows>(a, tile, act, mb, out);
      for (int64_t i = 0; i < mb; ++i) {
        float* y = a.y + (m0 + i) * a.N + n0;
        for (int64_t r = 0; r < nn; ++r) y[r] = out[i * 16 + r] + (a.bias ? a.bias[n0 + r] : 0.f);
      }
    }
  }
}

// --- int8, many rows (a prefill, a batch of more than kMaxRows): panels of output rows packed per call ------------
// A panel of kPanel output rows (two vectors of int32 lanes) is packed by pack16 (qgemv.cpp) into a thread's buffer,
// per 16 rows [Kp / 4][16][4]: for each 4 inputs, the 16 rows' 4 codes side by side. Then every input row passes
// over it while it sits in L1/L2: a broadcast of the row's 4 codes meets a vector of L output rows, so each int32 lane
// keeps one output's sum to the end (the few-row kernels' layout ends each sum with a horizontal reduction: at 32
// rows those cost as much as the products).
constexpr int kPanel = 2 * L;
constexpr int kGemmRows = kRegs == 32 ? 12 : 4;  // input rows per pass: 2 MR accumulators, 2 weights, 1 broadcast

// What a panel's outputs are scaled by, per output row: the offset correction (VNNI), the weight scale and the bias.
// Read from memory by each row's epilogue: held in registers across the loop they cost 6 of its accumulators.
struct PanelScales {
  alignas(64) int32_t off[kPanel];
  alignas(64) float sw[kPanel], b[kPanel];
};

// Input rows m0 + I... against the packed panel (output rows c0.., nc of them real), into a.y. The rows are a pack of
// constant indices, not a loop: GCC keeps arrays indexed by constants in registers, while a loop it unrolls only
// late left all 24 accumulators on the stack (loaded and stored on every step, at half the speed).
template <int... I>
__attribute__((noinline)) void gemm_rows(const GemmArgs& a, const uint8_t* pk, int64_t Kq, int64_t m0, int64_t c0,
                                         int64_t nc, const PanelScales& e, std::integer_sequence<int, I...>) {
  constexpr int MR = sizeof...(I);
  // vector v's lanes: output rows v L.. of the panel, in block (v L) / 16 at byte (v L % 16) * 4 of each 64
  const uint8_t* w0 = pk;
  const uint8_t* w1 = pk + (L / 16) * Kq * 64 + (L % 16) * 4;
  const uint8_t* x = a.xs + m0 * a.Kp;
  VI acc0[MR] = {((void)I, zero())...}, acc1[MR] = {((void)I, zero())...};
  for (int64_t kq = 0; kq < Kq; ++kq) {
    const VI wa = loadb(w0 + 64 * kq), wb = loadb(w1 + 64 * kq);
    auto row = [&](VI& s0, VI& s1, const uint8_t* xr) {
      const VI xb = bcast4(xr + 4 * kq);
      s0 = dot8(s0, wa, xb);
      s1 = dot8(s1, wb, xb);
    };
    (row(acc0[I], acc1[I], x + I * a.Kp), ...);
  }
  auto out = [&](int64_t m, VI s0, VI s1) {
    const VF sx = setf(a.sx[m]);
    const VI sums[2] = {s0, s1};
    for (int v = 0; v < 2; ++v) {
      VF r = mulf(tof(subi(sums[v], loadb(e.off + v * L))), mulf(sx, loadf(e.sw + v * L)));
      if (a.bias) r = addf(r, loadf(e.b + v * L));
      float* y = a.y + m * a.N + c0 + v * L;
      if ((v + 1) * L <= nc) {
        storef(y, r);
      } else if (v * L < nc) {
        alignas(64) float t[L];
        storef(t, r);
        std::memcpy(y, t, sizeof(float) * (nc - v * L));
      }
    }
  };
  (out(m0 + I, acc0[I], acc1[I]), ...);
}

// mr (1 .. kGemmRows) input rows from m0: the kernel of that many rows.
template <int MR>
void gemm_chunk(const GemmArgs& a, const uint8_t* pk, int64_t Kq, int64_t m0, int64_t mr, int64_t c0, int64_t nc,
                const PanelScales& e) {
  if constexpr (MR > 1) {
    if (mr < MR) return gemm_chunk<MR - 1>(a, pk, Kq, m0, mr, c0, nc, e);
  }
  gemm_rows(a, pk, Kq, m0, c0, nc, e, std::make_integer_sequence<int, MR>{});
}

// Panels [p0, p1) of the output rows, each packed once and passed over by every input row.
void int8_gemm(const GemmArgs& a, int64_t p0, int64_t p1) {
  const int64_t Kq = a.Kp / 4;
  constexpr int blocks = (kPanel + 15) / 16;
  thread_local std::vector<uint8_t> packed;
  packed.resize(static_cast<size_t>(blocks * Kq * 64));
  PanelScales e;
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t c0 = p * kPanel, nc = std::min<int64_t>(kPanel, a.N - c0);
    for (int blk = 0; blk < blocks; ++blk) pack16(a.w, a.N, a.K, c0 + 16 * blk, Kq, packed.data() + blk * Kq * 64);
    for (int c = 0; c < kPanel; ++c) {
      const bool real = c < nc;
      e.off[c] = real && kOffset ? 128 * a.wsum[c0 + c] : 0;
      e.sw[c] = real ? a.sw[c0 + c] : 0.f;
      e.b[c] = real && a.bias ? a.bias[c0 + c] : 0.f;
    }
    for (int64_t m0 = 0; m0 < a.M; m0 += kGemmRows)
      gemm_chunk<kGemmRows>(a, packed.data(), Kq, m0, std::min<int64_t>(kGemmRows, a.M - m0), c0, nc, e);
  }
}
