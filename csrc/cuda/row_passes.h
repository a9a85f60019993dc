// The per-row passes of the CUDA kernels, written once for two executors.
//
// No torch and no CUDA includes: this header compiles with nvcc (csrc/cuda/divergence_kernel.cuh,
// where the executor is a thread block) and with a plain C++ compiler (csrc/tests/
// test_cuda_rows.cpp, where the executor emulates a thread block sequentially, in the same pack
// assignment and reduction-tree order), so that the orchestration below -- which passes run, how
// per-thread partial states are merged, how the one-pass forward turns its sums into the loss --
// is unit-tested on machines without a GPU.
//
// The math is csrc/kdplug_math.h's (logs_at, terms_at, stats_at, grad_at, OnlineLse, ...); the
// structure follows the CPU kernel (csrc/cpu/divergence_rows.h), which is the model:
//
//   forward, logit-space recipes (fused_eligible: p, q or a detached geometric r; KL / CE terms;
//            at most 2 terms): ONE pass (forward_fused), the loss streamed with the online LSEs
//   forward, any other recipe (forward_general):
//            1. online max / log-sum-exp of s/T and t/T (and of the geometric mixture's logits)
//            2. only for the alpha-mixture: online LSE of log r~ (log Z)
//            3. the elements: per-term loss sums and the sums behind U and H^r (row_stats)
//   backward ONE pass (backward_row): grad = scale (u - q U) / T from row_stats; rows whose
//            incoming gradient is 0 (masked rows included) are zero-filled and never read.
//
// An executor `Exec` provides (every thread of a block calls these collectively):
//   static constexpr int VEC;  begin_row(n, inv_T)   (the row the calls below are about)
//   bool leader()                                    (the thread that writes the row's outputs)
//   R row_reduce(S init, add, conv, merge)   each thread folds its packs of the row into S with
//            add(S&, xs, xt) (entries past V arrive as -inf on both sides: they add nothing),
//            conv(S) -> R turns it into the merge type, and merge(R&, const R&) combines them in
//            a fixed tree; every thread gets the row's R (deterministic: the tree depends only on
//            the block size, which depends only on V and the dtype).
//   for_each_pack(fn)   fn(pack, xs[VEC], xt[VEC]) over this thread's packs; store(pack, g[VEC])
//   zero_row()          writes 0 over the whole gradient row
#pragma once

#include <cstdint>
#include <type_traits>
#include <utility>

#include "divergence_cuda.h"

#if defined(__CUDACC__)
#define KDPLUG_UNROLL _Pragma("unroll")
#else
#define KDPLUG_UNROLL
#endif

namespace kdplug {
namespace gpu {

using math::kMaxTerms;
using math::kStats;
using math::RecipeDesc;
using math::RowConsts;

template <class F>
KDPLUG_HOST_DEVICE KDPLUG_INLINE F lowest();
template <>
KDPLUG_HOST_DEVICE KDPLUG_INLINE float lowest<float>() {
  return -3.402823466e+38f;
}
template <>
KDPLUG_HOST_DEVICE KDPLUG_INLINE double lowest<double>() {
  return -1.7976931348623157e+308;
}
template <class F>
KDPLUG_HOST_DEVICE KDPLUG_INLINE F quiet_nan() {
  return static_cast<F>(NAN);
}

// ---- the recipe a kernel instance is compiled for ---------------------------------------------
// NT: the number of terms when known at compile time (1 or 2: every built-in recipe), 0 when read
// at run time (up to kMaxTerms: third-party recipes). SIG: a single-term recipe's (div, lhs, rhs)
// fixed at compile time (the built-ins'), or 0. Either lets the compiler keep the row constants in
// registers and drop the element kinds a recipe does not use.
constexpr int sig_of(int div, int lhs, int rhs) { return 1 + div + 4 * (lhs + 3 * rhs); }

// The one-pass forward applies (as the CPU kernel's fused_eligible).
KDPLUG_HOST_DEVICE inline bool fused_eligible(const RecipeDesc& d) {
  if (!(d.mix == math::MIX_NONE || (d.mix == math::MIX_GEOMETRIC && d.detach))) return false;
  if (d.n_terms > 2) return false;
  for (int i = 0; i < d.n_terms; ++i)
    if (d.div[i] != math::KL && d.div[i] != math::CE) return false;
  return true;
}

// The row's constants (everything but the statistics). Returns false when the temperature is not
// finite and > 0 (the CPU binding checks it on the host; here params live on the device).
template <class F, int NT, int SIG>
KDPLUG_HOST_DEVICE KDPLUG_INLINE bool init_row(const RecipeDesc& desc, const double* params,
                                               const double* token_weights, int64_t n, RowConsts<F>* c) {
  RecipeDesc d = desc;
  if (NT > 0) d.n_terms = NT;  // == desc.n_terms (the launcher picks NT so); a constant from here on
  const double* tw = token_weights ? token_weights + n * desc.n_terms : static_cast<const double*>(nullptr);
  math::row_consts_init(d, params, tw, c);
  if (SIG != 0) {  // as the CPU kernel's pin_terms
    c->n_terms = 1;
    c->div[0] = (SIG - 1) % 4;
    c->lhs[0] = ((SIG - 1) / 4) % 3;
    c->rhs[0] = (SIG - 1) / 12;
  }
  const double T = params[0];
  return T > 0.0 && T - T == 0.0;
}

// ---- general forward, pass 1: the normalizers ---------------------------------------------------
template <class F, int MIX>
struct LsePass {
  math::OnlineLse<F> s, t, g;

