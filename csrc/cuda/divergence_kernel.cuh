// The CUDA kernels of kdplug::divergence_fwd / divergence_bwd (no torch headers: nvcc compiles this
// alone; csrc/cuda/binding.cpp calls the launchers declared in divergence_cuda.h).
//
// Layout. One thread block per row (a grid-stride loop over rows, so any N launches), 32 to
// kMaxThreads (256) threads chosen from V alone (about 4 packs per thread, a power of two).
// A row is read as packs of 16 bytes (VEC = 4 floats, 8 bf16 / fp16, 2 doubles): thread j takes
// packs j, j + B, j + 2B, ... (coalesced 128-bit loads, ld.global.nc; the next pack's loads issued
// before the current pack's math) when both rows and both row strides are 16-byte aligned, else the
// same packs element by element (so results do not depend on alignment; rows whose byte stride is
// not a multiple of 16, e.g. bf16 with V = 50257, take this slower path); the last, partial pack
// is padded with -inf on both sides, which adds exactly nothing to any sum (the zero rules).
//
// Passes (csrc/cuda/row_passes.h, the same structure as the CPU kernel): the one-pass forward of
// logit-space recipes; else 2 passes (3 for the alpha-mixture) over the row; the backward in one
// pass from row_stats, with streaming (evict-first) 128-bit stores of the gradient.
//
// Reductions. Each thread folds its packs into a partial state (online max / log-sum-exp, sums in
// the compute type); states are merged by warp shuffles (shfl_down tree) and then across warps in
// shared memory by warp 0, in a fixed order: results are bitwise reproducible run to run. No
// atomics. Sums are merged in double (as the CPU kernel folds its SIMD lanes).
//
// Not done (see benchmarks/gpu/README.md): keeping a row on chip (shared memory of a
// thread-block cluster) so that multi-pass recipes read HBM once; the passes after the first are
// served by L2 only when the rows in flight fit in it.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "divergence_cuda.h"
#include "row_passes.h"

namespace kdplug {
namespace gpu {

using math::RecipeDesc;
using math::RowConsts;

template <class In>
using compute_t = std::conditional_t<std::is_same<In, double>::value, double, float>;

// ---- conversions (explicit intrinsics: torch builds with __CUDA_NO_HALF_CONVERSIONS__ and
// __CUDA_NO_BFLOAT16_CONVERSIONS__, which remove the implicit ones) -----------------------------
template <class In>
struct Cvt;
template <>
struct Cvt<float> {
  static __device__ __forceinline__ float in(float x) { return x; }
  static __device__ __forceinline__ float out(float x) { return x; }
};
template <>
struct Cvt<double> {
  static __device__ __forceinline__ double in(double x) { return x; }
  static __device__ __forceinline__ double out(double x) { return x; }
};
template <>
struct Cvt<__nv_bfloat16> {
  static __device__ __forceinline__ float in(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 out(float x) { return __float2bfloat16_rn(x); }
};
template <>
struct Cvt<__half> {
  static __device__ __forceinline__ float in(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half out(float x) { return __float2half_rn(x); }
};

// ---- block reduction -------------------------------------------------------------------------
constexpr int kReduceBytes = 128;  // the largest merge state

template <class R>
__device__ __forceinline__ R shfl_down(const R& v, int offset) {
  static_assert(sizeof(R) % 4 == 0, "merge states are made of 4-byte words");
  constexpr int W = sizeof(R) / 4;
  unsigned in[W], out[W];
  memcpy(in, &v, sizeof(R));
#pragma unroll
  for (int i = 0; i < W; ++i) out[i] = __shfl_down_sync(0xffffffffu, in[i], offset);
  R r;
  memcpy(&r, out, sizeof(R));
  return r;
}

// Every thread's v merged in a fixed tree (lane 0 of each warp, then warp 0 over the warps);
// every thread gets the result. blockDim.x is a multiple of 32. buf: 33 * kReduceBytes bytes of
// shared memory; safe to call again right away (the two barriers order the reuse).
template <class R, class Merge>
__device__ __forceinline__ R block_reduce(R v, Merge& merge, unsigned char* buf) {
  static_assert(sizeof(R) <= kReduceBytes, "merge state too large for the reduction buffer");
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  R* slots = reinterpret_cast<R*>(buf);
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const R o = shfl_down(v, offset);
    if (lane < offset) merge(v, o);
  }
  if (lane == 0) slots[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = slots[lane < nwarps ? lane : 0];
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      const R o = shfl_down(v, offset);
      if (lane < offset && lane + offset < nwarps) merge(v, o);
    }
    if (lane == 0) slots[32] = v;
  }
  __syncthreads();
  return slots[32];
}

// ---- the executor: one row, one thread block -------------------------------------------------
template <class In>
struct BlockExec {
  using F = compute_t<In>;
  static constexpr int VEC = 16 / sizeof(In);

