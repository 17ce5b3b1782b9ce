// The 256-bit helpers the AVX-VNNI and AVX2 paths share. Included inside each path's namespace (after its VI/VF
// aliases and before its dot products), so each copy is compiled under that namespace's target pragma.
inline VI zero() { return _mm256_setzero_si256(); }
inline VF zerof() { return _mm256_setzero_ps(); }
inline VI loadb(const void* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline VF tof(VI v) { return _mm256_cvtepi32_ps(v); }
inline VF mulf(VF a, VF b) { return _mm256_mul_ps(a, b); }
inline VF fmaf(VF a, VF b, VF c) { return _mm256_fmadd_ps(a, b, c); }
inline int32_t hsum(VI v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1)));
}
inline VF addf(VF a, VF b) { return _mm256_add_ps(a, b); }
inline VI subi(VI a, VI b) { return _mm256_sub_epi32(a, b); }
inline VF loadf(const float* p) { return _mm256_loadu_ps(p); }
inline VF setf(float s) { return _mm256_set1_ps(s); }
inline void storef(float* p, VF v) { _mm256_storeu_ps(p, v); }
inline VI bcast4(const void* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}
inline VF halves(const void* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline VI nib_hi(VI v) { return _mm256_and_si256(_mm256_srli_epi16(v, 4), _mm256_set1_epi8(15)); }
inline VI nib_lo(VI v) { return _mm256_and_si256(v, _mm256_set1_epi8(15)); }
