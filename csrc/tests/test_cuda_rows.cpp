// Host emulation of the CUDA kernels' rows (no GPU, no CUDA toolkit, no torch).
//
// csrc/cuda/row_passes.h holds everything the CUDA kernels do to a row except the memory access
// and the block reduction primitive: which passes run, the per-thread partial states, how they
// merge, the one-pass forward's final formulas, the masked / bad / zero-gradient rules, and the
// instance dispatch. Here an executor runs those row bodies for an emulated thread block (each
// virtual thread folds packs j, j + B, ... padded with -inf past V, then the same shuffle-down /
// cross-warp tree as the kernel), and the results are compared with the scalar row driver of
// csrc/kdplug_math.h (forward_row / backward_row) on every built-in recipe shape, third-party
// multi-term recipes, both inf policies, -inf patterns, masked NaN rows, bad rows, odd V and
// several block sizes, in float and double. Exits non-zero on the first failed check.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "cuda/row_passes.h"

using namespace kdplug;
using namespace kdplug::gpu;

namespace {

int g_checks = 0;
int g_failures = 0;

#define CHECK(cond, ...)                                              \
  do {                                                                \
    ++g_checks;                                                       \
    if (!(cond)) {                                                    \
      ++g_failures;                                                   \
      if (g_failures <= 40) {                                         \
        std::printf("FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);   \
        std::printf(__VA_ARGS__);                                     \
        std::printf("\n");                                            \
      }                                                               \
    }                                                                 \
  } while (0)

template <class In>
using compute_t = std::conditional_t<std::is_same<In, double>::value, double, float>;

// The thread block, emulated: B virtual threads (B a multiple of 32), run one after the other.
template <class In, int VEC_>
struct HostExec {
  using F = compute_t<In>;
  static constexpr int VEC = VEC_;
  const In* s0;
  const In* t0;
  In* g0;
  int64_t s_stride, t_stride, V, npacks;
  int B;
  const In* s = nullptr;
  const In* t = nullptr;
  In* g = nullptr;
  F inv_T = F(1);
  int reduces = 0;  // row_reduce calls (passes) of the current row

  void begin_row(int64_t n, F inv_T_) {
    s = s0 + n * s_stride;
    t = t0 + n * t_stride;
    g = g0 ? g0 + n * V : nullptr;
    inv_T = inv_T_;
  }
  bool leader() const { return true; }

  void load(int64_t p, F* xs, F* xt) const {
    for (int j = 0; j < VEC; ++j) {
      const int64_t k = p * VEC + j;
      xs[j] = k < V ? static_cast<F>(s[k]) * inv_T : math::neg_inf<F>();
      xt[j] = k < V ? static_cast<F>(t[k]) * inv_T : math::neg_inf<F>();
    }
  }

  template <class S, class Add, class Conv, class Merge>
  auto row_reduce(S init, Add add, Conv conv, Merge merge) -> decltype(conv(init)) {
    using R = decltype(conv(init));
    ++reduces;
    std::vector<R> v;
    for (int tid = 0; tid < B; ++tid) {
      S st = init;
      for (int64_t p = tid; p < npacks; p += B) {
        F xs[VEC], xt[VEC];
        load(p, xs, xt);
        for (int j = 0; j < VEC; ++j) add(st, xs[j], xt[j]);
      }
      v.push_back(conv(st));
    }
    const int nwarps = B / 32;
    std::vector<R> slots;
    for (int w = 0; w < nwarps; ++w) {
      R* lane = &v[w * 32];
      for (int off = 16; off > 0; off >>= 1)
        for (int l = 0; l < off; ++l) merge(lane[l], lane[l + off]);
      slots.push_back(lane[0]);
    }
    for (int off = 16; off > 0; off >>= 1)
      for (int l = 0; l < off; ++l)
        if (l + off < nwarps) merge(slots[l], slots[l + off]);
    return slots[0];
  }

  template <class Fn>
  void for_each_pack(Fn fn) const {
    for (int64_t p = 0; p < npacks; ++p) {
      F xs[VEC], xt[VEC];
      load(p, xs, xt);
      fn(p, xs, xt);
    }
  }
  void store(int64_t p, const F* v) const {
    for (int j = 0; j < VEC; ++j)
      if (p * VEC + j < V) g[p * VEC + j] = static_cast<In>(v[j]);
  }
  void zero_row() const {
    for (int64_t k = 0; k < V; ++k) g[k] = In(0);
  }
};

// The launchers' choices, as in divergence_kernel.cuh (fused or general forward, the instance).
template <class In>
struct Emulated {
  using F = compute_t<In>;
  static constexpr int VEC = 16 / sizeof(In);
  std::vector<F> loss, stats;
  std::vector<In> grad;
  int passes = 0;  // row_reduce calls of the last row evaluated
};

template <class In>
Emulated<In> run_emulated(const KernelArgs& a, int B, bool specialize, bool fused, const std::vector<compute_t<In>>& gl) {
  using F = compute_t<In>;
  Emulated<In> out;
  out.loss.assign(a.N, F(-12345));
  out.stats.assign(a.N * kStats, F(-12345));
  out.grad.assign(a.N * a.V, In(-12345));
  constexpr int VEC = Emulated<In>::VEC;
  HostExec<In, VEC> ex{static_cast<const In*>(a.s), static_cast<const In*>(a.t), nullptr, a.s_stride, a.t_stride,
                       a.V, (a.V + VEC - 1) / VEC, B};
  if (fused && fused_eligible(a.desc)) {
    dispatch_fused(a.desc, [&](auto geo, auto nt) {
      for (int64_t n = 0; n < a.N; ++n) {
        ex.reduces = 0;
        forward_fused_row<F, decltype(geo)::value, decltype(nt)::value>(ex, a, n, out.loss.data(), out.stats.data());
      }
    });
  } else {
    auto go = [&](auto mix, auto sig, auto nt) {
      for (int64_t n = 0; n < a.N; ++n) {
        ex.reduces = 0;
        forward_general_row<F, decltype(mix)::value, decltype(sig)::value, decltype(nt)::value>(
            ex, a, n, out.loss.data(), out.stats.data());
      }
    };
    if (specialize) {
      dispatch_recipe<true>(a.desc, go);
    } else {
      dispatch_recipe<false>(a.desc, go);
    }
  }
  out.passes = ex.reduces;
  ex.g0 = out.grad.data();
  auto back = [&](auto mix, auto sig, auto nt) {
    for (int64_t n = 0; n < a.N; ++n)
      backward_row_body<F, decltype(mix)::value, decltype(sig)::value, decltype(nt)::value>(
          ex, a, n, gl.data(), 1, out.stats.data());
  };
  if (specialize) {
    dispatch_recipe<true>(a.desc, back);
  } else {
    dispatch_recipe<false>(a.desc, back);
  }
  return out;
}

struct RecipeCase {
  std::string name;
  std::vector<int64_t> structure;
  std::vector<double> consts;
  double lam;
  bool token_weights;
};

// The packed recipes of the built-in methods (kdplug/_pack.py; tests/test_compiled.py's variants)
// and a few third-party shapes (3 and 4 terms: the run-time term count).
std::vector<RecipeCase> recipes() {
  return {
      {"fkl", {0, 0, 0, 1, 0, 1, 0}, {1.0, 1.0, 0.0}, 0.5, false},
      {"fkl-ce", {0, 0, 0, 1, 0, 1, 1}, {1.0, 1.0, 0.0}, 0.5, false},
      {"rkl", {0, 0, 0, 1, 1, 0, 0}, {1.0, 1.0, 0.0}, 0.5, false},
      {"symmetric_kl", {0, 0, 0, 2, 0, 1, 0, 1, 0, 0}, {1.0, 1.0, 0.0, 1.0, 0.0}, 0.5, false},
      {"symmetric_kl-ce", {0, 0, 0, 2, 0, 1, 1, 1, 0, 0}, {1.0, 1.0, 0.0, 1.0, 0.0}, 0.5, false},
      {"akl", {0, 0, 0, 2, 0, 1, 0, 1, 0, 0}, {1.0, 1.0, 0.0, 1.0, 0.0}, 0.5, true},
      {"tvd", {0, 0, 0, 1, 0, 1, 3}, {1.0, 1.0, 0.0}, 0.5, false},
      {"abkd", {0, 0, 0, 1, 0, 1, 2}, {1.0, 0.2, 0.7}, 0.5, false},
      {"abkd-0-0.7", {0, 0, 0, 1, 0, 1, 2}, {1.0, 0.0, 0.7}, 0.5, false},
      {"abkd-1-0", {0, 0, 0, 1, 0, 1, 2}, {1.0, 1.0, 0.0}, 0.5, false},
      {"abkd-0-0", {0, 0, 0, 1, 0, 1, 2}, {1.0, 0.0, 0.0}, 0.5, false},
      {"gjsd", {0, 1, 0, 2, 0, 2, 0, 1, 2, 0}, {-1.0, 1.0, 0.0, 1.0, 0.0}, 0.5, false},
      {"skl", {0, 1, 0, 1, 0, 2, 0}, {-1.0, 1.0, 0.0}, 0.1, false},
      {"skl-ce", {0, 1, 0, 1, 0, 2, 1}, {-1.0, 1.0, 0.0}, 0.1, false},
      {"srkl", {0, 1, 0, 1, 1, 2, 0}, {-1.0, 1.0, 0.0}, 0.9, false},
      {"srkl-detach", {0, 1, 1, 1, 1, 2, 0}, {-1.0, 1.0, 0.0}, 0.9, false},
      {"taid", {0, 1, 1, 1, 2, 1, 1}, {1.0, 1.0, 0.0}, 0.4, false},
      {"taid-kl", {0, 1, 1, 1, 2, 1, 0}, {1.0, 1.0, 0.0}, 1.0, false},
      {"amid", {0, 1, 0, 1, 0, 2, 2}, {0.5, 0.2, 0.7}, 0.5, false},
      {"amid-a-1-qr", {0, 1, 0, 1, 1, 2, 2}, {-1.0, 0.2, 0.7}, 0.5, false},
      {"amid-a1-kl", {0, 1, 0, 1, 0, 2, 0}, {1.0, 1.0, 0.0}, 0.5, false},
      {"amid-a-3-rq", {0, 1, 0, 1, 2, 1, 0}, {-3.0, 1.0, 0.0}, 0.5, false},
      {"amid-lam0-rp", {0, 1, 0, 1, 2, 0, 2}, {0.5, 0.2, 0.7}, 0.0, false},
      {"amid-lam1-pr", {0, 1, 0, 1, 0, 2, 2}, {0.9, 0.2, 0.7}, 1.0, false},
      {"distillm2-on", {0, 1, 1, 1, 1, 2, 0}, {-1.0, 1.0, 0.0}, 0.9, false},
      {"distillm2-off", {0, 1, 0, 1, 0, 2, 0}, {-1.0, 1.0, 0.0}, 0.1, false},
      {"third-3", {0, 1, 0, 3, 0, 1, 0, 1, 2, 3, 0, 2, 2}, {0.5, 1.0, 0.0, 1.0, 0.0, 0.3, 0.6}, 0.3, false},
      {"third-4", {0, 0, 0, 4, 0, 1, 0, 1, 0, 0, 0, 1, 3, 0, 1, 2}, {1.0, 1, 0, 1, 0, 1, 0, 0.5, 0.5}, 0.5, true},
      {"third-2-geo-live", {0, 1, 0, 2, 2, 1, 0, 0, 2, 2}, {1.0, 1.0, 0.0, 0.4, 0.4}, 0.3, false},
  };
}

// Logits in [rows, stride] of which the first V columns are used; mask; the patterns of
// tests/test_compiled.py (shared, teacher-only and student-only -inf entries, a mostly-padding
// row), masked rows holding NaN, and (bad_rows) unmasked rows that must come out as errors.
struct Data {
  int64_t N, V, stride;
  std::vector<double> s, t;
  std::vector<unsigned char> mask;  // bool storage
  std::vector<bool> bad;
};

Data make_data(int64_t N, int64_t V, unsigned seed, bool inf_patterns, bool bad_rows) {
  Data d{N, V, V + 3, {}, {}, {}, {}};
  std::mt19937 rng(seed);
  std::normal_distribution<double> nd(0.0, 1.0);
  d.s.assign(N * d.stride, 0.0);
  d.t.assign(N * d.stride, 0.0);
  d.mask.assign(N, 1);
  d.bad.assign(N, false);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < V; ++k) {
      double tv = 3 * nd(rng) + (k < 3 ? 8.0 : 0.0);
      d.t[n * d.stride + k] = tv;
      d.s[n * d.stride + k] = 0.7 * tv + 1.5 * nd(rng);
    }
  const double NINF = -INFINITY;
  auto S = [&](int64_t n, int64_t k) -> double& { return d.s[n * d.stride + k]; };
  auto T = [&](int64_t n, int64_t k) -> double& { return d.t[n * d.stride + k]; };
  if (inf_patterns && V >= 12 && N >= 5) {
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = V - 3; k < V; ++k) S(n, k) = T(n, k) = NINF;
    T(1, 4) = NINF;
    S(2, 5) = NINF;
    T(3, 6) = NINF;
    S(3, 7) = NINF;
    for (int64_t k = 0; k < 10; ++k) S(4, k) = T(4, k) = NINF;
  }
  if (N >= 7) {  // masked rows are never read
    d.mask[5] = 0;
    S(5, 0) = NAN;
  }
  if (bad_rows && N >= 9) {
    for (int64_t k = 0; k < V; ++k) S(7, k) = NINF;  // all -inf student
    T(8, V / 2) = NAN;                               // NaN teacher entry
    d.bad[7] = d.bad[8] = true;
  }
  return d;
}

bool close(double a, double b, double rtol, double atol) {
  if (std::isinf(a) || std::isinf(b)) return a == b;
  if (std::isnan(a) || std::isnan(b)) return std::isnan(a) && std::isnan(b);
  return std::abs(a - b) <= atol + rtol * std::abs(b);
}

template <class In>
void check_case(const RecipeCase& rc, int policy, int64_t N, int64_t V, int B, bool specialize, bool fused,
                bool inf_patterns, bool bad_rows, unsigned seed) {
  using F = compute_t<In>;
  const double rtol_loss = std::is_same<In, double>::value ? 1e-9 : 2e-4;
  const double rtol_grad = std::is_same<In, double>::value ? 1e-8 : 2e-4;
  // (float: TVD's subgradient sign(P - Q) may flip where P ~ Q within rounding, moving that entry
  // by ~Q; seen at ~2e-6 on a row of probabilities ~1e-5)
  const double atol_grad = std::is_same<In, double>::value ? 0.0 : 5e-6;
  std::vector<int64_t> structure = rc.structure;
  structure[0] = policy;
  RecipeDesc desc;
  const char* err = math::decode_recipe(structure.data(), static_cast<int64_t>(structure.size()), rc.consts.data(),
                                        static_cast<int64_t>(rc.consts.size()), &desc);
  CHECK(err == nullptr, "%s: %s", rc.name.c_str(), err ? err : "");
  if (err) return;
  const int nt = desc.n_terms;
  std::vector<double> params = {1.7, rc.lam};
  std::mt19937 rng(seed * 7 + 1);
  std::uniform_real_distribution<double> ud(0.2, 1.5);
  for (int i = 0; i < nt; ++i) params.push_back(ud(rng));
  std::vector<double> tw;
  if (rc.token_weights) {
    for (int64_t i = 0; i < N * nt; ++i) tw.push_back(ud(rng));
    if (N > 2) tw[2 * nt] = 0.0;  // a zero weight: the term contributes exactly 0
  }
  const Data data = make_data(N, V, seed, inf_patterns, bad_rows);
  std::vector<In> s(data.s.begin(), data.s.end()), t(data.t.begin(), data.t.end());
  bool mask_arr[64];
  for (int64_t n = 0; n < N; ++n) mask_arr[n] = data.mask[n] != 0;

  KernelArgs a{};
  a.dtype = std::is_same<In, double>::value ? kFloat64 : kFloat32;
  a.s = s.data();
  a.t = t.data();
  a.s_stride = a.t_stride = data.stride;
  a.N = N;
  a.V = V;
  a.row_mask = mask_arr;
  a.mask_stride = 1;
  a.params = params.data();
  a.token_weights = rc.token_weights ? tw.data() : nullptr;
  a.desc = desc;

  std::vector<F> gl(N);
  for (int64_t n = 0; n < N; ++n) gl[n] = static_cast<F>(-1.5 + 3.5 * n / std::max<int64_t>(N - 1, 1));
  if (N > 3) gl[3] = F(0);  // a zero incoming gradient: exact zeros

  const Emulated<In> em = run_emulated<In>(a, B, specialize, fused, gl);
  const char* nm = rc.name.c_str();
  for (int64_t n = 0; n < N; ++n) {
    const F* st = &em.stats[n * kStats];
    const In* g = &em.grad[n * V];
    if (!mask_arr[n]) {
      bool zeros = em.loss[n] == F(0);
      for (int j = 0; j < kStats; ++j) zeros = zeros && st[j] == F(0);
      for (int64_t k = 0; k < V; ++k) zeros = zeros && g[k] == In(0);
      CHECK(zeros, "%s V=%ld B=%d: masked row %ld is not all zeros", nm, (long)V, B, (long)n);
      continue;
    }
    F ref_loss = 0, ref_stats[kStats] = {};
    const double* twn = rc.token_weights ? tw.data() + n * nt : nullptr;
    const bool ok = math::forward_row<F>(desc, params.data(), twn, s.data() + n * data.stride,
                                         t.data() + n * data.stride, V, &ref_loss, ref_stats);
    if (!ok) {
      CHECK(data.bad[n], "%s: reference says row %ld is bad", nm, (long)n);
      CHECK(std::isnan(em.loss[n]) && !(std::isfinite(st[0]) && std::isfinite(st[1])),
            "%s V=%ld: bad row %ld: loss %g, lse %g %g (want NaN loss and a non-finite LSE)", nm, (long)V,
            (long)n, (double)em.loss[n], (double)st[0], (double)st[1]);
      continue;
    }
    CHECK(!data.bad[n], "%s: row %ld should be bad", nm, (long)n);
    CHECK(close(em.loss[n], ref_loss, rtol_loss, rtol_loss * 1e-2),
          "%s policy=%d V=%ld B=%d spec=%d fused=%d row %ld: loss %.10g vs %.10g", nm, policy, (long)V, B,
          specialize, fused, (long)n, (double)em.loss[n], (double)ref_loss);
    CHECK(close(st[0], ref_stats[0], rtol_loss, rtol_loss), "%s row %ld: lse_s %.10g vs %.10g", nm, (long)n,
          (double)st[0], (double)ref_stats[0]);
    std::vector<In> ref_g(V);
    math::backward_row<F>(desc, params.data(), twn, s.data() + n * data.stride, t.data() + n * data.stride, V,
                          ref_stats, gl[n], ref_g.data());
    double scale = 0;
    for (int64_t k = 0; k < V; ++k) scale = std::max(scale, std::abs(static_cast<double>(ref_g[k])));
    if (scale == 0) scale = 1;
    int bad_k = -1;
    for (int64_t k = 0; k < V && bad_k < 0; ++k) {
      if (gl[n] == F(0) && g[k] != In(0)) bad_k = static_cast<int>(k);
      if (!close(g[k], ref_g[k], rtol_grad, rtol_grad * scale + atol_grad)) bad_k = static_cast<int>(k);
      if (!std::isfinite(static_cast<double>(g[k]))) bad_k = static_cast<int>(k);
      if (s[n * data.stride + k] == In(-INFINITY) && g[k] != In(0)) bad_k = static_cast<int>(k);
    }
    CHECK(bad_k < 0, "%s policy=%d V=%ld B=%d spec=%d fused=%d row %ld: grad[%d] %.10g vs %.10g", nm, policy,
          (long)V, B, specialize, fused, (long)n, bad_k, bad_k < 0 ? 0.0 : (double)g[bad_k],
          bad_k < 0 ? 0.0 : (double)ref_g[bad_k]);
  }
  // the pass counts the design promises (for a row that went through every pass)
  if (!bad_rows && mask_arr[N - 1]) {
    const int want = fused && fused_eligible(desc) ? 1 : desc.mix == math::MIX_ALPHA ? 3 : 2;
    CHECK(em.passes == want, "%s: %d row passes, want %d", nm, em.passes, want);
  }
}

}  // namespace

int main() {
  const int64_t Vs[] = {1, 3, 8, 17, 37, 130, 1001};
  unsigned seed = 1;
  for (const RecipeCase& rc : recipes()) {
    for (int policy = 0; policy < 2; ++policy) {
      for (int64_t V : Vs) {
        const bool patterns = V >= 12;
        const int64_t N = 10;
        for (int fused = 0; fused < 2; ++fused) {
          const int B = threads_for_packs((V + 3) / 4);
          check_case<float>(rc, policy, N, V, B, true, fused, patterns, true, seed);
          check_case<double>(rc, policy, N, V, threads_for_packs((V + 1) / 2), false, fused, patterns, true, seed);
          ++seed;
        }
      }
      // several block sizes (the reduction tree), unspecialized instances
      for (int B : {32, 64, 256}) {
        check_case<float>(rc, policy, 9, 517, B, false, true, true, false, seed);
        check_case<double>(rc, policy, 9, 517, B, true, false, true, false, seed);
        ++seed;
      }
    }
  }
  // the launch configuration
  CHECK(threads_for_packs(1) == 32 && threads_for_packs(128) == 32 && threads_for_packs(129) == 64,
        "threads_for_packs");
  CHECK(threads_for_packs(16032) == kMaxThreads, "threads_for_packs at V = 128256 bf16");
  std::printf("%d checks, %d failures\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
