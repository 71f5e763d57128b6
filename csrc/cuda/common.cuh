// Shared helpers of the CUDA kernels.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>

#include <cstdint>

namespace fastem {

constexpr int kThreads = 256; // threads per block of the elementwise kernels

inline unsigned int blocks_for(int64_t n, int64_t per_block = kThreads) {
  return static_cast<unsigned int>((n + per_block - 1) / per_block);
}

// A per-step scalar table entry, read on the device so that the launch can be
// graph-captured.
__device__ __forceinline__ int64_t
read_step(const int64_t* step, int64_t steps) {
  const int64_t s = *step;
  CUDA_KERNEL_ASSERT(s >= 0 && s < steps);
  return s;
}

} // namespace fastem
