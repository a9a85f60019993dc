// The CPU kernels of kdplug::divergence_fwd / divergence_bwd.
//
// Rows run in parallel (at::parallel_for; one row is always computed by one thread, in a fixed
// order, so results do not depend on the thread count). Inside a row, SIMD packs of
// at::vec::Vectorized<F> (F = float, or double for float64 inputs) go through the math of
// csrc/kdplug_math.h lane-wise (Ops<Vectorized<F>> in vec_ops.h). A row pair at V = 128k fp32 is
// 1 MB and stays in L2, so the passes after the first read cache, not memory.
//
// Passes (a pass reads both logit rows once):
//   forward   1. online max / log-sum-exp of s/T and t/T (and of the geometric mixture's logits)
//             2. only for the alpha-mixture (alpha not in {-1} and < 1): online LSE of log r~
//             3. the elements: per-term loss sums, and the sums behind U and H^r (row_stats)
//   backward  one pass: grad = scale (u - q U) / T, written once; rows whose incoming gradient is
//             0 (masked rows included) are written as zeros without being read.
// So FKL/RKL/TVD/AB/TAID/SKL/... take 2 forward passes, AMiD with 0 < |alpha| < 1 takes 3, and
// every backward takes 1. Masked rows are never read.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "vec_ops.h"

// Inlines the lambdas of the row loops into the loop (GCC and Clang do not always; a call per
// SIMD pack costs more than the pack's math).
#if defined(__GNUC__) || defined(__clang__)
#define KDPLUG_LAMBDA_INLINE __attribute__((always_inline))
#else
#define KDPLUG_LAMBDA_INLINE
#endif

namespace kdplug {
namespace cpu {
namespace {

using namespace kdplug::math;

template <class scalar_t>
using compute_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// ---- loading and storing one SIMD pack of logits in the compute type ---------------------------
template <class scalar_t>
struct PackIO {  // float, double
  using F = compute_t<scalar_t>;
  using Vec = Vectorized<F>;
  static KDPLUG_INLINE Vec load(const scalar_t* p) { return Vec::loadu(p); }
  static KDPLUG_INLINE void store(scalar_t* p, Vec v) { v.store(p); }
  // A non-temporal store (p aligned to the pack size): the gradient is written once and not read
  // back, so it should not evict the rows being read nor cost a read-for-ownership of its lines.
  static KDPLUG_INLINE void stream(scalar_t* p, Vec v) {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<scalar_t, float>) {
      _mm512_stream_ps(p, v);
    } else {
      _mm512_stream_pd(p, v);
    }
#else
    v.store(p);
#endif
  }
};

template <class scalar_t>
struct ReducedIO {  // BFloat16, Half: fp32 math
  using F = float;
  using Vec = Vectorized<float>;
  static KDPLUG_INLINE Vec load(const scalar_t* p) {
    Vec out;
    at::vec::load_to_float<scalar_t>(p, out);
    return out;
  }
  static KDPLUG_INLINE void store(scalar_t* p, Vec v) {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), at::vec::cvtfp32_bf16(v));
    } else {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), at::vec::cvtfp32_fp16(v));
    }
#else
    at::vec::convert_from_float<scalar_t>(v, v).store(p, Vec::size());
#endif
  }
  static KDPLUG_INLINE void stream(scalar_t* p, Vec v) {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      _mm256_stream_si256(reinterpret_cast<__m256i*>(p), at::vec::cvtfp32_bf16(v));
    } else {
      _mm256_stream_si256(reinterpret_cast<__m256i*>(p), at::vec::cvtfp32_fp16(v));
    }
#else
    store(p, v);
#endif
  }
};
template <>
struct PackIO<c10::BFloat16> : ReducedIO<c10::BFloat16> {};
template <>
struct PackIO<c10::Half> : ReducedIO<c10::Half> {};

// One row of student and teacher logits, visited pack by pack as s/T and t/T. The last, partial
// pack is read from a copy padded with -inf on both sides: an entry that is 0 on both sides adds
// exactly nothing to any sum (the zero rules), so the padding needs no masking downstream.
template <class scalar_t>
struct RowView {
  using IO = PackIO<scalar_t>;
  using F = typename IO::F;
  using Vec = Vectorized<F>;
  static constexpr int W = Vec::size();

  const scalar_t* s;
  const scalar_t* t;
  int64_t V, main_end;
  F inv_T;
  alignas(64) scalar_t s_tail[W];
  alignas(64) scalar_t t_tail[W];

