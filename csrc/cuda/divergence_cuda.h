// The CUDA kernels' interface between the operator binding (csrc/cuda/binding.cpp, ATen tensors,
// compiled only against a CUDA build of torch) and the kernels (csrc/cuda/divergence_*.cu, raw
// pointers, compiled by nvcc without torch). No torch and no CUDA headers here.
#pragma once

#include <cstdint>

#include "../kdplug_math.h"

namespace kdplug {
namespace gpu {

// The logits' dtype. Math in float32 (float64 for float64 logits); loss, row_stats and grad_loss
// are in that compute dtype, the gradient in the logits' dtype.
enum DType : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

// What the kernels read. Every pointer is device memory on the current device.
struct KernelArgs {
  int dtype;                    // DType
  const void* s;                // student logits, row n at s + n * s_stride (elements); last dim contiguous
  const void* t;                // teacher logits, same
  int64_t s_stride, t_stride;
  int64_t N, V;                 // V >= 1 (the launchers do nothing when N == 0)
  const bool* row_mask;         // [N], element n at row_mask[n * mask_stride]; false: row never read
  int64_t mask_stride;
  const double* params;         // [2 + n_terms]: T, lam, weights (read on the device: no host sync)
  const double* token_weights;  // [N, n_terms] contiguous, or null
  math::RecipeDesc desc;        // decoded on the host (math::decode_recipe)
};

// Per-token loss [N] and row_stats [N, kStats] (contiguous, compute dtype), on `stream` (a
// cudaStream_t). A row that is masked gets 0 everywhere; a row that is not masked but has an all
// -inf side, a +inf or NaN entry (or a temperature that is not finite and > 0) gets a NaN loss and
// a non-finite row_stats[n, 0] or [n, 1] (the CPU kernel raises instead; the Python layer checks).
// Returns null, or a message when the launch could not be configured (kernel launch errors are
// left for the caller's cudaGetLastError / C10_CUDA_KERNEL_LAUNCH_CHECK).
const char* launch_forward(const KernelArgs& a, void* loss, void* stats, void* stream);

// The gradient w.r.t. the student logits, [N, V] contiguous in the logits' dtype:
// grad_loss[n * grad_loss_stride] (compute dtype; the stride may be 0) times d loss[n] / d s[n].
// Rows that are masked or whose incoming gradient is 0 are written as exact zeros and not read.
const char* launch_backward(const KernelArgs& a, const void* grad_loss, int64_t grad_loss_stride,
                            const void* stats, void* grad, void* stream);

// Threads per block the kernels use for rows of V entries of `dtype` (a function of V and the
// dtype only, so that results do not depend on anything else), and the block limit they are
// compiled for.
int threads_per_row(int dtype, int64_t V);
constexpr int kMaxThreads = 256;

}  // namespace gpu
}  // namespace kdplug
