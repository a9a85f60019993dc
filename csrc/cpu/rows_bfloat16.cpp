// The CPU row loops for c10::BFloat16 logits (see divergence_rows.h; one file per dtype builds in parallel).
#include "divergence_rows.h"

namespace kdplug {
namespace cpu {

template void forward_cpu<c10::BFloat16>(const Args<c10::BFloat16>&, compute_t<c10::BFloat16>*, compute_t<c10::BFloat16>*, std::atomic<int64_t>*);
template void backward_cpu<c10::BFloat16>(const Args<c10::BFloat16>&, const compute_t<c10::BFloat16>*, const compute_t<c10::BFloat16>*, c10::BFloat16*, int64_t, bool);
template void partials_cpu<c10::BFloat16>(const Args<c10::BFloat16>&, int, const double*, double*);
template void forward_backward_cpu<c10::BFloat16>(const Args<c10::BFloat16>&, const compute_t<c10::BFloat16>*, compute_t<c10::BFloat16>*,
                                              compute_t<c10::BFloat16>*, c10::BFloat16*, std::atomic<int64_t>*, bool);

}  // namespace cpu
}  // namespace kdplug
