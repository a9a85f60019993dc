// AKL's head / tail weights on the CPU (kdplug::head_tail_weights): per row, the head of the
// teacher's distribution found without a sort, then the two gap sums (head_tail_split in
// csrc/kdplug_math.h).
//
// The rule (kdplug/_head_tail.py): order the entries by p descending, ties by vocabulary index,
// and take the longest prefix whose running sum of p stays <= mu, at least one entry: the head.
// order="ascending" (KDFlow's rule) orders by p ascending and the prefix is the tail. Both are
// "the longest prefix, in the order of a key descending (key = p, or -p) with ties by index,
// whose mass is <= mu", found here in two steps:
//   1. the upper set {key >= tau} of largest mass <= mu, by bisection on tau over the sortable
//      integers of the float keys (kdplug_math.h). A step reads the candidate keys (the first:
//      the whole row) for the mass at or above tau, the smallest key at or above it and the
//      largest below, and the bracket jumps to those present keys, so no two steps test the same
//      set (at most 32 steps, 64 for float64; ~16 on a row of N(0, 2^2) logits at V = 128k, the
//      candidates 128k, 58k, 57k, 13k, 3.6k, ... as the bracket narrows).
//   2. the prefix is that upper set plus the first entries of the next key v (its ties), by
//      index, while the running sum stays <= mu; with order "descending", v's first entry is
//      the head when the upper set is empty (the top-1 rule).
// Passes: the log-sum-exps (TopLse, the only read of the logits from memory); p, |p - q| and the
// key, kept in per-thread buffers; the bisection steps over shrinking candidate lists; one pass
// for the gap sums. The scratch (4 x V floats per thread) and the row fit the Xeon's 2 MiB L2 at
// V = 128k except while the first step writes its lists. Masses and gaps are float sums folded
// into double every 64 packs. The PyTorch path (kdplug/_head_tail.py, on float64
// log-probabilities) agrees with this one except where a running sum lies within rounding
// (~1e-7) of mu, which can move the boundary entry between head and tail.
// N = 2048, V = 128256 fp32, 2 threads (Xeon): 265 ms for the weights, AKL's fwd+bwd 0.50 s
// (12 s with the weights in PyTorch).
#include <ATen/Parallel.h>

#include <vector>

#include "divergence_rows.h"

namespace kdplug {
namespace cpu {
namespace {

using namespace kdplug::math;
using namespace kdplug::cpu::detail;

// A sum of packs folded into a double every 64 packs (each float partial sums <= 64 terms).
template <class F>
struct PackSum {
  using Vec = Vectorized<F>;
  Vec z = Vec(F(0));
  double total = 0;
  int n = 0;

  KDPLUG_INLINE void add(Vec x) {
    z = z + x;
    if (++n == 64) {
      total += hsum<F>(z);
      z = Vec(F(0));
      n = 0;
    }
  }
  double value() const { return total + hsum<F>(z); }
};

// An online log-sum-exp per lane (as VecLse) that keeps the count c of entries at the lane's
// maximum m apart from r, the sum of exp(x - m) over the others: a new maximum moves the old
// one's c into r (rescaled, (r + c) e^(m_old - m_new)). r is folded into rt every 64 packs.
// -inf entries add exp(-inf) = 0 to r; NaN ones make r NaN; +inf ones make m +inf.
template <class F>
struct TopLse {
  using Vec = Vectorized<F>;
  using O = Ops<Vec>;
  Vec m = Vec(std::numeric_limits<F>::lowest());
  Vec c = Vec(F(0)), r = Vec(F(0)), rt = Vec(F(0));
  int n = 0;

