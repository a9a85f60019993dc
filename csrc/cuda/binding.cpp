// The CUDA operators kdplug::divergence_fwd / divergence_bwd / divergence_bwd_inplace: argument checks, allocation, launch.
// The kernels are in divergence_kernel.cuh (raw pointers, no torch); this file is the only CUDA
// source that sees torch, and setup.py compiles it only against a CUDA build of torch. Checks and
// messages mirror the CPU binding (csrc/cpu/divergence_kernel.cpp), except that nothing here reads
// device memory on the host: params (the temperature included) are read by the kernels, and a row
// that is not masked but cannot be evaluated comes back as a NaN loss with a non-finite
// row_stats[:, 0:2], which kdplug/_ops.py checks with torch._assert_async (no host sync).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/where.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "divergence_cuda.h"

namespace kdplug {
namespace gpu {
namespace {

using math::kStats;
using math::RecipeDesc;

RecipeDesc decode(at::IntArrayRef structure, at::ArrayRef<double> consts) {
  RecipeDesc d;
  const char* err = math::decode_recipe(structure.data(), static_cast<int64_t>(structure.size()), consts.data(),
                                        static_cast<int64_t>(consts.size()), &d);
  TORCH_CHECK(err == nullptr, "kdplug: invalid packed recipe: ", err ? err : "");
  return d;
}

at::ScalarType compute_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return kFloat32;
    case at::kDouble:
      return kFloat64;
    case at::kBFloat16:
      return kBFloat16;
    default:
      return kFloat16;
  }
}

// (as the CPU binding: every tensor argument on the logits' device; here they are read there)
void check_device(const at::Tensor& x, const char* name, const at::Tensor& logits) {
  TORCH_CHECK(x.device() == logits.device(), "kdplug: with CUDA logits (", logits.device(),
              "), teacher_logits, params, row_mask, token_weights, grad_loss and row_stats must be on the same "
              "device; ", name, " is on ", x.device());
}

// Checks shared by both ops (as the CPU binding's check_inputs); returns N and V.
std::pair<int64_t, int64_t> check_inputs(const at::Tensor& s, const at::Tensor& t, const at::Tensor& params,
                                         const std::optional<at::Tensor>& token_weights, const at::Tensor& row_mask,
                                         const RecipeDesc& d) {
  TORCH_CHECK(s.dim() == 2 && t.dim() == 2, "kdplug: student_logits and teacher_logits must be [N, V], got ",
              s.sizes(), " and ", t.sizes());
  TORCH_CHECK(s.sizes() == t.sizes(), "kdplug: student_logits ", s.sizes(), " and teacher_logits ", t.sizes(),
              " must have the same shape");
  TORCH_CHECK(s.scalar_type() == t.scalar_type(), "kdplug: student_logits (", s.scalar_type(),
              ") and teacher_logits (", t.scalar_type(), ") must have the same dtype");
  const auto dt = s.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf,
              "kdplug: logits must be float32, float64, bfloat16 or float16, got ", dt);
  check_device(t, "teacher_logits", s);
  const int64_t N = s.size(0), V = s.size(1);
  TORCH_CHECK(V >= 1 || N == 0, "kdplug: the vocabulary is empty");
  TORCH_CHECK(V <= 1 || (s.stride(1) == 1 && t.stride(1) == 1),
              "kdplug: the logits' last dimension must be contiguous (stride 1); got strides ", s.strides(), " and ",
              t.strides());
  TORCH_CHECK(params.scalar_type() == at::kDouble && params.dim() == 1 && params.is_contiguous() &&
                  params.size(0) == 2 + d.n_terms,
              "kdplug: params must be a contiguous float64 vector [T, lam, weight * n_terms] of length ",
              2 + d.n_terms, ", got ", params.scalar_type(), " ", params.sizes());
  check_device(params, "params", s);
  TORCH_CHECK(row_mask.scalar_type() == at::kBool && row_mask.dim() == 1 && row_mask.size(0) == N,
              "kdplug: row_mask must be a bool vector [N] = [", N, "], got ", row_mask.scalar_type(), " ",
              row_mask.sizes());
  check_device(row_mask, "row_mask", s);
  if (token_weights.has_value()) {
    const auto& w = *token_weights;
    TORCH_CHECK(w.scalar_type() == at::kDouble && w.dim() == 2 && w.size(0) == N && w.size(1) == d.n_terms &&
                    w.is_contiguous(),
                "kdplug: token_weights must be a contiguous float64 [N, n_terms] = [", N, ", ", d.n_terms,
                "] tensor, got ", w.scalar_type(), " ", w.sizes());
    check_device(w, "token_weights", s);
  }
  return {N, V};
}

KernelArgs make_args(const at::Tensor& s, const at::Tensor& t, const at::Tensor& params,
                     const std::optional<at::Tensor>& token_weights, const at::Tensor& row_mask,
                     const RecipeDesc& d) {
  KernelArgs a{};
  a.dtype = dtype_code(s.scalar_type());
  a.s = s.data_ptr();
  a.t = t.data_ptr();
  a.s_stride = s.stride(0);
  a.t_stride = t.stride(0);
  a.N = s.size(0);
  a.V = s.size(1);
  a.row_mask = row_mask.data_ptr<bool>();
  a.mask_stride = row_mask.stride(0);
  a.params = params.data_ptr<double>();
  a.token_weights = token_weights.has_value() ? token_weights->data_ptr<double>() : nullptr;
  a.desc = d;
  return a;
}

