// The 256-bit helpers the AVX-VNNI and AVX2 paths share. Included inside each path's namespace (after its VI/VF
// aliases and before its dot products), so each copy is compiled under that namespace's target pragma.
inline VI zero() { return _mm256_setzero_si256(); }
inline VF zerof() { return _mm256_setzero_ps(); }
inline VI loadb(const void* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline VF loadf(const float* p) { return _mm256_loadu_ps(p); }
inline VF tof(VI v) { return _mm256_cvtepi32_ps(v); }
inline VF mulf(VF a, VF b) { return _mm256_mul_ps(a, b); }
inline VF fmaf(VF a, VF b, VF c) { return _mm256_fmadd_ps(a, b, c); }
inline int32_t hsum(VI v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1)));
}
inline float hsumf(VF v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
inline VF permf(VI idx, VF v) { return _mm256_permutevar8x32_ps(v, idx); }
inline VI nib_hi(VI v) { return _mm256_and_si256(_mm256_srli_epi16(v, 4), _mm256_set1_epi8(15)); }
inline VI nib_lo(VI v) { return _mm256_and_si256(v, _mm256_set1_epi8(15)); }
inline void widen_halves(const uint16_t* s, const uint16_t* l, int64_t G, float* sc, float* lz) {
  int64_t g = 0;
  for (; g + 8 <= G; g += 8) {
    _mm256_storeu_ps(sc + g, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + g))));
    _mm256_storeu_ps(lz + g, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(l + g))));
  }
  for (; g < G; ++g) sc[g] = _cvtsh_ss(s[g]), lz[g] = _cvtsh_ss(l[g]);
}
inline float zterm(const float* lz, const float* zs, int64_t G) {
  float z = 0;
  for (int64_t g = 0; g < G; ++g) z += lz[g] * zs[g];
  return z;
}