  // the launch
  const In* s0;
  const In* t0;
  In* g0;  // the gradient [N, V] (backward), or null
  int64_t s_stride, t_stride;
  int64_t V, npacks;
  bool vec_in, vec_out;
  unsigned char* buf;  // the block reduction's shared memory
  // the row
  const In* __restrict__ s;
  const In* __restrict__ t;
  In* __restrict__ g;
  F inv_T;

  __device__ __forceinline__ BlockExec(const KernelArgs& a, bool vec_in_, In* grad, bool vec_out_,
                                       unsigned char* buf_)
      : s0(static_cast<const In*>(a.s)),
        t0(static_cast<const In*>(a.t)),
        g0(grad),
        s_stride(a.s_stride),
        t_stride(a.t_stride),
        V(a.V),
        npacks((a.V + VEC - 1) / VEC),
        vec_in(vec_in_),
        vec_out(vec_out_),
        buf(buf_),
        s(nullptr),
        t(nullptr),
        g(nullptr),
        inv_T(F(1)) {}

  __device__ __forceinline__ void begin_row(int64_t n, F inv_T_) {
    s = s0 + n * s_stride;
    t = t0 + n * t_stride;
    g = g0 ? g0 + n * V : nullptr;
    inv_T = inv_T_;
  }

  __device__ __forceinline__ bool leader() const { return threadIdx.x == 0; }

  // A pack as loaded: 16 bytes of each row (entries past V are -inf).
  struct Raw {
    uint4 s, t;
  };

  __device__ __forceinline__ Raw fetch(int64_t p) const {
    const int64_t k0 = p * VEC;
    Raw r;
    if (vec_in && k0 + VEC <= V) {
      r.s = __ldg(reinterpret_cast<const uint4*>(s + k0));
      r.t = __ldg(reinterpret_cast<const uint4*>(t + k0));
    } else {
      const In ninf = Cvt<In>::out(math::neg_inf<F>());
      In a[VEC], b[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const int64_t k = k0 + j;
        a[j] = k < V ? s[k] : ninf;
        b[j] = k < V ? t[k] : ninf;
      }
      memcpy(&r.s, a, 16);
      memcpy(&r.t, b, 16);
    }
    return r;
  }

  // s/T and t/T of a pack
  __device__ __forceinline__ void convert(const Raw& r, F* xs, F* xt) const {
    In a[VEC], b[VEC];
    memcpy(a, &r.s, 16);
    memcpy(b, &r.t, 16);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      xs[j] = Cvt<In>::in(a[j]) * inv_T;
      xt[j] = Cvt<In>::in(b[j]) * inv_T;
    }
  }

  // fn(p, xs, xt) over this thread's packs p = threadIdx.x + i * blockDim.x, the loads of the
  // next pack issued before the math of the current one (two packs in flight per thread).
  template <class Fn>
  __device__ __forceinline__ void for_each_pack(Fn fn) const {
    int64_t p = threadIdx.x;
    if (p >= npacks) return;
    Raw cur = fetch(p);
    for (;;) {
      const int64_t next_p = p + blockDim.x;
      const bool more = next_p < npacks;
      Raw next;
      if (more) next = fetch(next_p);
      F xs[VEC], xt[VEC];
      convert(cur, xs, xt);
      fn(p, xs, xt);
      if (!more) break;
      cur = next;
      p = next_p;
    }
  }

  template <class S, class Add, class Conv, class Merge>
  __device__ __forceinline__ auto row_reduce(S st, Add add, Conv conv, Merge merge) const -> decltype(conv(st)) {
    for_each_pack([&](int64_t, const F* xs, const F* xt) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) add(st, xs[j], xt[j]);
    });
    return block_reduce(conv(st), merge, buf);
  }

  __device__ __forceinline__ void store(int64_t p, const F* v) const {
    const int64_t k0 = p * VEC;
    In a[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) a[j] = Cvt<In>::out(v[j]);
    if (vec_out && k0 + VEC <= V) {
      uint4 u;
      memcpy(&u, a, 16);
      __stcs(reinterpret_cast<uint4*>(g + k0), u);  // written once, read by the next kernel: evict first
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j)
        if (k0 + j < V) g[k0 + j] = a[j];
    }
  }

  __device__ __forceinline__ void zero_row() const {
    F zero[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) zero[j] = F(0);
    for (int64_t p = threadIdx.x; p < npacks; p += blockDim.x) store(p, zero);
  }
};

// ---- kernels: the row bodies of row_passes.h over a grid-stride loop of rows -----------------------
template <class In, int MIX, int SIG, int NT>
__global__ void __launch_bounds__(kMaxThreads)
    forward_general_kernel(const KernelArgs a, bool vec_in, compute_t<In>* __restrict__ loss,
                           compute_t<In>* __restrict__ stats) {
  __shared__ alignas(16) unsigned char buf[33 * kReduceBytes];
  BlockExec<In> ex(a, vec_in, nullptr, false, buf);
  for (int64_t n = blockIdx.x; n < a.N; n += gridDim.x)
    forward_general_row<compute_t<In>, MIX, SIG, NT>(ex, a, n, loss, stats);
}