  KDPLUG_INLINE void add(Vec x) {
    const auto up = O::gt(x, m);
    if (C10_UNLIKELY(O::any(up))) {
      const Vec m2 = O::max(m, x);
      const Vec f = O::exp(m - m2);  // 1 on the other lanes; 0 from the initial lowest()
      r = O::select(up, (r + c) * f, r);
      rt = O::select(up, rt * f, rt);
      c = O::select(up, Vec(F(0)), c);
      m = m2;
    }
    const auto at_max = O::eq(x, m);
    c = c + O::select(at_max, Vec(F(1)), Vec(F(0)));
    r = r + O::select(at_max, Vec(F(0)), O::exp(x - m));
    if (++n == 64) {
      rt = rt + r;
      r = Vec(F(0));
      n = 0;
    }
  }

  // The row's maximum; *log_z = log(c + r) over the lanes, in double.
  F value(double* log_z) const {
    constexpr int W = Vec::size();
    alignas(64) F ms[W], cs[W], rs[W];
    m.store(ms);
    c.store(cs);
    (rt + r).store(rs);
    F top = ms[0];
    for (int i = 1; i < W; ++i) top = ms[i] > top ? ms[i] : top;
    double count = 0, rest = 0;
    for (int i = 0; i < W; ++i) {
      if (ms[i] == top) {
        count += cs[i];
        rest += rs[i];
      } else {  // a lane below the maximum: its own c and r, rescaled (0 for an all -inf lane)
        rest += (static_cast<double>(cs[i]) + rs[i]) * std::exp(static_cast<double>(ms[i]) - top);
      }
    }
    *log_z = std::log(count) + std::log1p(rest / count);
    return top;
  }
};

// out[0 .. c) = the lanes of v that m selects, in lane order; returns c.
template <class F, class O>
KDPLUG_INLINE int64_t compress_store(F* out, Vectorized<F> v, typename O::Mask m) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<typename O::Mask, __mmask16>) {
    _mm512_mask_compressstoreu_ps(out, m, v);
    return __builtin_popcount(m);
  }
#endif
  constexpr int W = Vectorized<F>::size();
  alignas(64) F lanes[W], selected[W];
  v.store(lanes);
  O::select(m, Vectorized<F>(F(1)), Vectorized<F>(F(0))).store(selected);
  int64_t c = 0;
  for (int i = 0; i < W; ++i)
    if (selected[i] != F(0)) out[c++] = lanes[i];
  return c;
}

template <class F, class O>
KDPLUG_INLINE int64_t lane_count(typename O::Mask m) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<typename O::Mask, __mmask16>) return __builtin_popcount(m);
#endif
  return static_cast<int64_t>(hsum<F>(O::select(m, Vectorized<F>(F(1)), Vectorized<F>(F(0)))));
}

