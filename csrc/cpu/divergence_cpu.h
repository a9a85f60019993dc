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

// What the row loops read (pointers into the op's tensors; rows may be strided).
template <class scalar_t>
struct Args {
  const scalar_t* s;
  const scalar_t* t;
  int64_t s_stride, t_stride, N, V;
  const bool* row_mask;
  int64_t mask_stride;
  const double* params;         // [2 + n_terms]
  const double* token_weights;  // [N, n_terms] contiguous, or null
  math::RecipeDesc desc;
};

// Per-token loss and row_stats of rows [0, N) (parallel over rows). A row that is not masked but
// has an all -inf, +inf or NaN side sets *bad_row to min(2 n + side) (side 0: student, 1: teacher).
template <class scalar_t>
void forward_cpu(const Args<scalar_t>& a, compute_t<scalar_t>* loss, compute_t<scalar_t>* stats,
                 std::atomic<int64_t>* bad_row);

// The gradient w.r.t. the student logits, [N, V] contiguous.
template <class scalar_t>
void backward_cpu(const Args<scalar_t>& a, const compute_t<scalar_t>* grad_loss, const compute_t<scalar_t>* stats,
                  scalar_t* grad);

#define KDPLUG_CPU_DTYPES(X) X(float) X(double) X(c10::BFloat16) X(c10::Half)
#define KDPLUG_DECLARE_EXTERN(T)                                                                      \
  extern template void forward_cpu<T>(const Args<T>&, compute_t<T>*, compute_t<T>*, std::atomic<int64_t>*); \
  extern template void backward_cpu<T>(const Args<T>&, const compute_t<T>*, const compute_t<T>*, T*);
KDPLUG_CPU_DTYPES(KDPLUG_DECLARE_EXTERN)
#undef KDPLUG_DECLARE_EXTERN

// The SIMD level the row loops were compiled for, and at::vec's float pack width.
const char* simd_level();
int vec_floats();

}  // namespace cpu
}  // namespace kdplug
