// kdplug_math.h: the math of kdplug's compiled core, shared by every backend.
//
// No torch includes. Everything is a template on the value type `V`: a scalar (`float`, `double`;
// what the CUDA kernel and the C++ unit tests use) or a SIMD pack (the CPU kernel instantiates the
// same functions with `at::vec::Vectorized<float>`). The few primitives that differ between the
// two (exp, comparisons, selects, ...) come from `Ops<V>`; this header defines them for scalars,
// `csrc/cpu/vec_ops.h` for SIMD packs. Formulas are written branch-free (selects), so the same
// text runs lane-wise in a vector register; per-row constants may branch.
//
// The executable specification is `kdplug/_torch_impl.py`: same formulas, same zero / -inf / NaN
// rules, tensor ops instead of lanes. Keep the two in step.
//
// ------------------------------------------------------------------------------------------------
// Notation (one token, i.e. one row of the [N, V] logits)
//
//   s, t       student and teacher logits, T the temperature; s' = s / T, t' = t / T
//   lq = s' - LSE(s'),  lp = t' - LSE(t')          log-probabilities of student q and teacher p
//   lr                                             log of the assistant r (mixture of p and q)
//   loss = sum_i coef_i * sum_k e_i(l_lhs_i[k], l_rhs_i[k])      coef_i = weight_i (* token weight)
//
// Every element e(lP, lQ) is a function of two log-probabilities. With its partials
// dP = de/dlog P and dQ = de/dlog Q the gradient w.r.t. the student logits is
//
//   h^q_k = sum over slots holding q of coef * d(slot)       (dL/dlog q_k)
//   h^r_k = the same through slots holding r                 (dL/dlog r_k)
//   u_k   = h^q_k + w_k (h^r_k - H^r r_k),  H^r = sum_k h^r_k,  w_k = dlog r~_k / dlog q_k
//   grad_k = scale (u_k - q_k U) / T,  U = sum_k u_k,  scale = the incoming per-token gradient
//
// (-q U is the softmax Jacobian; -w H^r r is the normalization of r = r~ / Z). The forward
// accumulates U and H^r along with the loss, so that the backward is one pass over the row.
//
// Zero-probability rules (research/methods-ab-taid-amid.md §5.6), applied everywhere:
//   * select before multiply: P * x with P == 0 is 0 even for x = +-inf (0 log 0 = 0);
//   * an entry where both operands are 0 contributes 0 to the loss and to the gradient;
//   * a genuine support mismatch (P > 0 = Q in KL(P||Q)) gives +inf loss, never NaN; its
//     partials are infinite and are dropped (non-finite partial -> 0), so the gradient of such a
//     token is the gradient over its finite entries;
//   * the gradient w.r.t. a -inf student logit is 0; a token whose incoming gradient is 0 gets
//     exactly 0 (even with an infinite loss);
//   * inf_policy "exclude" (DistiLLM's masking) drops an entry where either logit is -inf.
// ------------------------------------------------------------------------------------------------
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define KDPLUG_HOST_DEVICE __host__ __device__
#define KDPLUG_INLINE __forceinline__
#elif defined(_MSC_VER)
#define KDPLUG_HOST_DEVICE
#define KDPLUG_INLINE __forceinline
#else
#define KDPLUG_HOST_DEVICE
#define KDPLUG_INLINE inline __attribute__((always_inline))
#endif

