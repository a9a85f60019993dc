// Inline SIMD exp / expm1 (and both at once) / log / log1p for float packs (AVX-512F, AVX2 + FMA):
// raw intrinsics, no torch, so that csrc/tests/test_simd.cpp checks them against the C library
// (ctest). The CPU kernel reaches them through Ops<Vectorized<float>> in vec_ops.h. Each
// namespace is compiled only where the compiler targets its instruction set.
//
// Semantics (what csrc/kdplug_math.h relies on), ~2 ulp elsewhere:
//   exp(-inf) = 0, exp(+inf) = +inf, exp(NaN) = NaN, subnormal results are not flushed;
//   expm1(-inf) = -1; log(0) = -inf, log(+inf) = +inf, log(< 0) = NaN (subnormal arguments
//   exact); log1p(-1) = -inf, log1p(+inf) = +inf, log1p(< -1) = NaN.
#pragma once

#include <immintrin.h>

#include <cmath>

#include "../kdplug_math.h"  // KDPLUG_INLINE

namespace kdplug {
namespace math {

#if defined(__AVX512F__)
// ---- AVX-512F ----------------------------------------------------------------------------------
namespace avx512 {

// x clamped to [-104, 88.75], NaN kept: max and min return their second operand where either is
// NaN, so the bound goes first (NaN then runs through every later step, and no blend restores it).
KDPLUG_INLINE __m512 clamp_keep_nan(__m512 x) {
  return _mm512_min_ps(_mm512_set1_ps(88.75f), _mm512_max_ps(_mm512_set1_ps(-104.0f), x));
}

// exp(x) = 2^n exp(r), n = round(x / ln 2), r = x - n ln 2 in [-ln2/2, ln2/2] (Cody-Waite, two
// parts of ln 2), exp(r) by the Cephes degree-6 polynomial (~2 ulp); scalef applies 2^n with
// correct overflow and gradual underflow. x is clamped to [-104, 88.75] first (exp(-104) rounds
// to 0, exp(88.75) overflows), so -inf -> 0 and +inf -> +inf; NaN stays NaN.
KDPLUG_INLINE __m512 exp_ps(__m512 x) {
  const __m512 xc = clamp_keep_nan(x);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(-0.693359375f), xc);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500E-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894E-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459E-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201E-1f));
  __m512 y = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(y, n);
}

// expm1(x) = 2^n (expm1(r) + 1) - 1 = 2 fma(2^(n-1), expm1(r), 2^(n-1) - 1/2), with n and r as
// in exp_ps and expm1(r) by its Taylor polynomial to degree 7 on |r| <= ln2/2 (relative error
// < 1e-8); 2^(n-1) - 1/2 is exact and n = 0 returns the polynomial itself, so small |x| keeps full
// relative precision (the halving keeps 2^(n-1) finite up to n = 128). exp(x) comes with it from
// the same reduction, 2^n (1 + expm1(r)) (~1 ulp): *ex. x is clamped to exp_ps's [-104, 88.75]
// (expm1 rounds to -1 below -17 and overflows above 88.73); NaN stays NaN in both.
KDPLUG_INLINE __m512 expm1_exp_ps(__m512 x, __m512* ex) {
  const __m512 xc = clamp_keep_nan(x);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(-0.693359375f), xc);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  const __m512 em1_r = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r);  // r + r^2 (1/2 + r/6 + ...)
  const __m512 t = _mm512_scalef_ps(_mm512_set1_ps(0.5f), n);       // 2^(n-1) (0 far below -17)
  __m512 y = _mm512_fmadd_ps(t, em1_r, _mm512_sub_ps(t, _mm512_set1_ps(0.5f)));
  y = _mm512_add_ps(y, y);
  *ex = _mm512_scalef_ps(_mm512_add_ps(em1_r, _mm512_set1_ps(1.0f)), n);
  return y;
}

KDPLUG_INLINE __m512 expm1_ps(__m512 x) {
  __m512 unused;
  return expm1_exp_ps(x, &unused);
}

