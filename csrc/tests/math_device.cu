// Compiles csrc/kdplug_math.h as device code (CMake builds it when nvcc is found): the header must
// stay usable by the CUDA kernels, with no torch include. Nothing here runs.
#include "kdplug_math.h"

using namespace kdplug::math;

__global__ void kdplug_math_device_check(const float* s, const float* t, const double* params, RecipeDesc d,
                                         float* out, int V) {
  RowConsts<float> c;
  row_consts_init(d, params, static_cast<const double*>(nullptr), &c);
  OnlineLse<float> ls, lt;
  for (int i = threadIdx.x; i < V; i += blockDim.x) {
    ls.add(s[i] * c.inv_T);
    lt.add(t[i] * c.inv_T);
  }
  ls.merge(lt.m, lt.z);
  c.lse_s = ls.value();
  c.lse_t = lt.value();
  float e_acc[kMaxTerms] = {};
  StatAcc<float> st{0.f, 0.f, 0.f, 0.f};
  for (int i = threadIdx.x; i < V; i += blockDim.x) {
    const float xs = s[i] * c.inv_T, xt = t[i] * c.inv_T;
    const Logs<float> L = logs_at(c, xs, xt);
    const H<float> h = terms_at<true>(c, L, keep_at(c, xs, xt), e_acc);
    stats_at(c, L, h, &st);
    out[i] = grad_at(c, L, h, st.h_r, st.h_q, 1.f);
  }
  out[0] += e_acc[0] + st.w_r + st.w_h_r;
}
