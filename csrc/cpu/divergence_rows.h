// The CPU row loops of kdplug::divergence_fwd / divergence_bwd (included by rows_<dtype>.cpp).
//
// Rows run in parallel (at::parallel_for; a row is always computed by one thread, in a fixed
// order, so results do not depend on the thread count). Inside a row, SIMD packs of
// at::vec::Vectorized<F> (F = float, or double for float64 logits) go through the math of
// csrc/kdplug_math.h lane-wise (Ops<Vectorized<F>> in vec_ops.h). A row pair at V = 128k fp32 is
// 1 MB and stays in L2, so the passes after the first read cache, not memory.
//
// Passes (a pass reads both logit rows once):
//   forward, logit-space recipes (every operand p, q or a detached geometric r; KL / CE terms:
//            fkl, rkl, symmetric_kl, akl, taid): ONE pass, the loss streamed with the online
//            log-sum-exps (forward_rows_fused)
//   forward, the other recipes without a mixture or AB term (tvd, third-party KL / CE / TVD
//            mixes): each exp once, kept, in the read of the logits, then the elements from
//            them (forward_grad_row_nomix without its gradient pass)
//   forward, the arithmetic mixture with KL terms on r (skl, srkl, gjsd, distillm2's sides; float
//            and bfloat16): the same, forward_grad_row_arith without its gradient pass
//   forward, any other recipe (forward_rows):
//            1. online max / log-sum-exp of s/T and t/T (and of the geometric mixture's logits)
//            2. only for the alpha-mixture (alpha != 1, -1): the LSE of log r~ (log Z), with
//               log r~, the mixture weight and the LSE's exps kept for pass 3
//            3. the elements: per-term loss sums and the sums behind U and H^r (row_stats)
//   backward ONE pass: grad = scale (u - q U) / T, written once with non-temporal stores; rows
//            whose incoming gradient is 0 (masked rows included) are zero-filled, never read.
//   forward + gradient (divergence_fwd_grad, eager training): per row, the forward's passes then
//            the gradient pass while the row is in cache (forward_backward_rows); the recipes
//            without a mixture, with a detached geometric one, or with the arithmetic one and KL
//            terms keep their exps and take the gradient from them (forward_grad_row_logit,
//            forward_grad_row_nomix, forward_grad_row_arith).
// The single-term recipes of the built-in methods also get instances with the term fixed at
// compile time (dispatch_recipe); every other recipe runs the same loops with its terms read at
// run time.
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if __has_include(<unistd.h>)
#include <unistd.h>  // sysconf: the L2 size (l2_bytes)
#endif

#include "divergence_cpu.h"
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
namespace detail {

using namespace kdplug::math;

// V rounded up to a whole number of packs of W entries (a row's per-entry scratch length).
template <int W>
constexpr int64_t padded(int64_t V) {
  return (V + W - 1) / W * W;
}

// A pack or a Pair of packs of F, for the lambdas of RowView::each_pair: its pack count, half i,
// and loads and stores of F rows.
template <class P>
struct PackN {  // Vectorized<F>
  static constexpr int n = 1;
  static KDPLUG_INLINE P half(P v, int) { return v; }
  static KDPLUG_INLINE void set(P& v, int, P x) { v = x; }
  template <class F>
  static KDPLUG_INLINE P load(const F* p) {
    return P::loadu(p);
  }
  template <class F>
  static KDPLUG_INLINE void store(P v, F* p) {
    v.store(p);
  }
};

template <class V>
struct PackN<Pair<V>> {
  static constexpr int n = 2;
  static KDPLUG_INLINE V half(Pair<V> v, int i) { return i == 0 ? v.lo : v.hi; }
  static KDPLUG_INLINE void set(Pair<V>& v, int i, V x) { (i == 0 ? v.lo : v.hi) = x; }
  template <class F>
  static KDPLUG_INLINE Pair<V> load(const F* p) {
    return {V::loadu(p), V::loadu(p + V::size())};
  }
  template <class F>
  static KDPLUG_INLINE void store(Pair<V> v, F* p) {
    v.lo.store(p);
    v.hi.store(p + V::size());
  }
};

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
#elif defined(CPU_CAPABILITY_AVX2)
    if constexpr (std::is_same_v<scalar_t, float>) {
      _mm256_stream_ps(p, v);
    } else {
      _mm256_stream_pd(p, v);
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
    visit<false>([&](int64_t k, const scalar_t* s_k, const scalar_t* t_k)
                     KDPLUG_LAMBDA_INLINE { fn(k, IO::load(s_k) * it, IO::load(t_k) * it); });
  }
  // the same from the last pack to the first (a pass over a row that the pass before left partly in
  // cache: see the gradient passes)
  template <class Fn>
  KDPLUG_INLINE void each_down(Fn&& fn) const {
    const Vec it(inv_T);
    visit<true>([&](int64_t k, const scalar_t* s_k, const scalar_t* t_k)
                    KDPLUG_LAMBDA_INLINE { fn(k, IO::load(s_k) * it, IO::load(t_k) * it); });
  }
  // fn(k, xs, xt) as each, two packs at a time (xs, xt: Pair<Vec>, k the first's column) while
  // two whole packs remain, then one: the same entries in the same order (see Pair in vec_ops.h).
  // fn takes both kinds (a generic lambda; PackN above).
  template <class Fn>
  KDPLUG_INLINE void each_pair(Fn&& fn) const {
    const Vec it(inv_T);
    int64_t k = 0;
    for (; k + 2 * W <= main_end; k += 2 * W) {
      fn(k, Pair<Vec>(IO::load(s + k) * it, IO::load(s + k + W) * it),
         Pair<Vec>(IO::load(t + k) * it, IO::load(t + k + W) * it));
    }
    for (; k < main_end; k += W) fn(k, IO::load(s + k) * it, IO::load(t + k) * it);
    if (main_end < V) fn(main_end, IO::load(s_tail) * it, IO::load(t_tail) * it);
  }
  // fn(k, xs): the student side only
  template <class Fn>
  KDPLUG_INLINE void each_student(Fn&& fn) const {
    const Vec it(inv_T);
    visit<false>([&](int64_t k, const scalar_t* s_k, const scalar_t*) KDPLUG_LAMBDA_INLINE { fn(k, IO::load(s_k) * it); });
  }

 private:
  template <bool DOWN, class Fn>
  KDPLUG_INLINE void visit(Fn&& fn) const {
    const bool tail = main_end < V;
    if (DOWN && tail) fn(main_end, s_tail, t_tail);
    if (DOWN) {
      for (int64_t k = main_end - W; k >= 0; k -= W) fn(k, s + k, t + k);
    } else {
      for (int64_t k = 0; k < main_end; k += W) fn(k, s + k, t + k);
    }
    if (!DOWN && tail) fn(main_end, s_tail, t_tail);
  }
};

// The row after row n, asked for (software prefetch) while row n's compute-bound pass reads cache:
// fetch(k) at every pack requests the cache lines of both sides holding entries [k, k + W), once
// per line, so that the next row's first pass finds them in cache instead of waiting for memory.
// At most the first kPrefetchBytes of the next row (both sides together) where the current row is
// read again (divergence_fwd_grad; forward_grad_row_logit: only what prefetch_budget leaves):
// fetched further, it evicts the current row's logits and kept exps from L2 before their last pass
// reads them (the one-pass forward, which reads each row once, fetches the whole next row: see
// forward_rows_fused; so does forward_rows' slower pass 3). On the
// Xeon (2 MiB L2), N = 2048 fp32 divergence_fwd_grad, whole next row / its first 512 KiB / none:
// V = 128256  FKL 181 / 167 / 162 ms, symmetric KL 246 / 200 / 177, TAID 194 / 189 / 203,
//             TVD 200 / 186 / 177, gJSD 350 / 347 / 364;
// V = 32000 (N = 8192: the whole next row is 250 KiB)  FKL 110 / - / 159, TAID 140 / - / 195.
// The fetches are prefetcht0 (locality 3): with prefetcht2 (locality 1) divergence_fwd took FKL
// 93 vs 85 ms, RKL 93 vs 85, symmetric KL 101 vs 96, TAID 119 vs 116 (V = 128256; the training
// step's times within noise of each other).
constexpr int64_t kPrefetchBytes = 512 << 10;

// The L2 cache of one core, in bytes, as the C library reads it from cpuid (1 MiB where it does
// not say: this project's EPYC's size, the Xeon's is 2 MiB).
inline int64_t l2_bytes() {
  static const int64_t bytes = [] {
#if defined(_SC_LEVEL2_CACHE_SIZE)
    const long v = sysconf(_SC_LEVEL2_CACHE_SIZE);
    if (v > 0) return static_cast<int64_t>(v);
#endif
    return int64_t(1) << 20;
  }();
  return bytes;
}

// How much of the next row to prefetch (both sides together, bytes) during a row whose passes keep
// `resident` bytes in L2 until its last pass (its logits and kept exps): what is left of L2, at most
// kPrefetchBytes (forward_grad_row_logit). A prefetch into a full L2 evicts the kept exps the
// gradient pass is about to read, and its own lines are evicted before the next row's pass reaches
// them. Xeon (2 MiB L2), fp32 divergence_fwd_grad, 2 threads, N V = 262 M, the first 512 KiB / none
// (FKL keeps 16 V bytes): FKL V = 32000  145-148 / 172-180 ms, V = 65536  141-143 / 172-177,
// V = 98304  160-162 / 162-168, V = 131072  169-171 / 166-170, V = 262144  178-179 / 171-174; RKL
// V = 196608  201-220 / 191-199. (The other kept-exps rows keep their own rules: the arithmetic
// mixture's compute-bound pass 2 gains from the prefetch even into a full L2, see there.)
inline int64_t prefetch_budget(int64_t resident) {
  return std::clamp<int64_t>(l2_bytes() - resident, 0, kPrefetchBytes);
}

template <class scalar_t>
struct NextRow {
  static constexpr int64_t kLine = 64 / sizeof(scalar_t);  // entries per cache line
  const scalar_t* s = nullptr;
  const scalar_t* t = nullptr;
  int64_t end = 0;  // entries [0, end) of each side

  NextRow(const Args<scalar_t>& a, int64_t n, bool enabled, int64_t bytes = kPrefetchBytes) {  // bytes: both sides
    if (enabled) {
      s = a.s + (n + 1) * a.s_stride;
      t = a.t + (n + 1) * a.t_stride;
      end = std::min<int64_t>(a.V, bytes / (2 * static_cast<int64_t>(sizeof(scalar_t))));
    }
  }

  KDPLUG_INLINE void fetch(int64_t k) const {
#if defined(__GNUC__) || defined(__clang__)
    if (k < end && k % kLine == 0) {
      __builtin_prefetch(s + k, 0, 3);
      __builtin_prefetch(t + k, 0, 3);
    }
#endif
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

// The largest (MAX) or smallest lane (NaN lanes are skipped unless the first lane is NaN).
template <bool MAX, class F>
KDPLUG_INLINE F hextreme(Vectorized<F> v) {
  alignas(64) F a[Vectorized<F>::size()];
  v.store(a);
  F m = a[0];
  for (int i = 1; i < Vectorized<F>::size(); ++i) m = (MAX ? a[i] > m : a[i] < m) ? a[i] : m;
  return m;
}

template <class F>
KDPLUG_INLINE F hmax(Vectorized<F> v) {
  return hextreme<true>(v);
}

template <class F>
KDPLUG_INLINE F hmin(Vectorized<F> v) {
  return hextreme<false>(v);
}

template <class F>
KDPLUG_INLINE void init_row(const RecipeDesc& d, const double* params, const double* token_weights, int64_t n,
                            RowConsts<F>* c) {
  row_consts_init(d, params, token_weights ? token_weights + n * d.n_terms : static_cast<const double*>(nullptr), c);
}

// A row that is not masked but has an all -inf, +inf or NaN side: keeps the first such row and
// side (the smallest 2 n + side, deterministic whatever the thread count) for the op to raise on.
inline void report_bad_row(std::atomic<int64_t>* bad_row, int64_t n, bool student_ok) {
  const int64_t code = 2 * n + (student_ok ? 1 : 0);
  int64_t prev = bad_row->load();
  while (code < prev && !bad_row->compare_exchange_weak(prev, code)) {
  }
}

// A row whose passes did not run: masked (loss and statistics 0, never read) or rejected (reported
// with report_bad_row for the op to raise; its STAT_LSE_S NaN tells divergence_fwd_grad's gradient
// pass to skip it). Its gradient row, where there is one (g_row), is zero-filled.
template <class scalar_t, class F>
KDPLUG_INLINE void no_loss_row(F* loss_n, F* st, scalar_t* g_row, int64_t V, bool rejected) {
  *loss_n = F(0);
  for (int j = 0; j < kStats; ++j) st[j] = F(0);
  if (rejected) st[STAT_LSE_S] = std::numeric_limits<F>::quiet_NaN();
  if (g_row != nullptr) std::memset(static_cast<void*>(g_row), 0, sizeof(scalar_t) * V);
}

// A row's loss and statistics (row_stats' layout) once its passes are done.
template <class F>
KDPLUG_INLINE void store_row(F* loss_n, F* st, const RowConsts<F>& c, double total, double H_r, double U) {
  *loss_n = static_cast<F>(total);
  st[STAT_LSE_S] = c.lse_s;
  st[STAT_LSE_T] = c.lse_t;
  st[STAT_LOG_Z] = c.log_z;
  st[STAT_H_R] = static_cast<F>(H_r);
  st[STAT_U] = static_cast<F>(U);
}

// Rows per task: enough entries per task that small rows do not pay one task each.
inline int64_t grain(int64_t V) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1)); }

