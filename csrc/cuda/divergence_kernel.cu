// The CUDA launchers' entry points (declared in divergence_cuda.h): dtype dispatch. The kernels
// and their launchers are templates in divergence_kernel.cuh, instantiated once per logits dtype
// in divergence_<dtype>.cu so that the four compile in parallel.
#include "divergence_kernel.cuh"

namespace kdplug {
namespace gpu {

#define KDPLUG_CUDA_DTYPES(X) X(float) X(double) X(__nv_bfloat16) X(__half)
#define KDPLUG_EXTERN(T)                                                                        \
  extern template void launch_forward_t<T>(const KernelArgs&, void*, void*, cudaStream_t);     \
  extern template void launch_backward_t<T>(const KernelArgs&, const void*, int64_t, const void*, void*, \
                                            cudaStream_t);
KDPLUG_CUDA_DTYPES(KDPLUG_EXTERN)
#undef KDPLUG_EXTERN

namespace {
template <class Fn>
const char* by_dtype(int dtype, Fn&& fn) {
  switch (dtype) {
    case kFloat32:
      fn(float{});
      return nullptr;
    case kFloat64:
      fn(double{});
      return nullptr;
    case kBFloat16:
      fn(__nv_bfloat16{});
      return nullptr;
    case kFloat16:
      fn(__half{});
      return nullptr;
    default:
      return "kdplug: unknown logits dtype code for the CUDA kernels";
  }
}
}  // namespace

const char* launch_forward(const KernelArgs& a, void* loss, void* stats, void* stream) {
  if (a.N <= 0) return nullptr;
  if (a.V < 1) return "kdplug: the vocabulary is empty";
  return by_dtype(a.dtype, [&](auto tag) {
    launch_forward_t<decltype(tag)>(a, loss, stats, static_cast<cudaStream_t>(stream));
  });
}

const char* launch_backward(const KernelArgs& a, const void* grad_loss, int64_t grad_loss_stride,
                            const void* stats, void* grad, void* stream) {
  if (a.N <= 0) return nullptr;
  if (a.V < 1) return "kdplug: the vocabulary is empty";
  return by_dtype(a.dtype, [&](auto tag) {
    launch_backward_t<decltype(tag)>(a, grad_loss, grad_loss_stride, stats, grad,
                                     static_cast<cudaStream_t>(stream));
  });
}

int threads_per_row(int dtype, int64_t V) {
  const int64_t bytes = dtype == kFloat64 ? 8 : dtype == kFloat32 ? 4 : 2;
  const int64_t vec = 16 / bytes;
  return threads_for_packs((V + vec - 1) / vec);
}

}  // namespace gpu
}  // namespace kdplug