namespace kdplug {
namespace math {

// ---- the packed recipe (layout written by kdplug/_pack.py) -------------------------------------
//   structure: [policy, has_assistant, detach, n_terms, (lhs, rhs, div) * n_terms]
//   consts:    [alpha, (ab_alpha, ab_beta) * n_terms]
//   params:    [T, lam, weight * n_terms]     (float64, may change between calls)
enum Operand : int { TEACHER = 0, STUDENT = 1, ASSISTANT = 2 };
enum Div : int { KL = 0, CE = 1, AB = 2, TVD = 3 };
enum Policy : int { EXACT = 0, EXCLUDE = 1 };
// How the assistant is built. ALPHA: the general alpha-mixture, normalized by Z = sum r~ (a pass
// of its own); ARITHMETIC (alpha = -1): already normalized; GEOMETRIC (alpha = 1): normalized by
// a log-sum-exp over the row that the first pass computes from the logits.
enum Mix : int { MIX_NONE = 0, MIX_GEOMETRIC = 1, MIX_ARITHMETIC = 2, MIX_ALPHA = 3 };

constexpr int kMaxTerms = 8;

// row_stats columns: what the forward leaves for the backward (compute dtype, [N, kStats]).
enum Stat : int {
  STAT_LSE_S = 0,  // LSE(s / T)
  STAT_LSE_T = 1,  // LSE(t / T)
  STAT_LOG_Z = 2,  // assistant normalizer: log Z (alpha-mixture; 0 arithmetic), or, for the
                   // geometric mixture, the LSE of its logits g (see geometric_mix), lr = g - it
  STAT_H_R = 3,    // H^r = sum_k h^r_k
  STAT_U = 4,      // U = sum_k u_k
};
constexpr int kStats = 5;

// The static part of a recipe, decoded once per call on the host (a POD: kernels take it by value).
struct RecipeDesc {
  int policy;
  int has_assistant;
  int detach;
  int n_terms;
  int mix;          // Mix
  double alpha;     // as packed (1 = geometric)
  double a;         // mixture exponent (1 - alpha) / 2, or 0 for the geometric mixture
  int lhs[kMaxTerms];
  int rhs[kMaxTerms];
  int div[kMaxTerms];
  double ab_alpha[kMaxTerms];
  double ab_beta[kMaxTerms];
};

// Decodes and validates the static part; returns nullptr or an error message.
inline const char* decode_recipe(const int64_t* structure, int64_t n_structure, const double* consts,
                                 int64_t n_consts, RecipeDesc* out) {
  if (n_structure < 4) return "structure must start with [policy, has_assistant, detach, n_terms]";
  RecipeDesc d{};
  d.policy = static_cast<int>(structure[0]);
  d.has_assistant = static_cast<int>(structure[1]);
  d.detach = static_cast<int>(structure[2]);
  d.n_terms = static_cast<int>(structure[3]);
  if (d.policy != EXACT && d.policy != EXCLUDE) return "structure[0] (policy) must be 0 (exact) or 1 (exclude)";
  if (d.has_assistant != 0 && d.has_assistant != 1) return "structure[1] (has_assistant) must be 0 or 1";
  if (d.detach != 0 && d.detach != 1) return "structure[2] (detach) must be 0 or 1";
  if (d.n_terms < 1 || d.n_terms > kMaxTerms) return "structure[3] (n_terms) must be in [1, 8]";
  if (n_structure != 4 + 3 * static_cast<int64_t>(d.n_terms)) return "structure must hold 4 + 3 * n_terms ints";
  if (n_consts != 1 + 2 * static_cast<int64_t>(d.n_terms)) return "consts must hold 1 + 2 * n_terms floats";
  d.alpha = consts[0];
  if (!std::isfinite(d.alpha)) return "consts[0] (alpha) must be finite";
  for (int i = 0; i < d.n_terms; ++i) {
    d.lhs[i] = static_cast<int>(structure[4 + 3 * i]);
    d.rhs[i] = static_cast<int>(structure[5 + 3 * i]);
    d.div[i] = static_cast<int>(structure[6 + 3 * i]);
    d.ab_alpha[i] = consts[1 + 2 * i];
    d.ab_beta[i] = consts[2 + 2 * i];
    for (int side = 0; side < 2; ++side) {
      const int op = side == 0 ? d.lhs[i] : d.rhs[i];
      if (op < TEACHER || op > ASSISTANT) return "an operand code is not 0 (teacher), 1 (student) or 2 (assistant)";
      if (op == ASSISTANT && !d.has_assistant) return "a term uses the assistant but has_assistant is 0";
    }
    if (d.lhs[i] == d.rhs[i]) return "a term has the same operand on both sides";
    if (d.div[i] < KL || d.div[i] > TVD) return "a divergence code is not 0 (KL), 1 (CE), 2 (AB) or 3 (TVD)";
    if (!(d.ab_alpha[i] >= 0.0) || !(d.ab_beta[i] >= 0.0) || !std::isfinite(d.ab_alpha[i]) ||
        !std::isfinite(d.ab_beta[i]))
      return "ab_alpha and ab_beta must be finite and >= 0";
  }
  // alpha = 1 is the geometric mixture; alpha > 1 a power mean (a < 0), normalized like any
  // alpha-mixture (AMiD's plugin sends exactly 1 unless asked for the power mean).
  d.a = (1.0 - d.alpha) / 2.0;
  d.mix = !d.has_assistant ? MIX_NONE : d.a == 0.0 ? MIX_GEOMETRIC : d.a == 1.0 ? MIX_ARITHMETIC : MIX_ALPHA;
  *out = d;
  return nullptr;
}

// ---- scalar primitives -----------------------------------------------------------------------
// Ops<V> gives, for a value type V: the scalar type F, the mask type M, and exp / expm1 / log1p /
// log (and expm1_exp(x, &e): expm1(x), with e = exp(x), which the SIMD versions take from one range
// reduction), comparisons (returning M), mask logic, select(m, a, b) = m ? a : b, and a few more.
template <class V>
struct Ops;

#define KDPLUG_SCALAR_OPS(F, EXP, EXPM1, LOG1P, LOG)                                              \
  template <>                                                                                     \
  struct Ops<F> {                                                                                 \
    using Scalar = F;                                                                             \
    using Mask = bool;                                                                            \
    static KDPLUG_HOST_DEVICE KDPLUG_INLINE F exp(F x) { return EXP(x); }                         \
    static KDPLUG_HOST_DEVICE KDPLUG_INLINE F expm1(F x) { return EXPM1(x); }                     \
    static KDPLUG_HOST_DEVICE KDPLUG_INLINE F expm1_exp(F x, F* ex) {                             \
      *ex = EXP(x);                                                                               \
      return EXPM1(x);                                                                            \
    }                                                                                             \
    static KDPLUG_HOST_DEVICE KDPLUG_INLINE F log1p(F x) { return LOG1P(x); }                     \
    static KDPLUG_HOST_DEVICE KDPLUG_INLINE F log(F x) { return LOG(x); }                         \
    static KDPLUG_HOST_DEVICE KDPLUG_INLINE F neg(F x) { return -x; }                             \
    static KDPLUG_HOST_DEVICE KDPLUG_INLINE F abs(F x) { return x < F(0) ? -x : x; }              \
    static KDPLUG_HOST_DEVICE KDPLUG_INLINE F max(F a, F b) { return a < b ? b : a; }             \
    static KDPLUG_HOST_DEVICE KDPLUG_INLINE F min(F a, F b) { return b < a ? b : a; }             \
    static KDPLUG_HOST_DEVICE KDPLUG_INLINE bool eq(F a, F b) { return a == b; }                  \
    static KDPLUG_HOST_DEVICE KDPLUG_INLINE bool ne(F a, F b) { return a != b; }                  \
    static KDPLUG_HOST_DEVICE KDPLUG_INLINE bool lt(F a, F b) { return a < b; }                   \
    static KDPLUG_HOST_DEVICE KDPLUG_INLINE bool le(F a, F b) { return a <= b; }                  \
    static KDPLUG_HOST_DEVICE KDPLUG_INLINE bool gt(F a, F b) { return a > b; }                   \
    static KDPLUG_HOST_DEVICE KDPLUG_INLINE bool ge(F a, F b) { return a >= b; }                  \
    static KDPLUG_HOST_DEVICE KDPLUG_INLINE bool land(bool a, bool b) { return a && b; }          \
    static KDPLUG_HOST_DEVICE KDPLUG_INLINE bool lor(bool a, bool b) { return a || b; }           \
    static KDPLUG_HOST_DEVICE KDPLUG_INLINE bool lnot(bool a) { return !a; }                      \
    static KDPLUG_HOST_DEVICE KDPLUG_INLINE bool all_true() { return true; }                      \
    static KDPLUG_HOST_DEVICE KDPLUG_INLINE bool all_false() { return false; }                    \
    static KDPLUG_HOST_DEVICE KDPLUG_INLINE bool all(bool m) { return m; }                        \
    static KDPLUG_HOST_DEVICE KDPLUG_INLINE F select(bool m, F a, F b) { return m ? a : b; }      \
    /* finite: neither +-inf nor NaN (x - x is NaN exactly then) */                               \
    static KDPLUG_HOST_DEVICE KDPLUG_INLINE bool is_finite(F x) { return x - x == F(0); }         \
  };

KDPLUG_SCALAR_OPS(float, ::expf, ::expm1f, ::log1pf, ::logf)
KDPLUG_SCALAR_OPS(double, ::exp, ::expm1, ::log1p, ::log)
#undef KDPLUG_SCALAR_OPS

template <class F>
KDPLUG_HOST_DEVICE KDPLUG_INLINE F neg_inf() {
  return static_cast<F>(-INFINITY);
}

// ---- small helpers -----------------------------------------------------------------------------

// a * b, but 0 where a == 0 even if b is +-inf or NaN (select before multiply: 0 log 0 = 0).
template <class V>
KDPLUG_HOST_DEVICE KDPLUG_INLINE V mul0(V a, V b) {
  using O = Ops<V>;
  return O::select(O::eq(a, V(0)), V(0), a * b);
}

// x where finite, else 0 (how a partial enters h: see "support mismatch" above).
template <class V>
KDPLUG_HOST_DEVICE KDPLUG_INLINE V finite_or_0(V x) {
  using O = Ops<V>;
  return O::select(O::is_finite(x), x, V(0));
}

// x ** c from log x, with x ** 0 == 1 also at x == 0 (c is a per-row constant).
template <class V, class F>
KDPLUG_HOST_DEVICE KDPLUG_INLINE V pow_log(V log_x, F c) {
  return c == F(0) ? V(1) : Ops<V>::exp(V(c) * log_x);
}

// phi(x, c) = expm1(c x) / c, with its limit x at c == 0. Used with x <= 0, where it lies in
// [-1/c, 0]: bounded, and free of cancellation for small c x (expm1, not exp - 1).
template <class V, class F>
KDPLUG_HOST_DEVICE KDPLUG_INLINE V phi(V x, F c) {
  return c == F(0) ? x : Ops<V>::expm1(V(c) * x) * V(F(1) / c);
}

// ---- elements ----------------------------------------------------------------------------------
// An element e(lP, lQ) of a divergence D(P || Q) = sum_k e(lP_k, lQ_k) and its partials
// dP = de/dlog P, dQ = de/dlog Q (the partials are what the gradient is built from; see the top).
template <class V>
struct Element {
  V e, dP, dQ;
};

// KL(P||Q):  e = P (lP - lQ)
//   dP = d/dlog P [P (lP - lQ)] = P (lP - lQ) + P = P (lP - lQ + 1)
//   dQ = -P
// Numerics: P = exp(lP) in [0, 1]; P == 0 (lP = -inf, or underflow) gives e = dP = 0 whatever
// lQ is (mul0). lQ = -inf with P > 0 gives e = dP = +inf: the support mismatch.
// (The overloads with P: the caller has P = exp(lP) at hand already, e.g. from a kept exp.)
template <class V>
KDPLUG_HOST_DEVICE KDPLUG_INLINE Element<V> kl_element(V lP, V lQ, V P) {
  using O = Ops<V>;
  V diff = lP - lQ;
  return {mul0(P, diff), mul0(P, diff + V(1)), O::neg(P)};
}

template <class V>
KDPLUG_HOST_DEVICE KDPLUG_INLINE Element<V> kl_element(V lP, V lQ) {
  return kl_element(lP, lQ, Ops<V>::exp(lP));
}

// CE(P||Q) = -sum P lQ = KL(P||Q) + H(P) (DistiLLM's "forward KL" value): e = -P lQ.
//   dP = -P lQ (= e),  dQ = -P.   The same zero rules as KL.
// (The recipe validator only lets CE have an lhs that does not depend on the student, so its
// gradient w.r.t. the student equals KL's.)
template <class V>
KDPLUG_HOST_DEVICE KDPLUG_INLINE Element<V> ce_element(V lP, V lQ, V P) {
  using O = Ops<V>;
  V e = mul0(P, O::neg(lQ));
  return {e, e, O::neg(P)};
}

template <class V>
KDPLUG_HOST_DEVICE KDPLUG_INLINE Element<V> ce_element(V lP, V lQ) {
  return ce_element(lP, lQ, Ops<V>::exp(lP));
}

// TVD: e = |P - Q| / 2.
//   dP = P sign(P - Q) / 2,  dQ = -Q sign(P - Q) / 2      (sign(0) = 0: the subgradient 0)
// Always finite. (tvd_element_pq: from P and Q themselves, no log needed.)
template <class V>
KDPLUG_HOST_DEVICE KDPLUG_INLINE Element<V> tvd_element_pq(V P, V Q) {
  using O = Ops<V>;
  V diff = P - Q;
  V half_sign = O::select(O::gt(diff, V(0)), V(0.5), O::select(O::lt(diff, V(0)), V(-0.5), V(0)));
  return {O::abs(diff) * V(0.5), P * half_sign, O::neg(Q) * half_sign};
}

template <class V>
KDPLUG_HOST_DEVICE KDPLUG_INLINE Element<V> tvd_element(V lP, V lQ) {
  return tvd_element_pq(Ops<V>::exp(lP), Ops<V>::exp(lQ));
}

// AB(alpha, beta) with k = alpha + beta (Cichocki-Amari; ABKD, AMiD):
//
//   e = -1/(alpha beta) [P^alpha Q^beta - alpha/k P^k - beta/k Q^k]
//
// Stable form. Let M = max(P, Q), m = min(P, Q), x = log(m / M) <= 0, and (c, d) = (alpha, beta)
// when Q >= P, (beta, alpha) otherwise (the element is symmetric under P<->Q, alpha<->beta).
// Dividing by M^k and writing phi(x, c) = (e^{cx} - 1)/c:
//
//   e = -(M^k / d) [phi(x, c) - phi(x, k)]                              (d != 0)
//
// Both phi are bounded for x <= 0 and computed with expm1, so there is no overflow when m << M.
// The difference still cancels where d is small (phi(x, k) ~ phi(x, c), then divided by d: with
// alpha = 1e-4, beta = 1.4 in fp32 it kept 2 digits). With e^{kx} = e^{cx} e^{dx},
//   phi(x, k) - phi(x, c) = d [e^{cx} phi(x, d) - phi(x, c)] / k,  so
//   e = (M^k / k) [e^{cx} phi(x, d) - phi(x, c)]                       (d != 0, k = c + d > 0)
// whose two terms do not cancel unless both c x and d x are small (there e ~ x^2 / 2, a few ulp
// of x absolute): fp32 worst case 2e-3 -> 2e-7 of the largest element at alpha = 1e-4, beta = 1.4,
// and no worse elsewhere (the ABKD default 0.2, 0.7: 7e-7 -> 2e-7). Limits (continuous
// normalization):
//   d -> 0, c != 0:  e = M^c [c x e^{cx} - expm1(cx)] / c^2       (x e^{cx} -> 0 as x -> -inf)
//   c = d = 0:       e = x^2 / 2
// (The alpha+beta -> 0 limit with alpha, beta of opposite signs is excluded: alpha, beta >= 0.)
// With one of alpha, beta 0 and the other, s, small, the brackets cancel again: for y = s x,
//   d = 0:  [y e^y - expm1(y)] / s^2 = x^2 sum_{n>=2} (n - 1) y^(n-2) / n!
//   c = 0:  [expm1(y) - y] / s^2     = x^2 sum_{n>=2}         y^(n-2) / n!    (the form above at c = 0)
// two terms ~ y for a result ~ y^2 / 2; where |y| < 0.1 the series to y^8 is used instead (the
// next term is below the double epsilon). fp32, alpha = 1e-4, beta = 0: 5e-5 -> ~1e-7 relative.
//
// Partials (from the raw form):
//   dQ = de/dlog Q = (Q^k - P^alpha Q^beta)/alpha = Q^beta [Q^alpha - P^alpha] / alpha
//   dP = de/dlog P = (P^k - P^alpha Q^beta)/beta  = P^alpha [P^beta - Q^beta] / beta
// in the stable form, factoring the larger side:
//   Q >= P:  dQ = -Q^beta  Q^alpha phi(x, alpha)     dP =  P^alpha Q^beta phi(x, beta)
//   P >  Q:  dQ =  Q^beta  P^alpha phi(x, alpha)     dP = -P^alpha P^beta phi(x, beta)
// (phi(x, 0) = x gives the alpha = 0 / beta = 0 limits directly; they hold a log ratio and are
// +-inf on one-sided zeros, where the non-finite-partial rule applies.)
// Both -inf: everything 0.
//
// ab_element_ref follows kdplug/_torch_impl.py literally (both branches, then a select);
// ab_element computes the same values with fewer transcendentals when alpha, beta > 0, and
// falls back to ab_element_ref for the limits.
// coef[0] + coef[1] y + ... + coef[8] y^8 (Horner).
template <class V, class F>
KDPLUG_HOST_DEVICE KDPLUG_INLINE V poly8(V y, const F (&coef)[9]) {
  V p(coef[8]);
  for (int i = 7; i >= 0; --i) p = p * y + V(coef[i]);
  return p;
}

template <class V, class F>
KDPLUG_HOST_DEVICE KDPLUG_INLINE V ab_branch(V l_big, V x, F c, F d) {
  using O = Ops<V>;
  const F k = c + d;
  if (c != F(0) && d != F(0)) {
    // NB: M^k may underflow to 0 where the bracket is infinite: select 0. (e^{cx} as pow_log.)
    return mul0(pow_log(l_big, k), (pow_log(x, c) * phi(x, d) - phi(x, c)) * V(F(1) / k));
  }
  if (k == F(0)) return V(0.5) * x * x;
  // one of c, d is 0 and k the other: the series where |k x| < 0.1
  const V y = V(k) * x;
  V bracket;
  if (d == F(0)) {
    // x * exp(c x) -> 0 as x -> -inf
    V xe = O::select(O::lt(O::abs(x), V(INFINITY)), x * O::exp(y), V(0));
    bracket = (V(c) * xe - O::expm1(y)) * V(F(1) / (c * c));
  } else {
    bracket = (phi(x, d) - x) * V(F(1) / d);  // +inf at x = -inf
  }
  const auto small = O::lt(O::abs(y), V(F(0.1)));
  if (!O::all(O::ge(O::abs(y), V(F(0.1))))) {  // some lane is small (a uniform branch: most packs hold none)
    const F d0[9] = {F(1.0 / 2), F(1.0 / 3), F(1.0 / 8), F(1.0 / 30), F(1.0 / 144), F(1.0 / 840),
                     F(1.0 / 5760), F(1.0 / 45360), F(1.0 / 403200)};  // (n - 1) / n!, n = 2 .. 10
    const F c0[9] = {F(1.0 / 2), F(1.0 / 6), F(1.0 / 24), F(1.0 / 120), F(1.0 / 720), F(1.0 / 5040),
                     F(1.0 / 40320), F(1.0 / 362880), F(1.0 / 3628800)};  // 1 / n!, n = 2 .. 10
    const V ys = O::select(small, y, V(0)), xs = O::select(small, x, V(0));
    bracket = O::select(small, xs * xs * poly8(ys, d == F(0) ? d0 : c0), bracket);
  }
  // NB: M^k may underflow to 0 where the bracket is infinite: select 0
  return mul0(pow_log(l_big, k), bracket);
}

template <class V, class F>
KDPLUG_HOST_DEVICE KDPLUG_INLINE Element<V> ab_element_ref(V lP, V lQ, F a, F b) {
  using O = Ops<V>;
  const V ninf(neg_inf<F>());
  auto both = O::land(O::eq(lP, ninf), O::eq(lQ, ninf));
  V lP_ = O::select(both, V(0), lP);
  V lQ_ = O::select(both, V(0), lQ);
  auto q_big = O::ge(lQ_, lP_);
  V x_pq = lP_ - lQ_;  // <= 0 where Q >= P
  V x_qp = lQ_ - lP_;  // <= 0 where P > Q
  V e = O::select(q_big, ab_branch(lQ_, x_pq, a, b), ab_branch(lP_, x_qp, b, a));
  V Pa = pow_log(lP_, a), Pb = pow_log(lP_, b), Qa = pow_log(lQ_, a), Qb = pow_log(lQ_, b);
  V dQ = O::select(q_big, O::neg(mul0(Qa, phi(x_pq, a))), mul0(Pa, phi(x_qp, a)));
  dQ = mul0(Qb, dQ);
  V dP = O::select(q_big, mul0(Qb, phi(x_pq, b)), O::neg(mul0(Pb, phi(x_qp, b))));
  dP = mul0(Pa, dP);
  return {O::select(both, V(0), e), O::select(both, V(0), dP), O::select(both, V(0), dQ)};
}

// An AB term's alpha, beta and the reciprocals its element multiplies by: per-row constants (in
// the element itself, each SIMD pack paid three scalar divisions, which the compiler did not hoist
// out of the row loops past the branch on alpha, beta > 0 that guards them).
template <class F>
struct AbParams {
  F a, b, inv_a, inv_b, inv_k;
  // alpha, beta > 0: ab_element's fast path, whose element and partials are finite everywhere
  KDPLUG_HOST_DEVICE KDPLUG_INLINE bool positive() const { return a > F(0) && b > F(0); }
};

template <class F>
KDPLUG_HOST_DEVICE KDPLUG_INLINE AbParams<F> ab_params(F a, F b) {
  const F k = a + b;
  return {a, b, a > F(0) ? F(1) / a : F(0), b > F(0) ? F(1) / b : F(0), k > F(0) ? F(1) / k : F(0)};
}

template <class V, class F>
KDPLUG_HOST_DEVICE KDPLUG_INLINE Element<V> ab_element(V lP, V lQ, const AbParams<F>& ab) {
  using O = Ops<V>;
  const F a = ab.a, b = ab.b;
  if (!ab.positive()) return ab_element_ref(lP, lQ, a, b);
  // alpha, beta > 0: every factor below is finite (M <= ~0, x <= 0, phi in [-1/c, 0]), so the
  // mul0 of the reference reduce to plain products. Both -inf: M is raised to -1e30, so that
  // x = -inf (not NaN) and M^k = 0: the element and its partials are 0 without a select.
  auto q_big = O::ge(lQ, lP);
  V M = O::max(O::select(q_big, lQ, lP), V(F(-1e30)));
  V x = O::select(q_big, lP, lQ) - M;  // <= 0, -inf on a one-sided zero (and where both are)
  const F k = a + b;
  // M^k = exp(k M), and the smaller side's power from the larger side's: P^alpha = M^alpha e^{alpha x}
  // (Q >= P), Q^beta = M^beta e^{beta x} (P > Q), so the partials above are
  //   Q >= P:  dQ = -M^k phi(x, alpha)              dP = M^k e^{alpha x} phi(x, beta)
  //   P >  Q:  dQ =  M^k e^{beta x} phi(x, alpha)   dP = -M^k phi(x, beta)
  // with e^{alpha x}, e^{beta x} from the range reductions of expm1(alpha x), expm1(beta x)
  // (expm1_exp): 3 exps an entry instead of 5. Each factor is accurate to a few ulp on its own
  // (exp itself, not 1 + expm1, where expm1 nears -1), so the products are too.
  V Mk = O::exp(V(k) * M);
  V e_a, e_b;
  V em1_a = O::expm1_exp(V(a) * x, &e_a), em1_b = O::expm1_exp(V(b) * x, &e_b);
  V phi_a = em1_a * V(ab.inv_a);
  V phi_b = em1_b * V(ab.inv_b);
  // e = (M^k / k) [e^{cx} phi(x, d) - phi(x, c)], (c, d) = (a, b) if Q >= P else (b, a)
  V e = Mk * O::select(q_big, e_a * phi_b - phi_a, e_b * phi_a - phi_b) * V(ab.inv_k);
  V dQ = Mk * phi_a * O::select(q_big, V(F(-1)), e_b);
  V dP = Mk * phi_b * O::select(q_big, e_a, V(F(-1)));
  return {e, dP, dQ};
}

template <class V, class F>
KDPLUG_HOST_DEVICE KDPLUG_INLINE Element<V> ab_element(V lP, V lQ, F a, F b) {
  return ab_element(lP, lQ, ab_params(a, b));
}

// P, Q: the operands' probabilities where the caller has them (else nullptr: exp(lP), exp(lQ));
// AB works from the logs alone.
template <class V, class F>
KDPLUG_HOST_DEVICE KDPLUG_INLINE Element<V> element(int div, V lP, V lQ, const AbParams<F>& ab,
                                                    const V* P = nullptr, const V* Q = nullptr) {
  using O = Ops<V>;
  switch (div) {
    case KL:
      return kl_element(lP, lQ, P ? *P : O::exp(lP));
    case CE:
      return ce_element(lP, lQ, P ? *P : O::exp(lP));
    case AB:
      return ab_element(lP, lQ, ab);
    default:
      return tvd_element_pq(P ? *P : O::exp(lP), Q ? *Q : O::exp(lQ));
  }
}

// ---- the assistant -----------------------------------------------------------------------------
// log(e^A + e^B) = max + log1p(exp(min - max)): log1p of a value in [0, 1], nothing cancels or
// overflows; A = B = -inf gives -inf. (log1p_half's series below also holds on [0, 1], but in lse2
// it gained nothing: SKL, SRKL, gJSD divergence_fwd / _fwd_grad, 1 thread, 8 cached rows of
// V = 128256 fp32, medians of 6 alternating runs within 3% of the general log1p's, minima equal.)
template <class V>
KDPLUG_HOST_DEVICE KDPLUG_INLINE V lse2(V A, V B) {
  using O = Ops<V>;
  using F = typename O::Scalar;
  const V ninf(neg_inf<F>());
  V mx = O::max(A, B);
  auto dead = O::eq(mx, ninf);
  V mx_ = O::select(dead, V(0), mx);
  V mn = O::select(dead, V(0), O::min(A, B));
  return O::select(dead, ninf, mx_ + O::log1p(O::exp(mn - mx_)));
}

// log1p(z) for z in [-1/2, 0] (alpha_mix's usual branch). In float, from
//   log(1 + z) = 2 atanh(s) = 2 s (1 + s^2/3 + s^4/5 + ...),   s = z / (2 + z) in [-1/3, 0],
// to s^12/13: the next term, s^14/15 <= 1.5e-8, is below float's half ulp. A division and 6
// products and sums in s^2, where the general log1p splits exponent and mantissa, runs a longer
// polynomial and corrects the rounding of 1 + z. z is exact and 2 + z and the quotient round once
// each; 2s is added last, the series' part being at most s^2/3 <= 1/27 of the result, so the
// result is within 2 ulp relative (1.7 in the C++ test's sweep), small ones included. Double:
// O::log1p (the series would need twice the terms).
template <class V>
KDPLUG_HOST_DEVICE KDPLUG_INLINE V log1p_half(V z) {
  using O = Ops<V>;
  using F = typename O::Scalar;
  if constexpr (sizeof(F) != 4) {
    return O::log1p(z);
  } else {
    const V s = z / (V(F(2)) + z);
    const V s2 = s * s;
    V p = V(F(1.0 / 13));
    p = p * s2 + V(F(1.0 / 11));
    p = p * s2 + V(F(1.0 / 9));
    p = p * s2 + V(F(1.0 / 7));
    p = p * s2 + V(F(1.0 / 5));
    p = p * s2 + V(F(1.0 / 3));
    const V t = s + s;
    return t + (t * s2) * p;
  }
}

// alpha-mixture (AMiD), a = (1 - alpha)/2 > 0:  r~ = (lam p^a + (1 - lam) q^a)^(1/a), r = r~ / Z.
//
// With the base chosen so that y = a (l_other - l_base) <= 0 (base = q when a (lp - lq) <= 0,
// other weight w_o = lam; else base = p, w_o = 1 - lam; w_b = 1 - w_o):
//
//   log r~ = l_base + log(w_b + w_o e^y) / a = l_base + log1p(w_o expm1(y)) / a
//
// The log1p/expm1 form keeps full relative precision when the result is small, which is what
// matters as a -> 0 (the division by a amplifies absolute errors). It loses the digits of
// w_b + w_o e^y once z = w_o expm1(y) nears -1 (a weight near 0 or 1 and a much smaller other
// side: in fp32, lam = 0 gave r~ = 0 instead of q once q/p < e^-17). There |log(.)| >= log 2,
// and the sum is formed in log space, lse2(log w_b, log w_o + y) (no underflow of e^y either).
// Hence: z >= -1/2 -> log1p(z), else lse2. One side -inf: y = -inf, log r~ = l_base + log(w_b)/a
// (-inf when w_b = 0). Both -inf: -inf. log_lam, log_1m_lam: per-row constants.
//
// w_q (when asked for): mixture_weight's w = (1 - lam) (q / r~)^a from the same y, without its
// exp. r~^a = base^a (w_b + w_o e^y), so
//   base = q:  w = (1 - lam) / (w_b + w_o e^y)          base = p:  w = (1 - lam) e^y / (w_b + w_o e^y)
// a sum of two non-negative terms below (nothing cancels; w_b > 0), e^y in [0, 1] from expm1's
// own range reduction. 0 where q = 0, as mixture_weight.
template <class V, class F>
KDPLUG_HOST_DEVICE KDPLUG_INLINE V alpha_mix(V lp, V lq, F lam, F log_lam, F log_1m_lam, F a, F inv_a,
                                             V* w_q = nullptr) {
  using O = Ops<V>;
  const V ninf(neg_inf<F>());
  // NB: lam = 0 and 1 are q and p exactly; for a < 0 the formula would meet 0 * inf there.
  if (lam == F(0) || lam == F(1)) {
    if (w_q) *w_q = O::select(O::eq(lq, ninf), V(0), V(F(1) - lam));
    return lam == F(0) ? lq : lp;
  }
  auto both = O::land(O::eq(lp, ninf), O::eq(lq, ninf));
  V lp_ = O::select(both, V(0), lp);
  V lq_ = O::select(both, V(0), lq);
  auto on_q = O::le(V(a) * (lp_ - lq_), V(0));
  V base = O::select(on_q, lq_, lp_);
  V w_o = O::select(on_q, V(lam), V(F(1) - lam));
  V y = V(a) * (O::select(on_q, lp_, lq_) - base);
  V e_y;
  V z = w_o * (w_q ? O::expm1_exp(y, &e_y) : O::expm1(y));
  if (w_q) {
    const V num = O::select(on_q, V(F(1) - lam), V(F(1) - lam) * e_y);
    *w_q = O::select(O::eq(lq, ninf), V(0), num / (O::select(on_q, V(F(1) - lam), V(lam)) + w_o * e_y));
  }
  auto small = O::ge(z, V(F(-0.5)));
  V l;
  if (O::all(small)) {  // a uniform branch (a SIMD pack takes it when every lane agrees)
    l = log1p_half(z);
  } else {
    V log_w_o = O::select(on_q, V(log_lam), V(log_1m_lam));
    V log_w_b = O::select(on_q, V(log_1m_lam), V(log_lam));
    l = O::select(small, log1p_half(z), lse2(log_w_b, log_w_o + y));  // (z > -1: finite either way)
  }
  return O::select(both, ninf, base + l * V(inv_a));
}

// The arithmetic mixture (a = 1), r~ = lam p + (1 - lam) q, directly as lse2(log lam + lp,
// log(1 - lam) + lq): the same numbers as alpha_mix at a = 1 up to rounding, with 2
// transcendentals instead of 2-4.
template <class V, class F>
KDPLUG_HOST_DEVICE KDPLUG_INLINE V arithmetic_mix(V lp, V lq, F log_lam, F log_1m_lam) {
  return lse2(V(log_lam) + lp, V(log_1m_lam) + lq);
}

// Geometric mixture (alpha = 1; TAID's interpolation): log r~ = lam lp + (1 - lam) lq, where a
// side with zero weight is left out (so that 0 * -inf never appears), and a zero (-inf) on a side
// with positive weight makes the mixture 0. The same function applied to the logits t', s'
// gives g = lam t' + (1 - lam) s' = log r~ + const, so log r = g - LSE(g): the first pass gets the
// normalizer from the logits (no teacher/student LSE needed) and lr needs no log Z.
template <class V, class F>
KDPLUG_HOST_DEVICE KDPLUG_INLINE V geometric_mix(V xp, V xq, F lam) {
  using O = Ops<V>;
  const V ninf(neg_inf<F>());
  V out = V(0);
  auto zero_mix = O::all_false();
  if (lam > F(0)) {
    out = out + V(lam) * xp;
    zero_mix = O::lor(zero_mix, O::eq(xp, ninf));
  }
  if (lam < F(1)) {
    out = out + V(F(1) - lam) * xq;
    zero_mix = O::lor(zero_mix, O::eq(xq, ninf));
  }
  return O::select(zero_mix, ninf, out);
}

// d log r~ / d log q (the mixture weight w of u = h^q + w (h^r - H^r r)), 0 where q = 0:
//   alpha-mixture:  w = (1 - lam) (q / r~)^a = (1 - lam) exp(a (lq - log r~))
//                   (bounded: r~ >= (1 - lam)^(1/a) q, so w <= 1; a = 1: the arithmetic mixture)
//   geometric:      w = 1 - lam
// (logs_at takes the general alpha-mixture's from alpha_mix instead, without the exp.)
template <class V, class F>
KDPLUG_HOST_DEVICE KDPLUG_INLINE V mixture_weight(V lq, V l_mix, F q_weight, F a) {
  using O = Ops<V>;
  const V ninf(neg_inf<F>());
  // NB: a zero weight (lam = 1) is 0 even where (q / r~)^a overflows (r~ = p far below q).
  if (q_weight == F(0)) return V(0);
  V w = a == F(0) ? V(q_weight) : V(q_weight) * O::exp(V(a) * (lq - O::select(O::eq(l_mix, ninf), V(0), l_mix)));
  return O::select(O::eq(lq, ninf), V(0), w);
}

// ---- online log-sum-exp ------------------------------------------------------------------------
// A running (max m, sum z = sum exp(x - m)) pair; LSE = m + log z. Adding x > m rescales z by
// exp(m - x) (0 when m = -inf). -inf entries are skipped (exp(-inf - -inf) would be NaN); NaN
// and +inf make the result NaN or +inf (the kernels report such rows as errors). Merging two pairs
// is associative up to rounding, so per-lane / per-thread pairs combine in any fixed order.
template <class F>
struct OnlineLse {
  F m = neg_inf<F>();
  F z = F(0);