  RowView(const scalar_t* s_, const scalar_t* t_, int64_t V_, F inv_T_)
      : s(s_), t(t_), V(V_), main_end(V_ - V_ % W), inv_T(inv_T_) {
    const scalar_t ninf = static_cast<scalar_t>(-std::numeric_limits<float>::infinity());
    for (int i = 0; i < W; ++i) {
      s_tail[i] = main_end + i < V ? s[main_end + i] : ninf;
      t_tail[i] = main_end + i < V ? t[main_end + i] : ninf;
    }
  }

  // fn(k, xs, xt) for every pack, k its first column
  template <class Fn>
  KDPLUG_INLINE void each(Fn&& fn) const {
    const Vec it(inv_T);
    for (int64_t k = 0; k < main_end; k += W) fn(k, IO::load(s + k) * it, IO::load(t + k) * it);
    if (main_end < V) fn(main_end, IO::load(s_tail) * it, IO::load(t_tail) * it);
  }
};

// ---- per-lane online log-sum-exp ---------------------------------------------------------------
// Each lane keeps its own running max m and sum z; a pack with any lane above its max rescales
// (rare after the first packs), so the common case costs one exp per entry. z is folded into zt
// every 64 packs (cascade summation: ~64 + V/1024 terms per partial sum instead of V/16).
// -inf entries add exp(-inf - m) = 0 (m starts at the lowest finite value, never -inf); NaN
// and +inf entries make the result non-finite.
template <class F>
struct VecLse {
  using Vec = Vectorized<F>;
  using O = Ops<Vec>;
  Vec m = Vec(std::numeric_limits<F>::lowest());
  Vec z = Vec(F(0));
  Vec zt = Vec(F(0));
  int n = 0;

  KDPLUG_INLINE void add(Vec x) {
    if (C10_UNLIKELY(O::any(O::gt(x, m)))) {
      const Vec m2 = O::max(m, x);
      const Vec f = O::exp(m - m2);
      z = z * f;
      zt = zt * f;
      m = m2;
    }
    z = z + O::exp(x - m);
    if (++n == 64) {
      zt = zt + z;
      z = Vec(F(0));
      n = 0;
    }
  }

  F value() const {
    alignas(64) F ms[Vec::size()], zs[Vec::size()];
    m.store(ms);
    (zt + z).store(zs);
    OnlineLse<F> acc;
    for (int i = 0; i < Vec::size(); ++i) acc.merge(ms[i], zs[i]);
    return acc.value();
  }
};

template <class F>
KDPLUG_INLINE double hsum(Vectorized<F> v) {
  alignas(64) F a[Vectorized<F>::size()];
  v.store(a);
  double total = 0;
  for (int i = 0; i < Vectorized<F>::size(); ++i) total += static_cast<double>(a[i]);
  return total;
}

// ---- arguments shared by the row loops ---------------------------------------------------------
template <class scalar_t>
struct Args {
  const scalar_t* s;
  const scalar_t* t;
  int64_t s_stride, t_stride, N, V;
  const bool* row_mask;
  int64_t mask_stride;
  const double* params;         // [2 + n_terms]
  const double* token_weights;  // [N, n_terms] contiguous, or null
  RecipeDesc desc;
};

template <class F>
KDPLUG_INLINE void init_row(const RecipeDesc& d, const double* params, const double* token_weights, int64_t n,
                            RowConsts<F>* c) {
  row_consts_init(d, params, token_weights ? token_weights + n * d.n_terms : static_cast<const double*>(nullptr), c);
}

// Rows per task: enough entries per task that small rows do not pay one task each.
inline int64_t grain(int64_t V) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1)); }

