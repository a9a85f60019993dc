// The CPU operators (kdplug::divergence_fwd, _bwd, ...): argument checks, allocation, dtype
// dispatch. The row loops are in divergence_rows.h (compiled per dtype in rows_<dtype>.cpp).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <tuple>
#include <utility>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "divergence_cpu.h"

namespace kdplug {
namespace cpu {
namespace {

using namespace kdplug::math;

RecipeDesc decode(at::IntArrayRef structure, at::ArrayRef<double> consts) {
  RecipeDesc d;
  const char* err = decode_recipe(structure.data(), static_cast<int64_t>(structure.size()), consts.data(),
                                  static_cast<int64_t>(consts.size()), &d);
  TORCH_CHECK(err == nullptr, "kdplug: invalid packed recipe: ", err ? err : "");
  return d;
}

at::ScalarType compute_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// The logits' checks (every op); returns the row count N and vocabulary size V.
std::pair<int64_t, int64_t> check_logits(const at::Tensor& s, const at::Tensor& t) {
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
  TORCH_CHECK(s.device().is_cpu() && t.device().is_cpu(), "kdplug: student_logits and teacher_logits must be on "
              "the same device (the CPU here)");
  return {N, V};
}

void check_row_mask(const at::Tensor& row_mask, int64_t N) {
  TORCH_CHECK(row_mask.device().is_cpu(), "kdplug: with CPU logits, row_mask must be on the CPU too");
  TORCH_CHECK(row_mask.scalar_type() == at::kBool && row_mask.dim() == 1 && row_mask.size(0) == N,
              "kdplug: row_mask must be a bool vector [N] = [", N, "], got ", row_mask.scalar_type(), " ",
              row_mask.sizes());
}

// Checks of the divergence ops' arguments; returns N and V.
std::pair<int64_t, int64_t> check_inputs(const at::Tensor& s, const at::Tensor& t, const at::Tensor& params,
                                         const std::optional<at::Tensor>& token_weights, const at::Tensor& row_mask,
                                         const RecipeDesc& d) {
  const auto [N, V] = check_logits(s, t);
  TORCH_CHECK(params.scalar_type() == at::kDouble && params.dim() == 1 && params.is_contiguous() &&
                  params.size(0) == 2 + d.n_terms,
              "kdplug: params must be a contiguous float64 vector [T, lam, weight * n_terms] of length ",
              2 + d.n_terms, ", got ", params.scalar_type(), " ", params.sizes());
  TORCH_CHECK(params.device().is_cpu() && (!token_weights.has_value() || token_weights->device().is_cpu()),
              "kdplug: with CPU logits, params and token_weights must be on the CPU too");
  check_row_mask(row_mask, N);
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
void set_rows(const at::Tensor& s, const at::Tensor& t, const at::Tensor& row_mask, Rows<scalar_t>* a) {
  a->s = s.data_ptr<scalar_t>();
  a->t = t.data_ptr<scalar_t>();
  a->s_stride = s.stride(0);
  a->t_stride = t.stride(0);
  a->N = s.size(0);
  a->V = s.size(1);
  a->row_mask = row_mask.data_ptr<bool>();
  a->mask_stride = row_mask.stride(0);
}

template <class scalar_t>
Args<scalar_t> make_args(const at::Tensor& s, const at::Tensor& t, const at::Tensor& params,
                         const std::optional<at::Tensor>& token_weights, const at::Tensor& row_mask,
                         const RecipeDesc& d) {
  Args<scalar_t> a;
  set_rows<scalar_t>(s, t, row_mask, &a);
  a.params = params.data_ptr<double>();
  a.token_weights = token_weights.has_value() ? token_weights->data_ptr<double>() : nullptr;
  a.desc = d;
  return a;
}

// ---- the gradient's memory ------------------------------------------------------------------
// The gradient is the one N x V allocation, and fresh memory costs its first touch: the kernel
// zero-fills every page as it is mapped. At N = 2048, V = 128256 fp32 that was 0.2-0.5 s with
// 4 KiB pages (vs ~0.1 s for the whole pass on the AVX-512 machine), and with transparent huge
// pages still ~45% of an FKL forward + gradient call on the AVX2 machine (perf: clear_page). A
// training step frees the gradient before the next step asks for the same size, so a freed
// gradient buffer (one, the last freed) is kept mapped and handed out again: no page is touched
// for the first time. The cache never holds a buffer while a new one is mapped (a buffer that does
// not fit is unmapped first), so a call's peak stays one N x V; between calls the cached buffer
// is resident, as with CUDA's caching allocator. KDPLUG_GRAD_CACHE=0 turns the cache off,
// KDPLUG_THP=0 the huge pages. Buffers under 8 MiB come from the default allocator.
bool env_on(const char* name) {
  const char* v = std::getenv(name);
  return !(v && std::strcmp(v, "0") == 0);
}

#if defined(__linux__)
class GradientCache {
 public:
  // A mapping of at least `bytes` (rounded up to 2 MiB), its pages already touched if it is the
  // cached one; capacity: its length.
  void* take(size_t bytes, size_t* capacity) {
    const size_t want = (bytes + kHuge - 1) / kHuge * kHuge;
    void* old = nullptr;
    size_t old_len = 0;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (ptr_ != nullptr && len_ >= want && len_ - want <= want / 4) {  // fits, wastes <= 25%
        *capacity = len_;
        return std::exchange(ptr_, nullptr);
      }
      old = std::exchange(ptr_, nullptr);
      old_len = len_;
    }
    if (old != nullptr) munmap(old, old_len);  // before mapping the new one: one buffer at a time
    void* p = mmap(nullptr, want, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    TORCH_CHECK(p != MAP_FAILED, "kdplug: could not allocate the ", bytes, "-byte gradient");
#if defined(MADV_HUGEPAGE)
    static const bool thp = env_on("KDPLUG_THP");
    if (thp) madvise(p, want, MADV_HUGEPAGE);
#endif
    *capacity = want;
    return p;
  }

  // The tensor's deleter: keep the buffer (replacing an older one) unless the cache is off.
  void give_back(void* p, size_t len) {
    static const bool on = env_on("KDPLUG_GRAD_CACHE");
    void* old = p;
    size_t old_len = len;
    if (on) {
      std::lock_guard<std::mutex> lock(mu_);
      std::swap(old, ptr_);
      std::swap(old_len, len_);
    }
    if (old != nullptr) munmap(old, old_len);
  }

  // never destroyed: a tensor may be freed after this library's static destructors ran
  static GradientCache& get() {
    static GradientCache* cache = new GradientCache;
    return *cache;
  }

 private:
  static constexpr size_t kHuge = size_t(2) << 20;
  std::mutex mu_;
  void* ptr_ = nullptr;
  size_t len_ = 0;
};
#endif

// An uninitialized contiguous [N, V] tensor for a gradient (see above).
at::Tensor gradient_buffer(int64_t N, int64_t V, const at::TensorOptions& options) {
#if defined(__linux__)
  const size_t bytes = static_cast<size_t>(N) * static_cast<size_t>(V) * options.dtype().itemsize();
  if (bytes >= (size_t(8) << 20)) {
    size_t capacity = 0;
    void* p = GradientCache::get().take(bytes, &capacity);
    return at::from_blob(
        p, {N, V}, [capacity](void* q) { GradientCache::get().give_back(q, capacity); }, options);
  }
#endif
  return at::empty({N, V}, options);
}

// A per-row factor of the gradient (grad_loss, grad_scale): a compute-dtype CPU vector [N].
void check_per_row(const at::Tensor& x, const char* name, int64_t N, at::ScalarType cdt) {
  TORCH_CHECK(x.dim() == 1 && x.size(0) == N && x.scalar_type() == cdt && x.device().is_cpu(), "kdplug: ", name,
              " must be a ", cdt, " CPU vector [N] = [", N, "], got ", x.scalar_type(), " ", x.sizes());
}

// The forward's verdict on the rows: bad = min(2 n + side) over rejected rows (see forward_cpu).
void check_rows(int64_t bad) {
  TORCH_CHECK(bad == std::numeric_limits<int64_t>::max(), "kdplug: ",
              bad % 2 == 0 ? "student_logits" : "teacher_logits",
              " has a row that is not masked but is all -inf, or holds +inf or NaN (row ", bad / 2,
              "); mask such rows (mask= or labels=)");
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
    forward_cpu<scalar_t>(a, loss.data_ptr<F>(), row_stats.data_ptr<F>(), &bad_row);
  });
  check_rows(bad_row.load());
  return {loss, row_stats};
}

// The forward and the gradient of sum_n grad_scale[n] * loss[n] in one call, written to grad
// (contiguous [N, V]), each row's backward pass right after its forward passes (the row still in
// cache): see forward_backward_rows. skip_masked: masked rows' gradient left as it is.
std::tuple<at::Tensor, at::Tensor> forward_backward_into(const at::Tensor& student_logits,
                                                         const at::Tensor& teacher_logits, const at::Tensor& params,
                                                         const std::optional<at::Tensor>& token_weights,
                                                         const at::Tensor& row_mask, const at::Tensor& grad_scale,
                                                         const RecipeDesc& d, const at::Tensor& grad, bool skip_masked) {
  const int64_t N = student_logits.size(0);
  const auto cdt = compute_dtype(student_logits.scalar_type());
  check_per_row(grad_scale, "grad_scale", N, cdt);
  const auto opts = student_logits.options().dtype(cdt);
  at::Tensor loss = at::empty({N}, opts);
  at::Tensor row_stats = at::empty({N, kStats}, opts);
  if (grad.numel() == 0) return {loss.zero_(), row_stats.zero_()};
  const at::Tensor gs = grad_scale.contiguous();
  std::atomic<int64_t> bad_row{std::numeric_limits<int64_t>::max()};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student_logits.scalar_type(), "kdplug_fwd_grad", [&] {
    using F = compute_t<scalar_t>;
    const Args<scalar_t> a = make_args<scalar_t>(student_logits, teacher_logits, params, token_weights, row_mask, d);
    forward_backward_cpu<scalar_t>(a, gs.data_ptr<F>(), loss.data_ptr<F>(), row_stats.data_ptr<F>(),
                                   grad.data_ptr<scalar_t>(), &bad_row, skip_masked);
  });
  check_rows(bad_row.load());
  return {loss, row_stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> divergence_fwd_grad_cpu(
    const at::Tensor& student_logits, const at::Tensor& teacher_logits, const at::Tensor& params,
    const std::optional<at::Tensor>& token_weights, const at::Tensor& row_mask, const at::Tensor& grad_scale,
    at::IntArrayRef structure, at::ArrayRef<double> consts) {
  const RecipeDesc d = decode(structure, consts);
  const auto [N, V] = check_inputs(student_logits, teacher_logits, params, token_weights, row_mask, d);
  at::Tensor grad = gradient_buffer(N, V, student_logits.options());
  auto [loss, row_stats] = forward_backward_into(student_logits, teacher_logits, params, token_weights, row_mask,
                                                 grad_scale, d, grad, /*skip_masked=*/false);
  return {loss, row_stats, grad};
}

// divergence_fwd_grad with the gradient of the unmasked rows written into grad and the masked
// rows left as they are: a Split's second recipe fills its rows of the first one's gradient.
std::tuple<at::Tensor, at::Tensor> divergence_fwd_grad_into_cpu(
    const at::Tensor& student_logits, const at::Tensor& teacher_logits, const at::Tensor& params,
    const std::optional<at::Tensor>& token_weights, const at::Tensor& row_mask, const at::Tensor& grad_scale,
    at::IntArrayRef structure, at::ArrayRef<double> consts, const at::Tensor& grad) {
  const RecipeDesc d = decode(structure, consts);
  const auto [N, V] = check_inputs(student_logits, teacher_logits, params, token_weights, row_mask, d);
  TORCH_CHECK(grad.sizes() == student_logits.sizes() && grad.scalar_type() == student_logits.scalar_type() &&
                  grad.device().is_cpu() && grad.is_contiguous(),
              "kdplug: grad must be a contiguous ", student_logits.scalar_type(), " [", N, ", ", V,
              "] CPU tensor, got ", grad.scalar_type(), " ", grad.sizes(), " strides ", grad.strides());
  at::assert_no_overlap(grad, student_logits);
  at::assert_no_overlap(grad, teacher_logits);
  return forward_backward_into(student_logits, teacher_logits, params, token_weights, row_mask, grad_scale, d, grad,
                               /*skip_masked=*/true);
}

// Checks of the backward's own arguments; writes the gradient to grad (row stride grad_stride).
void backward_into(const at::Tensor& grad_loss, const at::Tensor& student_logits, const at::Tensor& teacher_logits,
                   const at::Tensor& params, const std::optional<at::Tensor>& token_weights,
                   const at::Tensor& row_mask, const at::Tensor& row_stats, const RecipeDesc& d, int64_t N,
                   void* grad, int64_t grad_stride, bool skip_masked = false) {
  const auto cdt = compute_dtype(student_logits.scalar_type());
  check_per_row(grad_loss, "grad_loss", N, cdt);
  TORCH_CHECK(row_stats.dim() == 2 && row_stats.size(0) == N && row_stats.size(1) == kStats &&
                  row_stats.scalar_type() == cdt && row_stats.is_contiguous() && row_stats.device().is_cpu(),
              "kdplug: row_stats must be the contiguous ", cdt, " [N, ", kStats,
              "] tensor that divergence_fwd returned, got ", row_stats.scalar_type(), " ", row_stats.sizes());
  if (N == 0 || student_logits.size(1) == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student_logits.scalar_type(), "kdplug_divergence_bwd", [&] {
    using F = compute_t<scalar_t>;
    const Args<scalar_t> a = make_args<scalar_t>(student_logits, teacher_logits, params, token_weights, row_mask, d);
    // grad_loss may be strided (an expanded scalar gradient); read it through a contiguous view
    const at::Tensor gl = grad_loss.is_contiguous() ? grad_loss : grad_loss.contiguous();
    const F* gl_p = gl.data_ptr<F>();
    const F* stats_p = row_stats.data_ptr<F>();
    backward_cpu<scalar_t>(a, gl_p, stats_p, static_cast<scalar_t*>(grad), grad_stride, skip_masked);
  });
}

at::Tensor divergence_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& student_logits,
                              const at::Tensor& teacher_logits, const at::Tensor& params,
                              const std::optional<at::Tensor>& token_weights, const at::Tensor& row_mask,
                              const at::Tensor& row_stats, at::IntArrayRef structure, at::ArrayRef<double> consts) {
  const RecipeDesc d = decode(structure, consts);
  const auto [N, V] = check_inputs(student_logits, teacher_logits, params, token_weights, row_mask, d);
  at::Tensor grad = gradient_buffer(N, V, student_logits.options());
  backward_into(grad_loss, student_logits, teacher_logits, params, token_weights, row_mask, row_stats, d, N,
                grad.data_ptr(), V);
  return grad;
}

// The in-place backward: the gradient overwrites student_logits (same rows, same strides), which
// saves the one N x V allocation. The logits are read before they are overwritten, entry by entry.
void divergence_bwd_inplace_cpu(const at::Tensor& grad_loss, const at::Tensor& student_logits,
                                const at::Tensor& teacher_logits, const at::Tensor& params,
                                const std::optional<at::Tensor>& token_weights, const at::Tensor& row_mask,
                                const at::Tensor& row_stats, at::IntArrayRef structure, at::ArrayRef<double> consts) {
  const RecipeDesc d = decode(structure, consts);
  const auto [N, V] = check_inputs(student_logits, teacher_logits, params, token_weights, row_mask, d);
  TORCH_CHECK(N <= 1 || V == 0 || student_logits.stride(0) >= V,
              "kdplug: the in-place backward needs student_logits rows that do not overlap (row stride ",
              student_logits.stride(0), " < V = ", V, ", e.g. an expanded tensor)");
  at::assert_no_overlap(student_logits, teacher_logits);
  backward_into(grad_loss, student_logits, teacher_logits, params, token_weights, row_mask, row_stats, d, N,
                student_logits.data_ptr(), student_logits.stride(0));
}

// The gradient of the unmasked rows written into grad, the masked rows left as they are: the
// recipes of a Split (distillm2) fill their own rows of one gradient tensor.
void divergence_bwd_into_cpu(const at::Tensor& grad_loss, const at::Tensor& student_logits,
                             const at::Tensor& teacher_logits, const at::Tensor& params,
                             const std::optional<at::Tensor>& token_weights, const at::Tensor& row_mask,
                             const at::Tensor& row_stats, at::IntArrayRef structure, at::ArrayRef<double> consts,
                             const at::Tensor& grad) {
  const RecipeDesc d = decode(structure, consts);
  const auto [N, V] = check_inputs(student_logits, teacher_logits, params, token_weights, row_mask, d);
  TORCH_CHECK(grad.sizes() == student_logits.sizes() && grad.scalar_type() == student_logits.scalar_type() &&
                  grad.device().is_cpu() && (V <= 1 || grad.stride(1) == 1) && (N <= 1 || grad.stride(0) >= V),
              "kdplug: grad must be a ", student_logits.scalar_type(), " [", N, ", ", V,
              "] CPU tensor with contiguous, non-overlapping rows, got ", grad.scalar_type(), " ", grad.sizes(),
              " strides ", grad.strides());
  at::assert_no_overlap(grad, student_logits);
  at::assert_no_overlap(grad, teacher_logits);
  backward_into(grad_loss, student_logits, teacher_logits, params, token_weights, row_mask, row_stats, d, N,
                grad.data_ptr(), grad.stride(0), /*skip_masked=*/true);
}

// Vocabulary-parallel partial row statistics of one shard (stage 0, 1, 2: see partial_rows in
// divergence_rows.h). given: float64 [N, 2] at stage 1, [N, 3] at stage 2, None at stage 0.
at::Tensor divergence_partials_cpu(const at::Tensor& student_logits, const at::Tensor& teacher_logits,
                                   const at::Tensor& params, const std::optional<at::Tensor>& token_weights,
                                   const at::Tensor& row_mask, const std::optional<at::Tensor>& given,
                                   int64_t stage, at::IntArrayRef structure, at::ArrayRef<double> consts) {
  const RecipeDesc d = decode(structure, consts);
  const auto [N, V] = check_inputs(student_logits, teacher_logits, params, token_weights, row_mask, d);
  TORCH_CHECK(stage >= 0 && stage <= 2, "kdplug: stage must be 0, 1 or 2, got ", stage);
  TORCH_CHECK(stage != 1 || d.mix == MIX_ALPHA, "kdplug: stage 1 (log Z) is for alpha-mixture recipes only");
  if (stage == 0) {
    TORCH_CHECK(!given.has_value(), "kdplug: stage 0 takes no given statistics");
  } else {
    const int64_t k = stage == 1 ? 2 : 3;
    TORCH_CHECK(given.has_value() && given->scalar_type() == at::kDouble && given->dim() == 2 &&
                    given->size(0) == N && given->size(1) == k && given->is_contiguous() && given->device().is_cpu(),
                "kdplug: stage ", stage, " needs the global statistics as a contiguous float64 [N, ", k,
                "] = [", N, ", ", k, "] CPU tensor");
  }
  at::Tensor out = at::empty({N, partials_width(static_cast<int>(stage))}, params.options());
  if (N == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student_logits.scalar_type(), "kdplug_partials", [&] {
    const Args<scalar_t> a = make_args<scalar_t>(student_logits, teacher_logits, params, token_weights, row_mask, d);
    partials_cpu<scalar_t>(a, static_cast<int>(stage), given.has_value() ? given->data_ptr<double>() : nullptr,
                           out.data_ptr<double>());
  });
  return out;
}

// AKL's per-token (w_head, w_tail) as float64 [N, 2] (see csrc/cpu/head_tail_rows.cpp).
at::Tensor head_tail_weights_cpu(const at::Tensor& student_logits, const at::Tensor& teacher_logits,
                                 const at::Tensor& row_mask, double temperature, double mu, bool descending) {
  const auto [N, V] = check_logits(student_logits, teacher_logits);
  check_row_mask(row_mask, N);
  TORCH_CHECK(temperature > 0 && std::isfinite(temperature), "kdplug: temperature must be finite and > 0, got ",
              temperature);
  TORCH_CHECK(mu > 0 && mu < 1, "kdplug: mu must be in (0, 1), got ", mu);
  at::Tensor weights = at::empty({N, 2}, student_logits.options().dtype(at::kDouble));
  if (N == 0) return weights;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student_logits.scalar_type(), "kdplug_head_tail", [&] {
    HeadTailArgs<scalar_t> a;
    set_rows<scalar_t>(student_logits, teacher_logits, row_mask, &a);
    a.inv_T = 1.0 / temperature;
    a.mu = mu;
    a.descending = descending;
    head_tail_cpu<scalar_t>(a, weights.data_ptr<double>());
  });
  return weights;
}

}  // namespace
}  // namespace cpu
}  // namespace kdplug

TORCH_LIBRARY_IMPL(kdplug, CPU, m) {
  m.impl("divergence_fwd", &kdplug::cpu::divergence_fwd_cpu);
  m.impl("divergence_fwd_grad", &kdplug::cpu::divergence_fwd_grad_cpu);
  m.impl("divergence_fwd_grad_into", &kdplug::cpu::divergence_fwd_grad_into_cpu);
  m.impl("divergence_bwd", &kdplug::cpu::divergence_bwd_cpu);
  m.impl("divergence_bwd_inplace", &kdplug::cpu::divergence_bwd_inplace_cpu);
  m.impl("divergence_bwd_into", &kdplug::cpu::divergence_bwd_into_cpu);
  m.impl("divergence_partials", &kdplug::cpu::divergence_partials_cpu);
  m.impl("head_tail_weights", &kdplug::cpu::head_tail_weights_cpu);
}
