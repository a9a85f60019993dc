// The CPU row loops for c10::Half logits (see divergence_rows.h; one file per dtype builds in parallel).
#include "divergence_rows.h"

namespace kdplug {
namespace cpu {

template void forward_cpu<c10::Half>(const Args<c10::Half>&, compute_t<c10::Half>*, compute_t<c10::Half>*, std::atomic<int64_t>*);
template void backward_cpu<c10::Half>(const Args<c10::Half>&, const compute_t<c10::Half>*, const compute_t<c10::Half>*, c10::Half*, int64_t, bool);
template void partials_cpu<c10::Half>(const Args<c10::Half>&, int, const double*, double*);
template void forward_backward_cpu<c10::Half>(const Args<c10::Half>&, const compute_t<c10::Half>*, compute_t<c10::Half>*,
                                              compute_t<c10::Half>*, c10::Half*, std::atomic<int64_t>*, bool);

}  // namespace cpu
}  // namespace kdplug