// ---- forward -----------------------------------------------------------------------------------
template <class scalar_t, int MIX>
void forward_rows(const Args<scalar_t>& a, compute_t<scalar_t>* loss, compute_t<scalar_t>* stats, int64_t begin,
                  int64_t end, std::atomic<int64_t>* bad_row) {
  using F = compute_t<scalar_t>;
  using Vec = Vectorized<F>;
  for (int64_t n = begin; n < end; ++n) {
    F* st_out = stats + n * kStats;
    if (!a.row_mask[n * a.mask_stride]) {  // never read
      loss[n] = F(0);
      for (int j = 0; j < kStats; ++j) st_out[j] = F(0);
      continue;
    }
    RowConsts<F> c;
    init_row(a.desc, a.params, a.token_weights, n, &c);
    const RowView<scalar_t> row(a.s + n * a.s_stride, a.t + n * a.t_stride, a.V, c.inv_T);

    // pass 1: the normalizers
    VecLse<F> ls, lt, lg;
    row.each([&](int64_t, Vec xs, Vec xt) KDPLUG_LAMBDA_INLINE {
      ls.add(xs);
      lt.add(xt);
      if constexpr (MIX == MIX_GEOMETRIC) lg.add(geometric_mix(xt, xs, c.lam));
    });
    c.lse_s = ls.value();
    c.lse_t = lt.value();
    if (!std::isfinite(c.lse_s) || !std::isfinite(c.lse_t)) {
      // report the first bad row (deterministic whatever the thread count)
      int64_t code = 2 * n + (std::isfinite(c.lse_s) ? 1 : 0);
      int64_t prev = bad_row->load();
      while (code < prev && !bad_row->compare_exchange_weak(prev, code)) {
      }
      loss[n] = F(0);
      continue;
    }
    if constexpr (MIX == MIX_GEOMETRIC) c.log_z = lg.value();

    // pass 2: the alpha-mixture's normalizer
    if constexpr (MIX == MIX_ALPHA) {
      VecLse<F> lz;
      row.each([&](int64_t, Vec xs, Vec xt) KDPLUG_LAMBDA_INLINE { lz.add(logs_at<MIX>(c, xs, xt).lr_tilde); });
      c.log_z = lz.value();
    }

    // pass 3: the elements
    Vec e_acc[kMaxTerms];
    for (int i = 0; i < c.n_terms; ++i) e_acc[i] = Vec(F(0));
    StatAcc<Vec> acc{Vec(F(0)), Vec(F(0)), Vec(F(0)), Vec(F(0))};
    double e_tot[kMaxTerms] = {};
    double h_q = 0, h_r = 0, w_h_r = 0, w_r = 0;
    int packs = 0;
    auto fold = [&]() KDPLUG_LAMBDA_INLINE {
      for (int i = 0; i < c.n_terms; ++i) {
        e_tot[i] += hsum(e_acc[i]);
        e_acc[i] = Vec(F(0));
      }
      h_q += hsum(acc.h_q);
      h_r += hsum(acc.h_r);
      w_h_r += hsum(acc.w_h_r);
      w_r += hsum(acc.w_r);
      acc = StatAcc<Vec>{Vec(F(0)), Vec(F(0)), Vec(F(0)), Vec(F(0))};
      packs = 0;
    };
    row.each([&](int64_t, Vec xs, Vec xt) KDPLUG_LAMBDA_INLINE {
      const Logs<Vec> L = logs_at<MIX>(c, xs, xt);
      const H<Vec> h = terms_at<true>(c, L, keep_at(c, xs, xt), e_acc);
      stats_at(c, L, h, &acc);
      if (++packs == 64) fold();
    });
    fold();
    double total = 0;
    for (int i = 0; i < c.n_terms; ++i)
      if (c.coef[i] != F(0)) total += static_cast<double>(c.coef[i]) * e_tot[i];  // mul0(coef, sum)
    loss[n] = static_cast<F>(total);
    st_out[STAT_LSE_S] = c.lse_s;
    st_out[STAT_LSE_T] = c.lse_t;
    st_out[STAT_LOG_Z] = c.log_z;
    st_out[STAT_H_R] = static_cast<F>(h_r);
    st_out[STAT_U] = static_cast<F>(h_q + w_h_r - h_r * w_r);
  }
}

// ---- forward, one pass: "logit-space" recipes ----------------------------------------------------
// When every operand is a softmax of a logit vector (p of t/T, q of s/T, or a detached geometric
// mixture r of g = lam t/T + (1 - lam) s/T) and every term is KL or CE, the loss is linear in each
// operand's softmax weights, so it streams in the same pass as the log-sum-exps (one read of each
// row, no second pass). With w_k = exp(a_k - m_A) the running weights of the lhs A (the very
// exps the LSE of A sums, so the loss costs no extra transcendental):
//
//   KL(A||B) = (1/Z_A) sum_k w_k (a_k - b_k) - (lse_A - lse_B) (1/Z_A) sum_k w_k
//   CE(A||B) = -(1/Z_A) sum_k w_k b_k + lse_B (1/Z_A) sum_k w_k
//
// (a, b the operands' logits, Z_A = sum_k w_k, lse_A = m_A + log Z_A). The zero rules become masks:
// entries with a = -inf add nothing (w = 0); an entry with a finite and b = -inf is the support
// mismatch: the term is +inf and the entry is left out of every sum (its partials are dropped by
// the non-finite rule); "exclude" drops entries where s or t is -inf. The sums behind U:
//   lhs = q (KL):  sum of the finite dP = Q (lq - lB + 1):   the finite loss + sum_ok Q
//   rhs = q:       sum of dQ = -P_A over kept entries (mismatches included: dQ is finite there)
// Same values as the 2-pass path up to rounding (tests compare both to the PyTorch path).
bool fused_eligible(const RecipeDesc& d) {
  if (!(d.mix == MIX_NONE || (d.mix == MIX_GEOMETRIC && d.detach))) return false;
  if (d.n_terms > 2) return false;
  for (int i = 0; i < d.n_terms; ++i)
    if (d.div[i] != KL && d.div[i] != CE) return false;
  return true;
}