  KDPLUG_HOST_DEVICE KDPLUG_INLINE void add(F x) {
    using O = Ops<F>;
    if (x == neg_inf<F>()) return;
    if (x > m) {
      z = z * O::exp(m - x) + F(1);
      m = x;
    } else {
      z = z + O::exp(x - m);  // NaN x lands here and propagates
    }
  }

  KDPLUG_HOST_DEVICE KDPLUG_INLINE void merge(F m2, F z2) {
    using O = Ops<F>;
    if (m2 == neg_inf<F>() && z2 == F(0)) return;
    if (m == neg_inf<F>() && z == F(0)) {
      m = m2;
      z = z2;
      return;
    }
    F mm = m > m2 ? m : m2;
    z = z * O::exp(m - mm) + z2 * O::exp(m2 - mm);
    m = mm;
  }

  KDPLUG_HOST_DEVICE KDPLUG_INLINE F value() const {
    return z == F(0) ? neg_inf<F>() : m + Ops<F>::log(z);
  }
};

// ---- one row -----------------------------------------------------------------------------------
// Everything the per-entry math of one row needs, in the compute type F.
template <class F>
struct RowConsts {
  F T, inv_T;
  F lse_s, lse_t;
  F lam;
  F log_lam, log_1m_lam;  // log lam, log(1 - lam) (the arithmetic mixture)
  F a, inv_a;     // mixture exponent (0: geometric)
  F log_z;        // STAT_LOG_Z
  int mix;        // Mix
  bool live_assistant;  // gradient flows through the assistant
  bool exclude;
  int n_terms;
  int lhs[kMaxTerms], rhs[kMaxTerms], div[kMaxTerms];
  AbParams<F> ab[kMaxTerms];
  F coef[kMaxTerms];  // weight * token weight; a term with coef == 0 contributes exactly 0
};

// Fills the parts of RowConsts that do not depend on the row's statistics.
// params: [T, lam, weight * n_terms] (float64); token_weights: this row's n_terms values or null.
template <class F, class TW>
KDPLUG_HOST_DEVICE inline void row_consts_init(const RecipeDesc& d, const double* params, const TW* token_weights,
                                               RowConsts<F>* c) {
  const F T = static_cast<F>(params[0]);
  c->T = T;
  c->inv_T = F(1) / T;
  c->lam = static_cast<F>(params[1]);
  c->log_lam = Ops<F>::log(c->lam);
  c->log_1m_lam = Ops<F>::log1p(-c->lam);
  c->a = static_cast<F>(d.a);
  c->inv_a = d.a == 0.0 ? F(0) : F(1) / static_cast<F>(d.a);
  c->mix = d.mix;
  c->live_assistant = d.has_assistant && !d.detach;
  c->exclude = d.policy == EXCLUDE;
  c->n_terms = d.n_terms;
  c->lse_s = c->lse_t = c->log_z = F(0);
  for (int i = 0; i < d.n_terms; ++i) {
    c->lhs[i] = d.lhs[i];
    c->rhs[i] = d.rhs[i];
    c->div[i] = d.div[i];
    c->ab[i] = ab_params(static_cast<F>(d.ab_alpha[i]), static_cast<F>(d.ab_beta[i]));
    F w = static_cast<F>(params[2 + i]);
    // as the torch path: coef = weight * token weight, loss += mul0(coef, sum_k e)
    c->coef[i] = token_weights ? w * static_cast<F>(token_weights[i]) : w;
  }
}

// The log-probabilities at one entry (or one SIMD pack of entries).
template <class V>
struct Logs {
  V lp, lq, lr, lr_tilde;
  V w;  // the mixture's weight of q, mixture_weight's w (0 without a mixture)
  KDPLUG_HOST_DEVICE KDPLUG_INLINE V of(int operand) const {
    return operand == TEACHER ? lp : operand == STUDENT ? lq : lr;
  }
};

// log r = log r~ - log Z; a mixture that is 0 everywhere (log Z = -inf) stays 0.
template <class V, class F>
KDPLUG_HOST_DEVICE KDPLUG_INLINE V alpha_lr(const RowConsts<F>& c, V lr_tilde) {
  return c.log_z == neg_inf<F>() ? lr_tilde : lr_tilde - V(c.log_z);
}

// xs = s / T, xt = t / T at one entry. MIX: the mixture kind when the caller knows it at compile
// time (kernels specialize on it), else -1 (read from c.mix).
template <int MIX = -1, class V, class F>
KDPLUG_HOST_DEVICE KDPLUG_INLINE Logs<V> logs_at(const RowConsts<F>& c, V xs, V xt) {
  const V ninf(neg_inf<F>());
  const int mix = MIX >= 0 ? MIX : c.mix;
  Logs<V> L;
  L.lq = xs - V(c.lse_s);
  L.lp = xt - V(c.lse_t);
  L.lr = L.lr_tilde = ninf;
  L.w = V(0);
  if (mix == MIX_GEOMETRIC) {
    // lr = g - LSE(g); a mixture that is 0 everywhere stays 0 (log_z = -inf)
    V g = geometric_mix(xt, xs, c.lam);
    L.lr = c.log_z == neg_inf<F>() ? ninf : g - V(c.log_z);
    L.w = mixture_weight(L.lq, L.lr_tilde, F(1) - c.lam, F(0));
  } else if (mix == MIX_ARITHMETIC) {
    L.lr = L.lr_tilde = arithmetic_mix(L.lp, L.lq, c.log_lam, c.log_1m_lam);  // Z = 1
    L.w = mixture_weight(L.lq, L.lr_tilde, F(1) - c.lam, F(1));
  } else if (mix == MIX_ALPHA) {
    L.lr_tilde = alpha_mix(L.lp, L.lq, c.lam, c.log_lam, c.log_1m_lam, c.a, c.inv_a, &L.w);
    L.lr = alpha_lr(c, L.lr_tilde);
  }
  return L;
}

// logs_at of the alpha-mixture, given its log r~ and w (the CPU forward keeps pass 2's for pass 3).
template <class V, class F>
KDPLUG_HOST_DEVICE KDPLUG_INLINE Logs<V> logs_at_alpha(const RowConsts<F>& c, V xs, V xt, V lr_tilde, V w) {
  Logs<V> L;
  L.lq = xs - V(c.lse_s);
  L.lp = xt - V(c.lse_t);
  L.lr_tilde = lr_tilde;
  L.lr = alpha_lr(c, lr_tilde);
  L.w = w;
  return L;
}

// The terms at one entry: adds each term's element to e_acc[i] (when WITH_LOSS) and returns the
// entry's h^q and h^r. keep: the "exclude" policy's mask (all true under "exact"). probs: p and q
// themselves where the caller has them (divergence_fwd_grad's kept exps), else nullptr.
template <class V>
struct H {
  V q, r;
};

template <class V>
struct Probs {
  V p, q;
  KDPLUG_HOST_DEVICE KDPLUG_INLINE const V* of(int operand) const {
    return operand == TEACHER ? &p : operand == STUDENT ? &q : nullptr;
  }
};

// NT: the term count when the caller knows it at compile time (== c.n_terms), else 0. The CUDA
// kernel's instances pass it: with a constant trip count the loop unrolls and RowConsts stays in
// registers (else its arrays, indexed by i, live in local memory).
template <bool WITH_LOSS, int NT = 0, class V, class F>
KDPLUG_HOST_DEVICE KDPLUG_INLINE H<V> terms_at(const RowConsts<F>& c, const Logs<V>& L,
                                               typename Ops<V>::Mask keep, V* e_acc,
                                               const Probs<V>* probs = nullptr) {
  using O = Ops<V>;
  H<V> h{V(0), V(0)};
  const int n_terms = NT > 0 ? NT : c.n_terms;
  for (int i = 0; i < n_terms; ++i) {
    const F coef = c.coef[i];
    if (coef == F(0)) continue;  // mul0(coef, .) = 0: the term contributes nothing
    Element<V> el = element(c.div[i], L.of(c.lhs[i]), L.of(c.rhs[i]), c.ab[i],
                            probs ? probs->of(c.lhs[i]) : nullptr, probs ? probs->of(c.rhs[i]) : nullptr);
    if (c.exclude) {
      el.e = O::select(keep, el.e, V(0));
      el.dP = O::select(keep, el.dP, V(0));
      el.dQ = O::select(keep, el.dQ, V(0));
    }
    if (WITH_LOSS) e_acc[i] = e_acc[i] + el.e;
    // (AB's partials are finite where alpha, beta > 0: see ab_element; TVD's always are)
    const bool finite = (c.div[i] == AB && c.ab[i].positive()) || c.div[i] == TVD;
    const V dP = V(coef) * (finite ? el.dP : finite_or_0(el.dP));
    const V dQ = V(coef) * (finite ? el.dQ : finite_or_0(el.dQ));
    if (c.lhs[i] == STUDENT) h.q = h.q + dP;
    if (c.lhs[i] == ASSISTANT) h.r = h.r + dP;
    if (c.rhs[i] == STUDENT) h.q = h.q + dQ;
    if (c.rhs[i] == ASSISTANT) h.r = h.r + dQ;
  }
  return h;
}

// The exclude policy's mask at one entry: both logits finite (rows with +inf or NaN are errors).
template <class V, class F>
KDPLUG_HOST_DEVICE KDPLUG_INLINE typename Ops<V>::Mask keep_at(const RowConsts<F>& c, V xs, V xt) {
  using O = Ops<V>;
  if (!c.exclude) return O::all_true();
  const V ninf(neg_inf<F>());
  return O::land(O::ne(xs, ninf), O::ne(xt, ninf));
}

// Per-entry contributions to the row statistics the backward needs (forward pass):
//   U = sum h^q + sum w h^r - H^r sum w r      (= sum_k u_k, expanded so one pass suffices)
template <class V>
struct StatAcc {
  V h_q, h_r, w_h_r, w_r;
};

// Returns the entry's (w h^r, w r) (0 without a live assistant): u = h^q + w h^r - H^r w r once
// H^r is known (divergence_fwd_grad keeps them for its gradient pass).
template <class V>
struct MixTerms {
  V w_h_r, w_r;
};

// w, r: the entry's mixture weight and r (used only with a live assistant).
template <class V, class F>
KDPLUG_HOST_DEVICE KDPLUG_INLINE MixTerms<V> stats_at(const RowConsts<F>& c, const H<V>& h, V w, V r,
                                                      StatAcc<V>* acc) {
  acc->h_q = acc->h_q + h.q;
  MixTerms<V> out{V(0), V(0)};
  if (c.live_assistant) {
    out = MixTerms<V>{w * h.r, w * r};
    acc->h_r = acc->h_r + h.r;
    acc->w_h_r = acc->w_h_r + out.w_h_r;
    acc->w_r = acc->w_r + out.w_r;
  }
  return out;
}

template <class V, class F>
KDPLUG_HOST_DEVICE KDPLUG_INLINE MixTerms<V> stats_at(const RowConsts<F>& c, const Logs<V>& L, const H<V>& h,
                                                      StatAcc<V>* acc) {
  if (!c.live_assistant) return stats_at(c, h, V(0), V(0), acc);
  return stats_at(c, h, L.w, Ops<V>::exp(L.lr), acc);
}

// The gradient at one entry (backward pass): scale (u - q U), 0 at a -inf student logit.
// scale = incoming gradient / T (the caller skips rows where it is 0: their gradient is exactly 0).
template <class V, class F>
KDPLUG_HOST_DEVICE KDPLUG_INLINE V grad_at(const RowConsts<F>& c, const Logs<V>& L, const H<V>& h, F H_r, F U,
                                           F scale) {
  using O = Ops<V>;
  V u = h.q;
  if (c.live_assistant) {
    V r = O::exp(L.lr);
    // NB: grouped as (h^q + w h^r) - H^r (w r), the two values stats_at returns, so that the
    // CPU's divergence_fwd_grad, which keeps them from its forward, gives the same bits
    u = (u + L.w * h.r) - V(H_r) * (L.w * r);
  }
  V q = O::exp(L.lq);
  V g = (u - q * V(U)) * V(scale);
  return O::select(O::eq(L.lq, V(neg_inf<F>())), V(0), g);
}

// ---- a scalar driver for one row ---------------------------------------------------------------
// The passes every backend makes, written plainly: the C++ unit tests run it, and the kernels
// follow it (the CPU kernel vectorizes the same loops; see csrc/cpu/divergence_kernel.cpp).
//
//   forward:  pass 1  online LSE of s/T and t/T (and of the geometric mixture's logits g)
//             pass 2  (alpha-mixture only) online LSE of log r~ -> log Z
//             pass 3  elements: the loss and the sums behind U and H^r
//   backward: one pass: the gradient from the row statistics
//
// Returns false when the row (which must not be masked) has an all -inf, +inf or NaN side.
template <class F, class In, class TW>
inline bool forward_row(const RecipeDesc& d, const double* params, const TW* token_weights, const In* s,
                        const In* t, int64_t V, F* loss, F* stats) {
  RowConsts<F> c;
  row_consts_init(d, params, token_weights, &c);
  OnlineLse<F> ls, lt, lg;
  for (int64_t k = 0; k < V; ++k) {
    const F xs = static_cast<F>(s[k]) * c.inv_T, xt = static_cast<F>(t[k]) * c.inv_T;
    ls.add(xs);
    lt.add(xt);
    if (c.mix == MIX_GEOMETRIC) lg.add(geometric_mix(xt, xs, c.lam));
  }
  c.lse_s = ls.value();
  c.lse_t = lt.value();
  if (!Ops<F>::is_finite(c.lse_s) || !Ops<F>::is_finite(c.lse_t)) return false;
  if (c.mix == MIX_GEOMETRIC) c.log_z = lg.value();
  if (c.mix == MIX_ALPHA) {
    OnlineLse<F> lz;
    for (int64_t k = 0; k < V; ++k)
      lz.add(logs_at(c, static_cast<F>(s[k]) * c.inv_T, static_cast<F>(t[k]) * c.inv_T).lr_tilde);
    c.log_z = lz.value();
  }
  F e_acc[kMaxTerms] = {};
  StatAcc<F> st{F(0), F(0), F(0), F(0)};
  for (int64_t k = 0; k < V; ++k) {
    const F xs = static_cast<F>(s[k]) * c.inv_T, xt = static_cast<F>(t[k]) * c.inv_T;
    const Logs<F> L = logs_at(c, xs, xt);
    const H<F> h = terms_at<true>(c, L, keep_at(c, xs, xt), e_acc);
    stats_at(c, L, h, &st);
  }
  F total = F(0);
  for (int i = 0; i < c.n_terms; ++i) total = total + (c.coef[i] == F(0) ? F(0) : c.coef[i] * e_acc[i]);
  *loss = total;
  stats[STAT_LSE_S] = c.lse_s;
  stats[STAT_LSE_T] = c.lse_t;
  stats[STAT_LOG_Z] = c.log_z;
  stats[STAT_H_R] = st.h_r;
  stats[STAT_U] = st.h_q + st.w_h_r - st.h_r * st.w_r;
  return true;
}

template <class F, class In, class TW, class Out>
inline void backward_row(const RecipeDesc& d, const double* params, const TW* token_weights, const In* s,
                         const In* t, int64_t V, const F* stats, F grad_loss, Out* grad) {
  RowConsts<F> c;
  row_consts_init(d, params, token_weights, &c);
  const F scale = grad_loss / c.T;
  if (scale == F(0)) {  // exactly 0, even where the loss is +inf
    for (int64_t k = 0; k < V; ++k) grad[k] = static_cast<Out>(F(0));
    return;
  }
  c.lse_s = stats[STAT_LSE_S];
  c.lse_t = stats[STAT_LSE_T];
  c.log_z = stats[STAT_LOG_Z];
  for (int64_t k = 0; k < V; ++k) {
    const F xs = static_cast<F>(s[k]) * c.inv_T, xt = static_cast<F>(t[k]) * c.inv_T;
    const Logs<F> L = logs_at(c, xs, xt);
    const H<F> h = terms_at<false>(c, L, keep_at(c, xs, xt), static_cast<F*>(nullptr));
    grad[k] = static_cast<Out>(grad_at(c, L, h, stats[STAT_H_R], stats[STAT_U], scale));
  }
}

// ---- AKL's head / tail weights (kdplug::head_tail_weights) ---------------------------------------
// A token's vocabulary splits into a "head" and a "tail" (the rule: kdplug/_head_tail.py; the CPU
// row loop: csrc/cpu/head_tail_rows.cpp), and with the gaps g_head = sum_{k in head} |p_k - q_k|,
// g_tail = the same over the tail, the two terms of the recipe are weighted per token by
//   w_head = g_head / (g_head + g_tail),  w_tail = g_tail / (g_head + g_tail)
// and by 1/2 each when p == q (no gap anywhere: the 0 / 0 of the formula).
KDPLUG_HOST_DEVICE KDPLUG_INLINE void head_tail_split(double g_head, double g_tail, double* w) {
  const double total = g_head + g_tail;
  w[0] = total > 0 ? g_head / total : 0.5;
  w[1] = total > 0 ? g_tail / total : 0.5;
}

// |P - Q| from the log-probabilities: e^hi (1 - e^(lo - hi)), hi = max(lP, lQ), lo = min. The
// -expm1 keeps the gap's relative precision where P and Q are both near 1 (a peaked row's top
// entry: P - Q rounds to 0 in float while the tail's gaps, which sum to about the same, do not,
// and the weights would come out (0, 1)). e^hi is P or Q, passed in. 0 where both are 0 (there
// lo - hi is NaN).
template <class V>
KDPLUG_HOST_DEVICE KDPLUG_INLINE V abs_gap(V lP, V lQ, V P, V Q) {
  using O = Ops<V>;
  const auto p_hi = O::ge(lP, lQ);
  const V hi = O::select(p_hi, lP, lQ), lo = O::select(p_hi, lQ, lP);
  return mul0(O::select(p_hi, P, Q), O::neg(O::expm1(lo - hi)));
}

// An order-preserving map of floats to unsigned integers (non-NaN x < y iff key(x) < key(y), and
// the floats between two keys are the integers between them): the sign bit set on positives, all
// bits flipped on negatives. -0.0 maps just below +0.0 (the only pair the map splits that
// compares equal as floats). The head search bisects on these integers.
template <class F>
struct SortableBits;
template <>
struct SortableBits<float> {
  using U = uint32_t;
  static constexpr U kSign = 0x80000000u;
};
template <>
struct SortableBits<double> {
  using U = uint64_t;
  static constexpr U kSign = 0x8000000000000000ull;
};
template <class F>
KDPLUG_HOST_DEVICE KDPLUG_INLINE typename SortableBits<F>::U sortable_key(F x) {
  using U = typename SortableBits<F>::U;
  U b;
  memcpy(&b, &x, sizeof(F));
  return (b & SortableBits<F>::kSign) ? ~b : (b | SortableBits<F>::kSign);
}
template <class F>
KDPLUG_HOST_DEVICE KDPLUG_INLINE F sortable_value(typename SortableBits<F>::U key) {
  using U = typename SortableBits<F>::U;
  const U b = (key & SortableBits<F>::kSign) ? (key & ~SortableBits<F>::kSign) : ~key;
  F x;
  memcpy(&x, &b, sizeof(F));
  return x;
}

}  // namespace math
}  // namespace kdplug