  KDPLUG_HOST_DEVICE KDPLUG_INLINE void add(const RowConsts<F>& c, F xs, F xt) {
    s.add(xs);
    t.add(xt);
    if (MIX == math::MIX_GEOMETRIC) g.add(math::geometric_mix(xt, xs, c.lam));
  }
  KDPLUG_HOST_DEVICE KDPLUG_INLINE void merge(const LsePass& o) {
    s.merge(o.s.m, o.s.z);
    t.merge(o.t.m, o.t.z);
    if (MIX == math::MIX_GEOMETRIC) g.merge(o.g.m, o.g.z);
  }
};

// ---- general forward, pass 2 (alpha-mixture): log Z ---------------------------------------------
template <class F, int MIX>
struct LogZPass {
  math::OnlineLse<F> z;

  KDPLUG_HOST_DEVICE KDPLUG_INLINE void add(const RowConsts<F>& c, F xs, F xt) {
    z.add(math::logs_at<MIX>(c, xs, xt).lr_tilde);
  }
  KDPLUG_HOST_DEVICE KDPLUG_INLINE void merge(const LogZPass& o) { z.merge(o.z.m, o.z.z); }
};

// ---- general forward, pass 3: the elements --------------------------------------------------------
// Per-thread sums in the compute type F, merged in double (as the CPU kernel folds its lanes).
template <class F, int MIX, int NT>  // NT: the term count, or 0 (up to kMaxTerms, read at run time)
struct ElementPass {
  static constexpr int NA = NT > 0 ? NT : kMaxTerms;
  F e[NA];
  math::StatAcc<F> st;

  KDPLUG_HOST_DEVICE KDPLUG_INLINE ElementPass() : st{F(0), F(0), F(0), F(0)} {
    for (int i = 0; i < NA; ++i) e[i] = F(0);
  }
  KDPLUG_HOST_DEVICE KDPLUG_INLINE void add(const RowConsts<F>& c, F xs, F xt) {
    const math::Logs<F> L = math::logs_at<MIX>(c, xs, xt);
    const math::H<F> h = math::terms_at<true, NT>(c, L, math::keep_at(c, xs, xt), e);
    math::stats_at(c, L, h, &st);
  }
};

template <int NA>
struct ElementSums {
  double e[NA];
  double h_q, h_r, w_h_r, w_r;

