// Unit tests of csrc/cpu/simd_math.h (no torch): the inline SIMD exp / expm1 / log / log1p (and
// expm1_exp_ps's exp) against the C library in double, over their whole float range (subnormal
// results and arguments included) and at the special values the math header relies on. Compiled once per instruction
// set (KDPLUG_TEST_ISA = 2: AVX2 + FMA, 512: AVX-512F) and run by test_simd_main.cpp only on a
// CPU that has it. Returns the number of failed checks.
#include "cpu/simd_math.h"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

namespace {

#if KDPLUG_TEST_ISA == 512
namespace isa = kdplug::math::avx512;
constexpr int W = 16;
using Pack = __m512;
Pack load(const float* p) { return _mm512_loadu_ps(p); }
void store(float* p, Pack v) { _mm512_storeu_ps(p, v); }
#else
namespace isa = kdplug::math::avx2;
constexpr int W = 8;
using Pack = __m256;
Pack load(const float* p) { return _mm256_loadu_ps(p); }
void store(float* p, Pack v) { _mm256_storeu_ps(p, v); }
#endif

int g_checks = 0;
int g_failures = 0;

// One unit in the last place of a float of magnitude |r| (the subnormal spacing below 2^-126).
double ulp(double r) {
  r = std::abs(r);
  if (r < 0x1p-126) return 0x1p-149;
  int e;
  std::frexp(r, &e);  // r = m 2^e, m in [0.5, 1)
  return std::ldexp(1.0, e - 24);
}

// Applies fn lane-wise to xs; checks each result against ref (double) to max_ulp units in the
// last place of the float result, or exactly for the special values (inf, NaN, 0).
template <class Fn>
void check(const char* name, Fn fn, double (*ref)(double), const std::vector<float>& xs, double max_ulp) {
  std::vector<float> in(xs), out(xs.size() + W);
  while (in.size() % W) in.push_back(0.0f);
  out.resize(in.size());
  for (size_t i = 0; i < in.size(); i += W) store(&out[i], fn(load(&in[i])));
  double worst = 0;
  float worst_x = 0;
  for (size_t i = 0; i < xs.size(); ++i) {
    ++g_checks;
    const double want = ref(static_cast<double>(xs[i]));
    const float want_f = static_cast<float>(want);  // (rounds to inf / 0 where the float does)
    const float got = out[i];
    bool ok;
    if (std::isnan(want)) {
      ok = std::isnan(got);
    } else if (std::isinf(want_f) || want_f == 0.0f) {
      // a result that overflows or underflows in float: within one ulp of the boundary
      ok = got == want_f || std::abs(static_cast<double>(got) - want) <= max_ulp * ulp(want);
    } else {
      const double err = std::abs(static_cast<double>(got) - want) / ulp(want);
      ok = err <= max_ulp;
      if (err > worst) {
        worst = err;
        worst_x = xs[i];
      }
    }
    if (!ok) {
      ++g_failures;
      if (g_failures < 20)
        std::printf("FAIL %s(%.9g) = %.9g, want %.17g\n", name, static_cast<double>(xs[i]), static_cast<double>(got),
                    want);
    }
  }
  std::printf("  %-6s %zu arguments, worst %.2f ulp (at %.9g)\n", name, xs.size(), worst,
              static_cast<double>(worst_x));
}

// Every float between lo and hi at a spacing of about (hi - lo) / n, plus random ones.
std::vector<float> grid(double lo, double hi, int n, std::mt19937& rng) {
  std::vector<float> xs;
  for (int i = 0; i <= n; ++i) xs.push_back(static_cast<float>(lo + (hi - lo) * i / n));
  std::uniform_real_distribution<double> u(lo, hi);
  for (int i = 0; i < n; ++i) xs.push_back(static_cast<float>(u(rng)));
  return xs;
}

// Positive floats across every binade, subnormals included.
std::vector<float> binades(std::mt19937& rng) {
  std::vector<float> xs;
  std::uniform_real_distribution<double> m(1.0, 2.0);
  for (int e = -149; e <= 127; ++e)
    for (int i = 0; i < 40; ++i) xs.push_back(static_cast<float>(std::ldexp(m(rng), e)));
  xs.push_back(std::nextafter(0.0f, 1.0f));
  xs.push_back(std::numeric_limits<float>::min());
  xs.push_back(std::numeric_limits<float>::max());
  return xs;
}

double d_exp(double x) { return std::exp(x); }
double d_expm1(double x) { return std::expm1(x); }
double d_log(double x) { return std::log(x); }
double d_log1p(double x) { return std::log1p(x); }

}  // namespace

int run_simd_tests() {
  std::mt19937 rng(7);
  const float inf = INFINITY, nan = NAN;

  std::vector<float> xs = grid(-105.0, 89.0, 200000, rng);  // subnormal results below -87.3
  for (float x : {-inf, inf, nan, 0.0f, -0.0f, -87.33654f, -103.97208f, -103.28f, 88.72283f, 88.7229f})
    xs.push_back(x);
  for (float x : grid(-1e-6, 1e-6, 1000, rng)) xs.push_back(x);
  check("exp", isa::exp_ps, d_exp, xs, 2.5);
  // the exp that expm1_exp_ps gives with expm1 (its expm1 is expm1_ps, checked below)
  auto exp_of_expm1_exp = [](Pack x) {
    Pack ex;
    isa::expm1_exp_ps(x, &ex);
    return ex;
  };
  check("exp'", exp_of_expm1_exp, d_exp, xs, 2.5);

  xs = grid(-105.0, 89.0, 200000, rng);
  for (float x : grid(-1e-3, 1e-3, 20000, rng)) xs.push_back(x);
  for (int e = -149; e < -2; ++e) xs.push_back(std::ldexp(1.3f, e)), xs.push_back(-std::ldexp(1.7f, e));
  for (float x : {-inf, inf, nan, 0.0f, -0.0f, 88.72283f, 89.0f}) xs.push_back(x);
  check("expm1", isa::expm1_ps, d_expm1, xs, 2.5);

  xs = binades(rng);
  for (float x : grid(0.5, 2.0, 50000, rng)) xs.push_back(x);  // around 1, where log -> 0
  for (float x : {0.0f, -0.0f, inf, -inf, nan, -1.0f, -1e-30f, 1.0f}) xs.push_back(x);
  check("log", isa::log_ps, d_log, xs, 2.5);

  xs = grid(-1.0, 10.0, 100000, rng);
  for (float x : binades(rng)) {
    xs.push_back(x);
    if (x < 1.0f) xs.push_back(-x);  // (-1, 0)
  }
  for (float x : {-1.0f, -1.0f + 0x1p-24f, -0.5f, -1.5f, -inf, inf, nan, 0.0f, -0.0f}) xs.push_back(x);
  check("log1p", isa::log1p_ps, d_log1p, xs, 2.5);

  std::printf("%d checks, %d failures\n", g_checks, g_failures);
  return g_failures;
}
