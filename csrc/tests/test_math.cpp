// Unit tests of csrc/kdplug_math.h (no torch): identities, limits, zero / -inf rules, the online
// log-sum-exp, and the gradient of the scalar row driver against finite differences.
// Built and run by CMake (ctest); exits non-zero on the first failed check.
#include "kdplug_math.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

using namespace kdplug::math;

namespace {

int g_checks = 0;
int g_failures = 0;

#define CHECK(cond, ...)                                              \
  do {                                                                \
    ++g_checks;                                                       \
    if (!(cond)) {                                                    \
      ++g_failures;                                                   \
      std::printf("FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);     \
      std::printf(__VA_ARGS__);                                       \
      std::printf("\n");                                              \
    }                                                                 \
  } while (0)

bool close(double a, double b, double rtol, double atol) {
  if (std::isinf(a) || std::isinf(b)) return a == b;
  return std::abs(a - b) <= atol + rtol * std::abs(b);
}

const double NINF = -INFINITY;
const double PINF = INFINITY;
const double DNAN = NAN;

// log-softmax of a vector (double)
std::vector<double> log_softmax(const std::vector<double>& x) {
  OnlineLse<double> acc;
  for (double v : x) acc.add(v);
  std::vector<double> out(x.size());
  for (size_t k = 0; k < x.size(); ++k) out[k] = x[k] - acc.value();
  return out;
}

// A packed recipe, as kdplug/_pack.py writes it.
struct Packed {
  std::vector<int64_t> structure;
  std::vector<double> consts;
  std::vector<double> params;
  RecipeDesc desc;
};

struct TermSpec {
  int lhs, rhs, div;
  double weight, ab_a, ab_b;
};

Packed pack(int policy, bool assistant, bool detach, double alpha, double T, double lam,
            const std::vector<TermSpec>& terms) {
  Packed p;
  p.structure = {policy, assistant ? 1 : 0, detach ? 1 : 0, static_cast<int64_t>(terms.size())};
  p.consts = {alpha};
  p.params = {T, lam};
  for (const auto& t : terms) {
    p.structure.insert(p.structure.end(), {t.lhs, t.rhs, t.div});
    p.consts.insert(p.consts.end(), {t.ab_a, t.ab_b});
    p.params.push_back(t.weight);
  }
  const char* err = decode_recipe(p.structure.data(), static_cast<int64_t>(p.structure.size()), p.consts.data(),
                                  static_cast<int64_t>(p.consts.size()), &p.desc);
  if (err) {
    std::printf("decode_recipe failed: %s\n", err);
    std::exit(2);
  }
  return p;
}

double row_loss(const Packed& p, const std::vector<double>& s, const std::vector<double>& t,
                std::vector<double>* stats = nullptr) {
  double loss = 0, st[kStats];
  bool ok = forward_row<double>(p.desc, p.params.data(), static_cast<const double*>(nullptr), s.data(), t.data(),
                                static_cast<int64_t>(s.size()), &loss, st);
  if (!ok) return NAN;
  if (stats) stats->assign(st, st + kStats);
  return loss;
}

std::vector<double> row_grad(const Packed& p, const std::vector<double>& s, const std::vector<double>& t,
                             double grad_loss) {
  std::vector<double> stats;
  row_loss(p, s, t, &stats);
  std::vector<double> g(s.size());
  backward_row<double>(p.desc, p.params.data(), static_cast<const double*>(nullptr), s.data(), t.data(),
                       static_cast<int64_t>(s.size()), stats.data(), grad_loss, g.data());
  return g;
}

// ------------------------------------------------------------------------------------------------
void test_decode() {
  RecipeDesc d;
  const int64_t ok[] = {0, 1, 0, 1, 0, 2, 0};
  const double c1[] = {-1.0, 1.0, 0.0};
  CHECK(decode_recipe(ok, 7, c1, 3, &d) == nullptr, "valid recipe rejected");
  CHECK(d.mix == MIX_ARITHMETIC && d.a == 1.0, "alpha=-1 is the arithmetic mixture");
  const double c2[] = {1.0, 1.0, 0.0};
  decode_recipe(ok, 7, c2, 3, &d);
  CHECK(d.mix == MIX_GEOMETRIC && d.a == 0.0, "alpha=1 is the geometric mixture");
  const double c3[] = {0.5, 1.0, 0.0};
  decode_recipe(ok, 7, c3, 3, &d);
  CHECK(d.mix == MIX_ALPHA && d.a == 0.25, "alpha=0.5 -> a=0.25");
  const int64_t no_assistant[] = {0, 0, 0, 1, 0, 2, 0};
  CHECK(decode_recipe(no_assistant, 7, c1, 3, &d) != nullptr, "assistant operand without assistant accepted");
  const int64_t same[] = {0, 0, 0, 1, 1, 1, 0};
  CHECK(decode_recipe(same, 7, c1, 3, &d) != nullptr, "lhs == rhs accepted");
  const int64_t bad_div[] = {0, 0, 0, 1, 0, 1, 7};
  CHECK(decode_recipe(bad_div, 7, c1, 3, &d) != nullptr, "divergence code 7 accepted");
  const int64_t short_[] = {0, 0, 0, 2, 0, 1, 0};
  CHECK(decode_recipe(short_, 7, c1, 3, &d) != nullptr, "n_terms inconsistent with the length accepted");
  const double neg_ab[] = {-1.0, -0.5, 0.0};
  const int64_t ab[] = {0, 0, 0, 1, 0, 1, 2};
  CHECK(decode_recipe(ab, 7, neg_ab, 3, &d) != nullptr, "negative ab_alpha accepted");
}

// Every element, every combination of {-inf, finite} operands: never NaN; both -inf -> 0.
void test_zero_rules() {
  const double vals[] = {NINF, -50.0, -3.0, -0.1, 0.0};
  const double ab[][2] = {{0.2, 0.7}, {1.0, 0.0}, {0.0, 1.0}, {0.0, 0.0}, {0.5, 0.5}};
  for (double lP : vals)
    for (double lQ : vals) {
      std::vector<Element<double>> els = {kl_element(lP, lQ), ce_element(lP, lQ), tvd_element(lP, lQ)};
      for (auto& a : ab) els.push_back(ab_element(lP, lQ, a[0], a[1]));
      for (size_t i = 0; i < els.size(); ++i) {
        const auto& el = els[i];
        CHECK(!std::isnan(el.e) && !std::isnan(el.dP) && !std::isnan(el.dQ), "NaN in element %zu at (%g, %g)", i, lP,
              lQ);
        if (lP == NINF && lQ == NINF)
          CHECK(el.e == 0 && el.dP == 0 && el.dQ == 0, "element %zu not 0 where both are 0", i);
        if (lP == NINF && i < 2) CHECK(el.e == 0 && el.dP == 0 && el.dQ == 0, "KL/CE with P = 0 not 0 (%zu)", i);
      }
    }
  // the support mismatch: P > 0 = Q gives +inf (KL, CE), finite dQ
  Element<double> mm = kl_element(-1.0, NINF);
  CHECK(mm.e == INFINITY && mm.dP == INFINITY && mm.dQ == -std::exp(-1.0), "KL mismatch");
  // AB with alpha, beta > 0 is finite on one-sided zeros: q^k / (alpha k) and p^k / (beta k)
  const double a = 0.2, b = 0.7, k = 0.9;
  Element<double> qz = ab_element(NINF, -0.5, a, b);
  CHECK(close(qz.e, std::exp(-0.5 * k) / (a * k), 1e-12, 0), "AB(p=0): %g", qz.e);
  Element<double> pz = ab_element(-0.5, NINF, a, b);
  CHECK(close(pz.e, std::exp(-0.5 * k) / (b * k), 1e-12, 0), "AB(q=0): %g", pz.e);
  // mul0 and finite_or_0
  CHECK(mul0(0.0, PINF) == 0.0 && mul0(0.0, DNAN) == 0.0 && mul0(2.0, 3.0) == 6.0, "mul0");
  CHECK(finite_or_0(PINF) == 0.0 && finite_or_0(DNAN) == 0.0 && finite_or_0(-2.0) == -2.0, "finite_or_0");
}

// The fast AB path equals the literal one; the AB family's limits are continuous.
void test_ab() {
  std::mt19937 gen(1);
  std::uniform_real_distribution<double> u(-12.0, 0.0);
  const double params[][2] = {{0.2, 0.7}, {1.0, 1.0}, {0.5, 0.5}, {2.0, 0.3}, {1e-3, 0.9}};
  for (auto& ab : params)
    for (int i = 0; i < 200; ++i) {
      double lP = i % 17 == 0 ? NINF : u(gen), lQ = i % 13 == 0 ? NINF : u(gen);
      if (i % 11 == 0) lQ = lP;
      Element<double> f = ab_element(lP, lQ, ab[0], ab[1]);
      Element<double> r = ab_element_ref(lP, lQ, ab[0], ab[1]);
      CHECK(close(f.e, r.e, 1e-10, 1e-14) && close(f.dP, r.dP, 1e-10, 1e-14) && close(f.dQ, r.dQ, 1e-10, 1e-14),
            "fast AB != reference at (%g, %g), ab=(%g, %g): e %g vs %g, dP %g vs %g, dQ %g vs %g", lP, lQ, ab[0],
            ab[1], f.e, r.e, f.dP, r.dP, f.dQ, r.dQ);
    }
  // continuity of the element at alpha -> 0, beta -> 0, alpha = beta -> 0
  const double limits[][2] = {{0.0, 0.7}, {0.7, 0.0}, {0.0, 0.0}, {1.0, 0.0}, {0.0, 1.0}};
  for (auto& ab : limits)
    for (int i = 0; i < 100; ++i) {
      double lP = u(gen) * 0.3, lQ = u(gen) * 0.3;
      Element<double> at = ab_element(lP, lQ, ab[0], ab[1]);
      Element<double> near = ab_element(lP, lQ, ab[0] + 1e-7, ab[1] + 1e-7);
      CHECK(close(near.e, at.e, 1e-5, 1e-6) && close(near.dP, at.dP, 1e-5, 1e-6) && close(near.dQ, at.dQ, 1e-5, 1e-6),
            "AB not continuous at (%g, %g) for (%g, %g): e %g vs %g", ab[0], ab[1], lP, lQ, near.e, at.e);
    }
  // summed over a distribution: AB(1, 0) = KL(p||q), AB(0, 1) = KL(q||p), AB(1/2, 1/2) = 4 Hellinger^2
  std::vector<double> s(37), t(37);
  for (int k = 0; k < 37; ++k) {
    s[k] = u(gen) * 0.4;
    t[k] = u(gen) * 0.4;
  }
  std::vector<double> lq = log_softmax(s), lp = log_softmax(t);
  double ab10 = 0, ab01 = 0, abh = 0, kl_pq = 0, kl_qp = 0, hel = 0;
  for (int k = 0; k < 37; ++k) {
    ab10 += ab_element(lp[k], lq[k], 1.0, 0.0).e;
    ab01 += ab_element(lp[k], lq[k], 0.0, 1.0).e;
    abh += ab_element(lp[k], lq[k], 0.5, 0.5).e;
    kl_pq += kl_element(lp[k], lq[k]).e;
    kl_qp += kl_element(lq[k], lp[k]).e;
    double d = std::exp(lp[k] / 2) - std::exp(lq[k] / 2);
    hel += 0.5 * d * d;
  }
  CHECK(close(ab10, kl_pq, 1e-10, 1e-13), "AB(1,0) %g != KL(p||q) %g", ab10, kl_pq);
  CHECK(close(ab01, kl_qp, 1e-10, 1e-13), "AB(0,1) %g != KL(q||p) %g", ab01, kl_qp);
  CHECK(close(abh, 4 * hel, 1e-10, 1e-13), "AB(1/2,1/2) %g != 4 H^2 %g", abh, 4 * hel);
}

void test_mixtures() {
  std::mt19937 gen(2);
  std::uniform_real_distribution<double> u(-30.0, 0.0);
  for (int i = 0; i < 300; ++i) {
    double lp = i % 19 == 0 ? NINF : u(gen), lq = i % 23 == 0 ? NINF : u(gen);
    double lam = (i % 5) / 4.0;
    // arithmetic: log(lam p + (1 - lam) q)
    double arith = alpha_mix(lp, lq, lam, std::log(lam), std::log1p(-lam), 1.0, 1.0);
    double direct = std::log(lam * std::exp(lp) + (1 - lam) * std::exp(lq));
    CHECK(close(arith, direct, 1e-12, 1e-12), "arithmetic mixture %g vs %g (lam %g)", arith, direct, lam);
    // lam = 0 / 1 give the sides
    CHECK(close(alpha_mix(lp, lq, 0.0, NINF, 0.0, 0.3, 1 / 0.3), lq, 1e-12, 1e-12), "lam=0 is q");
    CHECK(close(alpha_mix(lp, lq, 1.0, 0.0, NINF, 0.3, 1 / 0.3), lp, 1e-12, 1e-12), "lam=1 is p");
    // a -> 0 tends to the geometric mixture
    if (lp != NINF && lq != NINF && lam > 0 && lam < 1) {
      double near_geo = alpha_mix(lp, lq, lam, std::log(lam), std::log1p(-lam), 1e-7, 1e7);
      double geo = geometric_mix(lp, lq, lam);
      CHECK(close(near_geo, geo, 1e-5, 1e-4), "alpha-mixture as a->0: %g vs geometric %g", near_geo, geo);
    }
    // a general exponent against the direct formula (in a safe range)
    if (lp > -20 && lq > -20) {
      double a = 0.25;
      double d2 = std::log(std::pow(lam * std::pow(std::exp(lp), a) + (1 - lam) * std::pow(std::exp(lq), a), 1 / a));
      CHECK(close(alpha_mix(lp, lq, lam, std::log(lam), std::log1p(-lam), a, 1 / a), d2, 1e-10, 1e-10), "alpha mixture a=0.25");
    }
  }
  // the arithmetic mixture's log-sum-exp form agrees with the general one at a = 1
  for (int i = 0; i < 300; ++i) {
    double lp = i % 19 == 0 ? NINF : u(gen), lq = i % 23 == 0 ? NINF : u(gen), lam = (i % 7) / 6.0;
    double general = alpha_mix(lp, lq, lam, std::log(lam), std::log1p(-lam), 1.0, 1.0);
    double lse = arithmetic_mix(lp, lq, std::log(lam), std::log1p(-lam));
    CHECK(close(lse, general, 1e-12, 1e-12), "arithmetic_mix %g vs alpha_mix %g", lse, general);
  }
  // fp32 with a weight at or near 0 / 1 and sides far apart (1 + w expm1(y) would cancel)
  const float sides[][2] = {{-30.0f, -1.0f}, {-1.0f, -30.0f}, {-60.0f, -0.5f}, {-0.5f, -60.0f}};
  const float lams[] = {0.0f, 1e-6f, 1e-3f, 0.5f, 1.0f - 1e-3f, 1.0f - 1e-6f, 1.0f};
  const float exps[] = {1.0f, 0.25f, 2.0f};
  for (auto& sd : sides)
    for (float lam : lams)
      for (float a : exps) {
        float got = alpha_mix(sd[0], sd[1], lam, std::log(lam), std::log1p(-lam), a, 1.0f / a);
        double want = std::log(std::pow(static_cast<double>(lam) * std::exp(a * static_cast<double>(sd[0])) +
                                            (1.0 - static_cast<double>(lam)) * std::exp(a * static_cast<double>(sd[1])),
                                        1.0 / a));
        CHECK(close(got, want, 2e-6, 2e-6), "fp32 alpha_mix(%g, %g, lam=%g, a=%g) = %g, want %g", sd[0], sd[1], lam, a,
              got, want);
        if (a == 1.0f) {
          float lse = arithmetic_mix(sd[0], sd[1], std::log(lam), std::log1p(-lam));
          CHECK(close(lse, want, 2e-6, 2e-6), "fp32 arithmetic_mix lam=%g: %g, want %g", lam, lse, want);
        }
      }
  // the geometric mixture's zero rules
  CHECK(geometric_mix(NINF, -1.0, 0.5) == NINF, "geometric: p = 0 with weight > 0");
  CHECK(geometric_mix(NINF, -1.0, 0.0) == -1.0, "geometric: p = 0 with weight 0 is q");
  CHECK(geometric_mix(-2.0, NINF, 1.0) == -2.0, "geometric: q = 0 with weight 0 is p");
  CHECK(alpha_mix(NINF, NINF, 0.5, std::log(0.5), std::log(0.5), 0.5, 2.0) == NINF, "alpha mixture of two zeros");
  // alpha_mix's w (from its own expm1) against mixture_weight's exp, in double and float: sides far
  // apart, -inf sides, weights at and near 0 / 1, a > 0 and a < 0 (the power mean past alpha = 1)
  {
    const double ls[] = {NINF, -60.0, -30.0, -3.0, -1.0, -0.5, -1e-3, 0.0};
    const double lm[] = {0.0, 1e-6, 0.3, 0.5, 1.0 - 1e-6, 1.0};
    const double as[] = {0.25, 0.75, 1e-3, -0.5};
    for (double lp : ls)
      for (double lq : ls)
        for (double lam : lm)
          for (double a : as) {
            double w = -1;
            const double lr = alpha_mix(lp, lq, lam, std::log(lam), std::log1p(-lam), a, 1 / a, &w);
            CHECK(lr == alpha_mix(lp, lq, lam, std::log(lam), std::log1p(-lam), a, 1 / a), "alpha_mix with w: same log r~");
            if (lr == NINF && lq != NINF) continue;  // r = 0 (a < 0, p = 0): w multiplies only zeros
            const double want = mixture_weight(lq, lr, 1 - lam, a);
            CHECK(close(w, want, 1e-13, 1e-15), "alpha_mix w(%g, %g, lam=%g, a=%g) = %g, mixture_weight %g", lp, lq, lam, a,
                  w, want);
            // fp32, against the double formula at the float-rounded lam
            const float lam_f = float(lam);
            const double lr_f = alpha_mix(lp, lq, double(lam_f), std::log(double(lam_f)), std::log1p(-double(lam_f)), a,
                                          1 / a);
            const double want_f = mixture_weight(lq, lr_f, 1 - double(lam_f), a);
            float wf = -1;
            alpha_mix(float(lp), float(lq), lam_f, std::log(lam_f), std::log1p(-lam_f), float(a), float(1 / a), &wf);
            CHECK(close(wf, want_f, 3e-6, 1e-30), "fp32 alpha_mix w(%g, %g, lam=%g, a=%g) = %g, want %g", lp, lq, lam, a,
                  wf, want_f);
          }
  }
  // log1p_half (alpha_mix's usual branch) in float: within 2 ulp of the double log1p over
  // [-1/2, 0], ends, tiny and subnormal z included (relative precision where the result is small)
  {
    std::vector<float> zs = {0.0f,   -0.0f,   -0.5f,  -1e-38f,    -1e-45f,
                             -1e-30f, -1e-7f, -0.25f, -0.3333333f, -0.4999999f};
    for (int i = 0; i <= 100000; ++i) zs.push_back(-0.5f * float(i) / 100000.0f);
    for (int e = 2; e < 150; ++e) zs.push_back(-std::ldexp(1.2345f, -e));
    double worst = 0;
    for (float z : zs) {
      const float got = log1p_half(z);
      const double want = std::log1p(static_cast<double>(z));
      const float mag = float(std::abs(want));
      const double ulp = want == 0.0 ? 0.0 : std::abs(got - want) / (std::nextafter(mag, INFINITY) - mag);
      if (want == 0.0) CHECK(got == 0.0f, "log1p_half(%g) = %g, want 0", z, got);
      worst = std::max(worst, ulp);
      CHECK(ulp <= 2.0, "log1p_half(%.9g) = %.9g, want %.9g (%.2f ulp)", z, got, want, ulp);
    }
    CHECK(worst > 0.0, "log1p_half: the sweep checked nothing");
    std::printf("log1p_half: worst %.2f ulp\n", worst);
  }
  // mixture weight: bounded by 1 - lam, 0 where q = 0
  CHECK(mixture_weight(NINF, -1.0, 0.7, 0.5) == 0.0, "w at q = 0");
  CHECK(mixture_weight(-1.0, alpha_mix(-3.0, -1.0, 0.3, std::log(0.3), std::log(0.7), 0.5, 2.0), 0.7, 0.5) <= 1.0, "w <= 1");
}

void test_online_lse() {
  std::mt19937 gen(3);
  std::normal_distribution<double> n(0.0, 20.0);
  for (int rep = 0; rep < 20; ++rep) {
    std::vector<double> x(1000);
    for (auto& v : x) v = n(gen);
    for (int k = 0; k < 1000; k += 7) x[k] = NINF;
    double m = NINF;
    for (double v : x) m = std::max(m, v);
    double z = 0;
    for (double v : x) z += std::exp(v - m);
    double direct = m + std::log(z);
    OnlineLse<double> acc;
    for (double v : x) acc.add(v);
    CHECK(close(acc.value(), direct, 1e-13, 0), "online LSE %g vs %g", acc.value(), direct);
    // split in 4 parts, merged in another order
    OnlineLse<double> parts[4];
    for (size_t k = 0; k < x.size(); ++k) parts[k % 4].add(x[k]);
    OnlineLse<double> merged;
    for (int i : {2, 0, 3, 1}) merged.merge(parts[i].m, parts[i].z);
    CHECK(close(merged.value(), direct, 1e-13, 0), "merged LSE %g vs %g", merged.value(), direct);
  }
  OnlineLse<double> all_ninf;
  for (int k = 0; k < 5; ++k) all_ninf.add(NINF);
  CHECK(all_ninf.value() == NINF, "LSE of all -inf is -inf");
  OnlineLse<double> with_nan;
  with_nan.add(1.0);
  with_nan.add(NAN);
  CHECK(std::isnan(with_nan.value()), "LSE with NaN is NaN");
  OnlineLse<double> with_inf;
  with_inf.add(1.0);
  with_inf.add(INFINITY);
  with_inf.add(2.0);
  CHECK(!std::isfinite(with_inf.value()), "LSE with +inf is not finite");
  OnlineLse<float> f;
  f.add(100.0f);
  f.add(-100.0f);
  f.add(100.0f);
  CHECK(close(f.value(), 100.0 + std::log(2.0), 1e-6, 0), "float LSE");
}

// The gradient of the row driver is the derivative of its loss (recipes without a detached
// assistant), including temperature, weights and several terms.
void test_gradients() {
  const double T = 1.7;
  struct Case {
    const char* name;
    Packed p;
  };
  std::vector<Case> cases = {
      {"fkl", pack(EXACT, false, false, 1.0, T, 0.5, {{TEACHER, STUDENT, KL, 1.0, 1, 0}})},
      {"rkl", pack(EXACT, false, false, 1.0, T, 0.5, {{STUDENT, TEACHER, KL, 1.0, 1, 0}})},
      {"sym", pack(EXACT, false, false, 1.0, T, 0.5, {{TEACHER, STUDENT, CE, 0.3, 1, 0}, {STUDENT, TEACHER, KL, 0.7, 1, 0}})},
      {"tvd", pack(EXACT, false, false, 1.0, T, 0.5, {{TEACHER, STUDENT, TVD, 1.0, 1, 0}})},
      {"abkd", pack(EXACT, false, false, 1.0, T, 0.5, {{TEACHER, STUDENT, AB, 1.0, 0.2, 0.7}})},
      {"abkd_limit", pack(EXACT, false, false, 1.0, T, 0.5, {{TEACHER, STUDENT, AB, 1.0, 0.0, 0.7}})},
      {"skl", pack(EXACT, true, false, -1.0, T, 0.1, {{TEACHER, ASSISTANT, KL, 1.0, 1, 0}})},
      {"srkl", pack(EXACT, true, false, -1.0, T, 0.9, {{STUDENT, ASSISTANT, KL, 1.0, 1, 0}})},
      {"jsd", pack(EXACT, true, false, -1.0, T, 0.3, {{TEACHER, ASSISTANT, KL, 0.3, 1, 0}, {STUDENT, ASSISTANT, KL, 0.7, 1, 0}})},
      {"amid_ab", pack(EXACT, true, false, 0.5, T, 0.4, {{TEACHER, ASSISTANT, AB, 1.0, 0.2, 0.7}})},
      {"amid_kl_rq", pack(EXACT, true, false, -3.0, T, 0.4, {{ASSISTANT, STUDENT, KL, 1.0, 1, 0}})},
      {"amid_geo", pack(EXACT, true, false, 1.0, T, 0.4, {{TEACHER, ASSISTANT, KL, 1.0, 1, 0}})},
      {"amid_geo_ab_qr", pack(EXACT, true, false, 1.0, T, 0.6, {{STUDENT, ASSISTANT, AB, 1.0, 0.5, 0.5}})},
  };
  std::mt19937 gen(4);
  std::normal_distribution<double> n(0.0, 2.0);
  const int V = 23;
  for (auto& cs : cases) {
    for (int variant = 0; variant < 2; ++variant) {
      std::vector<double> s(V), t(V);
      for (int k = 0; k < V; ++k) {
        t[k] = n(gen);
        s[k] = 0.7 * t[k] + n(gen);
      }
      if (variant == 1) {  // shared -inf entries (a padded vocabulary)
        s[3] = t[3] = NINF;
        s[10] = t[10] = NINF;
      }
      const double gout = 0.8;
      std::vector<double> g = row_grad(cs.p, s, t, gout);
      double max_err = 0;
      for (int k = 0; k < V; ++k) {
        if (s[k] == NINF) {
          CHECK(g[k] == 0.0, "%s: gradient at a -inf logit is %g", cs.name, g[k]);
          continue;
        }
        const double h = 1e-5;
        std::vector<double> sp = s, sm = s;
        sp[k] += h;
        sm[k] -= h;
        double fd = gout * (row_loss(cs.p, sp, t) - row_loss(cs.p, sm, t)) / (2 * h);
        max_err = std::max(max_err, std::abs(fd - g[k]));
      }
      CHECK(max_err < 1e-6, "%s (variant %d): gradient vs finite differences, max error %g", cs.name, variant, max_err);
    }
  }
}

// Rows with zeros: finite loss and gradients where the exact limits say so, +inf loss on a
// genuine mismatch, exactly-zero gradient for a zero incoming gradient, "exclude" policy.
void test_row_rules() {
  std::vector<double> s = {1.0, 0.5, NINF, -1.0, 2.0}, t = {0.2, NINF, 1.0, -0.5, 1.5};
  Packed fkl = pack(EXACT, false, false, 1.0, 1.0, 0.5, {{TEACHER, STUDENT, KL, 1.0, 1, 0}});
  CHECK(row_loss(fkl, s, t) == INFINITY, "FKL with p > 0 = q is +inf");
  std::vector<double> g = row_grad(fkl, s, t, 1.0);
  for (double v : g) CHECK(std::isfinite(v), "FKL mismatch gradient not finite");
  CHECK(g[2] == 0.0, "gradient at the -inf student logit");
  std::vector<double> g0 = row_grad(fkl, s, t, 0.0);
  for (double v : g0) CHECK(v == 0.0 && !std::signbit(v), "zero incoming gradient gives exactly 0");
  // exclude: the mismatch entry is dropped -> finite
  Packed fkl_ex = pack(EXCLUDE, false, false, 1.0, 1.0, 0.5, {{TEACHER, STUDENT, KL, 1.0, 1, 0}});
  double ex = row_loss(fkl_ex, s, t);
  CHECK(std::isfinite(ex), "exclude policy gives a finite loss (%g)", ex);
  std::vector<double> lq = log_softmax(s), lp = log_softmax(t);
  double direct = 0;
  for (size_t k = 0; k < s.size(); ++k)
    if (s[k] != NINF && t[k] != NINF) direct += std::exp(lp[k]) * (lp[k] - lq[k]);
  CHECK(close(ex, direct, 1e-12, 1e-14), "exclude FKL %g vs %g", ex, direct);
  // RKL, SKL, AB, TVD on the same row: finite where the limits are finite
  Packed skl = pack(EXACT, true, false, -1.0, 1.0, 0.1, {{TEACHER, ASSISTANT, KL, 1.0, 1, 0}});
  CHECK(std::isfinite(row_loss(skl, s, t)), "SKL finite with one-sided zeros");
  Packed tvd = pack(EXACT, false, false, 1.0, 1.0, 0.5, {{TEACHER, STUDENT, TVD, 1.0, 1, 0}});
  CHECK(std::isfinite(row_loss(tvd, s, t)), "TVD finite");
  Packed ab = pack(EXACT, false, false, 1.0, 1.0, 0.5, {{TEACHER, STUDENT, AB, 1.0, 0.2, 0.7}});
  CHECK(std::isfinite(row_loss(ab, s, t)), "AB finite");
  // a geometric mixture of disjoint supports is 0 everywhere: the row stays finite (log Z = -inf)
  std::vector<double> s2 = {1.0, NINF}, t2 = {NINF, 1.0};
  Packed geo = pack(EXACT, true, false, 1.0, 1.0, 0.5, {{ASSISTANT, STUDENT, KL, 1.0, 1, 0}});
  std::vector<double> st;
  double lg = row_loss(geo, s2, t2, &st);
  CHECK(lg == 0.0 && st[STAT_LOG_Z] == NINF, "disjoint geometric mixture: loss %g", lg);
  // a row that is all -inf, or holds NaN / +inf, is refused
  std::vector<double> dead = {NINF, NINF};
  CHECK(std::isnan(row_loss(fkl, dead, t2)), "all -inf student row accepted");
  std::vector<double> nanrow = {1.0, NAN};
  CHECK(std::isnan(row_loss(fkl, s2, nanrow)), "NaN teacher row accepted");
  std::vector<double> infrow = {1.0, INFINITY};
  CHECK(std::isnan(row_loss(fkl, infrow, t2)), "+inf student row accepted");
  // identities on a row: TAID (geometric, lam = 1) with KL is FKL; SKL at lam = 0 is FKL
  Packed taid1 = pack(EXACT, true, true, 1.0, 1.3, 1.0, {{ASSISTANT, STUDENT, KL, 1.0, 1, 0}});
  Packed skl0 = pack(EXACT, true, false, -1.0, 1.3, 0.0, {{TEACHER, ASSISTANT, KL, 1.0, 1, 0}});
  Packed fkl13 = pack(EXACT, false, false, 1.0, 1.3, 0.5, {{TEACHER, STUDENT, KL, 1.0, 1, 0}});
  std::vector<double> s3 = {0.3, -1.2, 2.0, 0.1}, t3 = {1.0, 0.2, -0.4, 0.8};
  CHECK(close(row_loss(taid1, s3, t3), row_loss(fkl13, s3, t3), 1e-12, 1e-14), "TAID(t=1) != FKL");
  CHECK(close(row_loss(skl0, s3, t3), row_loss(fkl13, s3, t3), 1e-12, 1e-14), "SKL(0) != FKL");
  std::vector<double> ga = row_grad(taid1, s3, t3, 1.0), gb = row_grad(fkl13, s3, t3, 1.0);
  for (size_t k = 0; k < ga.size(); ++k) CHECK(close(ga[k], gb[k], 1e-12, 1e-14), "TAID(t=1) gradient != FKL's");
}

// AKL's head / tail helpers: the order-preserving float keys, the gap without cancellation and
// the weights' split.
template <class F>
void check_sortable(const std::vector<F>& xs) {
  for (size_t i = 0; i < xs.size(); ++i) {
    CHECK(sortable_value<F>(sortable_key<F>(xs[i])) == xs[i], "sortable round trip of %g", double(xs[i]));
    for (size_t j = 0; j < xs.size(); ++j) {
      if (xs[i] < xs[j]) CHECK(sortable_key<F>(xs[i]) < sortable_key<F>(xs[j]), "key order %g < %g", double(xs[i]),
                               double(xs[j]));
    }
  }
  // the floats between two keys are the integers between them: the successor of x is nextafter(x)
  for (F x : xs) {
    if (std::isinf(x) && x > 0) continue;
    const F next = sortable_value<F>(sortable_key<F>(x) + 1);
    const F want = (x == F(0) && std::signbit(x)) ? F(0) : std::nextafter(x, F(INFINITY));
    CHECK(next == want && std::signbit(next) == std::signbit(want), "successor of %g: %g", double(x), double(next));
  }
}

void test_head_tail() {
  check_sortable<float>({-INFINITY, -3.5f, -1e-30f, -0.0f, 0.0f, 1e-45f, 1e-30f, 0.25f, 1.0f, 3e38f, INFINITY});
  check_sortable<double>({-INFINITY, -3.5, -1e-300, -0.0, 0.0, 5e-324, 1e-300, 0.25, 1.0, 1e308, INFINITY});
  CHECK(sortable_key<float>(-0.0f) + 1 == sortable_key<float>(0.0f), "-0 sits just below +0");

  // abs_gap against long double, where P - Q in float cancels (both near 1) and where it does not
  const double cases[][2] = {{-1e-9, -3e-9}, {-2e-8, 0.0}, {-0.1, -0.3}, {-20.0, -21.5}, {-5.0, -5.0},
                             {NINF, -2.0}, {-2.0, NINF}, {NINF, NINF}};
  for (const auto& c : cases) {
    const float lp = float(c[0]), lq = float(c[1]);
    const float got = abs_gap(lp, lq, std::exp(lp), std::exp(lq));
    const long double want = std::fabs(std::exp((long double)lp) - std::exp((long double)lq));
    CHECK(close(got, double(want), 1e-6, 1e-38), "abs_gap(%g, %g) = %g, want %Lg", c[0], c[1], double(got), want);
  }
  double w[2];
  head_tail_split(1.0, 3.0, w);
  CHECK(w[0] == 0.25 && w[1] == 0.75, "split (1, 3): %g %g", w[0], w[1]);
  head_tail_split(0.0, 0.0, w);
  CHECK(w[0] == 0.5 && w[1] == 0.5, "split (0, 0): %g %g", w[0], w[1]);
  head_tail_split(0.0, 2e-300, w);
  CHECK(w[0] == 0.0 && w[1] == 1.0, "split (0, tiny): %g %g", w[0], w[1]);
}

}  // namespace

int main() {
  test_decode();
  test_zero_rules();
  test_ab();
  test_mixtures();
  test_online_lse();
  test_gradients();
  test_row_rules();
  test_head_tail();
  std::printf("%d checks, %d failures\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
