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
//      integers of the float keys (kdplug_math.h). A step is one pass over the row's keys: the
//      mass at or above tau, the smallest key at or above it and the largest below; the bracket
//      then jumps to those present keys, so no two steps test the same set (at most 32 steps,
//      64 for float64; a peaked row whose top entry alone passes mu takes none).
//   2. the prefix is that upper set plus the first entries of the next key v (its ties), by
//      index, while the running sum stays <= mu; with order "descending", v's first entry is
//      the head when the upper set is empty (the top-1 rule).
// Passes: the two maxima, the two log-sum-exps; p, |p - q| (abs_gap: from the log-probabilities) and the key, kept in per-thread buffers (2 x V
// floats: with the row's logits they fit L2 at V = 128k); the bisection steps over the keys; one
// pass for the gap sums. Masses and gaps are float sums folded into double every 64 packs. The
// PyTorch path (float64 p from float32 log-probabilities, a float64 cumsum) agrees with this one
// except for a boundary entry whose running sum lies within rounding (~1e-7) of mu.
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

template <class F>
KDPLUG_INLINE F hmax(Vectorized<F> v) {
  alignas(64) F a[Vectorized<F>::size()];
  v.store(a);
  F m = a[0];
  for (int i = 1; i < Vectorized<F>::size(); ++i) m = a[i] > m ? a[i] : m;
  return m;
}

template <class F>
KDPLUG_INLINE F hmin(Vectorized<F> v) {
  alignas(64) F a[Vectorized<F>::size()];
  v.store(a);
  F m = a[0];
  for (int i = 1; i < Vectorized<F>::size(); ++i) m = a[i] < m ? a[i] : m;
  return m;
}

