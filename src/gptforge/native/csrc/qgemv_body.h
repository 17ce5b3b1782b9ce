// The integer kernels of qgemv.cpp, written once over a small vector vocabulary that each instruction set's
// prelude defines (qgemv.cpp includes this file once per set, inside that set's `#pragma GCC target` region and
// namespace, so one build holds every path and the CPU picks at run time):
//   W            bytes per integer vector (64 or 32); kRegs: vector registers (32 or 16)
//   VI, VF       integer / fp32 vectors; zero(), zerof(), loadb(p), loadf(p), tof(v), mulf, fmaf, hsum, hsumf, permf
//   dot8(acc, w, xs)   acc += the products of 4-byte runs of s8 weights with the prepared int8 activations xs
//                       (VNNI: xs = xq + 128 as u8, the caller subtracts 128 * sum(w); AVX2: xs = xq, sign trick)
//   dot4(acc, c, xq)   acc += products of u8 codes 0..15 with s8 activations, 4-byte runs (no overflow anywhere)
//   nib_hi(v), nib_lo(v)   the high / low nibble of each byte
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
  return kRegs == 32 ? (mb <= 2 ? 8 : mb == 3 ? 6 : 5) : (mb == 1 ? 6 : mb == 2 ? 4 : 3);
}

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

// Output rows [n0, n1) for every input row, in chunks of at most 4 input rows.
template <int MB>
void i8_chunk(const I8Args& a, int64_t m0, int64_t n0, int64_t n1) {
  constexpr int R = i8_rows(MB);
  int64_t n = n0;
  for (; n + R <= n1; n += R) i8_block<R, MB>(a, m0, n, n + 2 * R <= n1 ? a.w + (n + R) * a.K : nullptr);
  for (; n < n1; ++n) i8_block<1, MB>(a, m0, n, nullptr);
}

void int8_rows(const I8Args& a, int64_t n0, int64_t n1) {
  const int64_t chunks = (a.M + 3) / 4;
  // Tiles of output rows, each over every chunk of input rows while its weights are in L1.
  const int64_t step = 64;
  for (int64_t nb = n0; nb < n1; nb += step) {
    const int64_t nb1 = std::min(n1, nb + step);
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t m0 = c * 4, mb = std::min<int64_t>(4, a.M - m0);
      switch (mb) {
        case 1: i8_chunk<1>(a, m0, nb, nb1); break;
        case 2: i8_chunk<2>(a, m0, nb, nb1); break;
        case 3: i8_chunk<3>(a, m0, nb, nb1); break;
        default: i8_chunk<4>(a, m0, nb, nb1); break;
      }
    }
  }
}

// --- int4: byte j of a group holds code j (high nibble) and code j + g/2 (low nibble) -------------------------------
// The activations come as two planes laid out like the packed bytes (xa: each group's first half, xb: its second),
// so one vector of packed bytes meets one vector of each plane. A 4-byte lane lies inside one group (g/2 >= 16), so
// after dot4 each int32 lane is scaled by its group's weight scale and activation scale (idx maps lanes to groups).
template <int R, int MB>
inline void i4_tile(const I4Args& a, int64_t m0, int64_t n, const float* sc, VI idx, float* out) {
  VF acc[R][MB];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int i = 0; i < MB; ++i) acc[r][i] = zerof();
  const int64_t Kh = a.Kh, h = a.h;
  const uint8_t* qn = a.q + n * Kh;
  for (int64_t k = 0; k < Kh; k += W) {
    VI hi[R], lo[R];
    VF f[R];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      VI wv;
      if (k + W <= Kh) {
        wv = loadb(qn + r * Kh + k);
      } else {
        alignas(64) uint8_t buf[W] = {0};
        std::memcpy(buf, qn + r * Kh + k, Kh - k);
        wv = loadb(buf);
      }
      hi[r] = nib_hi(wv);
      lo[r] = nib_lo(wv);
      f[r] = permf(idx, loadf(sc + r * a.Gp + k / h));
    }
#pragma GCC unroll 16
    for (int i = 0; i < MB; ++i) {
      const int64_t m = m0 + i;
      const VI xa = loadb(a.xa + m * a.Khp + k), xb = loadb(a.xb + m * a.Khp + k);
      const VF s = loadf(a.sxe + m * (a.Khp / 4) + k / 4);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        const VI d = dot4(dot4(zero(), hi[r], xa), lo[r], xb);
        acc[r][i] = fmaf(mulf(tof(d), f[r]), s, acc[r][i]);
      }
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int i = 0; i < MB; ++i) out[r * MB + i] = hsumf(acc[r][i]);
}

constexpr int i4_rows(int mb) { return kRegs == 32 ? (mb <= 2 ? 4 : 2) : (mb == 1 ? 2 : 1); }

template <int R, int MB>
void i4_block(const I4Args& a, int64_t m0, int64_t n, float* sc, float* lz, VI idx) {
  for (int r = 0; r < R; ++r) widen_halves(a.scale + (n + r) * a.G, a.lo + (n + r) * a.G, a.G, sc + r * a.Gp, lz + r * a.G);
  float dots[R * MB];
  i4_tile<R, MB>(a, m0, n, sc, idx, dots);
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < MB; ++i) {
      const int64_t m = m0 + i, c = n + r;
      // + sum_g lo[c, g] * s[m, g] * sum(xq in group g)
      a.y[m * a.N + c] = dots[r * MB + i] + zterm(lz + r * a.G, a.zs + m * a.G, a.G) + (a.bias ? a.bias[c] : 0.f);
    }
}

template <int MB>
void i4_chunk(const I4Args& a, int64_t m0, int64_t n0, int64_t n1, float* sc, float* lz, VI idx) {
  constexpr int R = i4_rows(MB);
  int64_t n = n0;
  for (; n + R <= n1; n += R) i4_block<R, MB>(a, m0, n, sc, lz, idx);
  for (; n < n1; ++n) i4_block<1, MB>(a, m0, n, sc, lz, idx);
}

void int4_rows(const I4Args& a, int64_t n0, int64_t n1) {
  // Per-tile fp32 copies of the scales (padded by a vector, for permf's full-width loads) and minima.
  std::vector<float> sc(4 * a.Gp, 0.f), lz(4 * a.G, 0.f);
  alignas(64) int32_t lanes[16];
  for (int l = 0; l < W / 4; ++l) lanes[l] = static_cast<int32_t>((4 * l) / a.h);  // the same for every vector
  const VI idx = loadb(lanes);
  const int64_t chunks = (a.M + 3) / 4, step = 64;
  for (int64_t nb = n0; nb < n1; nb += step) {
    const int64_t nb1 = std::min(n1, nb + step);
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t m0 = c * 4, mb = std::min<int64_t>(4, a.M - m0);
      switch (mb) {
        case 1: i4_chunk<1>(a, m0, nb, nb1, sc.data(), lz.data(), idx); break;
        case 2: i4_chunk<2>(a, m0, nb, nb1, sc.data(), lz.data(), idx); break;
        case 3: i4_chunk<3>(a, m0, nb, nb1, sc.data(), lz.data(), idx); break;
        default: i4_chunk<4>(a, m0, nb, nb1, sc.data(), lz.data(), idx); break;
      }
    }
  }
}
