// Ops<V> for SIMD packs (at::vec::Vectorized): what csrc/kdplug_math.h needs to run lane-wise.
//
// Masks: a lane mask type M and comparisons returning it. The generic version uses at::vec's
// all-ones-lane vectors and its exp / expm1 / log1p (SLEEF, accurate to 1 ulp, but out-of-line
// calls: expm1 and log1p run at ~1.5-2 G/s per core here). The AVX-512 float version uses k-masks
// and inline polynomial exp / expm1 / log1p (~2 ulp; exp at ~8 G/s per core), because these
// three functions are most of the kernel's arithmetic.
//
// Semantics every version keeps (the math header relies on them):
//   exp(-inf) = 0, exp(+inf) = +inf, exp(NaN) = NaN, subnormal results are not flushed;
//   expm1(-inf) = -1; log1p(-1) = -inf, log1p(+inf) = +inf, log1p(< -1) = NaN;
//   select(m, a, b) = m ? a : b lane-wise; comparisons with NaN are false except ne.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <cstdint>

#include "../kdplug_math.h"

namespace kdplug {
namespace math {

using at::vec::Vectorized;

// ---- generic: any at::vec backend, float and double -------------------------------------------
template <class T>
struct GenericVecOps {
  using V = Vectorized<T>;
  using Scalar = T;
  using Mask = V;  // all-ones lanes for true
  static KDPLUG_INLINE V exp(V x) { return x.exp(); }
  static KDPLUG_INLINE V expm1(V x) { return x.expm1(); }
  static KDPLUG_INLINE V log1p(V x) { return x.log1p(); }
  static KDPLUG_INLINE V log(V x) { return x.log(); }
  static KDPLUG_INLINE V neg(V x) { return x.neg(); }
  static KDPLUG_INLINE V abs(V x) { return x.abs(); }
  static KDPLUG_INLINE V max(V a, V b) { return V::blendv(a, b, a < b); }
  static KDPLUG_INLINE V min(V a, V b) { return V::blendv(a, b, b < a); }
  static KDPLUG_INLINE Mask eq(V a, V b) { return a == b; }
  static KDPLUG_INLINE Mask ne(V a, V b) { return a != b; }
  static KDPLUG_INLINE Mask lt(V a, V b) { return a < b; }
  static KDPLUG_INLINE Mask le(V a, V b) { return a <= b; }
  static KDPLUG_INLINE Mask gt(V a, V b) { return a > b; }
  static KDPLUG_INLINE Mask ge(V a, V b) { return a >= b; }
  static KDPLUG_INLINE Mask land(Mask a, Mask b) { return a & b; }
  static KDPLUG_INLINE Mask lor(Mask a, Mask b) { return a | b; }
  static KDPLUG_INLINE Mask all_true() { return V(T(0)) == V(T(0)); }
  static KDPLUG_INLINE Mask all_false() { return V(T(0)); }
  static KDPLUG_INLINE Mask lnot(Mask a) { return a ^ all_true(); }
  static KDPLUG_INLINE bool all(Mask m) { return m.zero_mask() == 0; }
  static KDPLUG_INLINE bool any(Mask m) { return m.zero_mask() != (1 << V::size()) - 1; }
  static KDPLUG_INLINE V select(Mask m, V a, V b) { return V::blendv(b, a, m); }
  static KDPLUG_INLINE Mask is_finite(V x) { return (x - x) == V(T(0)); }
};

#if defined(CPU_CAPABILITY_AVX512)

// ---- AVX-512, float: k-masks and inline transcendentals ---------------------------------------
namespace avx512 {

KDPLUG_INLINE __m512 pow2i(__m512i k) {  // 2^k for k in [-126, 128] (128 -> +inf)
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(k, _mm512_set1_epi32(127)), 23));
}

// exp(x) = 2^n exp(r), n = round(x / ln 2), r = x - n ln 2 in [-ln2/2, ln2/2] (Cody-Waite, two
// parts of ln 2), exp(r) by the Cephes degree-6 polynomial (~2 ulp); scalef applies 2^n with
// correct overflow and gradual underflow. x is clamped to [-104, 88.75] first (exp(-104) rounds
// to 0, exp(88.75) overflows), so -inf -> 0 and +inf -> +inf; NaN is restored at the end.
KDPLUG_INLINE __m512 exp_ps(__m512 x) {
  const __m512 xc = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.0f)), _mm512_set1_ps(88.75f));
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
  y = _mm512_scalef_ps(y, n);
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), y, x);
}