  template <class P>
  KDPLUG_HOST_DEVICE KDPLUG_INLINE static ElementSums from(const P& p) {
    ElementSums out;
    for (int i = 0; i < NA; ++i) out.e[i] = static_cast<double>(p.e[i]);
    out.h_q = static_cast<double>(p.st.h_q);
    out.h_r = static_cast<double>(p.st.h_r);
    out.w_h_r = static_cast<double>(p.st.w_h_r);
    out.w_r = static_cast<double>(p.st.w_r);
    return out;
  }
  KDPLUG_HOST_DEVICE KDPLUG_INLINE void merge(const ElementSums& o) {
    for (int i = 0; i < NA; ++i) e[i] += o.e[i];
    h_q += o.h_q;
    h_r += o.h_r;
    w_h_r += o.w_h_r;
    w_r += o.w_r;
  }
};

// What a row that is not masked but cannot be evaluated writes (an all -inf side, +inf or NaN, a
// bad temperature): NaN loss, and the side's non-finite LSE in row_stats, which the Python layer
// checks without a host sync (kdplug/_ops.py, torch._assert_async). The CPU kernel raises instead.
template <class F>
KDPLUG_HOST_DEVICE KDPLUG_INLINE void write_bad_row(F lse_s, F lse_t, F* loss, F* stats) {
  *loss = quiet_nan<F>();
  stats[math::STAT_LSE_S] = lse_s;
  stats[math::STAT_LSE_T] = lse_t;
  stats[math::STAT_LOG_Z] = quiet_nan<F>();
  stats[math::STAT_H_R] = quiet_nan<F>();
  stats[math::STAT_U] = quiet_nan<F>();
}

template <class F>
KDPLUG_HOST_DEVICE KDPLUG_INLINE void write_masked_row(F* loss, F* stats) {
  *loss = F(0);
  for (int j = 0; j < kStats; ++j) stats[j] = F(0);
}

template <class F, int MIX, int NT, class Exec>
KDPLUG_HOST_DEVICE void forward_general(Exec& ex, RowConsts<F>& c, F* loss, F* stats) {
  using math::Ops;
  // pass 1
  using P1 = LsePass<F, MIX>;
  const P1 p1 = ex.row_reduce(
      P1{}, [&](P1& st, F xs, F xt) { st.add(c, xs, xt); }, [](const P1& st) { return st; },
      [](P1& a, const P1& b) { a.merge(b); });
  c.lse_s = p1.s.value();
  c.lse_t = p1.t.value();
  if (!Ops<F>::is_finite(c.lse_s) || !Ops<F>::is_finite(c.lse_t)) {
    if (ex.leader()) write_bad_row(c.lse_s, c.lse_t, loss, stats);
    return;
  }
  if (MIX == math::MIX_GEOMETRIC) c.log_z = p1.g.value();
  // pass 2
  if (MIX == math::MIX_ALPHA) {
    using P2 = LogZPass<F, MIX>;
    const P2 p2 = ex.row_reduce(
        P2{}, [&](P2& st, F xs, F xt) { st.add(c, xs, xt); }, [](const P2& st) { return st; },
        [](P2& a, const P2& b) { a.merge(b); });
    c.log_z = p2.z.value();
  }
  // pass 3
  constexpr int NA = NT > 0 ? NT : kMaxTerms;
  using P3 = ElementPass<F, MIX, NT>;
  using R3 = ElementSums<NA>;
  const R3 r = ex.row_reduce(
      P3{}, [&](P3& st, F xs, F xt) { st.add(c, xs, xt); }, [](const P3& st) { return R3::from(st); },
      [](R3& a, const R3& b) { a.merge(b); });
  if (ex.leader()) {
    double total = 0;
    for (int i = 0; i < c.n_terms; ++i)
      if (c.coef[i] != F(0)) total += static_cast<double>(c.coef[i]) * r.e[i];  // mul0(coef, sum)
    *loss = static_cast<F>(total);
    stats[math::STAT_LSE_S] = c.lse_s;
    stats[math::STAT_LSE_T] = c.lse_t;
    stats[math::STAT_LOG_Z] = c.log_z;
    stats[math::STAT_H_R] = static_cast<F>(r.h_r);
    stats[math::STAT_U] = static_cast<F>(r.h_q + r.w_h_r - r.h_r * r.w_r);
  }
}

// ---- one-pass forward: "logit-space" recipes ------------------------------------------------------
// The CPU kernel's forward_rows_fused (its comment has the derivation), per thread instead of per
// SIMD lane. Operand slots: TEACHER (t/T), STUDENT (s/T), ASSISTANT (g, the detached geometric
// mixture's logits). With w_k = exp(a_k - m_A) the running weights of a term's lhs A:
//   KL(A||B) = (1/Z_A) sum_k w_k (a_k - b_k) - (lse_A - lse_B) (1/Z_A) sum_k w_k
//   CE(A||B) = -(1/Z_A) sum_k w_k b_k + lse_B (1/Z_A) sum_k w_k
// f, s, tq: a term's sums of w (a - b) or w b, of w, and (rhs = q) of w over kept entries.
template <int NX, class F>
KDPLUG_HOST_DEVICE KDPLUG_INLINE F pick(const F (&x)[NX], int k) {  // x[k], reading x at constant indices only
  if (NX == 2) return k == 0 ? x[0] : x[1];
  return k == 0 ? x[0] : k == 1 ? x[1] : x[NX - 1];
}

template <class F, bool GEO, int NT>
struct FusedPass {
  static constexpr int NX = GEO ? 3 : 2;
  F m[NX], z[NX];
  F f[NT], s[NT], tq[NT];
  unsigned mismatch;