template <class F>
struct LaneSums {  // one term's per-lane sums, relative to the running max of its lhs
  Vectorized<F> f, s, tq;
};

template <class scalar_t, bool GEO, int NT>
void forward_rows_fused(const Args<scalar_t>& a, compute_t<scalar_t>* loss, compute_t<scalar_t>* stats,
                        int64_t begin, int64_t end, std::atomic<int64_t>* bad_row) {
  using F = compute_t<scalar_t>;
  using Vec = Vectorized<F>;
  using O = Ops<Vec>;
  constexpr int W = Vec::size();
  constexpr int NX = GEO ? 3 : 2;  // operand slots: TEACHER (t), STUDENT (s), ASSISTANT (g)
  const Vec zero(F(0)), ninf(neg_inf<F>());
  for (int64_t n = begin; n < end; ++n) {
    F* st_out = stats + n * kStats;
    if (!a.row_mask[n * a.mask_stride]) {
      loss[n] = F(0);
      for (int j = 0; j < kStats; ++j) st_out[j] = F(0);
      continue;
    }
    RowConsts<F> c;
    init_row(a.desc, a.params, a.token_weights, n, &c);
    const RowView<scalar_t> row(a.s + n * a.s_stride, a.t + n * a.t_stride, a.V, c.inv_T);
    int lhs[NT], rhs[NT];
    bool kl[NT];
    for (int i = 0; i < NT; ++i) {
      lhs[i] = c.lhs[i];
      rhs[i] = c.rhs[i];
      kl[i] = c.div[i] == KL;
    }
    Vec m[NX], z[NX], zt[NX];
    LaneSums<F> cur[NT], tot[NT];
    for (int x = 0; x < NX; ++x) {
      m[x] = Vec(std::numeric_limits<F>::lowest());
      z[x] = zt[x] = zero;
    }
    for (int i = 0; i < NT; ++i) cur[i] = tot[i] = LaneSums<F>{zero, zero, zero};
    bool mismatch[NT] = {};
    int packs = 0;
    row.each([&](int64_t, Vec xs, Vec xt) KDPLUG_LAMBDA_INLINE {
      Vec x[NX], w[NX];
      x[TEACHER] = xt;
      x[STUDENT] = xs;
      if constexpr (GEO) x[ASSISTANT] = geometric_mix(xt, xs, c.lam);
      for (int k = 0; k < NX; ++k) {
        if (C10_UNLIKELY(O::any(O::gt(x[k], m[k])))) {
          const Vec m2 = O::max(m[k], x[k]);
          const Vec f = O::exp(m[k] - m2);
          z[k] = z[k] * f;
          zt[k] = zt[k] * f;
          for (int i = 0; i < NT; ++i)
            if (lhs[i] == k) {
              cur[i] = LaneSums<F>{cur[i].f * f, cur[i].s * f, cur[i].tq * f};
              tot[i] = LaneSums<F>{tot[i].f * f, tot[i].s * f, tot[i].tq * f};
            }
          m[k] = m2;
        }
        w[k] = O::exp(x[k] - m[k]);
        z[k] = z[k] + w[k];
      }
      const auto keep = keep_at(c, xs, xt);
      for (int i = 0; i < NT; ++i) {
        const Vec xa = x[lhs[i]], xb = x[rhs[i]], wa = w[lhs[i]];
        const auto b_zero = O::eq(xb, ninf);
        const auto mism = O::land(keep, O::land(O::ne(xa, ninf), b_zero));
        const auto live = O::land(keep, O::lnot(b_zero));  // a = -inf: w = 0 adds nothing
        if (C10_UNLIKELY(O::any(mism))) mismatch[i] = true;
        // select before multiply: a - b or b may be -inf / NaN where w = 0 or b = -inf
        cur[i].f = cur[i].f + O::select(O::land(live, O::ne(xa, ninf)), wa * (kl[i] ? xa - xb : xb), zero);
        cur[i].s = cur[i].s + O::select(live, wa, zero);
        if (rhs[i] == STUDENT) cur[i].tq = cur[i].tq + O::select(keep, wa, zero);
      }
      if (++packs == 64) {
        for (int k = 0; k < NX; ++k) {
          zt[k] = zt[k] + z[k];
          z[k] = zero;
        }
        for (int i = 0; i < NT; ++i) {
          tot[i] = LaneSums<F>{tot[i].f + cur[i].f, tot[i].s + cur[i].s, tot[i].tq + cur[i].tq};
          cur[i] = LaneSums<F>{zero, zero, zero};
        }
        packs = 0;
      }
    });
    // lanes -> row: each operand's max M, and every lane's sums rescaled by exp(m_lane - M)
    alignas(64) F ms[NX][W], zs[NX][W];
    F lse[NX];
    double Z[NX], scale[NX][W];
    for (int k = 0; k < NX; ++k) {
      m[k].store(ms[k]);
      (zt[k] + z[k]).store(zs[k]);
      OnlineLse<F> acc;
      for (int l = 0; l < W; ++l) acc.merge(ms[k][l], zs[k][l]);
      lse[k] = acc.value();
      Z[k] = 0;
      for (int l = 0; l < W; ++l) {
        // lanes whose max never left its initial value hold no weight
        scale[k][l] = zs[k][l] == F(0) ? 0.0 : std::exp(static_cast<double>(ms[k][l]) - static_cast<double>(acc.m));
        Z[k] += static_cast<double>(zs[k][l]) * scale[k][l];
      }
    }
    c.lse_t = lse[TEACHER];
    c.lse_s = lse[STUDENT];
    if (!std::isfinite(c.lse_s) || !std::isfinite(c.lse_t)) {
      int64_t code = 2 * n + (std::isfinite(c.lse_s) ? 1 : 0);
      int64_t prev = bad_row->load();
      while (code < prev && !bad_row->compare_exchange_weak(prev, code)) {
      }
      loss[n] = F(0);
      continue;
    }
    if constexpr (GEO) c.log_z = lse[ASSISTANT];
    double total = 0, U = 0;
    for (int i = 0; i < NT; ++i) {
      const int A = lhs[i];
      alignas(64) F fs[W], ss[W], ts[W];
      (tot[i].f + cur[i].f).store(fs);
      (tot[i].s + cur[i].s).store(ss);
      (tot[i].tq + cur[i].tq).store(ts);
      double Fi = 0, Si = 0, Ti = 0;
      for (int l = 0; l < W; ++l) {
        Fi += fs[l] * scale[A][l];
        Si += ss[l] * scale[A][l];
        Ti += ts[l] * scale[A][l];
      }
      const double coef = c.coef[i];
      if (Z[A] == 0.0 || coef == 0.0) continue;  // an operand that is 0 everywhere: e = 0
      Fi /= Z[A];
      Si /= Z[A];
      Ti /= Z[A];
      const double lse_b = lse[rhs[i]];
      // (Si == 0: no entry where both sides are positive; then Fi == 0 too and lse_b may be -inf)
      const double finite_sum =
          Si == 0.0 ? 0.0 : kl[i] ? Fi - (static_cast<double>(lse[A]) - lse_b) * Si : -Fi + lse_b * Si;
      total += coef * (mismatch[i] ? std::numeric_limits<double>::infinity() : finite_sum);
      if (A == STUDENT) U += coef * (finite_sum + Si);
      if (rhs[i] == STUDENT) U -= coef * Ti;
    }
    loss[n] = static_cast<F>(total);
    st_out[STAT_LSE_S] = c.lse_s;
    st_out[STAT_LSE_T] = c.lse_t;
    st_out[STAT_LOG_Z] = c.log_z;
    st_out[STAT_H_R] = F(0);
    st_out[STAT_U] = static_cast<F>(U);
  }
}