std::tuple<at::Tensor, at::Tensor> divergence_fwd_cuda(const at::Tensor& student_logits,
                                                       const at::Tensor& teacher_logits, const at::Tensor& params,
                                                       const std::optional<at::Tensor>& token_weights,
                                                       const at::Tensor& row_mask, at::IntArrayRef structure,
                                                       at::ArrayRef<double> consts) {
  const RecipeDesc d = decode(structure, consts);
  const auto [N, V] = check_inputs(student_logits, teacher_logits, params, token_weights, row_mask, d);
  const c10::cuda::CUDAGuard guard(student_logits.device());
  const auto opts = student_logits.options().dtype(compute_dtype(student_logits.scalar_type()));
  at::Tensor loss = at::empty({N}, opts);
  at::Tensor row_stats = at::empty({N, kStats}, opts);
  if (N == 0) return {loss, row_stats};
  const KernelArgs a = make_args(student_logits, teacher_logits, params, token_weights, row_mask, d);
  const char* err = launch_forward(a, loss.data_ptr(), row_stats.data_ptr(), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == nullptr, err ? err : "");
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {loss, row_stats};
}

at::Tensor divergence_bwd_cuda(const at::Tensor& grad_loss, const at::Tensor& student_logits,
                               const at::Tensor& teacher_logits, const at::Tensor& params,
                               const std::optional<at::Tensor>& token_weights, const at::Tensor& row_mask,
                               const at::Tensor& row_stats, at::IntArrayRef structure, at::ArrayRef<double> consts) {
  const RecipeDesc d = decode(structure, consts);
  const auto [N, V] = check_inputs(student_logits, teacher_logits, params, token_weights, row_mask, d);
  const auto cdt = compute_dtype(student_logits.scalar_type());
  TORCH_CHECK(grad_loss.dim() == 1 && grad_loss.size(0) == N && grad_loss.scalar_type() == cdt,
              "kdplug: grad_loss must be a ", cdt, " vector [N] = [", N, "], got ", grad_loss.scalar_type(), " ",
              grad_loss.sizes());
  check_device(grad_loss, "grad_loss", student_logits);
  TORCH_CHECK(row_stats.dim() == 2 && row_stats.size(0) == N && row_stats.size(1) == kStats &&
                  row_stats.scalar_type() == cdt && row_stats.is_contiguous(),
              "kdplug: row_stats must be the contiguous ", cdt, " [N, ", kStats,
              "] tensor that divergence_fwd returned, got ", row_stats.scalar_type(), " ", row_stats.sizes());
  check_device(row_stats, "row_stats", student_logits);
  const c10::cuda::CUDAGuard guard(student_logits.device());
  at::Tensor grad = at::empty({N, V}, student_logits.options());
  if (grad.numel() == 0) return grad;
  const KernelArgs a = make_args(student_logits, teacher_logits, params, token_weights, row_mask, d);
  // grad_loss may be strided (an expanded scalar gradient: stride 0); the kernel takes its stride
  const char* err = launch_backward(a, grad_loss.data_ptr(), grad_loss.stride(0), row_stats.data_ptr(),
                                    grad.data_ptr(), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == nullptr, err ? err : "");
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grad;
}

// The in-place backward on CUDA goes through a temporary (the same values; the kernel's gradient
// rows are [N, V] contiguous and its loads/stores are __restrict__, so writing over the logits
// directly needs a variant that has not been run on a GPU yet). The CPU kernel writes in place.
void divergence_bwd_inplace_cuda(const at::Tensor& grad_loss, const at::Tensor& student_logits,
                                 const at::Tensor& teacher_logits, const at::Tensor& params,
                                 const std::optional<at::Tensor>& token_weights, const at::Tensor& row_mask,
                                 const at::Tensor& row_stats, at::IntArrayRef structure, at::ArrayRef<double> consts) {
  at::Tensor grad = divergence_bwd_cuda(grad_loss, student_logits, teacher_logits, params, token_weights, row_mask,
                                        row_stats, structure, consts);
  const_cast<at::Tensor&>(student_logits).copy_(grad);
}

// The rows of a Split's recipe into a shared gradient (through a temporary on CUDA for now).
void divergence_bwd_into_cuda(const at::Tensor& grad_loss, const at::Tensor& student_logits,
                              const at::Tensor& teacher_logits, const at::Tensor& params,
                              const std::optional<at::Tensor>& token_weights, const at::Tensor& row_mask,
                              const at::Tensor& row_stats, at::IntArrayRef structure, at::ArrayRef<double> consts,
                              const at::Tensor& grad) {
  at::Tensor rows = divergence_bwd_cuda(grad_loss, student_logits, teacher_logits, params, token_weights, row_mask,
                                        row_stats, structure, consts);
  const_cast<at::Tensor&>(grad).copy_(at::where(row_mask.unsqueeze(1), rows, grad));
}

}  // namespace
}  // namespace gpu
}  // namespace kdplug

TORCH_LIBRARY_IMPL(kdplug, CUDA, m) {
  m.impl("divergence_fwd", &kdplug::gpu::divergence_fwd_cuda);
  m.impl("divergence_bwd", &kdplug::gpu::divergence_bwd_cuda);
  m.impl("divergence_bwd_inplace", &kdplug::gpu::divergence_bwd_inplace_cuda);
  m.impl("divergence_bwd_into", &kdplug::gpu::divergence_bwd_into_cuda);
}