// ---- specialization on common recipes ----------------------------------------------------------
// The row loops read the recipe's terms from RowConsts at run time (any recipe, a third-party one
// included). For the single-term recipes of the built-in methods they are also instantiated with
// the term fixed at compile time (SIG != 0), which lets the compiler drop the unused element
// kinds and partials: the same code, specialized.
constexpr int sig_of(int div, int lhs, int rhs) { return 1 + div + 4 * (lhs + 3 * rhs); }

// Two-term recipes with their own signature: KL(p||r) + KL(q||r) (the generalized JSD) and
// KL(p||q) + KL(q||p) (symmetric KL, AKL, Jeffreys).
constexpr int SIG_JS = 100;
constexpr int SIG_SYM = 101;

inline int signature(const RecipeDesc& d) {
  if (d.n_terms == 1) return sig_of(d.div[0], d.lhs[0], d.rhs[0]);
  if (d.n_terms == 2 && d.div[0] == KL && d.div[1] == KL && d.lhs[0] == TEACHER && d.lhs[1] == STUDENT) {
    if (d.rhs[0] == ASSISTANT && d.rhs[1] == ASSISTANT) return SIG_JS;
    if (d.rhs[0] == STUDENT && d.rhs[1] == TEACHER) return SIG_SYM;
  }
  return 0;
}

template <int SIG, class F>
KDPLUG_INLINE void pin_terms(RowConsts<F>& c) {
  if constexpr (SIG == SIG_JS || SIG == SIG_SYM) {
    c.n_terms = 2;
    c.div[0] = c.div[1] = KL;
    c.lhs[0] = TEACHER;
    c.lhs[1] = STUDENT;
    c.rhs[0] = SIG == SIG_JS ? ASSISTANT : STUDENT;
    c.rhs[1] = SIG == SIG_JS ? ASSISTANT : TEACHER;
  } else if constexpr (SIG != 0) {
    c.n_terms = 1;
    c.div[0] = (SIG - 1) % 4;
    c.lhs[0] = ((SIG - 1) / 4) % 3;
    c.rhs[0] = (SIG - 1) / 12;
  }
}

// fn(integral_constant<int, SIG>) for the SIG among SIGS equal to sig, else SIG = 0.
template <int... SIGS, class Fn>
void dispatch_sig(int sig, Fn&& fn) {
  const bool done = ((sig == SIGS ? (fn(std::integral_constant<int, SIGS>{}), true) : false) || ...);
  if (!done) fn(std::integral_constant<int, 0>{});
}

// Which dtypes get the specialized instances (the others run every recipe through SIG = 0):
// float and bfloat16, the dtypes training runs in; float64 / float16 are for tests and odd cases.
template <class scalar_t>
constexpr bool kSpecialize = std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, c10::BFloat16>;

// The specialized terms per mixture kind (built-in methods' single-term recipes).
template <bool SPECIALIZE, class Fn>
void dispatch_recipe(const RecipeDesc& d, Fn&& fn) {
  const int sig = SPECIALIZE ? signature(d) : 0;
  switch (d.mix) {
    case MIX_NONE:  // tvd, abkd, fkl, rkl, symmetric_kl, akl (the last four: backward only)
      dispatch_sig<sig_of(TVD, TEACHER, STUDENT), sig_of(AB, TEACHER, STUDENT), sig_of(KL, TEACHER, STUDENT),
                   sig_of(KL, STUDENT, TEACHER), sig_of(CE, TEACHER, STUDENT), SIG_SYM>(
          sig, [&](auto s) { fn(std::integral_constant<int, MIX_NONE>{}, s); });
      break;
    case MIX_GEOMETRIC:  // taid (value ce / kl), amid alpha >= 1
      dispatch_sig<sig_of(CE, ASSISTANT, STUDENT), sig_of(KL, ASSISTANT, STUDENT), sig_of(AB, TEACHER, ASSISTANT),
                   sig_of(KL, TEACHER, ASSISTANT)>(
          sig, [&](auto s) { fn(std::integral_constant<int, MIX_GEOMETRIC>{}, s); });
      break;
    case MIX_ARITHMETIC:  // skl, srkl, distillm2, gjsd, amid alpha = -1
      dispatch_sig<sig_of(KL, TEACHER, ASSISTANT), sig_of(KL, STUDENT, ASSISTANT), SIG_JS,
                   sig_of(AB, TEACHER, ASSISTANT)>(
          sig, [&](auto s) { fn(std::integral_constant<int, MIX_ARITHMETIC>{}, s); });
      break;
    default:  // amid
      dispatch_sig<sig_of(AB, TEACHER, ASSISTANT), sig_of(KL, TEACHER, ASSISTANT)>(
          sig, [&](auto s) { fn(std::integral_constant<int, MIX_ALPHA>{}, s); });
      break;
  }
}

// ---- the arithmetic mixture in probability space -------------------------------------------------
// For r = lam p + (1 - lam) q (Z = 1) and KL terms with r on the right (skl and distillm2's
// teacher side: KL(p||r); srkl and its student side: KL(q||r); gjsd: both), the formulas of
// kdplug_math.h simplify once P = e^lp and Q = e^lq are at hand: R = lam P + (1 - lam) Q,
// log r = log R, w = (1 - lam) Q / R and w r = (1 - lam) Q, so
//   u = h^q + (1 - lam) Q (h^r / R - H^r)            (0 / 0 at R = 0 is 0: there w = 0)
// which is 2 exps, a division and (when the value or h^q needs log r) a log per entry, instead of
// 4-5 exps and a log1p. Exact in real arithmetic; in floating point it needs P and Q to be normal
// numbers, so a pack with a log-probability in (-inf, -85) takes the general formulas instead.
template <int SIG>
constexpr bool kArithKL =
    SIG == sig_of(KL, TEACHER, ASSISTANT) || SIG == sig_of(KL, STUDENT, ASSISTANT) || SIG == SIG_JS;

template <class Vec>
KDPLUG_INLINE bool arith_in_range(Vec lp, Vec lq) {
  using O = Ops<Vec>;
  using F = typename O::Scalar;
  const Vec lo(F(-85)), ninf(neg_inf<F>());
  return O::all(O::land(O::lor(O::ge(lp, lo), O::eq(lp, ninf)), O::lor(O::ge(lq, lo), O::eq(lq, ninf))));
}

template <class Vec>
struct ArithKL {
  Vec e[2], h_q, h_r, Q, inv_R;
};

// The terms (pinned by SIG) at one pack, given P = e^lp and Q = e^lq: their elements, h^q, h^r, Q
// and 1/R (0 where R = 0).
template <int SIG, bool NEED_E, class Vec, class F>
KDPLUG_INLINE ArithKL<Vec> arith_kl_of(const RowConsts<F>& c, Vec lp, Vec lq, Vec P, Vec Q,
                                       typename Ops<Vec>::Mask keep) {
  using O = Ops<Vec>;
  constexpr bool HAS_P = SIG != sig_of(KL, STUDENT, ASSISTANT);  // a KL(p||r) term
  constexpr bool HAS_Q = SIG != sig_of(KL, TEACHER, ASSISTANT);  // a KL(q||r) term
  constexpr int IQ = HAS_P ? 1 : 0;                              // its index
  const Vec zero(F(0));
  const Vec R = Vec(c.lam) * P + Vec(F(1) - c.lam) * Q;
  const auto R0 = O::eq(R, zero);
  ArithKL<Vec> out;
  out.Q = Q;
  out.inv_R = O::select(R0, zero, Vec(F(1)) / O::select(R0, Vec(F(1)), R));
  out.e[0] = out.e[1] = out.h_q = out.h_r = zero;
  Vec lr = zero;
  if (NEED_E || HAS_Q) lr = O::log(R);
  if (HAS_P) {
    if (NEED_E) out.e[0] = O::select(keep, mul0(P, lp - lr), zero);
    out.h_r = Vec(c.coef[0]) * O::select(keep, O::neg(P), zero);
  }
  if (HAS_Q) {
    const Vec diff = lq - lr;
    if (NEED_E) out.e[IQ] = O::select(keep, mul0(Q, diff), zero);
    out.h_q = Vec(c.coef[IQ]) * O::select(keep, finite_or_0(mul0(Q, diff + Vec(F(1)))), zero);
    out.h_r = out.h_r + Vec(c.coef[IQ]) * O::select(keep, O::neg(Q), zero);
  }
  return out;
}

template <int SIG, bool NEED_E, class Vec, class F>
KDPLUG_INLINE ArithKL<Vec> arith_kl_at(const RowConsts<F>& c, Vec lp, Vec lq, typename Ops<Vec>::Mask keep) {
  return arith_kl_of<SIG, NEED_E>(c, lp, lq, Ops<Vec>::exp(lp), Ops<Vec>::exp(lq), keep);
}

// ---- kept exps ---------------------------------------------------------------------------------
// The kept exps of a row (KeptLse below) and the factors that make them probabilities. Segment j
// covers entries [start[j], start[j + 1]); its exps of operand X were taken relative to the
// reference maximum ref[X][j], and the pass turns those into the scales
//   scale[X][j] = exp(ref[X][j] - lse_X)        (double, then F; 0 where lse_X = -inf)
// so that P = w_t scale[TEACHER][j], Q = w_s scale[STUDENT][j] (and r = w_g scale[ASSISTANT][j]).
// NB: exp(ref - lse) with lse the rounded F the log-probabilities x - lse are taken from (not
// exp(ref - M) / Z): then P and lp = x - lse agree to an entry's own rounding. 1 / Z is off from
// exp(M - lse) by lse's rounding (~1e-6 at |lse| ~ 20 in float32) in the same direction at every
// entry, and a loss such as sum P (lp - log R) (gJSD, SKL) took that offset whole: 1e-3 of a
// small row's value.
template <class F>
struct KeptScales {
  std::vector<int64_t> start;
  std::vector<F> scale[3];  // the reference maxima until the pass is done

  void reset(int nx) {
    start.assign(1, 0);
    for (int x = 0; x < 3; ++x) scale[x].assign(x < nx ? 1 : 0, std::numeric_limits<F>::lowest());
  }
  // the references m[0 .. nx) from entry k on (the pass calls it where one of them moved)
  void moved(int64_t k, const F* m, int nx) {
    if (start.back() != k) {
      start.push_back(k);
      for (int x = 0; x < nx; ++x) scale[x].push_back(F(0));
    }
    for (int x = 0; x < nx; ++x) scale[x].back() = m[x];
  }
  void finish(const F* lse, int nx) {
    for (int x = 0; x < nx; ++x)
      for (F& r : scale[x])
        r = lse[x] == neg_inf<F>() ? F(0)
                                   : static_cast<F>(std::exp(static_cast<double>(r) - static_cast<double>(lse[x])));
  }
};

// The scales of the segment holding entry k, for a pass that visits k in increasing order (seek)
// or, started with `down`, in decreasing order (seek_down).
template <class F>
struct ScaleCursor {
  using Vec = Vectorized<F>;
  const KeptScales<F>& ks;
  size_t j = 0;
  int64_t lo = 0, next = 0;  // segment j: entries [lo, next)
  Vec f[3];  // P = w_t f[TEACHER], Q = w_s f[STUDENT], r = w_g f[ASSISTANT]

  explicit ScaleCursor(const KeptScales<F>& ks_, bool down = false) : ks(ks_) {
    load(down ? ks.start.size() - 1 : 0);
  }
  KDPLUG_INLINE void seek(int64_t k) {
    while (C10_UNLIKELY(k >= next)) load(j + 1);
  }
  KDPLUG_INLINE void seek_down(int64_t k) {
    while (C10_UNLIKELY(k < lo)) load(j - 1);
  }
  void load(size_t i) {
    j = i;
    for (int x = 0; x < 3; ++x) f[x] = Vec(ks.scale[x].empty() ? F(0) : ks.scale[x][j]);
    lo = ks.start[j];
    next = j + 1 < ks.start.size() ? ks.start[j + 1] : std::numeric_limits<int64_t>::max();
  }
};

// (forward_rows' elements without the alpha-mixture read no kept scales)
struct NoCursor {
  template <class KS>
  explicit NoCursor(const KS&) {}
};

// The log-sum-exps of NX operands whose exps a pass keeps (row_exps, forward_rows' alpha-mixture
// pass, forward_grad_row_logit's pass B), and the segments of KeptScales that make those exps
// probabilities. m[x] is operand x's running maximum (over all lanes): where a pack holds a larger
// entry, m moves to it, what was summed relative to it is rescaled by exp(old - new), and a new
// segment of scales begins. Each exp is final when it is taken, so the maxima need no pass of their
// own before it (the pass that reads the rows from memory also takes the exps), and an entry near
// the row's maximum is taken relative to it or to a value close to it, as exactly as against the
// maximum itself. A row in random order has ~ln(V / W) segments per operand; an ascending one, one
// per pack (a scalar exp more a pack and operand). The start is the lowest finite value: a -inf
// entry's exp is 0, never exp(-inf + inf). Per pack k: see(k, x) then exp(j, x[j]) for each
// operand, then end_pack(); lse_X = m + log Z, -inf where Z = 0 (NaN or +inf entries make it
// non-finite, for the caller to reject the row).
template <class F, int NX>
struct KeptLse {
  using Vec = Vectorized<F>;
  using O = Ops<Vec>;
  F m[NX];
  Vec mv[NX];         // m, broadcast
  Vec z[NX], zt[NX];  // Z: the sums of this run of 64 packs and of the runs before (cascade)
  int packs = 0;

