// Instances of the CUDA kernels for one logits dtype (see divergence_kernel.cu).
#include "divergence_kernel.cuh"

namespace kdplug {
namespace gpu {
template void launch_forward_t<__nv_bfloat16>(const KernelArgs&, void*, void*, cudaStream_t);
template void launch_backward_t<__nv_bfloat16>(const KernelArgs&, const void*, int64_t, const void*, void*, cudaStream_t);
}  // namespace gpu
}  // namespace kdplug