// log u + c for u > 0: e ln 2 + log m with m = u / 2^e in [sqrt(1/2), sqrt(2)) (getexp /
// getmant, so subnormal u is exact), log m = f - f^2/2 + f^3 P(f), f = m - 1, the Cephes logf
// polynomial (~1 ulp); c is a small correction added before the last rounding.
KDPLUG_INLINE __m512 log_core_ps(__m512 u, __m512 c) {
  const __m512 one = _mm512_set1_ps(1.0f);
  __m512 m = _mm512_getmant_ps(u, _MM_MANT_NORM_1_2, _MM_MANT_SIGN_zero);  // [1, 2)
  __m512 e = _mm512_getexp_ps(u);
  const __mmask16 big = _mm512_cmp_ps_mask(m, _mm512_set1_ps(1.41421356237f), _CMP_GT_OQ);
  m = _mm512_mask_mul_ps(m, big, m, _mm512_set1_ps(0.5f));
  e = _mm512_mask_add_ps(e, big, e, one);
  const __m512 f = _mm512_sub_ps(m, one);
  __m512 p = _mm512_set1_ps(7.0376836292E-2f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(-1.1514610310E-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.1676998740E-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(-1.2420140846E-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.4249322787E-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(-1.6668057665E-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.0000714765E-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(-2.4999993993E-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(3.3333331174E-1f));
  const __m512 f2 = _mm512_mul_ps(f, f);
  __m512 y = _mm512_mul_ps(_mm512_mul_ps(f2, f), p);  // f^3 P(f)
  y = _mm512_fmadd_ps(e, _mm512_set1_ps(-2.12194440e-4f), y);
  y = _mm512_fnmadd_ps(f2, _mm512_set1_ps(0.5f), y);
  y = _mm512_add_ps(y, c);
  y = _mm512_add_ps(_mm512_add_ps(f, y), _mm512_mul_ps(e, _mm512_set1_ps(0.693359375f)));
  // special values: u == 0 -> -inf; u == +inf -> +inf; u < 0 or NaN -> NaN
  y = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(u, _mm512_setzero_ps(), _CMP_EQ_OQ), y,
                           _mm512_set1_ps(-INFINITY));
  y = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(u, _mm512_set1_ps(INFINITY), _CMP_EQ_OQ), y, u);
  y = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(u, _mm512_setzero_ps(), _CMP_NGE_UQ), y, _mm512_set1_ps(NAN));
  return y;
}

KDPLUG_INLINE __m512 log_ps(__m512 x) { return log_core_ps(x, _mm512_setzero_ps()); }

// log1p(z) = log(u) + c: u = 1 + z rounded, c = (z - (u - 1)) / u the rounding's first-order
// correction. z = -1 -> -inf, z = +inf -> +inf, z < -1 or NaN -> NaN.
KDPLUG_INLINE __m512 log1p_ps(__m512 z) {
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 u = _mm512_add_ps(one, z);
  // NB: 1/u to ~23 bits (the 14-bit estimate and one Newton step): where u rounds to 1, c = z is
  // the whole result, so the reciprocal's error is the result's relative error
  const __m512 r0 = _mm512_rcp14_ps(u);
  const __m512 r = _mm512_fmadd_ps(r0, _mm512_fnmadd_ps(u, r0, one), r0);
  const __m512 c = _mm512_mul_ps(_mm512_sub_ps(z, _mm512_sub_ps(u, one)), r);
  return log_core_ps(u, _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(c, c, _CMP_ORD_Q), c));  // (NaN c at u = 0, inf)
}

}  // namespace avx512
#endif  // __AVX512F__

#if defined(__AVX2__) && defined(__FMA__)
// ---- AVX2 + FMA ---------------------------
// The AVX-512 functions above, without scalef / getexp / getmant / k-masks (same polynomials and
// special values; the scaling by 2^n and the exponent split written with integer ops).
namespace avx2 {

KDPLUG_INLINE __m256 pow2i(__m256i k) {  // 2^k for k in [-126, 128] (128 -> +inf, -127 -> 0)
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(k, _mm256_set1_epi32(127)), 23));
}

// y 2^n for n in [-150, 128] as y 2^(n >> 1) 2^(n - (n >> 1)), both factors normal, so the second
// product rounds once into the subnormal range (gradual underflow, 0 below it) and n = 128
// overflows to +inf.
KDPLUG_INLINE __m256 scale_pow2(__m256 y, __m256i n) {
  const __m256i n1 = _mm256_srai_epi32(n, 1);
  return _mm256_mul_ps(_mm256_mul_ps(y, pow2i(n1)), pow2i(_mm256_sub_epi32(n, n1)));
}

KDPLUG_INLINE __m256 clamp_keep_nan(__m256 x) {  // as avx512::clamp_keep_nan
  return _mm256_min_ps(_mm256_set1_ps(88.75f), _mm256_max_ps(_mm256_set1_ps(-104.0f), x));
}

// exp: as avx512::exp_ps, with 2^n applied by scale_pow2.
KDPLUG_INLINE __m256 exp_ps(__m256 x) {
  const __m256 xc = clamp_keep_nan(x);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fmadd_ps(n, _mm256_set1_ps(-0.693359375f), xc);
  r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500E-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507E-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073E-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894E-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459E-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201E-1f));
  const __m256 y = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  return scale_pow2(y, _mm256_cvtps_epi32(n));  // (NaN: NaN y)
}

