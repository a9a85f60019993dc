// A stand-in for c10/cuda/CUDAStream.h (see CUDAException.h here).
#pragma once
namespace c10 {
namespace cuda {
struct CUDAStream {
  void* stream() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream() { return {}; }
}  // namespace cuda
}  // namespace c10