// One row: w = (w_head, w_tail). keys and gaps: scratch of padded(V) entries.
template <class scalar_t>
void head_tail_row(const scalar_t* s, const scalar_t* t, int64_t V, compute_t<scalar_t> inv_T, double mu,
                   bool descending, compute_t<scalar_t>* keys, compute_t<scalar_t>* gaps, double* w) {
  using F = compute_t<scalar_t>;
  using Vec = Vectorized<F>;
  using O = Ops<Vec>;
  using U = typename SortableBits<F>::U;
  constexpr int W = Vec::size();
  const RowView<scalar_t> row(s, t, V, inv_T);
  const int64_t Vp = padded<W>(V);

  // The log-sum-exps as m + log z, z = c + r: c entries at the maximum m, r = the sum of exp(x - m)
  // over the others, accumulated apart from c, so that a peaked row keeps r (float32 would round
  // 1 + r to 1 for r < 6e-8, and lose r's digits above that) and log z = log c + log1p(r / c). The
  // log-probabilities are then (x - m) - log z, each part exact or small: a peaked row's top
  // entry gets lp = -log1p(r), not 0, and its gap to the student survives (abs_gap).
  Vec max_s(std::numeric_limits<F>::lowest()), max_t(std::numeric_limits<F>::lowest());
  row.each([&](int64_t, Vec xs, Vec xt) KDPLUG_LAMBDA_INLINE {
    max_s = O::max(max_s, xs);
    max_t = O::max(max_t, xt);
  });
  const Vec m_s(hmax<F>(max_s)), m_t(hmax<F>(max_t));
  PackSum<F> r_s, r_t, c_s, c_t;
  const Vec zero(F(0)), one(F(1));
  row.each([&](int64_t, Vec xs, Vec xt) KDPLUG_LAMBDA_INLINE {
    const auto top_s = O::eq(xs, m_s), top_t = O::eq(xt, m_t);
    r_s.add(O::select(top_s, zero, O::exp(xs - m_s)));  // NaN entries make r NaN; -inf ones add 0
    r_t.add(O::select(top_t, zero, O::exp(xt - m_t)));
    c_s.add(O::select(top_s, one, zero));
    c_t.add(O::select(top_t, one, zero));
  });
  const double log_z_s = std::log(c_s.value()) + std::log1p(r_s.value() / c_s.value());
  const double log_z_t = std::log(c_t.value()) + std::log1p(r_t.value() / c_t.value());
  // An all -inf, +inf or NaN side: divergence_fwd rejects the row (it raises, naming it); the
  // weights are never used.
  if (!std::isfinite(log_z_s + hmax<F>(max_s)) || !std::isfinite(log_z_t + hmax<F>(max_t))) {
    w[0] = w[1] = 0.5;
    return;
  }

  // p, |p - q| and the key (p or -p). The padding entries (-inf logits) have p = q = 0: gap 0 and
  // key +-0, the smallest p, last in index order, so they change no sum and no tie's rank.
  PackSum<F> mass, gap_total;
  Vec kmax(std::numeric_limits<F>::lowest()), kmin(std::numeric_limits<F>::max());
  const Vec lz_s(static_cast<F>(log_z_s)), lz_t(static_cast<F>(log_z_t));
  row.each([&](int64_t k, Vec xs, Vec xt) KDPLUG_LAMBDA_INLINE {
    const Vec lp = (xt - m_t) - lz_t, lq = (xs - m_s) - lz_s;
    const Vec P = O::exp(lp), Q = O::exp(lq);
    const Vec key = descending ? P : O::neg(P);
    const Vec gap = abs_gap(lp, lq, P, Q);
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

  // The bracket: S(lo) > mu >= S(hi), S(x) = the mass of {key >= sortable_value(x)}; lo moves to
  // present keys and hi to one above a present key, so the loop ends with lo = the key v whose
  // ties are split and {key >= sortable_value(hi)} = {key > v}, of mass S(hi).
  U lo = sortable_key<F>(hmin<F>(kmin)), hi = sortable_key<F>(hmax<F>(kmax)) + 1;
  double upper_mass = 0;  // S(hi)
  while (hi - lo > 1) {
    const U mid = lo + (hi - lo) / 2;
    const Vec tau(sortable_value<F>(mid));
    PackSum<F> above;
    Vec min_ge(std::numeric_limits<F>::max()), max_lt(std::numeric_limits<F>::lowest());
    for (int64_t k = 0; k < Vp; k += W) {
      const Vec key = Vec::loadu(keys + k);
      const auto ge = O::ge(key, tau);
      above.add(O::select(ge, O::abs(key), Vec(F(0))));
      min_ge = O::select(ge, O::min(min_ge, key), min_ge);
      max_lt = O::select(ge, max_lt, O::max(max_lt, key));
    }
    const double S = above.value();
    if (S <= mu) {
      hi = sortable_key<F>(hmax<F>(max_lt)) + 1;  // {key >= tau} = {key > max_lt}
      upper_mass = S;
    } else {
      lo = sortable_key<F>(hmin<F>(min_ge));  // {key >= tau} = {key >= min_ge}
    }
  }
  const F v = sortable_value<F>(lo);

  // The gap sums: keys above v are in the prefix, keys below it out; v's ties in index order.
  const double v_mass = static_cast<double>(descending ? v : -v);
  const bool top1 = descending && v == hmax<F>(kmax);  // nothing above v: v's first entry is the head
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
  at::parallel_for(0, a.N, 1, [&](int64_t begin, int64_t end) {
    std::vector<F> scratch;  // keys, then gaps; allocated by the first unmasked row
    for (int64_t n = begin; n < end; ++n) {
      double* w = weights + 2 * n;
      if (!a.row_mask[n * a.mask_stride] || a.V == 0) {  // never read: it may hold NaN
        w[0] = w[1] = 0.5;
        continue;
      }
      if (scratch.empty()) scratch.resize(static_cast<size_t>(2 * Vp));
      head_tail_row<scalar_t>(a.s + n * a.s_stride, a.t + n * a.t_stride, a.V, static_cast<F>(a.inv_T), a.mu,
                              a.descending, scratch.data(), scratch.data() + Vp, w);
    }
  });
}

#define KDPLUG_INSTANTIATE(T) template void head_tail_cpu<T>(const HeadTailArgs<T>&, double*);
KDPLUG_CPU_DTYPES(KDPLUG_INSTANTIATE)
#undef KDPLUG_INSTANTIATE

}  // namespace cpu
}  // namespace kdplug