// ---- backward ----------------------------------------------------------------------------------
template <class scalar_t, int MIX>
void backward_rows(const Args<scalar_t>& a, const compute_t<scalar_t>* grad_loss, const compute_t<scalar_t>* stats,
                   scalar_t* grad, int64_t begin, int64_t end) {
  using F = compute_t<scalar_t>;
  using Vec = Vectorized<F>;
  using IO = PackIO<scalar_t>;
  constexpr int W = Vec::size();
  for (int64_t n = begin; n < end; ++n) {
    scalar_t* g = grad + n * a.V;
    RowConsts<F> c;
    init_row(a.desc, a.params, a.token_weights, n, &c);
    const F scale = a.row_mask[n * a.mask_stride] ? grad_loss[n] / c.T : F(0);
    if (scale == F(0)) {  // masked, or no incoming gradient: exactly 0, inputs not read
      std::memset(static_cast<void*>(g), 0, sizeof(scalar_t) * a.V);
      continue;
    }
    const F* st = stats + n * kStats;
    c.lse_s = st[STAT_LSE_S];
    c.lse_t = st[STAT_LSE_T];
    c.log_z = st[STAT_LOG_Z];
    const F H_r = st[STAT_H_R], U = st[STAT_U];
    const RowView<scalar_t> row(a.s + n * a.s_stride, a.t + n * a.t_stride, a.V, c.inv_T);
    const bool aligned = reinterpret_cast<uintptr_t>(g) % (sizeof(scalar_t) * W) == 0;
    row.each([&](int64_t k, Vec xs, Vec xt) KDPLUG_LAMBDA_INLINE {
      const Logs<Vec> L = logs_at<MIX>(c, xs, xt);
      const H<Vec> h = terms_at<false>(c, L, keep_at(c, xs, xt), static_cast<Vec*>(nullptr));
      const Vec gk = grad_at(c, L, h, H_r, U, scale);
      if (k + W <= a.V) {
        if (aligned) {
          IO::stream(g + k, gk);
        } else {
          IO::store(g + k, gk);
        }
      } else {
        alignas(64) scalar_t tail[W];
        IO::store(tail, gk);
        std::memcpy(static_cast<void*>(g + k), tail, sizeof(scalar_t) * (a.V - k));
      }
    });
  }
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();  // order the non-temporal stores before the results are handed over
#endif
}