  KDPLUG_HOST_DEVICE KDPLUG_INLINE FusedPass() : mismatch(0u) {
    for (int k = 0; k < NX; ++k) {
      m[k] = lowest<F>();  // finite: exp(-inf - m) = 0 needs no special case
      z[k] = F(0);
    }
    for (int i = 0; i < NT; ++i) f[i] = s[i] = tq[i] = F(0);
  }

  // NB: the teacher's LSE is computed even where no term uses p (TAID): row_stats always holds
  // both LSEs (the per-token log-ratio at sampled ids reads them), as on the CPU.
  KDPLUG_HOST_DEVICE KDPLUG_INLINE void add(const RowConsts<F>& c, F xs, F xt) {
    using O = math::Ops<F>;
    const F ninf = math::neg_inf<F>();
    F x[NX], w[NX];
    x[math::TEACHER] = xt;
    x[math::STUDENT] = xs;
    if (GEO) x[NX - 1] = math::geometric_mix(xt, xs, c.lam);
    for (int k = 0; k < NX; ++k) {
      w[k] = F(0);
      if (x[k] > m[k]) {  // a new maximum: rescale this operand's sums
        const F fct = O::exp(m[k] - x[k]);
        z[k] = z[k] * fct;
        for (int i = 0; i < NT; ++i)
          if (c.lhs[i] == k) {
            f[i] = f[i] * fct;
            s[i] = s[i] * fct;
            tq[i] = tq[i] * fct;
          }
        m[k] = x[k];
      }
      w[k] = O::exp(x[k] - m[k]);  // NaN / +inf entries make z non-finite: the row check
      z[k] = z[k] + w[k];
    }
    const bool keep = math::keep_at(c, xs, xt);
    for (int i = 0; i < NT; ++i) {
      const F xa = pick(x, c.lhs[i]), xb = pick(x, c.rhs[i]), wa = pick(w, c.lhs[i]);
      const bool b_zero = xb == ninf;
      const bool live = keep && !b_zero;  // a = -inf: w = 0 adds nothing
      if (keep && xa != ninf && b_zero) mismatch |= 1u << i;
      // select before multiply: a - b or b may be -inf / NaN where w = 0 or b = -inf
      if (live && xa != ninf) f[i] = f[i] + wa * (c.div[i] == math::KL ? xa - xb : xb);
      if (live) s[i] = s[i] + wa;
      if (c.rhs[i] == math::STUDENT && keep) tq[i] = tq[i] + wa;
    }
  }
};

template <class F, bool GEO, int NT>
struct FusedSums {
  static constexpr int NX = GEO ? 3 : 2;
  double m[NX], z[NX];
  double f[NT], s[NT], tq[NT];
  unsigned mismatch;

  KDPLUG_HOST_DEVICE KDPLUG_INLINE static FusedSums from(const FusedPass<F, GEO, NT>& p) {
    FusedSums o;
    for (int k = 0; k < NX; ++k) {
      o.m[k] = static_cast<double>(p.m[k]);
      o.z[k] = static_cast<double>(p.z[k]);
    }
    for (int i = 0; i < NT; ++i) {
      o.f[i] = static_cast<double>(p.f[i]);
      o.s[i] = static_cast<double>(p.s[i]);
      o.tq[i] = static_cast<double>(p.tq[i]);
    }
    o.mismatch = p.mismatch;
    return o;
  }