  void reset(KeptScales<F>* ks) {
    for (int x = 0; x < NX; ++x) {
      m[x] = std::numeric_limits<F>::lowest();
      mv[x] = Vec(m[x]);
      z[x] = zt[x] = Vec(F(0));
    }
    packs = 0;
    ks->reset(NX);
  }
  // Pack k's values x[0 .. NX), before their exps: rescale(j, f) multiplies what was summed
  // relative to m[j] by f (Z, and whatever the caller sums alongside it) where m[j] moves.
  template <class Rescale>
  KDPLUG_INLINE void see(int64_t k, const Vec* x, KeptScales<F>* ks, Rescale&& rescale) {
    bool up = O::any(O::gt(x[0], mv[0]));
    for (int j = 1; j < NX; ++j) up = up || O::any(O::gt(x[j], mv[j]));
    if (C10_LIKELY(!up)) return;
    for (int j = 0; j < NX; ++j) {
      if (!O::any(O::gt(x[j], mv[j]))) continue;
      const F m2 = hmax<F>(x[j]);
      rescale(j, Vec(std::exp(m[j] - m2)));
      m[j] = m2;
      mv[j] = Vec(m2);
    }
    ks->moved(k, m, NX);
  }
  KDPLUG_INLINE void see(int64_t k, const Vec* x, KeptScales<F>* ks) {
    see(k, x, ks, [this](int j, Vec f) KDPLUG_LAMBDA_INLINE { rescale(j, f); });
  }
  KDPLUG_INLINE void rescale(int j, Vec f) {
    z[j] = z[j] * f;
    zt[j] = zt[j] * f;
  }
  KDPLUG_INLINE Vec exp(int j, Vec x) {
    const Vec e = O::exp(x - mv[j]);
    z[j] = z[j] + e;
    return e;
  }
  // every 64 packs z is folded into zt; returns whether it was (for the caller's own sums)
  KDPLUG_INLINE bool end_pack() {
    if (++packs < 64) return false;
    for (int x = 0; x < NX; ++x) {
      zt[x] = zt[x] + z[x];
      z[x] = Vec(F(0));
    }
    packs = 0;
    return true;
  }
  double sum(int x) const { return hsum(zt[x] + z[x]); }
  F lse(int x) const {
    const double Z = sum(x);
    return Z == 0.0 ? neg_inf<F>() : static_cast<F>(static_cast<double>(m[x]) + std::log(Z));
  }
};

