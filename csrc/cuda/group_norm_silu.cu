// The UNet's norm and activation on CUDA, y = SiLU(GN(x)·(1+scale) + shift),
// and its input-VJP (fastem_ext/ops/group_norm_silu.py). One block per
// (sample, group); everything in float32 from x, rounded once to x's dtype.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <limits>
#include <tuple>

#include "../checks.h"
#include "../group_norm_affine.h"
#include "common.cuh"

namespace fastem {
namespace {

constexpr int kGroupThreads = 512; // threads per (sample, group) block
constexpr int kWarps = kGroupThreads / 32;

// The sum of v over the block (every thread gets it). shared: [kWarps].
__device__ float block_sum(float v, float* shared) {
  for (int offset = 16; offset > 0; offset /= 2) {
    v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) {
    shared[warp] = v;
  }
  __syncthreads();
  if (warp == 0) {
    v = lane < kWarps ? shared[lane] : 0.0f;
    for (int offset = 16; offset > 0; offset /= 2) {
      v += __shfl_down_sync(0xffffffffu, v, offset);
    }
    if (lane == 0) {
      shared[0] = v;
    }
  }
  __syncthreads();
  const float total = shared[0];
  __syncthreads(); // shared is reused by the next call
  return total;
}

template <typename T>
using Affine = GroupNormAffine<T, int>;

__device__ __forceinline__ float sigmoid(float a) {
  return 1.0f / (1.0f + expf(-a));
}

// Grid: (N·G,); group task of sample n = task / G is the contiguous block of
// size = (C/G)·plane elements at task·size. The loops' j is 64-bit: a group
// may hold up to 2^31 − 1 elements, and j + kGroupThreads would overflow an int.
template <typename T>
__global__ void __launch_bounds__(kGroupThreads) forward_kernel(
    const T* __restrict__ x, // [N, C, H·W]
    const Affine<T> affine,
    T* __restrict__ y, // [N, C, H·W]
    float* __restrict__ mean, // [N, G]
    float* __restrict__ rstd, // [N, G]
    int groups,
    int plane,
    int size,
    float eps) {
  __shared__ float shared[kWarps];
  const int64_t task = blockIdx.x;
  const T* xg = x + task * size;
  float sum = 0.0f;
  for (int64_t j = threadIdx.x; j < size; j += kGroupThreads) {
    sum += static_cast<float>(xg[j]);
  }
  const float m = block_sum(sum, shared) / size;
  // The centred second pass: float sums of (x − μ)² do not cancel.
  float sum_sq = 0.0f;
  for (int64_t j = threadIdx.x; j < size; j += kGroupThreads) {
    const float d = static_cast<float>(xg[j]) - m;
    sum_sq += d * d;
  }
  const float r = rsqrtf(block_sum(sum_sq, shared) / size + eps);
  if (threadIdx.x == 0) {
    mean[task] = m;
    rstd[task] = r;
  }
  const int n = static_cast<int>(task / groups);
  const int first = static_cast<int>(task % groups) * (size / plane);
  T* yg = y + task * size;
  for (int64_t j = threadIdx.x; j < size; j += kGroupThreads) {
    float gain, offset;
    affine.at(n, first + static_cast<int>(j) / plane, gain, offset);
    const float a = (static_cast<float>(xg[j]) - m) * r * gain + offset;
    yg[j] = static_cast<T>(a * sigmoid(a));
  }
}

// (∂L/∂x̂, x̂) at element j of one group.
template <typename T>
__device__ __forceinline__ float input_grad(
    const T* __restrict__ dy,
    const T* __restrict__ xg,
    const Affine<T>& affine,
    int n,
    int c,
    int64_t j,
    float m,
    float r,
    float& xhat) {
  float gain, offset;
  affine.at(n, c, gain, offset);
  xhat = (static_cast<float>(xg[j]) - m) * r;
  const float a = xhat * gain + offset;
  const float sig = sigmoid(a);
  // SiLU'(a) = σ(a)(1 + a(1 − σ(a)))
  return static_cast<float>(dy[j]) * sig * (1.0f + a * (1.0f - sig)) * gain;
}

// Grid as forward_kernel. Pass 1 sums g = ∂L/∂x̂ and g·x̂ over the group,
// pass 2 recomputes g and writes rstd·(g − mean(g) − x̂·mean(g·x̂)).
template <typename T>
__global__ void __launch_bounds__(kGroupThreads) backward_kernel(
    const T* __restrict__ grad, // [N, C, H·W]
    const T* __restrict__ x, // [N, C, H·W]
    const float* __restrict__ mean, // [N, G]
    const float* __restrict__ rstd, // [N, G]
    const Affine<T> affine,
    T* __restrict__ out, // [N, C, H·W]
    int groups,
    int plane,
    int size) {
  __shared__ float shared[kWarps];
  const int64_t task = blockIdx.x;
  const T* xg = x + task * size;
  const T* dy = grad + task * size;
  const float m = mean[task], r = rstd[task];
  const int n = static_cast<int>(task / groups);
  const int first = static_cast<int>(task % groups) * (size / plane);
  float sum_g = 0.0f, sum_gx = 0.0f;
  for (int64_t j = threadIdx.x; j < size; j += kGroupThreads) {
    float xhat;
    const float g = input_grad(dy, xg, affine, n, first + static_cast<int>(j) / plane, j, m, r, xhat);
    sum_g += g;
    sum_gx += g * xhat;
  }
  const float mean_g = block_sum(sum_g, shared) / size;
  const float mean_gx = block_sum(sum_gx, shared) / size;
  T* og = out + task * size;
  for (int64_t j = threadIdx.x; j < size; j += kGroupThreads) {
    float xhat;
    const float g = input_grad(dy, xg, affine, n, first + static_cast<int>(j) / plane, j, m, r, xhat);
    og[j] = static_cast<T>(r * (g - mean_g - xhat * mean_gx));
  }
}

// The launch's sizes, checked to fit the kernels' 32-bit indices.
GroupShape prepare(
    const at::Tensor& x,
    const at::Tensor& weight,
    const at::Tensor& bias,
    const c10::optional<at::Tensor>& scale,
    const c10::optional<at::Tensor>& shift,
    int64_t groups) {
  FASTEM_CHECK(x.is_cuda(), "x must be a CUDA tensor");
  const GroupShape s =
      check_group_norm_inputs(x, weight, bias, scale, shift, groups);
  FASTEM_CHECK(
      s.per_group() < (int64_t{1} << 31) && s.n * s.channels < (int64_t{1} << 31),
      "a group of x must hold fewer than 2^31 elements, got ",
      s.per_group());
  FASTEM_CHECK(
      s.n * groups < (int64_t{1} << 31), "at most 2^31 - 1 (sample, group) pairs");
  return s;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu_cuda(
    const at::Tensor& x,
    const at::Tensor& weight,
    const at::Tensor& bias,
    const c10::optional<at::Tensor>& scale,
    const c10::optional<at::Tensor>& shift,
    int64_t groups,
    double eps) {
  const c10::cuda::CUDAGuard guard(x.device());
  const GroupShape s = prepare(x, weight, bias, scale, shift, groups);
  auto y = at::empty_like(x);
  auto mean = at::empty({s.n, groups}, x.options().dtype(at::kFloat));
  auto rstd = at::empty_like(mean);
  if (x.numel() == 0) {
    // Empty groups: the statistics are 0/0, as the CPU kernel and torch give.
    mean.fill_(std::numeric_limits<float>::quiet_NaN());
    rstd.fill_(std::numeric_limits<float>::quiet_NaN());
    return {y, mean, rstd};
  }
  const auto stream = c10::cuda::getCurrentCUDAStream();
  FASTEM_DISPATCH_GROUP_NORM_TYPES(
      x.scalar_type(), "group_norm_silu", [&] {
        forward_kernel<scalar_t>
            <<<static_cast<unsigned int>(s.n * groups), kGroupThreads, 0, stream>>>(
                x.data_ptr<scalar_t>(),
                group_norm_affine<scalar_t, int>(weight, bias, scale, shift),
                y.data_ptr<scalar_t>(),
                mean.data_ptr<float>(),
                rstd.data_ptr<float>(),
                static_cast<int>(groups),
                static_cast<int>(s.plane),
                static_cast<int>(s.per_group()),
                static_cast<float>(eps));
      });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {y, mean, rstd};
}

at::Tensor group_norm_silu_backward_cuda(
    const at::Tensor& grad,
    const at::Tensor& x,
    const at::Tensor& mean,
    const at::Tensor& rstd,
    const at::Tensor& weight,
    const at::Tensor& bias,
    const c10::optional<at::Tensor>& scale,
    const c10::optional<at::Tensor>& shift,
    int64_t groups) {
  const c10::cuda::CUDAGuard guard(x.device());
  const GroupShape s = prepare(x, weight, bias, scale, shift, groups);
  check_group_norm_backward(grad, x, mean, rstd, s);
  auto out = at::empty_like(x);
  if (x.numel() == 0) {
    return out;
  }
  const auto stream = c10::cuda::getCurrentCUDAStream();
  FASTEM_DISPATCH_GROUP_NORM_TYPES(
      x.scalar_type(), "group_norm_silu_backward", [&] {
        backward_kernel<scalar_t>
            <<<static_cast<unsigned int>(s.n * groups), kGroupThreads, 0, stream>>>(
                grad.data_ptr<scalar_t>(),
                x.data_ptr<scalar_t>(),
                mean.data_ptr<float>(),
                rstd.data_ptr<float>(),
                group_norm_affine<scalar_t, int>(weight, bias, scale, shift),
                out.data_ptr<scalar_t>(),
                static_cast<int>(groups),
                static_cast<int>(s.plane),
                static_cast<int>(s.per_group()));
      });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

} // namespace

TORCH_LIBRARY_IMPL(fastem, CUDA, m) {
  m.impl("group_norm_silu", &group_norm_silu_cuda);
  m.impl("group_norm_silu_backward", &group_norm_silu_backward_cuda);
}

} // namespace fastem