template <class In, bool GEO, int NT>
__global__ void __launch_bounds__(kMaxThreads)
    forward_fused_kernel(const KernelArgs a, bool vec_in, compute_t<In>* __restrict__ loss,
                         compute_t<In>* __restrict__ stats) {
  __shared__ alignas(16) unsigned char buf[33 * kReduceBytes];
  BlockExec<In> ex(a, vec_in, nullptr, false, buf);
  for (int64_t n = blockIdx.x; n < a.N; n += gridDim.x) forward_fused_row<compute_t<In>, GEO, NT>(ex, a, n, loss, stats);
}

template <class In, int MIX, int SIG, int NT>
__global__ void __launch_bounds__(kMaxThreads)
    backward_kernel(const KernelArgs a, bool vec_in, const compute_t<In>* __restrict__ grad_loss,
                    int64_t grad_loss_stride, const compute_t<In>* __restrict__ stats, In* __restrict__ grad,
                    bool vec_out) {
  BlockExec<In> ex(a, vec_in, grad, vec_out, nullptr);
  for (int64_t n = blockIdx.x; n < a.N; n += gridDim.x)
    backward_row_body<compute_t<In>, MIX, SIG, NT>(ex, a, n, grad_loss, grad_loss_stride, stats);
}

// ---- launchers ------------------------------------------------------------------------------
// Which dtypes get the instances specialized on a built-in single-term recipe (the others run
// every recipe through SIG = 0): float and bfloat16, the dtypes training runs in (as on the CPU).
template <class In>
constexpr bool kSpecialize = std::is_same<In, float>::value || std::is_same<In, __nv_bfloat16>::value;

inline unsigned grid_for_rows(int64_t N) {
  return static_cast<unsigned>(N < int64_t(0x7fffffff) ? N : int64_t(0x7fffffff));
}

inline bool aligned16(const void* p, int64_t row_stride_bytes) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0 && row_stride_bytes % 16 == 0;
}

inline bool vec_inputs(const KernelArgs& a, int64_t elem) {
  return aligned16(a.s, a.s_stride * elem) && aligned16(a.t, a.t_stride * elem);
}

constexpr bool kFusedForward = false;

inline bool fused_disabled() {  // KDPLUG_NO_FUSED=1: the generic forward (tests compare the two)
  const char* v = std::getenv("KDPLUG_NO_FUSED");
  return v != nullptr && v[0] != '\0' && !(v[0] == '0' && v[1] == '\0');
}

template <class In>
void launch_forward_t(const KernelArgs& a, void* loss_, void* stats_, cudaStream_t stream) {
  using F = compute_t<In>;
  F* loss = static_cast<F*>(loss_);
  F* stats = static_cast<F*>(stats_);
  const RecipeDesc& d = a.desc;
  const dim3 grid(grid_for_rows(a.N));
  const dim3 block(threads_for_packs((a.V + BlockExec<In>::VEC - 1) / BlockExec<In>::VEC));
  const bool vec_in = vec_inputs(a, sizeof(In));
  // NB: off for now: the one-pass loss cancels at large |lse| (see kFusedLseLimit in the CPU
  // kernel, which recomputes such rows); the CUDA port needs the same per-row fallback, and no
  // GPU was available to test one. The generic forward is exact.
  if (kFusedForward && fused_eligible(d) && !fused_disabled()) {
    dispatch_fused(d, [&](auto geo, auto nt) {
      forward_fused_kernel<In, decltype(geo)::value, decltype(nt)::value>
          <<<grid, block, 0, stream>>>(a, vec_in, loss, stats);
    });
    return;
  }
  dispatch_recipe<kSpecialize<In>>(d, [&](auto mix, auto sig, auto nt) {
    forward_general_kernel<In, decltype(mix)::value, decltype(sig)::value, decltype(nt)::value>
        <<<grid, block, 0, stream>>>(a, vec_in, loss, stats);
  });
}

template <class In>
void launch_backward_t(const KernelArgs& a, const void* grad_loss_, int64_t grad_loss_stride, const void* stats_,
                       void* grad_, cudaStream_t stream) {
  using F = compute_t<In>;
  const F* grad_loss = static_cast<const F*>(grad_loss_);
  const F* stats = static_cast<const F*>(stats_);
  In* grad = static_cast<In*>(grad_);
  const dim3 grid(grid_for_rows(a.N));
  const dim3 block(threads_for_packs((a.V + BlockExec<In>::VEC - 1) / BlockExec<In>::VEC));
  const bool vec_in = vec_inputs(a, sizeof(In));
  const bool vec_out = aligned16(grad, a.V * static_cast<int64_t>(sizeof(In)));
  dispatch_recipe<kSpecialize<In>>(a.desc, [&](auto mix, auto sig, auto nt) {
    backward_kernel<In, decltype(mix)::value, decltype(sig)::value, decltype(nt)::value>
        <<<grid, block, 0, stream>>>(a, vec_in, grad_loss, grad_loss_stride, stats, grad, vec_out);
  });
}

}  // namespace gpu
}  // namespace kdplug