  // Both sides' sums relative to the larger maximum (an empty side, z = 0, holds no weight and
  // its sums are 0; NaN propagates into z).
  KDPLUG_HOST_DEVICE KDPLUG_INLINE void merge(const FusedSums& o, const RowConsts<F>& c) {
    for (int k = 0; k < NX; ++k) {
      if (o.z[k] == 0.0) continue;
      double fa = 0.0, fb = 1.0;
      double mm = o.m[k];
      if (z[k] != 0.0) {
        mm = m[k] > o.m[k] ? m[k] : o.m[k];
        fa = math::Ops<double>::exp(m[k] - mm);
        fb = math::Ops<double>::exp(o.m[k] - mm);
      }
      z[k] = z[k] * fa + o.z[k] * fb;
      for (int i = 0; i < NT; ++i)
        if (c.lhs[i] == k) {
          f[i] = f[i] * fa + o.f[i] * fb;
          s[i] = s[i] * fa + o.s[i] * fb;
          tq[i] = tq[i] * fa + o.tq[i] * fb;
        }
      m[k] = mm;
    }
    mismatch |= o.mismatch;
  }
};

template <class F, bool GEO, int NT, class Exec>
KDPLUG_HOST_DEVICE void forward_fused(Exec& ex, RowConsts<F>& c, F* loss, F* stats) {
  using P = FusedPass<F, GEO, NT>;
  using R = FusedSums<F, GEO, NT>;
  constexpr int NX = P::NX;
  const R r = ex.row_reduce(
      P{}, [&](P& st, F xs, F xt) { st.add(c, xs, xt); }, [](const P& st) { return R::from(st); },
      [&](R& a, const R& b) { a.merge(b, c); });
  F lse[NX];
  for (int k = 0; k < NX; ++k)
    lse[k] = r.z[k] == 0.0 ? math::neg_inf<F>() : static_cast<F>(r.m[k] + math::Ops<double>::log(r.z[k]));
  c.lse_t = lse[math::TEACHER];
  c.lse_s = lse[math::STUDENT];
  if (!math::Ops<F>::is_finite(c.lse_s) || !math::Ops<F>::is_finite(c.lse_t)) {
    if (ex.leader()) write_bad_row(c.lse_s, c.lse_t, loss, stats);
    return;
  }
  if (GEO) c.log_z = lse[NX - 1];
  if (!ex.leader()) return;
  double total = 0, U = 0;
  for (int i = 0; i < NT; ++i) {
    const int A = c.lhs[i], B = c.rhs[i];
    const double ZA = pick(r.z, A);
    const double coef = static_cast<double>(c.coef[i]);
    if (ZA == 0.0 || coef == 0.0) continue;  // an operand that is 0 everywhere: e = 0
    const double Fi = r.f[i] / ZA, Si = r.s[i] / ZA, Ti = r.tq[i] / ZA;
    const double lse_a = static_cast<double>(pick(lse, A)), lse_b = static_cast<double>(pick(lse, B));
    // (Si == 0: no entry where both sides are positive; then Fi == 0 too and lse_b may be -inf)
    const double finite_sum =
        Si == 0.0 ? 0.0 : c.div[i] == math::KL ? Fi - (lse_a - lse_b) * Si : -Fi + lse_b * Si;
    total += coef * ((r.mismatch >> i) & 1u ? static_cast<double>(INFINITY) : finite_sum);
    if (A == math::STUDENT) U += coef * (finite_sum + Si);
    if (B == math::STUDENT) U -= coef * Ti;
  }
  *loss = static_cast<F>(total);
  stats[math::STAT_LSE_S] = c.lse_s;
  stats[math::STAT_LSE_T] = c.lse_t;
  stats[math::STAT_LOG_Z] = c.log_z;
  stats[math::STAT_H_R] = F(0);
  stats[math::STAT_U] = static_cast<F>(U);
}

// ---- backward ----------------------------------------------------------------------------------
template <class F, int MIX, int NT>
KDPLUG_HOST_DEVICE KDPLUG_INLINE F grad_entry(const RowConsts<F>& c, F xs, F xt, F H_r, F U, F scale) {
  const math::Logs<F> L = math::logs_at<MIX>(c, xs, xt);
  const math::H<F> h = math::terms_at<false, NT>(c, L, math::keep_at(c, xs, xt), static_cast<F*>(nullptr));
  return math::grad_at(c, L, h, H_r, U, scale);
}

// scale = incoming gradient / T, already known to be != 0; stats: this row's row_stats.
template <class F, int MIX, int NT, class Exec>
KDPLUG_HOST_DEVICE void backward_row(Exec& ex, RowConsts<F>& c, const F* stats, F scale) {
  constexpr int VEC = Exec::VEC;
  c.lse_s = stats[math::STAT_LSE_S];
  c.lse_t = stats[math::STAT_LSE_T];
  c.log_z = stats[math::STAT_LOG_Z];
  const F H_r = stats[math::STAT_H_R], U = stats[math::STAT_U];
  ex.for_each_pack([&](int64_t pack, const F* xs, const F* xt) {
    F g[VEC];
    KDPLUG_UNROLL
    for (int j = 0; j < VEC; ++j) g[j] = grad_entry<F, MIX, NT>(c, xs[j], xt[j], H_r, U, scale);
    ex.store(pack, g);
  });
}

// ---- the rows of a kernel ----------------------------------------------------------------------
// What one block does for row n (the kernels loop these over their rows). a: the launcher's
// arguments (device pointers on the GPU); loss / stats: the whole outputs.
template <class F, int MIX, int SIG, int NT, class Exec>
KDPLUG_HOST_DEVICE void forward_general_row(Exec& ex, const KernelArgs& a, int64_t n, F* loss, F* stats) {
  F* st = stats + n * kStats;
  if (!a.row_mask[n * a.mask_stride]) {  // never read
    if (ex.leader()) write_masked_row(loss + n, st);
    return;
  }
  RowConsts<F> c;
  if (!init_row<F, NT, SIG>(a.desc, a.params, a.token_weights, n, &c)) {
    if (ex.leader()) write_bad_row(quiet_nan<F>(), quiet_nan<F>(), loss + n, st);
    return;
  }
  ex.begin_row(n, c.inv_T);
  forward_general<F, MIX, NT>(ex, c, loss + n, st);
}

template <class F, bool GEO, int NT, class Exec>
KDPLUG_HOST_DEVICE void forward_fused_row(Exec& ex, const KernelArgs& a, int64_t n, F* loss, F* stats) {
  F* st = stats + n * kStats;
  if (!a.row_mask[n * a.mask_stride]) {
    if (ex.leader()) write_masked_row(loss + n, st);
    return;
  }
  RowConsts<F> c;
  if (!init_row<F, NT, 0>(a.desc, a.params, a.token_weights, n, &c)) {
    if (ex.leader()) write_bad_row(quiet_nan<F>(), quiet_nan<F>(), loss + n, st);
    return;
  }
  ex.begin_row(n, c.inv_T);
  forward_fused<F, GEO, NT>(ex, c, loss + n, st);
}

// grad_loss[n * grad_loss_stride]: the incoming gradient (compute dtype).
template <class F, int MIX, int SIG, int NT, class Exec>
KDPLUG_HOST_DEVICE void backward_row_body(Exec& ex, const KernelArgs& a, int64_t n, const F* grad_loss,
                                          int64_t grad_loss_stride, const F* stats) {
  RowConsts<F> c;
  init_row<F, NT, SIG>(a.desc, a.params, a.token_weights, n, &c);
  ex.begin_row(n, c.inv_T);
  const F scale = a.row_mask[n * a.mask_stride] ? grad_loss[n * grad_loss_stride] / c.T : F(0);
  if (scale == F(0)) {  // masked, or no incoming gradient: exactly 0, inputs not read
    ex.zero_row();
    return;
  }
  backward_row<F, MIX, NT>(ex, c, stats + n * kStats, scale);
}

// ---- launch configuration -------------------------------------------------------------------------
// Threads per row: a power of two in [32, max_threads], about 4 packs per thread (a function of
// the row length alone, so the reduction tree, hence every bit of the result, depends on V only).
inline int threads_for_packs(int64_t npacks, int max_threads = kMaxThreads) {
  int threads = 32;
  while (threads < max_threads && int64_t(threads) * 4 < npacks) threads *= 2;
  return threads;
}

// Which instance runs a recipe. The single-term recipes of the built-in methods get instances
// with the term fixed at compile time (SIG, as the CPU kernel's dispatch_recipe); any other recipe
// runs the generic ones (NT = 1 or 2 terms, or NT = 0: the count read at run time).
template <int V_>
using ic = std::integral_constant<int, V_>;

// fn(ic<SIG>, ic<NT>): SIG among SIGS equal to sig (then NT = 1), else SIG = 0 and NT = nt.
// (SPECIALIZE = false compiles no SIG instance at all.)
template <bool SPECIALIZE, int... SIGS, class Fn>
void dispatch_sig(int sig, int nt, Fn&& fn) {
  if constexpr (SPECIALIZE) {
    const bool done = ((sig == SIGS ? (fn(ic<SIGS>{}, ic<1>{}), true) : false) || ...);
    if (done) return;
  }
  if (nt == 1) {
    fn(ic<0>{}, ic<1>{});
  } else if (nt == 2) {
    fn(ic<0>{}, ic<2>{});
  } else {
    fn(ic<0>{}, ic<0>{});
  }
}

// fn(ic<MIX>, ic<SIG>, ic<NT>) for the recipe d (SPECIALIZE: whether to use the SIG instances).
template <bool SPECIALIZE, class Fn>
void dispatch_recipe(const RecipeDesc& d, Fn&& fn) {
  using namespace math;
  const int sig = d.n_terms == 1 ? sig_of(d.div[0], d.lhs[0], d.rhs[0]) : 0;
  const int nt = d.n_terms == 1 || d.n_terms == 2 ? d.n_terms : 0;
  switch (d.mix) {
    case MIX_NONE:  // tvd, abkd; kl, rkl, ce (their forward is the one-pass one)
      dispatch_sig<SPECIALIZE, sig_of(TVD, TEACHER, STUDENT), sig_of(AB, TEACHER, STUDENT), sig_of(KL, TEACHER, STUDENT),
                   sig_of(KL, STUDENT, TEACHER), sig_of(CE, TEACHER, STUDENT)>(
          sig, nt, [&](auto s, auto t) { fn(ic<MIX_NONE>{}, s, t); });
      break;
    case MIX_GEOMETRIC:  // taid (value ce / kl), amid alpha >= 1
      dispatch_sig<SPECIALIZE, sig_of(CE, ASSISTANT, STUDENT), sig_of(KL, ASSISTANT, STUDENT), sig_of(AB, TEACHER, ASSISTANT),
                   sig_of(KL, TEACHER, ASSISTANT)>(sig, nt,
                                                   [&](auto s, auto t) { fn(ic<MIX_GEOMETRIC>{}, s, t); });
      break;
    case MIX_ARITHMETIC:  // skl, srkl, distillm2, amid alpha = -1
      dispatch_sig<SPECIALIZE, sig_of(KL, TEACHER, ASSISTANT), sig_of(KL, STUDENT, ASSISTANT), sig_of(AB, TEACHER, ASSISTANT)>(
          sig, nt, [&](auto s, auto t) { fn(ic<MIX_ARITHMETIC>{}, s, t); });
      break;
    default:  // amid
      dispatch_sig<SPECIALIZE, sig_of(AB, TEACHER, ASSISTANT), sig_of(KL, TEACHER, ASSISTANT)>(
          sig, nt, [&](auto s, auto t) { fn(ic<MIX_ALPHA>{}, s, t); });
      break;
  }
}

// fn(std::bool_constant<GEO>, ic<NT>) for a fused_eligible recipe.
template <class Fn>
void dispatch_fused(const RecipeDesc& d, Fn&& fn) {
  const bool geo = d.mix == math::MIX_GEOMETRIC;
  if (geo && d.n_terms == 1) fn(std::true_type{}, ic<1>{});
  if (geo && d.n_terms == 2) fn(std::true_type{}, ic<2>{});
  if (!geo && d.n_terms == 1) fn(std::false_type{}, ic<1>{});
  if (!geo && d.n_terms == 2) fn(std::false_type{}, ic<2>{});
}

}  // namespace gpu
}  // namespace kdplug