// One row: w = (w_head, w_tail). keys, gaps: scratch of padded(V) entries; lists: of 2 padded(V).
template <class scalar_t>
void head_tail_row(const scalar_t* s, const scalar_t* t, int64_t V, compute_t<scalar_t> inv_T, double mu,
                   bool descending, compute_t<scalar_t>* keys, compute_t<scalar_t>* gaps, compute_t<scalar_t>* lists,
                   double* w) {
  using F = compute_t<scalar_t>;
  using Vec = Vectorized<F>;
  using O = Ops<Vec>;
  using U = typename SortableBits<F>::U;
  constexpr int W = Vec::size();
  const RowView<scalar_t> row(s, t, V, inv_T);
  const int64_t Vp = padded<W>(V);

  // The log-sum-exps as m + log z, z = c + r: c entries at the maximum m, r = the sum of exp(x - m)
  // over the others, accumulated apart from c (TopLse), so that a peaked row keeps r (float32
  // would round 1 + r to 1 for r < 6e-8, and lose r's digits above that) and log z =
  // log c + log1p(r / c). The log-probabilities are then (x - m) - log z, each part exact or
  // small: a peaked row's top entry gets lp = -log1p(r), not 0, and its gap to the student
  // survives (abs_gap).
  TopLse<F> top_s, top_t;
  row.each([&](int64_t, Vec xs, Vec xt) KDPLUG_LAMBDA_INLINE {
    top_s.add(xs);
    top_t.add(xt);
  });
  double log_z_s, log_z_t;
  const F max_s = top_s.value(&log_z_s), max_t = top_t.value(&log_z_t);
  // An all -inf, +inf or NaN side: divergence_fwd rejects the row (it raises, naming it); the
  // weights are never used.
  if (!std::isfinite(log_z_s + max_s) || !std::isfinite(log_z_t + max_t)) {
    w[0] = w[1] = 0.5;
    return;
  }

  // p, |p - q| and the key (p or -p). The padding entries (-inf logits) have p = q = 0: gap 0 and
  // key +-0, the smallest p, last in index order, so they change no sum and no tie's rank.
  PackSum<F> mass, gap_total;
  Vec kmax(std::numeric_limits<F>::lowest()), kmin(std::numeric_limits<F>::max());
  const Vec m_s(max_s), m_t(max_t), lz_s(static_cast<F>(log_z_s)), lz_t(static_cast<F>(log_z_t));
  row.each([&](int64_t k, Vec xs, Vec xt) KDPLUG_LAMBDA_INLINE {
    const Vec lp = (xt - m_t) - lz_t, lq = (xs - m_s) - lz_s;
    const Vec P = O::exp(lp), Q = O::exp(lq);
    const Vec key = descending ? P : O::neg(P);
    // P - Q rounds once (exactly where P and Q are within a factor 2: Sterbenz), so |P - Q| is as
    // precise as P and Q are, except near 1, where P and Q themselves round away the gap (1 - 1e-9
    // is 1.0f): the packs holding a P or Q above 1/2 (one or two per row) take abs_gap.
    const Vec gap = C10_UNLIKELY(O::any(O::gt(O::max(P, Q), Vec(F(0.5))))) ? abs_gap(lp, lq, P, Q) : O::abs(P - Q);
    gap.store(gaps + k);
    key.store(keys + k);
    gap_total.add(gap);
    kmax = O::max(kmax, key);
    kmin = O::min(kmin, key);
    mass.add(P);
  });

  if (mass.value() <= mu) {  // the whole row is the prefix (mu within rounding of 1)
    descending ? head_tail_split(gap_total.value(), 0.0, w) : head_tail_split(0.0, gap_total.value(), w);
    return;
  }

  // The bracket, in floats: lo a present key with S(>= lo) > mu, hi a present key with
  // S(> hi) <= mu (S: the mass of a set of keys), tested at tau, the float midway between them
  // as sortable integers; each step moves lo up to the smallest key >= tau or hi down to the
  // largest key < tau. It ends when no float lies between them (hi = lo): v = lo, whose ties are
  // split, and {key > v} holds the prefix's complete part, of mass S(> hi). Each step reads only
  // the candidates, the keys in (lo, hi] (the first: all keys), and writes the two halves at tau
  // apart (those >= tau from the front of the output list, those < tau from its back), so the
  // next step reads the half its bracket kept: the row once, then lists that shrink geometrically.
  const F key_max = hmax<F>(kmax);
  F lo = hmin<F>(kmin), hi = key_max;
  double upper_mass = 0;  // S(> hi)
  const F* list = keys;
  int64_t n = Vp;
  F* out = lists;  // two lists of Vp, used in turn
  while (sortable_key<F>(hi) > sortable_key<F>(lo)) {
    const U a = sortable_key<F>(lo), b = sortable_key<F>(hi) + 1;
    const F tau = sortable_value<F>(a + (b - a) / 2);  // in (lo, hi]
    const Vec vtau(tau), vlo(lo), vhi(hi);
    PackSum<F> above;
    Vec min_ge(hi), max_lt(lo);
    int64_t n_ge = 0, n_lt = 0;
    auto step = [&](Vec key) KDPLUG_LAMBDA_INLINE {
      const auto in = O::land(O::gt(key, vlo), O::le(key, vhi));
      const auto ge = O::land(in, O::ge(key, vtau)), lt = O::land(in, O::lt(key, vtau));
      above.add(O::select(ge, O::abs(key), Vec(F(0))));
      min_ge = O::select(ge, O::min(min_ge, key), min_ge);
      max_lt = O::select(lt, O::max(max_lt, key), max_lt);
      n_ge += compress_store<F, O>(out + n_ge, key, ge);
      const int64_t c = lane_count<F, O>(lt);
      n_lt += c;
      compress_store<F, O>(out + Vp - n_lt, key, lt);
    };
    int64_t k = 0;
    for (; k + W <= n; k += W) step(Vec::loadu(list + k));
    if (k < n) {  // the rest, padded with lo (outside the bracket)
      alignas(64) F rest[W];
      for (int i = 0; i < W; ++i) rest[i] = k + i < n ? list[k + i] : lo;
      step(Vec::loadu(rest));
    }
    const double S = upper_mass + above.value();
    if (S <= mu) {
      hi = hmax<F>(max_lt);  // {key >= tau} = {key > max_lt}
      upper_mass = S;
      list = out + Vp - n_lt;
      n = n_lt;
    } else {
      lo = hmin<F>(min_ge);  // {key >= tau} = {key >= min_ge}
      list = out;
      n = n_ge;
    }
    out = out == lists ? lists + Vp : lists;
  }
  const F v = lo;

  // The gap sums: keys above v are in the prefix, keys below it out; v's ties in index order.
  const double v_mass = static_cast<double>(descending ? v : -v);
  const bool top1 = descending && v == key_max;  // nothing above v: v's first entry is the head
  PackSum<F> in_gap, out_gap;
  double ties_in = 0, ties_out = 0, running = upper_mass;
  bool first = true;
  const Vec vv(v);
  for (int64_t k = 0; k < Vp; k += W) {
    const Vec key = Vec::loadu(keys + k), g = Vec::loadu(gaps + k);
    in_gap.add(O::select(O::gt(key, vv), g, Vec(F(0))));
    out_gap.add(O::select(O::lt(key, vv), g, Vec(F(0))));
    const auto tie = O::eq(key, vv);
    if (O::any(tie)) {
      for (int i = 0; i < W; ++i) {
        if (keys[k + i] != v) continue;
        running += v_mass;
        const double gap = static_cast<double>(gaps[k + i]);
        if (running <= mu || (top1 && first)) {
          ties_in += gap;
        } else {
          ties_out += gap;
        }
        first = false;
      }
    }
  }
  const double prefix = in_gap.value() + ties_in, rest = out_gap.value() + ties_out;
  if (descending) {
    head_tail_split(prefix, rest, w);
  } else {
    head_tail_split(rest, prefix, w);
  }
}

}  // namespace

