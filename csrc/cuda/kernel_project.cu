// Kernel projection on CUDA in one launch. Every block recomputes the few
// reductions over the K×K support (K <= 64, read from L2) in the same order —
// so all blocks agree bit for bit — and writes its own tile of the [H, W] grid;
// block 0 also writes the kernel. No inter-block sync.
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cfloat>
#include <tuple>

#include "../checks.h"
#include "common.cuh"

namespace fastem {
namespace {

constexpr int kProjectThreads = 512;
constexpr int kMaxSupport = kMaxKernelSize * kMaxKernelSize;
constexpr int64_t kGridPerBlock = 4096; // grid elements written by each block
constexpr float kMinMass = 1e-12f; // below this a projection keeps its fallback

// The block-wide sum, returned to every thread. `scratch` holds one float per
// warp.
__device__ float block_sum(float v, float* scratch) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  __syncthreads(); // the previous call's readers are done with scratch
  if ((threadIdx.x & 31) == 0) {
    scratch[threadIdx.x >> 5] = v;
  }
  __syncthreads();
  float total = 0.0f;
  for (int w = 0; w < kProjectThreads / 32; ++w) {
    total += scratch[w];
  }
  return total;
}

__global__ void __launch_bounds__(kProjectThreads) kernel_project_kernel(
    const float* __restrict__ z, // [H, W], kernel centre at the origin
    const float* __restrict__ fallback, // [K, K]
    float* __restrict__ kernel, // [K, K]
    float* __restrict__ grid, // [H, W]
    int64_t height,
    int64_t width,
    int size,
    float threshold,
    bool recenter) {
  __shared__ float first[kMaxSupport]; // k1, later the re-centred kernel
  __shared__ float second[kMaxSupport]; // k2
  __shared__ float scratch[kProjectThreads / 32];
  const int support = size * size, centre = size / 2;

  float part = 0.0f;
  for (int e = threadIdx.x; e < support; e += kProjectThreads) {
    const int64_t r = (e / size - centre + height) % height;
    const int64_t c = (e % size - centre + width) % width;
    first[e] = fmaxf(z[r * width + c], 0.0f);
    part += first[e];
  }
  const float m1 = block_sum(part, scratch);
  part = 0.0f;
  for (int e = threadIdx.x; e < support; e += kProjectThreads) {
    first[e] = m1 > kMinMass ? first[e] / m1 : fallback[e];
    second[e] = fmaxf(first[e] - threshold, 0.0f);
    part += second[e];
  }
  const float m2 = block_sum(part, scratch);
  for (int e = threadIdx.x; e < support; e += kProjectThreads) {
    second[e] = m2 > kMinMass ? second[e] / m2 : first[e];
  }
  __syncthreads();
  const float* out = second;
  if (recenter) {
    float mass = 0.0f, row = 0.0f, col = 0.0f;
    for (int e = threadIdx.x; e < support; e += kProjectThreads) {
      mass += second[e];
      row += second[e] * static_cast<float>(e / size);
      col += second[e] * static_cast<float>(e % size);
    }
    mass = fmaxf(block_sum(mass, scratch), FLT_MIN);
    row = block_sum(row, scratch);
    col = block_sum(col, scratch);
    // rintf rounds half to even, like torch.round in the reference.
    const int shift_r = static_cast<int>(rintf(centre - row / mass));
    const int shift_c = static_cast<int>(rintf(centre - col / mass));
    part = 0.0f;
    for (int e = threadIdx.x; e < support; e += kProjectThreads) {
      const int a = e / size - shift_r, b = e % size - shift_c;
      first[e] = (a >= 0 && a < size && b >= 0 && b < size)
          ? second[a * size + b]
          : 0.0f;
      part += first[e];
    }
    const float m3 = block_sum(part, scratch);
    for (int e = threadIdx.x; e < support; e += kProjectThreads) {
      first[e] = m3 > kMinMass ? first[e] / m3 : second[e];
    }
    __syncthreads();
    out = first;
  }
  if (blockIdx.x == 0) {
    for (int e = threadIdx.x; e < support; e += kProjectThreads) {
      kernel[e] = out[e];
    }
  }
  // Grid pixel (r, c) holds kernel entry ((r + K/2) mod H, (c + K/2) mod W)
  // inside the support.
  const int64_t begin = blockIdx.x * kGridPerBlock;
  const int64_t end = min(begin + kGridPerBlock, height * width);
  for (int64_t p = begin + threadIdx.x; p < end; p += kProjectThreads) {
    const int64_t a = (p / width + centre) % height,
                  b = (p % width + centre) % width;
    grid[p] = (a < size && b < size) ? out[a * size + b] : 0.0f;
  }
}

std::tuple<at::Tensor, at::Tensor> kernel_project_cuda(
    const at::Tensor& z,
    const at::Tensor& fallback,
    double threshold,
    bool recenter) {
  FASTEM_CHECK(z.is_cuda(), "z must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(z.device());
  check_projection_inputs(z, fallback);
  FASTEM_CHECK(threshold >= 0.0, "threshold must be >= 0, got ", threshold);
  auto kernel = at::empty_like(fallback);
  auto grid = at::empty_like(z);
  kernel_project_kernel<<<
      blocks_for(z.numel(), kGridPerBlock),
      kProjectThreads,
      0,
      c10::cuda::getCurrentCUDAStream()>>>(
      z.data_ptr<float>(),
      fallback.data_ptr<float>(),
      kernel.data_ptr<float>(),
      grid.data_ptr<float>(),
      z.size(0),
      z.size(1),
      static_cast<int>(fallback.size(0)),
      static_cast<float>(threshold),
      recenter);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {kernel, grid};
}

} // namespace

TORCH_LIBRARY_IMPL(fastem, CUDA, m) {
  m.impl("kernel_project", &kernel_project_cuda);
}

} // namespace fastem
