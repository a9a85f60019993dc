// The CPU row loops for float logits (see divergence_rows.h; one file per dtype builds in parallel).
#include "divergence_rows.h"

namespace kdplug {
namespace cpu {

template void forward_cpu<float>(const Args<float>&, compute_t<float>*, compute_t<float>*, std::atomic<int64_t>*);
template void backward_cpu<float>(const Args<float>&, const compute_t<float>*, const compute_t<float>*, float*, int64_t, bool);
template void partials_cpu<float>(const Args<float>&, int, const double*, double*);
template void forward_backward_cpu<float>(const Args<float>&, const compute_t<float>*, compute_t<float>*,
                                              compute_t<float>*, float*, std::atomic<int64_t>*, bool);

const char* simd_level() { return kdplug::math::simd_level(); }
int vec_floats() { return static_cast<int>(at::vec::Vectorized<float>::size()); }

}  // namespace cpu
}  // namespace kdplug