// ---- forward -----------------------------------------------------------------------------------
// KEEP (divergence_fwd_grad, one row): pass 3 also stores each entry's v = h^q + w h^r and (with a
// mixture) w r in kept[0 .. V) and kept[Vp .. Vp + V) (Vp = V rounded up to the pack size), so
// that the gradient pass needs neither the elements nor the mixture again (see
// forward_backward_rows).
template <class scalar_t, int MIX, int SIG, bool KEEP = false>
void forward_rows(const Args<scalar_t>& a, compute_t<scalar_t>* loss, compute_t<scalar_t>* stats, int64_t begin,
                  int64_t end, std::atomic<int64_t>* bad_row, compute_t<scalar_t>* kept = nullptr,
                  int64_t prefetch_end = 0) {
  using F = compute_t<scalar_t>;
  using Vec = Vectorized<F>;
  constexpr int W = Vec::size();
  // (divergence_fwd and _fwd_grad give those terms forward_grad_row_arith's kept exps instead)
  static_assert(!(MIX == MIX_ARITHMETIC && kArithKL<SIG>), "the arithmetic KL terms keep their exps");
  for (int64_t n = begin; n < end; ++n) {
    F* st_out = stats + n * kStats;
    if (!a.row_mask[n * a.mask_stride]) {
      no_loss_row(loss + n, st_out, static_cast<scalar_t*>(nullptr), a.V, /*rejected=*/false);
      continue;
    }
    RowConsts<F> c;
    init_row(a.desc, a.params, a.token_weights, n, &c);
    pin_terms<SIG>(c);
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
      report_bad_row(bad_row, n, std::isfinite(c.lse_s));
      no_loss_row(loss + n, st_out, static_cast<scalar_t*>(nullptr), a.V, /*rejected=*/true);
      continue;
    }
    if constexpr (MIX == MIX_GEOMETRIC) c.log_z = lg.value();

    // pass 2: the alpha-mixture's normalizer Z. Each entry's log r~ (alpha_mix: 2-4
    // transcendentals), its mixture weight w (alpha_mix's, from the same expm1: a division instead
    // of mixture_weight's exp) and the exp of Z's sum, r~ / e^m (m: the running maximum of log r~,
    // in KeptLse's segments of scales, so that pass 3 reads r = that exp times its segment's
    // scale instead of computing exp(log r)), are kept in three rows of scratch for
    // pass 3: lr_tilde, r_kept and w_kept (ks_r: r's scales, its one operand at index 0). KEEP: in
    // kept, whose first two rows pass 3 overwrites with v and w r after reading them. Saves 2 exps
    // of ~11 an entry for 2 more streams through L2 / L3; AMiD, EPYC (Zen 5), fp32, V = 128256,
    // in-process, before / after: 1 thread, N = 256, divergence_fwd 116-132 / 108-121 ms,
    // divergence_fwd_grad 128-140 / 116-125; 2 threads, N = 2048, 494-535 / 482-498, 526-599 / 511-550
    const int64_t Vp = padded<Vec::size()>(a.V);
    F *lr_tilde = nullptr, *r_kept = nullptr, *w_kept = nullptr;
    thread_local KeptScales<F> ks_r;
    if constexpr (MIX == MIX_ALPHA) {
      F* rows = kept;
      if constexpr (!KEEP) {
        thread_local std::vector<F> scratch;
        if (static_cast<int64_t>(scratch.size()) < 3 * Vp) scratch.resize(static_cast<size_t>(3 * Vp));
        rows = scratch.data();
      }
      lr_tilde = rows;
      r_kept = rows + Vp;
      w_kept = rows + 2 * Vp;
      KeptLse<F, 1> ls;
      ls.reset(&ks_r);
      row.each_pair([&](int64_t k, auto xs, auto xt) KDPLUG_LAMBDA_INLINE {
        using P = decltype(xs);
        using N = PackN<P>;
        P w;
        const P l = alpha_mix(xt - P(c.lse_t), xs - P(c.lse_s), c.lam, c.log_lam, c.log_1m_lam, c.a, c.inv_a, &w);
        N::store(l, lr_tilde + k);
        N::store(w, w_kept + k);
        for (int i = 0; i < N::n; ++i) {
          const Vec l_i = N::half(l, i);
          ls.see(k + i * W, &l_i, &ks_r);
          ls.exp(0, l_i).store(r_kept + k + i * W);
          ls.end_pack();
        }
      });
      c.log_z = ls.lse(0);
      ks_r.finish(&c.log_z, 1);
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
    // (the elements' pass is compute-bound: it asks for the next row of the chunk meanwhile, all of
    // it: its ~5-10 transcendentals an entry leave the time, and the lines evicted are mostly ones
    // pass 3 is done with. Xeon, N = 2048, V = 128256 fp32, kPrefetchBytes / whole row:
    // divergence_fwd ABKD 236 / 210 ms, AMiD 545-549 / 520-525; divergence_fwd_grad ABKD 267-273 /
    // 265-269, AMiD 615-623 / 608-612)
    const NextRow<scalar_t> next(a, n, n + 1 < std::max(end, prefetch_end), std::numeric_limits<int64_t>::max());
    std::conditional_t<MIX == MIX_ALPHA, ScaleCursor<F>, NoCursor> f_r(ks_r);
    // Two packs at a time (each_pair): their sums start from 0 and are added into e_acc and acc
    // half by half, in the order and at the 64-pack folds of one pack at a time (0 + x is x), so
    // the sums keep their bits.
    row.each_pair([&](int64_t k, auto xs, auto xt) KDPLUG_LAMBDA_INLINE {
      using P = decltype(xs);
      using N = PackN<P>;
      for (int i = 0; i < N::n; ++i) next.fetch(k + i * W);
      const P zero(0);
      P e_k[kMaxTerms];
      for (int i = 0; i < c.n_terms; ++i) e_k[i] = zero;
      StatAcc<P> acc_k{zero, zero, zero, zero};
      MixTerms<P> mt;
      H<P> h;
      if constexpr (MIX == MIX_ALPHA) {
        P r;
        for (int i = 0; i < N::n; ++i) {
          f_r.seek(k + i * W);
          N::set(r, i, Vec::loadu(r_kept + k + i * W) * f_r.f[0]);  // (the halves' segments may differ)
        }
        const Logs<P> L = logs_at_alpha(c, xs, xt, N::load(lr_tilde + k), N::load(w_kept + k));
        h = terms_at<true>(c, L, keep_at(c, xs, xt), e_k);
        mt = stats_at(c, h, L.w, r, &acc_k);
      } else {
        const Logs<P> L = logs_at<MIX>(c, xs, xt);
        h = terms_at<true>(c, L, keep_at(c, xs, xt), e_k);
        mt = stats_at(c, L, h, &acc_k);
      }
      if constexpr (KEEP) {
        N::store(h.q + mt.w_h_r, kept + k);
        if constexpr (MIX != MIX_NONE) N::store(mt.w_r, kept + Vp + k);  // (0 without a mixture)
      }
      for (int j = 0; j < N::n; ++j) {
        for (int i = 0; i < c.n_terms; ++i) e_acc[i] = e_acc[i] + N::half(e_k[i], j);
        acc.h_q = acc.h_q + N::half(acc_k.h_q, j);
        acc.h_r = acc.h_r + N::half(acc_k.h_r, j);
        acc.w_h_r = acc.w_h_r + N::half(acc_k.w_h_r, j);
        acc.w_r = acc.w_r + N::half(acc_k.w_r, j);
        if (++packs == 64) fold();
      }
    });
    fold();
    double total = 0;
    for (int i = 0; i < c.n_terms; ++i)
      if (c.coef[i] != F(0)) total += static_cast<double>(c.coef[i]) * e_tot[i];  // mul0(coef, sum)
    store_row(loss + n, st_out, c, total, h_r, h_q + w_h_r - h_r * w_r);
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
// KDPLUG_NO_FUSED=1 sends every recipe through the multi-pass forwards (forward_grad_row_nomix
// without a mixture, forward_rows with one; the tests compare them with this one).
inline bool fused_eligible(const RecipeDesc& d) {
  if (!(d.mix == MIX_NONE || (d.mix == MIX_GEOMETRIC && d.detach))) return false;
  if (d.n_terms > 2) return false;
  for (int i = 0; i < d.n_terms; ++i)
    if (d.div[i] != KL && d.div[i] != CE) return false;
  return !std::getenv("KDPLUG_NO_FUSED");
}

template <class F>
struct LaneSums {  // one term's per-lane sums, relative to the running max of its lhs
  Vectorized<F> f, s, tq;
};

// One pack's contribution to each term's lane sums (x, w: each operand's values and weights,
// w relative to the operand's maximum). The zero rules as masks: entries with a = -inf add nothing
// (w = 0); an entry with a finite and b = -inf is the support mismatch (the term is +inf; the
// entry is left out of every sum); "exclude" drops entries where s or t is -inf (keep).
template <int NT, class F, class Mask>
KDPLUG_INLINE void add_term_sums(const int* lhs, const int* rhs, const bool* kl, const Vectorized<F>* x,
                                 const Vectorized<F>* w, Mask keep, LaneSums<F>* cur, bool* mismatch) {
  using Vec = Vectorized<F>;
  using O = Ops<Vec>;
  const Vec zero(F(0)), ninf(neg_inf<F>());
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
}

// Every 64 packs: the running sums folded into the totals (cascade summation, as VecLse).
template <int NT, int NX, class F>
KDPLUG_INLINE void fold_sums(Vectorized<F>* z, Vectorized<F>* zt, LaneSums<F>* cur, LaneSums<F>* tot) {
  const Vectorized<F> zero(F(0));
  for (int j = 0; j < NX; ++j) {
    zt[j] = zt[j] + z[j];
    z[j] = zero;
  }
  for (int i = 0; i < NT; ++i) {
    tot[i] = LaneSums<F>{tot[i].f + cur[i].f, tot[i].s + cur[i].s, tot[i].tq + cur[i].tq};
    cur[i] = LaneSums<F>{zero, zero, zero};
  }
}

// Operand x's maximum moved: what was summed relative to it (its normalizer and the sums of the
// terms with x on the left) times f = exp(old - new).
template <int NT, class F>
KDPLUG_INLINE void rescale_operand(int x, Vectorized<F> f, Vectorized<F>* z, Vectorized<F>* zt, const int* lhs,
                                   LaneSums<F>* cur, LaneSums<F>* tot) {
  z[x] = z[x] * f;
  zt[x] = zt[x] * f;
  for (int i = 0; i < NT; ++i)
    if (lhs[i] == x) {
      cur[i] = LaneSums<F>{cur[i].f * f, cur[i].s * f, cur[i].tq * f};
      tot[i] = LaneSums<F>{tot[i].f * f, tot[i].s * f, tot[i].tq * f};
    }
}

// A term's sums over the row, relative to its lhs's maximum: f = sum w (a - b) (KL) or sum w b
// (CE) over the live entries, s = sum w over the live entries, tq = sum w over the kept entries
// (read where rhs = q); mismatch: some entry has a > -inf = b.
struct LogitTermSums {
  double f, s, tq;
  bool mismatch;
};

// The row's loss and U from its terms' sums, the operands' normalizers Z (relative to the same
// maxima as the sums) and log-sum-exps (the formulas above).
template <int NT, class F>
KDPLUG_INLINE void logit_row_loss(const RowConsts<F>& c, const int* lhs, const int* rhs, const bool* kl,
                                  const LogitTermSums* sums, const double* Z, const F* lse, double* total,
                                  double* U) {
  *total = *U = 0;
  for (int i = 0; i < NT; ++i) {
    const int A = lhs[i];
    const double coef = c.coef[i];
    if (Z[A] == 0.0 || coef == 0.0) continue;  // an operand that is 0 everywhere: e = 0
    const double Fi = sums[i].f / Z[A], Si = sums[i].s / Z[A], Ti = sums[i].tq / Z[A];
    const double lse_b = lse[rhs[i]];
    // (Si == 0: no entry where both sides are positive; then Fi == 0 too and lse_b may be -inf)
    const double finite_sum =
        Si == 0.0 ? 0.0 : kl[i] ? Fi - (static_cast<double>(lse[A]) - lse_b) * Si : -Fi + lse_b * Si;
    *total += coef * (sums[i].mismatch ? std::numeric_limits<double>::infinity() : finite_sum);
    if (A == STUDENT) *U += coef * (finite_sum + Si);
    if (rhs[i] == STUDENT) *U -= coef * Ti;
  }
}

// NB: the one-pass loss subtracts log-sum-exps (lse_A - lse_B) from a weighted mean of logit
// differences: fine while |lse| is moderate, but at |x / T| ~ 1e5 (T = 0.05, logits of 1e4) the
// cancellation costs ~eps |lse| absolute (a KL of 0.05 came out as 0.054, an RKL negative). Rows
// whose |lse| exceeds kFusedLseLimit are flagged in `redo` and recomputed by the 2-pass forward.
template <class F>
constexpr F kFusedLseLimit = sizeof(F) == 4 ? F(64) : F(1 << 20);

template <class scalar_t, bool GEO, int NT>
void forward_rows_fused(const Args<scalar_t>& a, compute_t<scalar_t>* loss, compute_t<scalar_t>* stats,
                        int64_t begin, int64_t end, std::atomic<int64_t>* bad_row, uint8_t* redo) {
  using F = compute_t<scalar_t>;
  using Vec = Vectorized<F>;
  using O = Ops<Vec>;
  constexpr int W = Vec::size();
  constexpr int NX = GEO ? 3 : 2;  // operand slots: TEACHER (t), STUDENT (s), ASSISTANT (g)
  const Vec zero(F(0)), ninf(neg_inf<F>());
  for (int64_t n = begin; n < end; ++n) {
    F* st_out = stats + n * kStats;
    if (!a.row_mask[n * a.mask_stride]) {
      no_loss_row(loss + n, st_out, static_cast<scalar_t*>(nullptr), a.V, /*rejected=*/false);
      continue;
    }
    RowConsts<F> c;
    init_row(a.desc, a.params, a.token_weights, n, &c);
    const RowView<scalar_t> row(a.s + n * a.s_stride, a.t + n * a.t_stride, a.V, c.inv_T);
    // NB: the whole next row (not kPrefetchBytes): this pass reads the current row once, front to
    // back, and keeps nothing, so the lines the fetches evict are ones it has finished with. Xeon,
    // N = 2048, V = 128256 fp32 divergence_fwd, no prefetch / 512 KiB / whole row: FKL 113 / 109 / 96
    // ms, RKL 113 / 110 / 96, symmetric KL 117 / 114 / 101, TAID 138 / 133 / 118; at N = 1002,
    // V = 262144 (a row pair is the whole 2 MiB L2), 512 KiB / whole: FKL 116 / 103, TAID 138 / 116.
    const NextRow<scalar_t> next(a, n, n + 1 < end, std::numeric_limits<int64_t>::max());
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
    // NB: the teacher's log-sum-exp is computed even where no term uses p (TAID: r comes from the
    // logits, lr = g - LSE(g)): row_stats always holds both LSEs, which the per-token log-ratio
    // at sampled ids reads (KDLoss(..., log_ratio_at=)), for one exp per entry.
    row.each([&](int64_t k0, Vec xs, Vec xt) KDPLUG_LAMBDA_INLINE {
      next.fetch(k0);
      Vec x[NX], w[NX];
      x[TEACHER] = xt;
      x[STUDENT] = xs;
      if constexpr (GEO) x[ASSISTANT] = geometric_mix(xt, xs, c.lam);
      for (int k = 0; k < NX; ++k) {
        if (C10_UNLIKELY(O::any(O::gt(x[k], m[k])))) {
          const Vec m2 = O::max(m[k], x[k]);
          rescale_operand<NT>(k, O::exp(m[k] - m2), z, zt, lhs, cur, tot);
          m[k] = m2;
        }
        w[k] = O::exp(x[k] - m[k]);
        z[k] = z[k] + w[k];
      }
      add_term_sums<NT>(lhs, rhs, kl, x, w, keep_at(c, xs, xt), cur, mismatch);
      if (++packs == 64) {
        fold_sums<NT, NX>(z, zt, cur, tot);
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
      report_bad_row(bad_row, n, std::isfinite(c.lse_s));
      no_loss_row(loss + n, st_out, static_cast<scalar_t*>(nullptr), a.V, /*rejected=*/true);
      continue;
    }
    if constexpr (GEO) c.log_z = lse[ASSISTANT];
    {
      bool large = std::abs(c.lse_s) > kFusedLseLimit<F> || std::abs(c.lse_t) > kFusedLseLimit<F>;
      if constexpr (GEO) large = large || std::abs(c.log_z) > kFusedLseLimit<F>;
      if (large) {
        redo[n] = 1;
        continue;
      }
    }
    LogitTermSums sums[NT];
    for (int i = 0; i < NT; ++i) {
      const int A = lhs[i];
      alignas(64) F fs[W], ss[W], ts[W];
      (tot[i].f + cur[i].f).store(fs);
      (tot[i].s + cur[i].s).store(ss);
      (tot[i].tq + cur[i].tq).store(ts);
      sums[i] = LogitTermSums{0, 0, 0, mismatch[i]};
      for (int l = 0; l < W; ++l) {
        sums[i].f += fs[l] * scale[A][l];
        sums[i].s += ss[l] * scale[A][l];
        sums[i].tq += ts[l] * scale[A][l];
      }
    }
    double total, U;
    logit_row_loss<NT>(c, lhs, rhs, kl, sums, Z, lse, &total, &U);
    store_row(loss + n, st_out, c, total, 0.0, U);
  }
}

// ---- storing the gradient ----------------------------------------------------------------------
// Entries [k, k + W) of a gradient row g of length V (aligned: g sits on a pack boundary), with
// non-temporal stores where possible; store_fence() once the rows are written.
template <class scalar_t>
KDPLUG_INLINE void store_grad_pack(scalar_t* g, int64_t k, int64_t V, bool aligned,
                                   Vectorized<compute_t<scalar_t>> gk) {
  using IO = PackIO<scalar_t>;
  constexpr int W = Vectorized<compute_t<scalar_t>>::size();
  if (k + W <= V) {
    if (aligned) {
      IO::stream(g + k, gk);
    } else {
      IO::store(g + k, gk);
    }
  } else {
    alignas(64) scalar_t tail[W];
    IO::store(tail, gk);
    std::memcpy(static_cast<void*>(g + k), tail, sizeof(scalar_t) * (V - k));
  }
}

inline void store_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();  // order the non-temporal stores before the results are handed over
#endif
}

// ---- forward and gradient of a logit-space row: each exp once -----------------------------------
// divergence_fwd_grad for the recipes of forward_rows_fused. Their gradient needs the operands'
// probabilities, and the forward computes the same exps, so they are kept:
//   pass B  (the one read of the rows from memory) w_X,k = exp(x_X,k - m_X) for each operand X
//           (t/T, s/T, and g for TAID), m_X its running maximum (KeptLse: a new segment of
//           scales where it moves, the sums so far rescaled), Z_X = sum_k w_X,k,
//           lse_X = m_X + log Z_X, and the terms' sums of forward_rows_fused; w of q, and of the
//           lhs A of every term whose rhs is q, kept in a per-thread scratch row
//   pass C  Q = w_q scale_q, P_A = w_A scale_A (KeptScales) and
//             u = sum_{rhs = q} coef (-P_A)                  (dQ of KL and CE; kept entries)
//               + sum_{lhs = q} coef Q (lq - lB + 1)         (dP of KL; finite, kept entries)
//             grad = scale (u - Q U),  0 where s = -inf
//           (lq - lB from the logits, read again only when some term's lhs is q: rkl, symmetric KL,
//           AKL; past L2 from d = s/T - t/T, kept in pass B: see keep_d)
// One exp per operand and entry in all, where the one-pass forward and the backward's pass make
// two: fkl, rkl, symmetric KL, AKL 4 -> 2 exps per entry, TAID 5 -> 3. P = w scale rounds
// differently from the backward's exp(x - lse): the gradient agrees with divergence_bwd's to a
// few ulp, not bit for bit (a second backward recomputes with this op, see kdplug/_ops.py).
//
// A row with no -inf entry (most rows of a training batch) takes CLEAN passes, for the built-in
// recipes (SIG != 0): every entry is live and kept and none is a support mismatch, so the masks go
// and each term's s and tq are Z_A itself (the masked sums add the same w in the same order: the
// same bits). Pass B cannot know before it reads the row: it takes the kind the thread's previous
// row needed and reads a row again with the masks where the guess was wrong. The last pack's -inf
// padding always takes the masked code.
// (Before, a pass of its own found the maxima first: Xeon, N = 2048, V = 128256 fp32, in-process,
// that build / this one: FKL 166-171 / 149-152 ms, RKL 167-172 / 162-170, symmetric KL 212-213 /
// 207-210, TAID 196-201 / 161-167.)
// Returns false, having written nothing, for a row whose |lse| exceeds kFusedLseLimit (the
// caller recomputes it with the 2-pass forward and divergence_bwd's pass).
template <class scalar_t, bool GEO, int NT, int SIG>
bool forward_grad_row_logit(const Args<scalar_t>& a, int64_t n, const compute_t<scalar_t>* grad_scale,
                            compute_t<scalar_t>* loss, compute_t<scalar_t>* stats, scalar_t* grad,
                            std::atomic<int64_t>* bad_row, std::vector<compute_t<scalar_t>>& kept,
                            bool prefetch_next) {
  using F = compute_t<scalar_t>;
  using Vec = Vectorized<F>;
  using O = Ops<Vec>;
  constexpr int W = Vec::size();
  constexpr int NX = GEO ? 3 : 2;  // operand slots: TEACHER (t), STUDENT (s), ASSISTANT (g)
  const Vec zero(F(0)), ninf(neg_inf<F>());
  F* st_out = stats + n * kStats;
  scalar_t* g_row = grad + n * a.V;
  if (!a.row_mask[n * a.mask_stride]) {
    no_loss_row(loss + n, st_out, g_row, a.V, /*rejected=*/false);
    return true;
  }
  RowConsts<F> c;
  init_row(a.desc, a.params, a.token_weights, n, &c);
  // the built-in recipes' terms as constants: the operand arrays below are then indexed at compile
  // time and stay in registers (symmetric KL 890 -> 566 ms, TAID 715 -> 602 ms on AVX2)
  pin_terms<SIG>(c);
  const F scale = grad_scale[n] / c.T;
  const RowView<scalar_t> row(a.s + n * a.s_stride, a.t + n * a.t_stride, a.V, c.inv_T);
  int lhs[NT], rhs[NT];
  bool kl[NT];
  for (int i = 0; i < NT; ++i) {
    lhs[i] = c.lhs[i];
    rhs[i] = c.rhs[i];
    kl[i] = c.div[i] == KL;
  }
  // kept rows: slot 0 holds w_q; slot j > 0 the w of operand kept_of[j] (an lhs of a term on q)
  int slot_of[NX] = {};  // operand -> its slot (0: not kept unless it is q)
  int kept_of[NX] = {STUDENT};
  int n_kept = 1;
  bool q_lhs = false;  // some term has q on its left: pass C reads the logits, or the kept d
  bool keep_d = !c.exclude;  // (below)
  for (int i = 0; i < NT; ++i) {
    if (c.coef[i] == F(0)) continue;
    if (lhs[i] == STUDENT) {
      q_lhs = true;
      keep_d = keep_d && kl[i] && rhs[i] == TEACHER;
    }
    if (rhs[i] == STUDENT && lhs[i] != STUDENT && slot_of[lhs[i]] == 0) {
      slot_of[lhs[i]] = n_kept;
      kept_of[n_kept++] = lhs[i];
    }
  }
  const int64_t Vp = padded<W>(a.V);
  const int64_t logit_bytes = 2 * a.V * static_cast<int64_t>(sizeof(scalar_t));
  // d = s/T - t/T kept in a row of its own, for pass C's log-ratio lq - lp of KL(q||p) (every term
  // with q on its left, nothing excluded), where the row's logits and kept exps outgrow L2: pass C
  // then reads d where it would read the logits, and a clean row's pass C reads no logits at all.
  // Written in pass B its lines are dirty, so L2 evicts them to L3; the logits pass B read come
  // back from memory. Xeon (2 MiB L2), fp32 divergence_fwd_grad, 2 threads, N = 1000, V = 262144,
  // kept d / logits: RKL 178-184 / 201-214 ms, symmetric KL 210-214 / 236-241, AKL 209-213 /
  // 236-242; where the row fits L2 (V = 32000) d cost symmetric KL 197-202 against 179-185 ms.
  keep_d = keep_d && q_lhs && logit_bytes + n_kept * Vp * static_cast<int64_t>(sizeof(F)) > l2_bytes();
  const int64_t kept_rows = n_kept + (keep_d ? 1 : 0);
  if (static_cast<int64_t>(kept.size()) < kept_rows * Vp) kept.resize(static_cast<size_t>(kept_rows * Vp));
  F* kept_w = kept.data();
  F* kept_d = kept_w + n_kept * Vp;
  const int64_t next_bytes = prefetch_budget(logit_bytes + kept_rows * Vp * static_cast<int64_t>(sizeof(F)));

  // pass B: the one read of the logits. CLEAN_B: the sums without masks, for a row with no -inf
  // entry (returns whether the row has one; the last pack's padding always takes the masks)
  thread_local KeptScales<F> ks;
  KeptLse<F, NX> ls;
  LaneSums<F> cur[NT], tot[NT];
  bool mismatch[NT];
  auto pass_b = [&](auto clean_b) KDPLUG_LAMBDA_INLINE -> bool {
    constexpr bool CLEAN_B = decltype(clean_b)::value;
    ls.reset(&ks);
    for (int i = 0; i < NT; ++i) {
      cur[i] = tot[i] = LaneSums<F>{zero, zero, zero};
      mismatch[i] = false;
    }
    Vec lo(std::numeric_limits<F>::infinity());
    const NextRow<scalar_t> next(a, n, prefetch_next && next_bytes > 0, next_bytes);
    row.each([&](int64_t k, Vec xs, Vec xt) KDPLUG_LAMBDA_INLINE {
      next.fetch(k);
      Vec x[NX], w[NX];
      x[TEACHER] = xt;
      x[STUDENT] = xs;
      if constexpr (GEO) x[ASSISTANT] = geometric_mix(xt, xs, c.lam);
      ls.see(k, x, &ks, [&](int j, Vec f) KDPLUG_LAMBDA_INLINE {
        rescale_operand<NT>(j, f, ls.z, ls.zt, lhs, cur, tot);
      });
      for (int j = 0; j < NX; ++j) w[j] = ls.exp(j, x[j]);
      w[STUDENT].store(kept_w + k);
      if (keep_d) (xs - xt).store(kept_d + k);
      if (k < row.main_end) lo = O::min(lo, O::min(xs, xt));  // (a NaN row is rejected anyway)
      if (CLEAN_B && k < row.main_end) {  // add_term_sums without masks (s, tq: Z_A, below)
        for (int i = 0; i < NT; ++i) cur[i].f = cur[i].f + w[lhs[i]] * (kl[i] ? x[lhs[i]] - x[rhs[i]] : x[rhs[i]]);
        for (int j = 1; j < n_kept; ++j) w[kept_of[j]].store(kept_w + j * Vp + k);
      } else {
        const auto keep = keep_at(c, xs, xt);
        add_term_sums<NT>(lhs, rhs, kl, x, w, keep, cur, mismatch);
        // the lhs of a term on q enters u as dQ = -P_A: 0 where not kept or where s = -inf
        const auto on_q = O::land(keep, O::ne(xs, ninf));
        for (int j = 1; j < n_kept; ++j) O::select(on_q, w[kept_of[j]], zero).store(kept_w + j * Vp + k);
      }
      if (ls.end_pack()) fold_sums<NT, 0, F>(nullptr, nullptr, cur, tot);  // (the terms' sums; ls folds Z)
    });
    bool ninf_seen = O::any(O::eq(lo, ninf));
    for (int64_t k = row.main_end; k < row.V; ++k) {  // the last pack's real entries
      const int i = static_cast<int>(k - row.main_end);
      ninf_seen = ninf_seen || static_cast<F>(row.s_tail[i]) * row.inv_T == neg_inf<F>() ||
                  static_cast<F>(row.t_tail[i]) * row.inv_T == neg_inf<F>();
    }
    return ninf_seen;
  };
  // Which pass B to try first: the one the thread's previous row needed (the rows of a batch are
  // alike: all without -inf, or all with a padded vocabulary's); a row guessed clean that has a
  // -inf entry is read again with the masks. Both give the same bits, so the guess changes no value.
  thread_local bool guess_ninf = false;
  bool has_ninf, clean_b = false;
  if constexpr (SIG != 0) {
    if (!guess_ninf) {
      has_ninf = pass_b(std::true_type{});
      clean_b = !has_ninf;
      if (has_ninf) pass_b(std::false_type{});
    } else {
      has_ninf = pass_b(std::false_type{});
    }
    guess_ninf = has_ninf;
  } else {
    has_ninf = pass_b(std::false_type{});
  }

  double Z[NX];
  F lse[NX];
  for (int x = 0; x < NX; ++x) {
    Z[x] = ls.sum(x);
    lse[x] = ls.lse(x);
  }
  c.lse_t = lse[TEACHER];
  c.lse_s = lse[STUDENT];
  if (!std::isfinite(c.lse_s) || !std::isfinite(c.lse_t)) {
    report_bad_row(bad_row, n, std::isfinite(c.lse_s));
    no_loss_row(loss + n, st_out, g_row, a.V, /*rejected=*/true);
    return true;
  }
  if constexpr (GEO) c.log_z = lse[ASSISTANT];
  {
    bool large = std::abs(c.lse_s) > kFusedLseLimit<F> || std::abs(c.lse_t) > kFusedLseLimit<F>;
    if constexpr (GEO) large = large || std::abs(c.log_z) > kFusedLseLimit<F>;
    if (large) return false;
  }
  LogitTermSums sums[NT];
  for (int i = 0; i < NT; ++i) {
    const double s = clean_b ? Z[lhs[i]] : hsum(tot[i].s + cur[i].s);
    const double tq = clean_b ? Z[lhs[i]] : hsum(tot[i].tq + cur[i].tq);
    sums[i] = LogitTermSums{hsum(tot[i].f + cur[i].f), s, tq, mismatch[i]};
  }
  double total, U;
  logit_row_loss<NT>(c, lhs, rhs, kl, sums, Z, lse, &total, &U);
  store_row(loss + n, st_out, c, total, 0.0, U);
  if (scale == F(0)) {  // no incoming gradient: exactly 0
    std::memset(static_cast<void*>(g_row), 0, sizeof(scalar_t) * a.V);
    return true;
  }
  ks.finish(lse, NX);

  auto pass_c = [&](auto clean_c) KDPLUG_LAMBDA_INLINE {
    constexpr bool CLEAN = decltype(clean_c)::value;
    // pass C: the gradient. coef_P[j]: -sum of coef over the terms on q with lhs kept_of[j]
    // (P_A = w_A scale_A, 0 where the lhs is 0 everywhere: scale_A = 0)
    // From the last pack to the first (as _arith's gradient pass; _nomix's pass 2): where the row and
    // its kept exps outgrow L2, pass B leaves the row's end in cache and its start evicted, and a
    // pass in the same order would evict each line just before it reads it. Xeon (2 MiB L2), fp32,
    // N V = 262 M, in-process, increasing / decreasing order: V = 262144  FKL 176-182 / 165 ms,
    // RKL 216-218 / 191-198, TAID 183-186 / 168-182, gJSD within noise; V = 32000 and 128256 within
    // noise. (forward_backward_rows' pass over forward_rows' kept values, ABKD and AMiD, stays in
    // increasing order: AMiD 599-602 / 626-629 ms at V = 262144; so does _arith's pass 2, which
    // made no difference.)
    F coef_P[NX] = {};
    for (int i = 0; i < NT; ++i)
      if (c.coef[i] != F(0) && rhs[i] == STUDENT && lhs[i] != STUDENT) coef_P[slot_of[lhs[i]]] -= c.coef[i];
    const Vec Uv(static_cast<F>(U)), sc(scale);
    const bool aligned = reinterpret_cast<uintptr_t>(g_row) % (sizeof(scalar_t) * W) == 0;
    ScaleCursor<F> f(ks, /*down=*/true);
    auto u_kept = [&](int64_t k) KDPLUG_LAMBDA_INLINE {
      Vec u = zero;
      for (int j = 1; j < n_kept; ++j) u = u + Vec(coef_P[j]) * f.f[kept_of[j]] * Vec::loadu(kept_w + j * Vp + k);
      return u;
    };
    // with keep_d: KL(q||p)'s lq - lp = d - (lse_s - lse_t), which rounds differently from
    // (s/T - lse_s) - (t/T - lse_t), a few ulp (as the rest of this op); a row with -inf entries
    // takes it too (and reads s for its zeros), so that both kinds of row give the same bits
    const Vec d_lse(c.lse_s - c.lse_t);
    // the gradient from the kept rows alone: no term with q on its left (every part of u - Q U is
    // 0 where s = -inf: w_q = 0 and the kept P_A were zeroed there), or a clean row with keep_d
    // (KL(q||p)'s Q (lq - lp + 1) from d)
    auto from_kept = [&](auto with_d) KDPLUG_LAMBDA_INLINE {
      for (int64_t k = Vp - W; k >= 0; k -= W) {
        f.seek_down(k);
        const Vec Q = Vec::loadu(kept_w + k) * f.f[STUDENT];
        Vec u = u_kept(k);
        if constexpr (decltype(with_d)::value) {
          const Vec d = Q * ((Vec::loadu(kept_d + k) - d_lse) + Vec(F(1)));
          for (int i = 0; i < NT; ++i)
            if (lhs[i] == STUDENT && c.coef[i] != F(0)) u = u + Vec(c.coef[i]) * finite_or_0(d);
          // (the padding: d = NaN there, not stored)
        }
        store_grad_pack<scalar_t>(g_row, k, a.V, aligned, (u - Q * Uv) * sc);
      }
    };
    if (!q_lhs) return from_kept(std::false_type{});
    if (CLEAN && keep_d) return from_kept(std::true_type{});
    row.each_down([&](int64_t k, Vec xs, Vec xt) KDPLUG_LAMBDA_INLINE {
      f.seek_down(k);
      const Vec Q = Vec::loadu(kept_w + k) * f.f[STUDENT];
      const Vec lq = xs - Vec(c.lse_s);
      Vec u = u_kept(k);
      for (int i = 0; i < NT; ++i) {
        if (lhs[i] != STUDENT || c.coef[i] == F(0)) continue;
        Vec lb;
        if (rhs[i] == TEACHER) {
          lb = xt - Vec(c.lse_t);
        } else {  // the geometric mixture (0 everywhere when log Z = -inf)
          lb = c.log_z == neg_inf<F>() ? ninf : geometric_mix(xt, xs, c.lam) - Vec(c.log_z);
        }
        // kl_element's / ce_element's dP with P = q (CLEAN: Q, lq and lB finite, mul0 = *)
        Vec d;
        if constexpr (CLEAN) {
          d = kl[i] ? Q * ((lq - lb) + Vec(F(1))) : Q * O::neg(lb);
        } else if (keep_d) {  // (KL(q||p), nothing excluded)
          d = mul0(Q, (Vec::loadu(kept_d + k) - d_lse) + Vec(F(1)));
        } else {
          d = kl[i] ? mul0(Q, (lq - lb) + Vec(F(1))) : mul0(Q, O::neg(lb));
          if (c.exclude) d = O::select(keep_at(c, xs, xt), d, zero);
        }
        u = u + Vec(c.coef[i]) * finite_or_0(d);
      }
      const Vec gk = (u - Q * Uv) * sc;
      // (CLEAN: s > -inf but in the padding, which store_grad_pack does not store)
      store_grad_pack<scalar_t>(g_row, k, a.V, aligned, CLEAN ? gk : O::select(O::eq(xs, ninf), zero, gk));
    });
  };
  if constexpr (SIG != 0) {
    if (!has_ninf) {
      pass_c(std::true_type{});
      return true;
    }
  }
  pass_c(std::false_type{});
  return true;
}

// The one read of the rows that keep the exps of both sides (forward_grad_row_nomix, _arith):
// w_t = exp(t/T - m_t), w_s = exp(s/T - m_s) stored per entry (the last pack's padding: 0),
// c->lse_t, c->lse_s and the scales of the kept exps (KeptLse: m, Z and the segments).
template <class scalar_t, class F>
KDPLUG_INLINE void row_exps(const RowView<scalar_t>& row, const NextRow<scalar_t>& next, F* w_t, F* w_s,
                            RowConsts<F>* c, KeptScales<F>* ks) {
  using Vec = Vectorized<F>;
  KeptLse<F, 2> ls;
  ls.reset(ks);
  row.each([&](int64_t k, Vec xs, Vec xt) KDPLUG_LAMBDA_INLINE {
    next.fetch(k);
    const Vec x[2] = {xt, xs};  // TEACHER, STUDENT
    ls.see(k, x, ks);
    ls.exp(TEACHER, xt).store(w_t + k);
    ls.exp(STUDENT, xs).store(w_s + k);
    ls.end_pack();
  });
  const F lse[2] = {ls.lse(TEACHER), ls.lse(STUDENT)};
  c->lse_t = lse[TEACHER];
  c->lse_s = lse[STUDENT];
  ks->finish(lse, 2);
}

// Pass 1 of a row that keeps both sides' exps (forward_grad_row_nomix, _arith): row_exps into
// kept[0 .. V) (w_t) and kept[Vp .. Vp + V) (w_s), Vp = V rounded up to the pack size. Returns false
// for a row with an all -inf, +inf or NaN side, reported for the op to raise, its outputs written
// as no_loss_row does (g_row: its gradient row, or nullptr).
template <class scalar_t, class F>
bool kept_exps_pass(const Args<scalar_t>& a, int64_t n, const RowView<scalar_t>& row, const NextRow<scalar_t>& next,
                    std::vector<F>& kept, RowConsts<F>* c, KeptScales<F>* ks, std::atomic<int64_t>* bad_row,
                    F* loss_n, F* st, scalar_t* g_row) {
  const int64_t Vp = padded<Vectorized<F>::size()>(a.V);
  if (static_cast<int64_t>(kept.size()) < 2 * Vp) kept.resize(static_cast<size_t>(2 * Vp));
  row_exps(row, next, kept.data(), kept.data() + Vp, c, ks);
  if (std::isfinite(c->lse_s) && std::isfinite(c->lse_t)) return true;
  report_bad_row(bad_row, n, std::isfinite(c->lse_s));
  no_loss_row(loss_n, st, g_row, a.V, /*rejected=*/true);
  return false;
}

// ---- forward and gradient of a row without a mixture: each exp once ----------------------------
// divergence_fwd_grad (and, with grad == nullptr, divergence_fwd without pass 3) for the recipes
// with no assistant and no AB term that forward_grad_row_logit does not take (TVD, a third party's
// mix of KL / CE / TVD terms), the same way:
//   pass 1  w_t, w_s kept per entry, the LSEs and the kept exps' scales (row_exps: one read)
//   pass 2  P = w_t scale_t, Q = w_s scale_s, lp = t/T - lse_t, lq = s/T - lse_s: the terms' elements
//           with P and Q given (terms_at: KL, CE and TVD compute no exp),
//           the loss sums and U = sum h^q; h^q kept per entry (over w_t, not read again), 0 where
//           s = -inf (TVD: computed again in pass 3 instead, see below)
//   pass 3  grad = scale (h^q - Q U)
// TVD: 2 exps per entry where divergence_fwd + _bwd make 5 (and under "exact" pass 2 reads no
// logits: its element needs only P and Q). P = w scale rounds differently from exp(x - lse): the
// values agree with divergence_fwd / _bwd's to a few ulp, as forward_grad_row_logit's. (With the
// maxima in a pass of their own before the exps, TVD took 195-217 ms for divergence_fwd_grad and
// 170-178 ms for divergence_fwd, against 175-181 and 150-165 ms with row_exps: Xeon, N = 2048,
// V = 128256 fp32.)
template <class scalar_t, int SIG>
void forward_grad_row_nomix(const Args<scalar_t>& a, int64_t n, const compute_t<scalar_t>* grad_scale,
                            compute_t<scalar_t>* loss, compute_t<scalar_t>* stats, scalar_t* grad,
                            std::atomic<int64_t>* bad_row, std::vector<compute_t<scalar_t>>& kept,
                            bool prefetch_next) {
  using F = compute_t<scalar_t>;
  using Vec = Vectorized<F>;
  using O = Ops<Vec>;
  constexpr int W = Vec::size();
  constexpr int NT = SIG == SIG_SYM ? 2 : SIG != 0 ? 1 : 0;  // terms_at's count (0: c.n_terms)
  const Vec zero(F(0)), ninf(neg_inf<F>());
  F* st_out = stats + n * kStats;
  scalar_t* g_row = grad == nullptr ? nullptr : grad + n * a.V;  // nullptr: the forward alone
  if (!a.row_mask[n * a.mask_stride]) {
    no_loss_row(loss + n, st_out, g_row, a.V, /*rejected=*/false);
    return;
  }
  RowConsts<F> c;
  init_row(a.desc, a.params, a.token_weights, n, &c);
  pin_terms<SIG>(c);
  const RowView<scalar_t> row(a.s + n * a.s_stride, a.t + n * a.t_stride, a.V, c.inv_T);
  // NB: only a next row that fits kPrefetchBytes whole: part of a longer one costs these passes
  // (which read the row again from the kept exps) more than it saves. TVD, Xeon, fp32, forward
  // only / training, none vs the first 512 KiB: N = 2048, V = 128256  154 vs 164 / 194 vs 194 ms;
  // N = 8192, V = 32000 (the whole next row fits)  146 vs 110 / 175 vs 140 with none vs whole.
  const bool fits = 2 * a.V * static_cast<int64_t>(sizeof(scalar_t)) <= kPrefetchBytes;
  thread_local KeptScales<F> ks;
  if (!kept_exps_pass(a, n, row, NextRow<scalar_t>(a, n, prefetch_next && fits), kept, &c, &ks, bad_row, loss + n,
                      st_out, g_row))
    return;
  // NB: pinned again: kept_exps_pass (not inlined) took &c, so the compiler no longer knew the
  // pinned terms, and the passes below branched on them per pack (TVD: the element's switch, the
  // operands' choice, both partials' finite_or_0)
  pin_terms<SIG>(c);
  F* w_t = kept.data();  // then h^q (with a gradient to compute)
  F* w_s = kept.data() + padded<W>(a.V);

  // pass 2: the elements, the loss and U (padding entries: P = Q = 0, both logs -inf: nothing),
  // from the last pack to the first (see forward_grad_row_logit's pass C), and pass 3 the other way.
  // TVD, Xeon, fp32, in-process, both passes increasing / these orders: N = 2048, V = 128256
  // divergence_fwd 140-141 / 136-137 ms, divergence_fwd_grad 178-180 / 173-174; N = 1000,
  // V = 262144 divergence_fwd_grad 208-215 / 201
  Vec e_acc[kMaxTerms], u_acc = zero;
  for (int i = 0; i < kMaxTerms; ++i) e_acc[i] = zero;
  double e_tot[kMaxTerms] = {}, U = 0;
  int packs = 0;
  auto fold = [&]() KDPLUG_LAMBDA_INLINE {
    for (int i = 0; i < c.n_terms; ++i) {
      e_tot[i] += hsum(e_acc[i]);
      e_acc[i] = zero;
    }
    U += hsum(u_acc);
    u_acc = zero;
    packs = 0;
  };
  // TVD under "exact": its element reads neither log nor mask, and its h^q = coef Q (...) is 0
  // where s = -inf (Q = 0); it is a few operations on P and Q, so pass 3 computes it again rather
  // than pass 2 storing it (an extra store stream: 382 vs 346 ms at N = 2048, V = 128256 fp32, AVX2)
  const bool tvd_exact = SIG == sig_of(TVD, TEACHER, STUDENT) && !c.exclude;
  auto h_q_at = [&](auto with_loss, const ScaleCursor<F>& f, int64_t k, Vec xs, Vec xt) KDPLUG_LAMBDA_INLINE {
    // (adds e to e_acc)
    const Probs<Vec> pq{Vec::loadu(w_t + k) * f.f[TEACHER], Vec::loadu(w_s + k) * f.f[STUDENT]};
    return terms_at<decltype(with_loss)::value, NT>(c, logs_at<MIX_NONE>(c, xs, xt), keep_at(c, xs, xt), e_acc, &pq)
        .q;
  };
  ScaleCursor<F> f_c(ks, /*down=*/true);
  auto entry = [&](int64_t k, Vec xs, Vec xt) KDPLUG_LAMBDA_INLINE {
    f_c.seek_down(k);
    const Vec h_q = h_q_at(std::true_type{}, f_c, k, xs, xt);
    u_acc = u_acc + h_q;
    if (!tvd_exact && g_row != nullptr) O::select(O::eq(xs, ninf), zero, h_q).store(w_t + k);
    if (++packs == 64) fold();
  };
  if (tvd_exact) {
    for (int64_t k = padded<W>(a.V) - W; k >= 0; k -= W) entry(k, zero, zero);
  } else {
    row.each_down(entry);
  }
  fold();
  double total = 0;
  for (int i = 0; i < c.n_terms; ++i)
    if (c.coef[i] != F(0)) total += static_cast<double>(c.coef[i]) * e_tot[i];  // mul0(coef, sum)
  store_row(loss + n, st_out, c, total, 0.0, U);
  if (g_row == nullptr) return;
  const F scale = grad_scale[n] / c.T;
  if (scale == F(0)) {  // no incoming gradient: exactly 0
    std::memset(static_cast<void*>(g_row), 0, sizeof(scalar_t) * a.V);
    return;
  }

  // pass 3: the gradient (no transcendental)
  const Vec Uv(static_cast<F>(U)), sc(scale);
  const bool aligned = reinterpret_cast<uintptr_t>(g_row) % (sizeof(scalar_t) * W) == 0;
  ScaleCursor<F> f_d(ks);
  for (int64_t k = 0; k < a.V; k += W) {
    f_d.seek(k);
    const Vec Q = Vec::loadu(w_s + k) * f_d.f[STUDENT];
    const Vec u = tvd_exact ? h_q_at(std::false_type{}, f_d, k, zero, zero) : Vec::loadu(w_t + k);
    store_grad_pack<scalar_t>(g_row, k, a.V, aligned, (u - Q * Uv) * sc);
  }
}

// ---- forward and gradient of an arithmetic-mixture KL row: each exp once -------------------------
// divergence_fwd_grad (and, with grad == nullptr, divergence_fwd without pass 3) for the recipes of
// arith_kl_of (r = lam p + (1 - lam) q with KL(p||r) and / or KL(q||r): skl, srkl, gjsd, distillm2's
// two sides). forward_rows' passes and the gradient pass would make 5 exps, a log and a division
// per entry (the LSEs' 2 exps, arith_kl_at's P and Q, the gradient's q); here P and Q are the
// normalizers' own exps, kept:
//   pass 1  w_t, w_s kept per entry, the LSEs and the kept exps' scales (row_exps: one read)
//   pass 2  P = w_t scale_t, Q = w_s scale_s, lp and lq from the logits: arith_kl_of's elements, h^q,
//           h^r and w h^r = (1 - lam) Q h^r / R; the loss sums, H^r and U (forward_rows' pass 3);
//           v = h^q + w h^r kept over w_t (0 where s = -inf). A pack with a log-probability in
//           (-inf, -85) takes the general formulas, as in forward_rows.
//   pass 3  grad = scale ((v - H^r w r) - Q U), grouped as grad_at, with w r = (1 - lam) Q: no
//           transcendental
// 2 exps, a log and a division per entry. P = w scale rounds differently from exp(x - lse): the
// values agree with divergence_fwd / _bwd's to a few ulp, as forward_grad_row_logit's (where U and
// H^r are large, to a few ulp of those terms: see tests/test_compiled.py). Xeon, N = 2048,
// V = 128256 fp32, divergence_fwd_grad, forward_rows' passes vs these (in-process A/B): gJSD
// 367-425 vs 266-277 ms, SRKL 351-358 vs 255-275, SKL 344 vs 248.
template <class scalar_t, int SIG>
void forward_grad_row_arith(const Args<scalar_t>& a, int64_t n, const compute_t<scalar_t>* grad_scale,
                            compute_t<scalar_t>* loss, compute_t<scalar_t>* stats, scalar_t* grad,
                            std::atomic<int64_t>* bad_row, std::vector<compute_t<scalar_t>>& kept,
                            bool prefetch_next) {
  static_assert(kArithKL<SIG>, "the arithmetic mixture's KL terms only");
  using F = compute_t<scalar_t>;
  using Vec = Vectorized<F>;
  using O = Ops<Vec>;
  constexpr int W = Vec::size();
  const Vec zero(F(0)), ninf(neg_inf<F>());
  F* st_out = stats + n * kStats;
  scalar_t* g_row = grad == nullptr ? nullptr : grad + n * a.V;  // nullptr: the forward alone
  if (!a.row_mask[n * a.mask_stride]) {
    no_loss_row(loss + n, st_out, g_row, a.V, /*rejected=*/false);
    return;
  }
  RowConsts<F> c;
  init_row(a.desc, a.params, a.token_weights, n, &c);
  pin_terms<SIG>(c);
  const RowView<scalar_t> row(a.s + n * a.s_stride, a.t + n * a.t_stride, a.V, c.inv_T);
  thread_local KeptScales<F> ks;
  if (!kept_exps_pass(a, n, row, NextRow<scalar_t>(a, n, false), kept, &c, &ks, bad_row, loss + n, st_out, g_row))
    return;
  pin_terms<SIG>(c);  // (again: see forward_grad_row_nomix)
  F* w_t = kept.data();  // then v
  F* w_s = kept.data() + padded<W>(a.V);

  // pass 2 (compute-bound: a log and a division an entry; it asks for the next row meanwhile)
  const Vec q_weight(F(1) - c.lam);
  Vec e_acc[kMaxTerms];
  for (int i = 0; i < kMaxTerms; ++i) e_acc[i] = zero;
  StatAcc<Vec> acc{zero, zero, zero, zero};
  double e_tot[kMaxTerms] = {}, h_q = 0, h_r = 0, w_h_r = 0, w_r = 0;
  int packs = 0;
  auto fold = [&]() KDPLUG_LAMBDA_INLINE {
    for (int i = 0; i < c.n_terms; ++i) {
      e_tot[i] += hsum(e_acc[i]);
      e_acc[i] = zero;
    }
    h_q += hsum(acc.h_q);
    h_r += hsum(acc.h_r);
    w_h_r += hsum(acc.w_h_r);
    w_r += hsum(acc.w_r);
    acc = StatAcc<Vec>{zero, zero, zero, zero};
    packs = 0;
  };
  // (Xeon, N = 2048, V = 128256 fp32, no prefetch / the first 512 KiB / the whole next row: gJSD
  // 277 / 265 / 266 ms, SRKL 269 / 255 / 257, SKL 255 / 248 / 250; divergence_fwd, which stops
  // here, on this project's EPYC: the first 512 KiB / the whole next row within noise)
  const NextRow<scalar_t> next(a, n, prefetch_next);
  ScaleCursor<F> f_c(ks);
  row.each([&](int64_t k, Vec xs, Vec xt) KDPLUG_LAMBDA_INLINE {
    next.fetch(k);
    f_c.seek(k);
    const Vec lq = xs - Vec(c.lse_s), lp = xt - Vec(c.lse_t);
    const auto keep = keep_at(c, xs, xt);
    Vec v;
    if (C10_LIKELY(arith_in_range(lp, lq))) {
      const Vec P = Vec::loadu(w_t + k) * f_c.f[TEACHER], Q = Vec::loadu(w_s + k) * f_c.f[STUDENT];
      const auto t = arith_kl_of<SIG, true>(c, lp, lq, P, Q, keep);
      e_acc[0] = e_acc[0] + t.e[0];
      if constexpr (SIG == SIG_JS) e_acc[1] = e_acc[1] + t.e[1];
      acc.h_q = acc.h_q + t.h_q;
      v = t.h_q;
      if (c.live_assistant) {
        const Vec wq = q_weight * t.Q;  // w r
        const Vec wh = wq * t.h_r * t.inv_R;
        acc.h_r = acc.h_r + t.h_r;
        acc.w_h_r = acc.w_h_r + wh;
        acc.w_r = acc.w_r + wq;
        v = v + wh;
      }
    } else {
      const Logs<Vec> L = logs_at<MIX_ARITHMETIC>(c, xs, xt);
      const H<Vec> h = terms_at<true>(c, L, keep, e_acc);
      v = h.q + stats_at(c, L, h, &acc).w_h_r;
    }
    if (g_row != nullptr) O::select(O::eq(xs, ninf), zero, v).store(w_t + k);
    if (++packs == 64) fold();
  });
  fold();
  double total = 0;
  for (int i = 0; i < c.n_terms; ++i)
    if (c.coef[i] != F(0)) total += static_cast<double>(c.coef[i]) * e_tot[i];  // mul0(coef, sum)
  const double U = h_q + w_h_r - h_r * w_r;
  store_row(loss + n, st_out, c, total, h_r, U);
  if (g_row == nullptr) return;
  const F scale = grad_scale[n] / c.T;
  if (scale == F(0)) {  // no incoming gradient: exactly 0
    std::memset(static_cast<void*>(g_row), 0, sizeof(scalar_t) * a.V);
    return;
  }

  // pass 3: the gradient, from the last pack to the first (see forward_grad_row_logit's pass C).
  // mul0: exactly 0 where s = -inf (Q = 0 and v = 0) whatever U is.
  const Vec Hw(static_cast<F>(c.live_assistant ? h_r : 0.0)), Uv(static_cast<F>(U)), sc(scale);
  const bool aligned = reinterpret_cast<uintptr_t>(g_row) % (sizeof(scalar_t) * W) == 0;
  ScaleCursor<F> f_d(ks, /*down=*/true);
  for (int64_t k = padded<W>(a.V) - W; k >= 0; k -= W) {
    f_d.seek_down(k);
    const Vec Q = Vec::loadu(w_s + k) * f_d.f[STUDENT];
    const Vec u = Vec::loadu(w_t + k) - mul0(q_weight * Q, Hw);
    store_grad_pack<scalar_t>(g_row, k, a.V, aligned, (u - mul0(Q, Uv)) * sc);
  }
}

// ---- backward ----------------------------------------------------------------------------------
// In place (grad == a.s): a pack is loaded (RowView::each) before its gradient is stored, and the
// row's partial last pack was copied when the RowView was made, so every entry is read first.
template <class scalar_t, int MIX, int SIG>
void backward_rows(const Args<scalar_t>& a, const compute_t<scalar_t>* grad_loss, const compute_t<scalar_t>* stats,
                   scalar_t* grad, int64_t grad_stride, bool skip_masked, int64_t begin, int64_t end) {
  using F = compute_t<scalar_t>;
  using Vec = Vectorized<F>;
  constexpr int W = Vec::size();
  for (int64_t n = begin; n < end; ++n) {
    scalar_t* g = grad + n * grad_stride;
    RowConsts<F> c;
    init_row(a.desc, a.params, a.token_weights, n, &c);
    pin_terms<SIG>(c);
    const bool live = a.row_mask[n * a.mask_stride];
    if (!live && skip_masked) continue;  // another recipe's row
    const F scale = live ? grad_loss[n] / c.T : F(0);
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
    if constexpr (MIX == MIX_ALPHA) {
      // the alpha-mixture's chain of transcendentals an entry, two packs at a time (see Pair)
      row.each_pair([&](int64_t k, auto xs, auto xt) KDPLUG_LAMBDA_INLINE {
        using P = decltype(xs);
        using N = PackN<P>;
        const Logs<P> L = logs_at<MIX>(c, xs, xt);
        const H<P> h = terms_at<false>(c, L, keep_at(c, xs, xt), static_cast<P*>(nullptr));
        const P gk = grad_at(c, L, h, H_r, U, scale);
        for (int i = 0; i < N::n; ++i) store_grad_pack<scalar_t>(g, k + i * W, a.V, aligned, N::half(gk, i));
      });
    } else {
      row.each([&](int64_t k, Vec xs, Vec xt) KDPLUG_LAMBDA_INLINE {
        Vec gk;
        bool done = false;
        if constexpr (MIX == MIX_ARITHMETIC && kArithKL<SIG>) {
          const Vec lq = xs - Vec(c.lse_s), lp = xt - Vec(c.lse_t);
          if (C10_LIKELY(arith_in_range(lp, lq))) {
            const auto t = arith_kl_at<SIG, false>(c, lp, lq, keep_at(c, xs, xt));
            Vec u = t.h_q;
            if (c.live_assistant) {  // grouped as forward_rows keeps it (see grad_at)
              const Vec wq = Vec(F(1) - c.lam) * t.Q;
              u = (u + wq * t.h_r * t.inv_R) - Vec(H_r) * wq;
            }
            gk = Ops<Vec>::select(Ops<Vec>::eq(lq, Vec(neg_inf<F>())), Vec(F(0)), (u - t.Q * Vec(U)) * Vec(scale));
            done = true;
          }
        }
        if constexpr (SIG == SIG_SYM) {
          // KL(p||q) and KL(q||p): terms_at + grad_at written out with P and Q computed once (the
          // generic instance computed exp(lq) twice), the same operations in the same order
          using O = Ops<Vec>;
          const Vec lq = xs - Vec(c.lse_s), lp = xt - Vec(c.lse_t);
          const Vec P = O::exp(lp), Q = O::exp(lq), zero(F(0));
          const auto keep = keep_at(c, xs, xt);
          Vec d0 = O::neg(P), d1 = mul0(Q, (lq - lp) + Vec(F(1)));
          if (c.exclude) {
            d0 = O::select(keep, d0, zero);
            d1 = O::select(keep, d1, zero);
          }
          Vec u = zero;
          if (c.coef[0] != F(0)) u = u + Vec(c.coef[0]) * finite_or_0(d0);
          if (c.coef[1] != F(0)) u = u + Vec(c.coef[1]) * finite_or_0(d1);
          gk = O::select(O::eq(lq, Vec(neg_inf<F>())), zero, (u - Q * Vec(U)) * Vec(scale));
          done = true;
        }
        if (!done) {
          const Logs<Vec> L = logs_at<MIX>(c, xs, xt);
          const H<Vec> h = terms_at<false>(c, L, keep_at(c, xs, xt), static_cast<Vec*>(nullptr));
          gk = grad_at(c, L, h, H_r, U, scale);
        }
        store_grad_pack<scalar_t>(g, k, a.V, aligned, gk);
      });
    }
  }
  store_fence();
}

// ---- forward and gradient of a row, back to back ------------------------------------------------
// divergence_fwd_grad: each row's forward passes, then its gradient pass while the row is still in
// cache (a row pair at V = 128k fp32 is 1 MB), with grad_scale as the incoming per-token gradient.
//   * recipes with the one-pass forward (logit-space: fkl, rkl, symmetric_kl, akl, taid):
//     forward_grad_row_logit (exps kept, gradient from the kept exps); the same values as
//     divergence_fwd + divergence_bwd to a few ulp. A row with a large |lse| falls back to the
//     2-pass forward and backward_rows' pass;
//   * the other recipes without a mixture and without AB terms (tvd, third-party terms):
//     forward_grad_row_nomix, the same way (exps kept, elements from them);
//   * the arithmetic mixture with KL terms on r (skl, srkl, gjsd, distillm2's sides; float and
//     bfloat16, whose instances pin the terms): forward_grad_row_arith, the same way;
//   * the rest (abkd, amid, and the above in float64 / float16): forward_rows keeps each entry's
//     v = h^q + w h^r and w r (KEEP) in a per-thread
//     scratch row (2 V floats; 3 for the alpha-mixture, whose pass 2 keeps three), and the
//     gradient pass is
//         grad = scale (v - H^r (w r) - q U) / T,   q = exp(s/T - LSE(s/T)),  0 where s = -inf
//     (grad_at's u, grouped the same way), without the elements, the mixture or its weight again:
//     the expensive half of the backward's math. These values and gradients are divergence_fwd's
//     and divergence_bwd's, bit for bit, but for the alpha-mixture's gradient: its r is pass 2's
//     kept exp times a scale, where divergence_bwd takes exp(log r) (a few ulp apart).
//
// Whether forward_grad_row_logit can run the recipe (MIX, SIG): a logit-space mixture, and with
// SIG != 0 terms that are all KL or CE (the other pinned terms never take it: not instantiated).
template <int MIX, int SIG>
constexpr bool kLogitSig = (MIX == MIX_NONE || MIX == MIX_GEOMETRIC) &&
                           (SIG == 0 || SIG == SIG_SYM || (SIG < SIG_JS && ((SIG - 1) % 4 == KL || (SIG - 1) % 4 == CE)));

// Whether forward_grad_row_nomix can run the recipe (MIX, SIG): no mixture and no AB term (a
// pinned SIG says which term; SIG = 0 asks has_ab at run time). AB terms keep forward_rows'
// per-entry v: their elements need the logs (pass C would read the logits a third time) and cost
// 3-5 transcendentals, so the exp saved is lost (ABKD divergence_fwd_grad, N = 2048, V = 128256
// fp32, Xeon: 390 vs 348 ms A/B, with the 5-exp element; keeping only the student's exps in
// forward_rows' pass 1 instead, row_exps' scalar maxima and store cost more than the gradient
// pass's exp: 275 -> 288-293 ms).
template <int MIX, int SIG>
constexpr bool kNomixSig = MIX == MIX_NONE && !(SIG != 0 && SIG < SIG_JS && (SIG - 1) % 4 == AB);

inline bool has_ab(const RecipeDesc& d) {
  for (int i = 0; i < d.n_terms; ++i)
    if (d.div[i] == AB) return true;
  return false;
}

template <class scalar_t, int MIX, int SIG>
void forward_backward_rows(const Args<scalar_t>& a, bool fused, const compute_t<scalar_t>* grad_scale,
                           compute_t<scalar_t>* loss, compute_t<scalar_t>* stats, scalar_t* grad, int64_t begin,
                           int64_t end, std::atomic<int64_t>* bad_row, bool skip_masked) {
  using F = compute_t<scalar_t>;
  using Vec = Vectorized<F>;
  using O = Ops<Vec>;
  constexpr int W = Vec::size();
  const int64_t Vp = padded<W>(a.V);
  const bool one_pass = kLogitSig<MIX, SIG> && fused;
  std::vector<F> kept;
  for (int64_t n = begin; n < end; ++n) {
    F* st = stats + n * kStats;
    if (skip_masked && !a.row_mask[n * a.mask_stride]) {  // another recipe's row: its gradient is not ours
      no_loss_row<scalar_t, F>(loss + n, st, nullptr, a.V, false);
      continue;
    }
    if constexpr (MIX == MIX_ARITHMETIC && kArithKL<SIG>) {
      forward_grad_row_arith<scalar_t, SIG>(a, n, grad_scale, loss, stats, grad, bad_row, kept, n + 1 < end);
    } else {
      scalar_t* g = grad + n * a.V;
      bool keep = false;
      if constexpr (kLogitSig<MIX, SIG>) {
        if (one_pass) {
          auto logit_row = [&](auto nt) {
            return forward_grad_row_logit<scalar_t, MIX == MIX_GEOMETRIC, decltype(nt)::value, SIG>(
                a, n, grad_scale, loss, stats, grad, bad_row, kept, n + 1 < end);
          };
          bool done;
          if constexpr (SIG == SIG_JS || SIG == SIG_SYM) {
            done = logit_row(std::integral_constant<int, 2>{});
          } else if constexpr (SIG != 0) {
            done = logit_row(std::integral_constant<int, 1>{});
          } else {
            done = a.desc.n_terms == 1 ? logit_row(std::integral_constant<int, 1>{})
                                       : logit_row(std::integral_constant<int, 2>{});
          }
          if (done) continue;
          // |lse| too large for the one-pass loss: the 2-pass forward, then divergence_bwd's pass
          forward_rows<scalar_t, MIX, SIG>(a, loss, stats, n, n + 1, bad_row);
        }
      }
      if constexpr (kNomixSig<MIX, SIG>) {
        if (!one_pass && !has_ab(a.desc)) {
          forward_grad_row_nomix<scalar_t, SIG>(a, n, grad_scale, loss, stats, grad, bad_row, kept, n + 1 < end);
          continue;
        }
      }
      if (!one_pass) {
        const int64_t rows = MIX == MIX_NONE ? 1 : MIX == MIX_ALPHA ? 3 : 2;  // v, (w r), (pass 2's w)
        if (static_cast<int64_t>(kept.size()) < rows * Vp) kept.resize(static_cast<size_t>(rows * Vp));
        forward_rows<scalar_t, MIX, SIG, true>(a, loss, stats, n, n + 1, bad_row, kept.data(), end);
        keep = true;
      }
      const bool live = a.row_mask[n * a.mask_stride];
      if (live && !(std::isfinite(st[STAT_LSE_S]) && std::isfinite(st[STAT_LSE_T]))) {
        // a rejected row (the op raises): no gradient to compute
        std::memset(static_cast<void*>(g), 0, sizeof(scalar_t) * a.V);
        continue;
      }
      if (!keep) {
        backward_rows<scalar_t, MIX, SIG>(a, grad_scale, stats, grad, a.V, /*skip_masked=*/false, n, n + 1);
        continue;
      }
      const F T = static_cast<F>(a.params[0]);
      const F scale = live ? grad_scale[n] / T : F(0);
      if (scale == F(0)) {  // masked, or no incoming gradient: exactly 0
        std::memset(static_cast<void*>(g), 0, sizeof(scalar_t) * a.V);
        continue;
      }
      const RowView<scalar_t> row(a.s + n * a.s_stride, a.t + n * a.t_stride, a.V, F(1) / T);
      const Vec lse_s(st[STAT_LSE_S]), H_r(st[STAT_H_R]), U(st[STAT_U]), sc(scale), zero(F(0));
      const Vec ninf(neg_inf<F>());
      const bool aligned = reinterpret_cast<uintptr_t>(g) % (sizeof(scalar_t) * W) == 0;
      row.each_student([&](int64_t k, Vec xs) KDPLUG_LAMBDA_INLINE {
        const Vec lq = xs - lse_s;
        Vec u = Vec::loadu(kept.data() + k);
        if constexpr (MIX != MIX_NONE) u = u - H_r * Vec::loadu(kept.data() + Vp + k);  // (H^r = 0 without)
        const Vec gk = O::select(O::eq(lq, ninf), zero, (u - O::exp(lq) * U) * sc);  // grad_at's
        store_grad_pack<scalar_t>(g, k, a.V, aligned, gk);
      });
    }
  }
  store_fence();
}

// ---- vocabulary-parallel partial sums -----------------------------------------------------------
// With the vocabulary split across ranks (kdplug/_vocab_parallel.py), each rank makes the
// forward's passes over its shard [N, V_shard] and the row statistics are combined in between:
//   stage 0: out = {LSE(s/T), LSE(t/T), LSE(g)} over the shard (g: the geometric mixture's logits;
//            -inf without one). Combined by a log-sum-exp across ranks: the global lse_s, lse_t
//            and, for the geometric mixture, log_z.
//   stage 1: (alpha-mixture only) given the global {lse_s, lse_t}: out = {LSE(log r~)} over the
//            shard, combined the same way: the global log Z.
//   stage 2: given the global {lse_s, lse_t, log_z}: out = {sum_i coef_i sum_k e_i, sum h^q,
//            sum h^r, sum w h^r, sum w r} over the shard, combined by a sum. Then H^r = sum h^r and
//            U = sum h^q + sum w h^r - H^r sum w r (forward_rows' expansion of sum_k u_k, which
//            needs the global H^r: hence its three pieces travel separately).
// The backward needs nothing more: with the global row_stats, divergence_bwd on a shard gives that
// shard's columns of the gradient. A shard's row may be all -inf (no error here: the combined
// LSE is what kdplug/_vocab_parallel.py checks); masked rows are not read and give zeros.
template <class scalar_t, int MIX>
void partial_rows(const Args<scalar_t>& a, int stage, const double* given, double* out, int64_t begin, int64_t end) {
  using F = compute_t<scalar_t>;
  using Vec = Vectorized<F>;
  const int width = partials_width(stage);
  for (int64_t n = begin; n < end; ++n) {
    double* o = out + n * width;
    for (int j = 0; j < width; ++j) o[j] = 0.0;
    if (!a.row_mask[n * a.mask_stride]) continue;
    RowConsts<F> c;
    init_row(a.desc, a.params, a.token_weights, n, &c);
    const RowView<scalar_t> row(a.s + n * a.s_stride, a.t + n * a.t_stride, a.V, c.inv_T);
    if (stage == 0) {
      VecLse<F> ls, lt, lg;
      row.each([&](int64_t, Vec xs, Vec xt) KDPLUG_LAMBDA_INLINE {
        ls.add(xs);
        lt.add(xt);
        if constexpr (MIX == MIX_GEOMETRIC) lg.add(geometric_mix(xt, xs, c.lam));
      });
      o[0] = ls.value();
      o[1] = lt.value();
      o[2] = MIX == MIX_GEOMETRIC ? static_cast<double>(lg.value()) : -std::numeric_limits<double>::infinity();
      continue;
    }
    c.lse_s = static_cast<F>(given[n * (stage == 1 ? 2 : 3)]);
    c.lse_t = static_cast<F>(given[n * (stage == 1 ? 2 : 3) + 1]);
    if (stage == 1) {
      VecLse<F> lz;
      row.each([&](int64_t, Vec xs, Vec xt) KDPLUG_LAMBDA_INLINE { lz.add(logs_at<MIX>(c, xs, xt).lr_tilde); });
      o[0] = lz.value();
      continue;
    }
    c.log_z = static_cast<F>(given[n * 3 + 2]);
    Vec e_acc[kMaxTerms];
    for (int i = 0; i < c.n_terms; ++i) e_acc[i] = Vec(F(0));
    StatAcc<Vec> acc{Vec(F(0)), Vec(F(0)), Vec(F(0)), Vec(F(0))};
    double e_tot[kMaxTerms] = {};
    double sums[4] = {};
    int packs = 0;
    auto fold = [&]() KDPLUG_LAMBDA_INLINE {
      for (int i = 0; i < c.n_terms; ++i) {
        e_tot[i] += hsum(e_acc[i]);
        e_acc[i] = Vec(F(0));
      }
      sums[0] += hsum(acc.h_q);
      sums[1] += hsum(acc.h_r);
      sums[2] += hsum(acc.w_h_r);
      sums[3] += hsum(acc.w_r);
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
    for (int i = 0; i < c.n_terms; ++i)
      if (c.coef[i] != F(0)) o[0] += static_cast<double>(c.coef[i]) * e_tot[i];  // mul0(coef, sum)
    for (int j = 0; j < 4; ++j) o[1 + j] = sums[j];
  }
}

}  // namespace detail

template <class scalar_t>
void forward_cpu(const Args<scalar_t>& a, compute_t<scalar_t>* loss, compute_t<scalar_t>* stats,
                 std::atomic<int64_t>* bad_row) {
  using namespace detail;
  const RecipeDesc& d = a.desc;
  const int64_t N = a.N, V = a.V;
  if (fused_eligible(d)) {
    std::vector<uint8_t> redo(static_cast<size_t>(N), 0);
    auto run = [&](auto geo, auto nt) {
      at::parallel_for(0, N, grain(V), [&](int64_t begin, int64_t end) {
        forward_rows_fused<scalar_t, decltype(geo)::value, decltype(nt)::value>(a, loss, stats, begin, end, bad_row,
                                                                                redo.data());
      });
    };
    const bool geo = d.mix == MIX_GEOMETRIC;
    if (geo && d.n_terms == 1) run(std::true_type{}, std::integral_constant<int, 1>{});
    if (geo && d.n_terms == 2) run(std::true_type{}, std::integral_constant<int, 2>{});
    if (!geo && d.n_terms == 1) run(std::false_type{}, std::integral_constant<int, 1>{});
    if (!geo && d.n_terms == 2) run(std::false_type{}, std::integral_constant<int, 2>{});
    if (std::find(redo.begin(), redo.end(), uint8_t(1)) == redo.end()) return;
    dispatch_recipe<kSpecialize<scalar_t>>(d, [&](auto mix, auto sig) {
      constexpr int MIX = decltype(mix)::value, SIG = decltype(sig)::value;
      if constexpr (MIX == MIX_NONE || MIX == MIX_GEOMETRIC) {  // fused_eligible's
        at::parallel_for(0, N, grain(V), [&](int64_t begin, int64_t end) {
          for (int64_t n = begin; n < end; ++n)
            if (redo[n]) forward_rows<scalar_t, MIX, SIG>(a, loss, stats, n, n + 1, bad_row);
        });
      }
    });
    return;
  }
  dispatch_recipe<kSpecialize<scalar_t>>(d, [&](auto mix, auto sig) {
    constexpr int MIX = decltype(mix)::value, SIG = decltype(sig)::value;
    at::parallel_for(0, N, grain(V), [&](int64_t begin, int64_t end) {
      // no mixture and no AB term (TVD, third-party KL / CE / TVD mixes), or the arithmetic
      // mixture's KL terms: each exp once, kept (forward_grad_row_nomix, _arith without their
      // gradient pass; TVD 4 -> 2 exps an entry, gJSD, SKL, SRKL 4 -> 2)
      constexpr bool ARITH = MIX == MIX_ARITHMETIC && kArithKL<SIG>;
      if constexpr (ARITH || kNomixSig<MIX, SIG>) {
        if (ARITH || !has_ab(d)) {
          std::vector<compute_t<scalar_t>> kept;
          scalar_t* const no_grad = nullptr;
          for (int64_t n = begin; n < end; ++n) {
            if constexpr (ARITH) {
              forward_grad_row_arith<scalar_t, SIG>(a, n, nullptr, loss, stats, no_grad, bad_row, kept, n + 1 < end);
            } else {
              forward_grad_row_nomix<scalar_t, SIG>(a, n, nullptr, loss, stats, no_grad, bad_row, kept, n + 1 < end);
            }
          }
          return;
        }
      }
      if constexpr (!ARITH) forward_rows<scalar_t, MIX, SIG>(a, loss, stats, begin, end, bad_row);
    });
  });
}

template <class scalar_t>
void backward_cpu(const Args<scalar_t>& a, const compute_t<scalar_t>* grad_loss, const compute_t<scalar_t>* stats,
                  scalar_t* grad, int64_t grad_stride, bool skip_masked) {
  using namespace detail;
  dispatch_recipe<kSpecialize<scalar_t>>(a.desc, [&](auto mix, auto sig) {
    at::parallel_for(0, a.N, grain(a.V), [&](int64_t begin, int64_t end) {
      backward_rows<scalar_t, decltype(mix)::value, decltype(sig)::value>(a, grad_loss, stats, grad, grad_stride,
                                                                          skip_masked, begin, end);
    });
  });
}

template <class scalar_t>
void forward_backward_cpu(const Args<scalar_t>& a, const compute_t<scalar_t>* grad_scale, compute_t<scalar_t>* loss,
                          compute_t<scalar_t>* stats, scalar_t* grad, std::atomic<int64_t>* bad_row,
                          bool skip_masked) {
  using namespace detail;
  const bool fused = fused_eligible(a.desc);
  dispatch_recipe<kSpecialize<scalar_t>>(a.desc, [&](auto mix, auto sig) {
    at::parallel_for(0, a.N, grain(a.V), [&](int64_t begin, int64_t end) {
      forward_backward_rows<scalar_t, decltype(mix)::value, decltype(sig)::value>(a, fused, grad_scale, loss, stats,
                                                                                 grad, begin, end, bad_row,
                                                                                 skip_masked);
    });
  });
}

template <class scalar_t>
void partials_cpu(const Args<scalar_t>& a, int stage, const double* given, double* out) {
  using namespace detail;
  dispatch_recipe<false>(a.desc, [&](auto mix, auto) {
    at::parallel_for(0, a.N, grain(a.V), [&](int64_t begin, int64_t end) {
      partial_rows<scalar_t, decltype(mix)::value>(a, stage, given, out, begin, end);
    });
  });
}

}  // namespace cpu
}  // namespace kdplug