// ---- the ops -----------------------------------------------------------------------------------
RecipeDesc decode(at::IntArrayRef structure, at::ArrayRef<double> consts) {
  RecipeDesc d;
  const char* err = decode_recipe(structure.data(), static_cast<int64_t>(structure.size()), consts.data(),
                                  static_cast<int64_t>(consts.size()), &d);
  TORCH_CHECK(err == nullptr, "kdplug: invalid packed recipe: ", err ? err : "");
  return d;
}

at::ScalarType compute_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Checks shared by both ops; returns the row count N and vocabulary size V.
std::pair<int64_t, int64_t> check_inputs(const at::Tensor& s, const at::Tensor& t, const at::Tensor& params,
                                         const std::optional<at::Tensor>& token_weights, const at::Tensor& row_mask,
                                         const RecipeDesc& d) {
  TORCH_CHECK(s.dim() == 2 && t.dim() == 2, "kdplug: student_logits and teacher_logits must be [N, V], got ",
              s.sizes(), " and ", t.sizes());
  TORCH_CHECK(s.sizes() == t.sizes(), "kdplug: student_logits ", s.sizes(), " and teacher_logits ", t.sizes(),
              " must have the same shape");
  TORCH_CHECK(s.scalar_type() == t.scalar_type(), "kdplug: student_logits (", s.scalar_type(),
              ") and teacher_logits (", t.scalar_type(), ") must have the same dtype");
  const auto dt = s.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf,
              "kdplug: logits must be float32, float64, bfloat16 or float16, got ", dt);
  const int64_t N = s.size(0), V = s.size(1);
  TORCH_CHECK(V >= 1 || N == 0, "kdplug: the vocabulary is empty");
  TORCH_CHECK(V <= 1 || (s.stride(1) == 1 && t.stride(1) == 1),
              "kdplug: the logits' last dimension must be contiguous (stride 1); got strides ", s.strides(), " and ",
              t.strides());
  TORCH_CHECK(params.scalar_type() == at::kDouble && params.dim() == 1 && params.is_contiguous() &&
                  params.size(0) == 2 + d.n_terms,
              "kdplug: params must be a contiguous float64 vector [T, lam, weight * n_terms] of length ",
              2 + d.n_terms, ", got ", params.scalar_type(), " ", params.sizes());
  TORCH_CHECK(params.device().is_cpu(), "kdplug: params must be on the CPU with CPU logits");
  TORCH_CHECK(row_mask.scalar_type() == at::kBool && row_mask.dim() == 1 && row_mask.size(0) == N,
              "kdplug: row_mask must be a bool vector [N] = [", N, "], got ", row_mask.scalar_type(), " ",
              row_mask.sizes());
  if (token_weights.has_value()) {
    const auto& w = *token_weights;
    TORCH_CHECK(w.scalar_type() == at::kDouble && w.dim() == 2 && w.size(0) == N && w.size(1) == d.n_terms &&
                    w.is_contiguous(),
                "kdplug: token_weights must be a contiguous float64 [N, n_terms] = [", N, ", ", d.n_terms,
                "] tensor, got ", w.scalar_type(), " ", w.sizes());
  }
  const double T = params.data_ptr<double>()[0];
  TORCH_CHECK(T > 0 && std::isfinite(T), "kdplug: the temperature params[0] must be finite and > 0, got ", T);
  return {N, V};
}

