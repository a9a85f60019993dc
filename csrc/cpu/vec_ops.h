// Ops<V> for SIMD packs (at::vec::Vectorized): what csrc/kdplug_math.h needs to run lane-wise.
//
// Masks: a lane mask type M and comparisons returning it. The generic version uses at::vec's
// all-ones-lane vectors and its exp / expm1 / log1p (SLEEF, accurate to 1 ulp, but out-of-line
// calls: expm1 and log1p run at ~1.5-2 G/s per core here). The AVX-512 and AVX2 float versions
// use inline polynomial exp / expm1 / log1p / log (~2 ulp; exp at ~8 G/s per core on AVX-512),
// because these functions are most of the kernel's arithmetic; AVX-512 also uses k-masks.
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
#include <type_traits>

#include "../kdplug_math.h"
#include "simd_math.h"

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
  static KDPLUG_INLINE V expm1_exp(V x, V* ex) {
    *ex = x.exp();
    return x.expm1();
  }
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

// ---- AVX-512, float: k-masks and simd_math.h's transcendentals ---------------------------------

template <>
struct Ops<Vectorized<float>> {
  using V = Vectorized<float>;
  using Scalar = float;
  using Mask = __mmask16;
  static KDPLUG_INLINE V exp(V x) { return avx512::exp_ps(x); }
  static KDPLUG_INLINE V expm1(V x) { return avx512::expm1_ps(x); }
  static KDPLUG_INLINE V expm1_exp(V x, V* ex) {
    __m512 e;
    const V em1 = avx512::expm1_exp_ps(x, &e);
    *ex = e;
    return em1;
  }
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

#elif defined(CPU_CAPABILITY_AVX2)

// ---- AVX2 + FMA, float: at::vec's vector masks, simd_math.h's transcendentals ----------------

template <>
struct Ops<Vectorized<float>> : GenericVecOps<float> {
  using V = Vectorized<float>;
  static KDPLUG_INLINE V exp(V x) { return avx2::exp_ps(x); }
  static KDPLUG_INLINE V expm1(V x) { return avx2::expm1_ps(x); }
  static KDPLUG_INLINE V expm1_exp(V x, V* ex) {
    __m256 e;
    const V em1 = avx2::expm1_exp_ps(x, &e);
    *ex = e;
    return em1;
  }
  static KDPLUG_INLINE V log1p(V x) { return avx2::log1p_ps(x); }
  static KDPLUG_INLINE V log(V x) { return avx2::log_ps(x); }
};
template <>
struct Ops<Vectorized<double>> : GenericVecOps<double> {};

#else

template <>
struct Ops<Vectorized<float>> : GenericVecOps<float> {};
template <>
struct Ops<Vectorized<double>> : GenericVecOps<double> {};

#endif

// ---- two packs as one ---------------------------------------------------------------------------
// Pair<V>: two SIMD packs (entries [k, k + W) and [k + W, k + 2W)) that the math header's
// templates take as one value, each operation applied to both halves in turn. Same operations on
// the same lanes, so the same bits as two calls on single packs, but the two halves' dependency
// chains sit side by side in the instruction stream. The passes with long chains per entry (the
// alpha-mixture's expm1 -> log1p -> exp, then its AB element) are latency-bound with one pack per
// iteration: each iteration's ~100 dependent operations fill the out-of-order scheduler before the
// next iteration's independent ones are reached. alpha_mix + the exp of its result, fp32, AVX-512,
// EPYC (Zen 5), 4096 entries in L1: 1.47 ns an entry per pack, 1.06 per Pair. Not a general
// win: forward_grad_row_arith's pass (a log and a division an entry, with more values live per
// entry) got slower with it (SKL divergence_fwd 37-41 -> 41-44 ms, fwd_grad 42-44 -> 49-51;
// 1 thread, N = 256, V = 128256 fp32), so it stays one pack at a time.
template <class V>
struct Pair {
  V lo, hi;
  Pair() = default;
  KDPLUG_INLINE Pair(V lo_, V hi_) : lo(lo_), hi(hi_) {}
  template <class S, class = std::enable_if_t<std::is_arithmetic_v<S>>>
  KDPLUG_INLINE explicit Pair(S x) : lo(static_cast<typename Ops<V>::Scalar>(x)), hi(lo) {}
  friend KDPLUG_INLINE Pair operator+(Pair a, Pair b) { return {a.lo + b.lo, a.hi + b.hi}; }
  friend KDPLUG_INLINE Pair operator-(Pair a, Pair b) { return {a.lo - b.lo, a.hi - b.hi}; }
  friend KDPLUG_INLINE Pair operator*(Pair a, Pair b) { return {a.lo * b.lo, a.hi * b.hi}; }
  friend KDPLUG_INLINE Pair operator/(Pair a, Pair b) { return {a.lo / b.lo, a.hi / b.hi}; }
};

template <class V>
struct Ops<Pair<V>> {
  using B = Ops<V>;
  using P = Pair<V>;
  using Scalar = typename B::Scalar;
  struct Mask {
    typename B::Mask lo, hi;
  };
#define KDPLUG_PAIR_UNARY(f) \
  static KDPLUG_INLINE P f(P x) { return {B::f(x.lo), B::f(x.hi)}; }
#define KDPLUG_PAIR_BINARY(R, f) \
  static KDPLUG_INLINE R f(P a, P b) { return {B::f(a.lo, b.lo), B::f(a.hi, b.hi)}; }
  KDPLUG_PAIR_UNARY(exp)
  KDPLUG_PAIR_UNARY(expm1)
  KDPLUG_PAIR_UNARY(log1p)
  KDPLUG_PAIR_UNARY(log)
  KDPLUG_PAIR_UNARY(neg)
  KDPLUG_PAIR_UNARY(abs)
  KDPLUG_PAIR_BINARY(P, max)
  KDPLUG_PAIR_BINARY(P, min)
  KDPLUG_PAIR_BINARY(Mask, eq)
  KDPLUG_PAIR_BINARY(Mask, ne)
  KDPLUG_PAIR_BINARY(Mask, lt)
  KDPLUG_PAIR_BINARY(Mask, le)
  KDPLUG_PAIR_BINARY(Mask, gt)
  KDPLUG_PAIR_BINARY(Mask, ge)
#undef KDPLUG_PAIR_UNARY
#undef KDPLUG_PAIR_BINARY
  static KDPLUG_INLINE P expm1_exp(P x, P* ex) { return {B::expm1_exp(x.lo, &ex->lo), B::expm1_exp(x.hi, &ex->hi)}; }
  static KDPLUG_INLINE Mask land(Mask a, Mask b) { return {B::land(a.lo, b.lo), B::land(a.hi, b.hi)}; }
  static KDPLUG_INLINE Mask lor(Mask a, Mask b) { return {B::lor(a.lo, b.lo), B::lor(a.hi, b.hi)}; }
  static KDPLUG_INLINE Mask lnot(Mask a) { return {B::lnot(a.lo), B::lnot(a.hi)}; }
  static KDPLUG_INLINE Mask all_true() { return {B::all_true(), B::all_true()}; }
  static KDPLUG_INLINE Mask all_false() { return {B::all_false(), B::all_false()}; }
  static KDPLUG_INLINE Mask is_finite(P x) { return {B::is_finite(x.lo), B::is_finite(x.hi)}; }
  // (a branch on all / any is taken for the Pair when both halves agree: the math header's
  // uniform branches give the same values either way)
  static KDPLUG_INLINE bool all(Mask m) { return B::all(m.lo) && B::all(m.hi); }
  static KDPLUG_INLINE bool any(Mask m) { return B::any(m.lo) || B::any(m.hi); }
  static KDPLUG_INLINE P select(Mask m, P a, P b) { return {B::select(m.lo, a.lo, b.lo), B::select(m.hi, a.hi, b.hi)}; }
};

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