// expm1 and exp: avx512::expm1_exp_ps; 2^(n-1) from pow2i with n - 1 kept >= -127 (0 there:
// x < -87.3, where expm1 is -1 anyway), exp's 2^n as in exp_ps.
KDPLUG_INLINE __m256 expm1_exp_ps(__m256 x, __m256* ex) {
  const __m256 xc = clamp_keep_nan(x);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fmadd_ps(n, _mm256_set1_ps(-0.693359375f), xc);
  r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.0f / 5040.0f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  const __m256 em1_r = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r);
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256 t = pow2i(_mm256_max_epi32(_mm256_sub_epi32(ni, _mm256_set1_epi32(1)), _mm256_set1_epi32(-127)));
  const __m256 y = _mm256_fmadd_ps(t, em1_r, _mm256_sub_ps(t, _mm256_set1_ps(0.5f)));
  *ex = scale_pow2(_mm256_add_ps(em1_r, _mm256_set1_ps(1.0f)), ni);  // (NaN: NaN ex, y)
  return _mm256_add_ps(y, y);
}

KDPLUG_INLINE __m256 expm1_ps(__m256 x) {
  __m256 unused;
  return expm1_exp_ps(x, &unused);
}

// log u + c: as avx512::log_core_ps, with the exponent and mantissa read from the bits (a
// subnormal u is first scaled by 2^23, so it is exact too).
KDPLUG_INLINE __m256 log_core_ps(__m256 u, __m256 c) {
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 sub = _mm256_cmp_ps(u, _mm256_set1_ps(1.17549435e-38f), _CMP_LT_OQ);
  const __m256 us = _mm256_blendv_ps(u, _mm256_mul_ps(u, _mm256_set1_ps(8388608.0f)), sub);
  const __m256i bits = _mm256_castps_si256(us);
  __m256 e = _mm256_cvtepi32_ps(_mm256_sub_epi32(
      _mm256_and_si256(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(0xff)), _mm256_set1_epi32(127)));
  e = _mm256_sub_ps(e, _mm256_and_ps(sub, _mm256_set1_ps(23.0f)));
  __m256 m = _mm256_castsi256_ps(
      _mm256_or_si256(_mm256_and_si256(bits, _mm256_set1_epi32(0x007fffff)), _mm256_set1_epi32(0x3f800000)));
  const __m256 big = _mm256_cmp_ps(m, _mm256_set1_ps(1.41421356237f), _CMP_GT_OQ);
  m = _mm256_blendv_ps(m, _mm256_mul_ps(m, _mm256_set1_ps(0.5f)), big);
  e = _mm256_add_ps(e, _mm256_and_ps(big, one));
  const __m256 f = _mm256_sub_ps(m, one);
  __m256 p = _mm256_set1_ps(7.0376836292E-2f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(-1.1514610310E-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.1676998740E-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(-1.2420140846E-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.4249322787E-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(-1.6668057665E-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.0000714765E-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(-2.4999993993E-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(3.3333331174E-1f));
  const __m256 f2 = _mm256_mul_ps(f, f);
  __m256 y = _mm256_mul_ps(_mm256_mul_ps(f2, f), p);
  y = _mm256_fmadd_ps(e, _mm256_set1_ps(-2.12194440e-4f), y);
  y = _mm256_fnmadd_ps(f2, _mm256_set1_ps(0.5f), y);
  y = _mm256_add_ps(y, c);
  y = _mm256_add_ps(_mm256_add_ps(f, y), _mm256_mul_ps(e, _mm256_set1_ps(0.693359375f)));
  // special values: u == 0 -> -inf; u == +inf -> +inf; u < 0 or NaN -> NaN
  y = _mm256_blendv_ps(y, _mm256_set1_ps(-INFINITY), _mm256_cmp_ps(u, _mm256_setzero_ps(), _CMP_EQ_OQ));
  y = _mm256_blendv_ps(y, u, _mm256_cmp_ps(u, _mm256_set1_ps(INFINITY), _CMP_EQ_OQ));
  return _mm256_blendv_ps(y, _mm256_set1_ps(NAN), _mm256_cmp_ps(u, _mm256_setzero_ps(), _CMP_NGE_UQ));
}

KDPLUG_INLINE __m256 log_ps(__m256 x) { return log_core_ps(x, _mm256_setzero_ps()); }

// log1p: as avx512::log1p_ps (the 12-bit reciprocal estimate and one Newton step).
KDPLUG_INLINE __m256 log1p_ps(__m256 z) {
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 u = _mm256_add_ps(one, z);
  const __m256 r0 = _mm256_rcp_ps(u);
  const __m256 r = _mm256_fmadd_ps(r0, _mm256_fnmadd_ps(u, r0, one), r0);
  const __m256 c = _mm256_mul_ps(_mm256_sub_ps(z, _mm256_sub_ps(u, one)), r);
  return log_core_ps(u, _mm256_and_ps(c, _mm256_cmp_ps(c, c, _CMP_ORD_Q)));  // (NaN c at u = 0, inf)
}

}  // namespace avx2
#endif  // __AVX2__ && __FMA__

}  // namespace math
}  // namespace kdplug