template <class scalar_t>
Args<scalar_t> make_args(const at::Tensor& s, const at::Tensor& t, const at::Tensor& params,
                         const std::optional<at::Tensor>& token_weights, const at::Tensor& row_mask,
                         const RecipeDesc& d) {
  Args<scalar_t> a;
  a.s = s.data_ptr<scalar_t>();
  a.t = t.data_ptr<scalar_t>();
  a.s_stride = s.stride(0);
  a.t_stride = t.stride(0);
  a.N = s.size(0);
  a.V = s.size(1);
  a.row_mask = row_mask.data_ptr<bool>();
  a.mask_stride = row_mask.stride(0);
  a.params = params.data_ptr<double>();
  a.token_weights = token_weights.has_value() ? token_weights->data_ptr<double>() : nullptr;
  a.desc = d;
  return a;
}

// The gradient is the one N x V allocation. Fresh pages cost more than the kernel itself on some
// machines (page faults of a 1 GB buffer took 0.2-0.5 s here, vs ~0.1 s for the whole pass);
// asking for transparent huge pages before the first touch cuts that ~5x. KDPLUG_THP=0 turns it
// off. Harmless where THP is disabled.
void advise_huge_pages(void* ptr, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  static const bool enabled = [] {
    const char* v = std::getenv("KDPLUG_THP");
    return !(v && std::strcmp(v, "0") == 0);
  }();
  constexpr uintptr_t huge = uintptr_t(2) << 20;
  if (!enabled || bytes < 4 * huge) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(ptr) + huge - 1) & ~(huge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(ptr) + bytes) & ~(huge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)ptr;
  (void)bytes;
#endif
}

template <class Fn>
void dispatch_mix(int mix, Fn&& fn) {
  switch (mix) {
    case MIX_NONE:
      fn(std::integral_constant<int, MIX_NONE>{});
      break;
    case MIX_GEOMETRIC:
      fn(std::integral_constant<int, MIX_GEOMETRIC>{});
      break;
    case MIX_ARITHMETIC:
      fn(std::integral_constant<int, MIX_ARITHMETIC>{});
      break;
    default:
      fn(std::integral_constant<int, MIX_ALPHA>{});
      break;
  }
}

