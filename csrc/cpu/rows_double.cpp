// The CPU row loops for double logits (see divergence_rows.h; one file per dtype builds in parallel).
#include "divergence_rows.h"

namespace kdplug {
namespace cpu {

template void forward_cpu<double>(const Args<double>&, compute_t<double>*, compute_t<double>*, std::atomic<int64_t>*);
template void backward_cpu<double>(const Args<double>&, const compute_t<double>*, const compute_t<double>*, double*, int64_t, bool);
template void partials_cpu<double>(const Args<double>&, int, const double*, double*);
template void forward_backward_cpu<double>(const Args<double>&, const compute_t<double>*, compute_t<double>*,
                                              compute_t<double>*, double*, std::atomic<int64_t>*, bool);

}  // namespace cpu
}  // namespace kdplug