// expm1(x) = 2^n (expm1(r) + 1) - 1 = 2 fma(2^(n-1), expm1(r), 2^(n-1) - 1/2), with expm1(r) by
// its Taylor polynomial to degree 7 on |r| <= ln2/2 (relative error < 1e-8); 2^(n-1) - 1/2 is
// exact and n = 0 returns the polynomial itself, so small |x| keeps full relative precision
// (the halving keeps 2^(n-1) finite up to n = 128). x is clamped to [-30, 89] (expm1(-30) rounds
// to -1, 89 overflows); NaN is restored at the end.
KDPLUG_INLINE __m512 expm1_ps(__m512 x) {
  const __m512 xc = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-30.0f)), _mm512_set1_ps(89.0f));
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
  const __m512 t = pow2i(_mm512_sub_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(1)));  // 2^(n-1)
  __m512 y = _mm512_fmadd_ps(t, em1_r, _mm512_sub_ps(t, _mm512_set1_ps(0.5f)));
  y = _mm512_add_ps(y, y);
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), y, x);
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
  // (c is below one ulp of log u, so a 14-bit reciprocal is plenty: no division)
  const __m512 c = _mm512_mul_ps(_mm512_sub_ps(z, _mm512_sub_ps(u, one)), _mm512_rcp14_ps(u));
  return log_core_ps(u, _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(c, c, _CMP_ORD_Q), c));  // (NaN c at u = 0, inf)
}

}  // namespace avx512

template <>
struct Ops<Vectorized<float>> {
  using V = Vectorized<float>;
  using Scalar = float;
  using Mask = __mmask16;
  static KDPLUG_INLINE V exp(V x) { return avx512::exp_ps(x); }
  static KDPLUG_INLINE V expm1(V x) { return avx512::expm1_ps(x); }
  static KDPLUG_INLINE V log1p(V x) { return avx512::log1p_ps(x); }
  static KDPLUG_INLINE V log(V x) { return avx512::log_ps(x); }
  static KDPLUG_INLINE V neg(V x) { return _mm512_xor_ps(x, _mm512_set1_ps(-0.0f)); }
  static KDPLUG_INLINE V abs(V x) { return _mm512_abs_ps(x); }
  static KDPLUG_INLINE V max(V a, V b) { return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, b, _CMP_LT_OQ), a, b); }
  static KDPLUG_INLINE V min(V a, V b) { return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(b, a, _CMP_LT_OQ), a, b); }
  static KDPLUG_INLINE Mask eq(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_EQ_OQ); }
  static KDPLUG_INLINE Mask ne(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_NEQ_UQ); }
  static KDPLUG_INLINE Mask lt(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
  static KDPLUG_INLINE Mask le(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_LE_OQ); }
  static KDPLUG_INLINE Mask gt(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }
  static KDPLUG_INLINE Mask ge(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_GE_OQ); }
  static KDPLUG_INLINE Mask land(Mask a, Mask b) { return static_cast<Mask>(a & b); }
  static KDPLUG_INLINE Mask lor(Mask a, Mask b) { return static_cast<Mask>(a | b); }
  static KDPLUG_INLINE Mask lnot(Mask a) { return static_cast<Mask>(~a); }
  static KDPLUG_INLINE Mask all_true() { return static_cast<Mask>(0xFFFF); }
  static KDPLUG_INLINE Mask all_false() { return static_cast<Mask>(0); }
  static KDPLUG_INLINE bool all(Mask m) { return m == 0xFFFF; }
  static KDPLUG_INLINE bool any(Mask m) { return m != 0; }
  static KDPLUG_INLINE V select(Mask m, V a, V b) { return _mm512_mask_blend_ps(m, b, a); }
  // not +-inf, not NaN (fpclass: QNaN 0x01, +inf 0x08, -inf 0x10, SNaN 0x80)
  static KDPLUG_INLINE Mask is_finite(V x) { return static_cast<Mask>(~_mm512_fpclass_ps_mask(x, 0x99)); }
};

template <>
struct Ops<Vectorized<double>> : GenericVecOps<double> {};

#else

template <>
struct Ops<Vectorized<float>> : GenericVecOps<float> {};
template <>
struct Ops<Vectorized<double>> : GenericVecOps<double> {};

#endif

// The SIMD level this translation unit was compiled for (reported by build_info()).
inline const char* simd_level() {
#if defined(CPU_CAPABILITY_AVX512)
  return "AVX512";
#elif defined(CPU_CAPABILITY_AVX2)
  return "AVX2";
#elif defined(CPU_CAPABILITY_SVE256)
  return "SVE256";
#elif defined(__aarch64__)
  return "NEON";
#else
  return "DEFAULT";
#endif
}

}  // namespace math
}  // namespace kdplug