std::tuple<at::Tensor, at::Tensor> divergence_fwd_cpu(const at::Tensor& student_logits,
                                                      const at::Tensor& teacher_logits, const at::Tensor& params,
                                                      const std::optional<at::Tensor>& token_weights,
                                                      const at::Tensor& row_mask, at::IntArrayRef structure,
                                                      at::ArrayRef<double> consts) {
  const RecipeDesc d = decode(structure, consts);
  const auto [N, V] = check_inputs(student_logits, teacher_logits, params, token_weights, row_mask, d);
  const auto opts = student_logits.options().dtype(compute_dtype(student_logits.scalar_type()));
  at::Tensor loss = at::empty({N}, opts);
  at::Tensor row_stats = at::empty({N, kStats}, opts);
  std::atomic<int64_t> bad_row{std::numeric_limits<int64_t>::max()};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student_logits.scalar_type(), "kdplug_divergence_fwd", [&] {
    using F = compute_t<scalar_t>;
    const Args<scalar_t> a = make_args<scalar_t>(student_logits, teacher_logits, params, token_weights, row_mask, d);
    F* loss_p = loss.data_ptr<F>();
    F* stats_p = row_stats.data_ptr<F>();
    if (fused_eligible(d) && !std::getenv("KDPLUG_NO_FUSED")) {
      auto run = [&](auto geo, auto nt) {
        at::parallel_for(0, N, grain(V), [&](int64_t begin, int64_t end) {
          forward_rows_fused<scalar_t, decltype(geo)::value, decltype(nt)::value>(a, loss_p, stats_p, begin, end,
                                                                                  &bad_row);
        });
      };
      const bool geo = d.mix == MIX_GEOMETRIC;
      if (geo && d.n_terms == 1) run(std::true_type{}, std::integral_constant<int, 1>{});
      if (geo && d.n_terms == 2) run(std::true_type{}, std::integral_constant<int, 2>{});
      if (!geo && d.n_terms == 1) run(std::false_type{}, std::integral_constant<int, 1>{});
      if (!geo && d.n_terms == 2) run(std::false_type{}, std::integral_constant<int, 2>{});
      return;
    }
    dispatch_mix(d.mix, [&](auto mix) {
      at::parallel_for(0, N, grain(V), [&](int64_t begin, int64_t end) {
        forward_rows<scalar_t, decltype(mix)::value>(a, loss_p, stats_p, begin, end, &bad_row);
      });
    });
  });
  const int64_t bad = bad_row.load();
  TORCH_CHECK(bad == std::numeric_limits<int64_t>::max(), "kdplug: ",
              bad % 2 == 0 ? "student_logits" : "teacher_logits",
              " has a row that is not masked but is all -inf, or holds +inf or NaN (row ", bad / 2,
              "); mask such rows (mask= or labels=)");
  return {loss, row_stats};
}

at::Tensor divergence_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& student_logits,
                              const at::Tensor& teacher_logits, const at::Tensor& params,
                              const std::optional<at::Tensor>& token_weights, const at::Tensor& row_mask,
                              const at::Tensor& row_stats, at::IntArrayRef structure, at::ArrayRef<double> consts) {
  const RecipeDesc d = decode(structure, consts);
  const auto [N, V] = check_inputs(student_logits, teacher_logits, params, token_weights, row_mask, d);
  const auto cdt = compute_dtype(student_logits.scalar_type());
  TORCH_CHECK(grad_loss.dim() == 1 && grad_loss.size(0) == N && grad_loss.scalar_type() == cdt,
              "kdplug: grad_loss must be a ", cdt, " vector [N] = [", N, "], got ", grad_loss.scalar_type(), " ",
              grad_loss.sizes());
  TORCH_CHECK(row_stats.dim() == 2 && row_stats.size(0) == N && row_stats.size(1) == kStats &&
                  row_stats.scalar_type() == cdt && row_stats.is_contiguous(),
              "kdplug: row_stats must be the contiguous ", cdt, " [N, ", kStats,
              "] tensor that divergence_fwd returned, got ", row_stats.scalar_type(), " ", row_stats.sizes());
  at::Tensor grad = at::empty({N, V}, student_logits.options());
  if (grad.numel() == 0) return grad;
  advise_huge_pages(grad.data_ptr(), grad.nbytes());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student_logits.scalar_type(), "kdplug_divergence_bwd", [&] {
    using F = compute_t<scalar_t>;
    const Args<scalar_t> a = make_args<scalar_t>(student_logits, teacher_logits, params, token_weights, row_mask, d);
    // grad_loss may be strided (an expanded scalar gradient); read it through a contiguous view
    const at::Tensor gl = grad_loss.is_contiguous() ? grad_loss : grad_loss.contiguous();
    const F* gl_p = gl.data_ptr<F>();
    const F* stats_p = row_stats.data_ptr<F>();
    scalar_t* grad_p = grad.data_ptr<scalar_t>();
    dispatch_mix(d.mix, [&](auto mix) {
      at::parallel_for(0, N, grain(V), [&](int64_t begin, int64_t end) {
        backward_rows<scalar_t, decltype(mix)::value>(a, gl_p, stats_p, grad_p, begin, end);
      });
    });
  });
  return grad;
}

}  // namespace

const char* simd_level() { return kdplug::math::simd_level(); }
int vec_floats() { return static_cast<int>(Vectorized<float>::size()); }

}  // namespace cpu
}  // namespace kdplug

TORCH_LIBRARY_IMPL(kdplug, CPU, m) {
  m.impl("divergence_fwd", &kdplug::cpu::divergence_fwd_cpu);
  m.impl("divergence_bwd", &kdplug::cpu::divergence_bwd_cpu);
}
