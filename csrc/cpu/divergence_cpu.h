// The CPU kernels' interface between the operator file (csrc/cpu/divergence_kernel.cpp, ATen
// tensors) and the row loops (csrc/cpu/divergence_rows.h, raw pointers and at::vec), which are
// compiled once per logits dtype in csrc/cpu/rows_<dtype>.cpp so that the builds run in parallel.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <atomic>
#include <cstdint>
#include <type_traits>

#include "../kdplug_math.h"

namespace kdplug {
namespace cpu {

// fp32 math for fp32 / bf16 / fp16 logits, fp64 for fp64
template <class scalar_t>
using compute_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// The logit rows the loops read (pointers into the op's tensors; rows may be strided).
template <class scalar_t>
struct Rows {
  const scalar_t* s;
  const scalar_t* t;
  int64_t s_stride, t_stride, N, V;
  const bool* row_mask;
  int64_t mask_stride;
};

// What the divergence loops read: the rows and the packed recipe.
template <class scalar_t>
struct Args : Rows<scalar_t> {
  const double* params;         // [2 + n_terms]
  const double* token_weights;  // [N, n_terms] contiguous, or null
  math::RecipeDesc desc;
};

// Per-token loss and row_stats of rows [0, N) (parallel over rows). A row that is not masked but
// has an all -inf, +inf or NaN side sets *bad_row to min(2 n + side) (side 0: student, 1: teacher).
template <class scalar_t>
void forward_cpu(const Args<scalar_t>& a, compute_t<scalar_t>* loss, compute_t<scalar_t>* stats,
                 std::atomic<int64_t>* bad_row);

// The gradient w.r.t. the student logits, row n at grad + n * grad_stride. grad may be a.s itself
// (the in-place mode: each entry is read before it is overwritten, by the same thread). Masked
// rows are zero-filled, or left as they are with skip_masked (another recipe's rows).
template <class scalar_t>
void backward_cpu(const Args<scalar_t>& a, const compute_t<scalar_t>* grad_loss, const compute_t<scalar_t>* stats,
                  scalar_t* grad, int64_t grad_stride, bool skip_masked);

// forward_cpu and backward_cpu of each row back to back (the row still in cache), grad_loss =
// grad_scale; grad is [N, V] contiguous. A rejected row (bad_row) gets a zero gradient; masked
// rows get loss and statistics 0 and a zero gradient, or their gradient rows left as they are
// with skip_masked (another recipe's rows).
template <class scalar_t>
void forward_backward_cpu(const Args<scalar_t>& a, const compute_t<scalar_t>* grad_scale, compute_t<scalar_t>* loss,
                          compute_t<scalar_t>* stats, scalar_t* grad, std::atomic<int64_t>* bad_row,
                          bool skip_masked);

// The per-shard partial row statistics of the vocabulary-parallel forward (stage 0, 1 or 2; see
// partial_rows in divergence_rows.h): given [N, 2 or 3] float64 (null at stage 0), out [N, width].
template <class scalar_t>
void partials_cpu(const Args<scalar_t>& a, int stage, const double* given, double* out);
constexpr int partials_width(int stage) { return stage == 0 ? 3 : stage == 1 ? 1 : 5; }

// AKL's head / tail weights (csrc/cpu/head_tail_rows.cpp): weights [N, 2] float64, (0.5, 0.5)
// on masked rows and on rows divergence_fwd rejects.
template <class scalar_t>
struct HeadTailArgs : Rows<scalar_t> {
  double inv_T, mu;
  bool descending;
};
template <class scalar_t>
void head_tail_cpu(const HeadTailArgs<scalar_t>& a, double* weights);

#define KDPLUG_CPU_DTYPES(X) X(float) X(double) X(c10::BFloat16) X(c10::Half)
#define KDPLUG_DECLARE_EXTERN(T)                                                                      \
  extern template void forward_cpu<T>(const Args<T>&, compute_t<T>*, compute_t<T>*, std::atomic<int64_t>*); \
  extern template void backward_cpu<T>(const Args<T>&, const compute_t<T>*, const compute_t<T>*, T*, int64_t, bool); \
  extern template void partials_cpu<T>(const Args<T>&, int, const double*, double*);                 \
  extern template void forward_backward_cpu<T>(const Args<T>&, const compute_t<T>*, compute_t<T>*, compute_t<T>*, T*, \
                                               std::atomic<int64_t>*, bool); \
  extern template void head_tail_cpu<T>(const HeadTailArgs<T>&, double*);
KDPLUG_CPU_DTYPES(KDPLUG_DECLARE_EXTERN)
#undef KDPLUG_DECLARE_EXTERN

// The SIMD level the row loops were compiled for, and at::vec's float pack width.
const char* simd_level();
int vec_floats();

}  // namespace cpu
}  // namespace kdplug