template <class scalar_t>
void head_tail_cpu(const HeadTailArgs<scalar_t>& a, double* weights) {
  using F = compute_t<scalar_t>;
  constexpr int W = Vectorized<F>::size();
  const int64_t Vp = detail::padded<W>(a.V);
  at::parallel_for(0, a.N, detail::grain(a.V), [&](int64_t begin, int64_t end) {
    std::vector<F> scratch;  // keys, gaps, two lists; allocated by the first unmasked row
    for (int64_t n = begin; n < end; ++n) {
      double* w = weights + 2 * n;
      if (!a.row_mask[n * a.mask_stride] || a.V == 0) {  // never read: it may hold NaN
        w[0] = w[1] = 0.5;
        continue;
      }
      if (scratch.empty()) scratch.resize(static_cast<size_t>(4 * Vp));
      head_tail_row<scalar_t>(a.s + n * a.s_stride, a.t + n * a.t_stride, a.V, static_cast<F>(a.inv_T), a.mu,
                              a.descending, scratch.data(), scratch.data() + Vp, scratch.data() + 2 * Vp, w);
    }
  });
}

#define KDPLUG_INSTANTIATE(T) template void head_tail_cpu<T>(const HeadTailArgs<T>&, double*);
KDPLUG_CPU_DTYPES(KDPLUG_INSTANTIATE)
#undef KDPLUG_INSTANTIATE

}  // namespace cpu
}  // namespace kdplug
