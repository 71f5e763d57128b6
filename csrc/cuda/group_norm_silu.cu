// The UNet's norm and activation on CUDA, y = SiLU(GN(x)·(1+scale) + shift),
// and its input-VJP (fastem_ext/ops/group_norm_silu.py). Everything in float32
// from x, rounded once to x's dtype.
//
// Grid: (N·G, chunks). Block (task, k) handles chunk k of group task (sample
// n = task / G), the contiguous block of size = (C/G)·plane elements at
// task·size. With one chunk a block computes its group's statistics itself;
// a large group at a small N·G (the FFHQ UNet's first level at n = 1: 32
// groups of 262,144 values) would leave most of the device idle, so it is
// split into chunks whose partial statistics a first kernel writes and every
// block of the group combines. Loop indices are 64-bit: a group may hold up
// to 2^31 − 1 elements, and j + kGroupThreads would overflow an int.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAFunctions.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <limits>
#include <tuple>

#include "../checks.h"
#include "../group_norm_affine.h"
#include "common.cuh"

namespace fastem {
namespace {

constexpr int kGroupThreads = 512; // threads per (group, chunk) block
constexpr int kWarps = kGroupThreads / 32;
constexpr int64_t kMinChunk = 32 * kGroupThreads; // elements per chunk, at least

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

// How a group is split: chunks of `length` elements (the last may be shorter).
struct Split {
  int chunks;
  int length;
  __device__ int64_t begin(int k) const {
    return static_cast<int64_t>(k) * length;
  }
  __device__ int64_t end(int k, int size) const {
    return min(static_cast<int64_t>(size), begin(k) + length);
  }
};

// Mean and centred sum of squares of xg[begin, end) (the centred second pass:
// float sums of (x − μ)² do not cancel).
template <typename T>
__device__ float2 chunk_moments(
    const T* __restrict__ xg, int64_t begin, int64_t end, float* shared) {
  float sum = 0.0f;
  for (int64_t j = begin + threadIdx.x; j < end; j += kGroupThreads) {
    sum += static_cast<float>(xg[j]);
  }
  const float m = block_sum(sum, shared) / static_cast<float>(end - begin);
  float sum_sq = 0.0f;
  for (int64_t j = begin + threadIdx.x; j < end; j += kGroupThreads) {
    const float d = static_cast<float>(xg[j]) - m;
    sum_sq += d * d;
  }
  return make_float2(m, block_sum(sum_sq, shared));
}

// Pass 1 of a split group: partial[task · chunks + k] = chunk k's moments.
template <typename T>
__global__ void __launch_bounds__(kGroupThreads) forward_partial_kernel(
    const T* __restrict__ x, // [N, C, H·W]
    float2* __restrict__ partial, // [N·G, chunks]
    Split split,
    int size) {
  __shared__ float shared[kWarps];
  const int64_t task = blockIdx.x;
  const int k = blockIdx.y;
  partial[task * split.chunks + k] = chunk_moments(
      x + task * size, split.begin(k), split.end(k, size), shared);
}

// The group's (mean, rstd) from its chunks' moments, by Chan et al.'s pairwise
// update in double (a few dozen chunks: the same in every thread).
__device__ float2 combine_moments(
    const float2* __restrict__ partial, Split split, int size, float eps) {
  double count = 0.0, mean = 0.0, m2 = 0.0;
  for (int k = 0; k < split.chunks; ++k) {
    const float2 p = partial[k];
    const double nb = static_cast<double>(split.end(k, size) - split.begin(k));
    const double total = count + nb;
    const double delta = static_cast<double>(p.x) - mean;
    mean += delta * nb / total;
    m2 += static_cast<double>(p.y) + delta * delta * count * nb / total;
    count = total;
  }
  return make_float2(
      static_cast<float>(mean),
      rsqrtf(static_cast<float>(m2 / size) + eps));
}

// The statistics of group task and its chunk k's outputs. With one chunk the
// block computes the statistics; else pass 1 has left them in `partial`.
template <typename T>
__global__ void __launch_bounds__(kGroupThreads) forward_kernel(
    const T* __restrict__ x, // [N, C, H·W]
    const float2* __restrict__ partial, // [N·G, chunks] or nullptr
    const Affine<T> affine,
    T* __restrict__ y, // [N, C, H·W]
    float* __restrict__ mean, // [N, G]
    float* __restrict__ rstd, // [N, G]
    Split split,
    int groups,
    int plane,
    int size,
    float eps) {
  __shared__ float shared[kWarps];
  const int64_t task = blockIdx.x;
  const int k = blockIdx.y;
  const T* xg = x + task * size;
  float m, r;
  if (split.chunks == 1) {
    const float2 moments = chunk_moments(xg, 0, size, shared);
    m = moments.x;
    r = rsqrtf(moments.y / size + eps);
  } else {
    const float2 stats =
        combine_moments(partial + task * split.chunks, split, size, eps);
    m = stats.x;
    r = stats.y;
  }
  if (k == 0 && threadIdx.x == 0) {
    mean[task] = m;
    rstd[task] = r;
  }
  const int n = static_cast<int>(task / groups);
  const int first = static_cast<int>(task % groups) * (size / plane);
  T* yg = y + task * size;
  for (int64_t j = split.begin(k) + threadIdx.x; j < split.end(k, size);
       j += kGroupThreads) {
    float gain, offset;
    affine.at(n, first + static_cast<int>(j) / plane, gain, offset);
    const float a = (static_cast<float>(xg[j]) - m) * r * gain + offset;
    yg[j] = static_cast<T>(a * sigmoid(a));
  }
}

// One group's view for the input-VJP: its x, upstream gradient, statistics
// and affine map.
template <typename T>
struct GroupGrad {
  const T* __restrict__ xg;
  const T* __restrict__ dy;
  Affine<T> affine;
  float m, r;
  int n, first, plane;

  __device__ GroupGrad(
      const T* grad,
      const T* x,
      const float* mean,
      const float* rstd,
      const Affine<T>& affine_,
      int64_t task,
      int groups,
      int plane_,
      int size)
      : xg(x + task * size),
        dy(grad + task * size),
        affine(affine_),
        m(mean[task]),
        r(rstd[task]),
        n(static_cast<int>(task / groups)),
        first(static_cast<int>(task % groups) * (size / plane_)),
        plane(plane_) {}

  // ∂L/∂x̂ at element j of the group, and x̂ there.
  __device__ __forceinline__ float at(int64_t j, float& xhat) const {
    float gain, offset;
    affine.at(n, first + static_cast<int>(j) / plane, gain, offset);
    xhat = (static_cast<float>(xg[j]) - m) * r;
    const float a = xhat * gain + offset;
    const float sig = sigmoid(a);
    // SiLU'(a) = σ(a)(1 + a(1 − σ(a)))
    return static_cast<float>(dy[j]) * sig * (1.0f + a * (1.0f - sig)) * gain;
  }
};

// The sums of g = ∂L/∂x̂ and g·x̂ over chunk k of a group.
template <typename T>
__device__ float2 chunk_grad_sums(
    const GroupGrad<T>& group, Split split, int k, int size, float* shared) {
  float sum_g = 0.0f, sum_gx = 0.0f;
  for (int64_t j = split.begin(k) + threadIdx.x; j < split.end(k, size);
       j += kGroupThreads) {
    float xhat;
    const float g = group.at(j, xhat);
    sum_g += g;
    sum_gx += g * xhat;
  }
  return make_float2(block_sum(sum_g, shared), block_sum(sum_gx, shared));
}

// Pass 1 of a split group's backward: partial[task · chunks + k] = chunk k's
// (Σg, Σg·x̂).
template <typename T>
__global__ void __launch_bounds__(kGroupThreads) backward_partial_kernel(
    const T* __restrict__ grad,
    const T* __restrict__ x,
    const float* __restrict__ mean,
    const float* __restrict__ rstd,
    const Affine<T> affine,
    float2* __restrict__ partial, // [N·G, chunks]
    Split split,
    int groups,
    int plane,
    int size) {
  __shared__ float shared[kWarps];
  const int64_t task = blockIdx.x;
  const int k = blockIdx.y;
  const GroupGrad<T> group(grad, x, mean, rstd, affine, task, groups, plane, size);
  partial[task * split.chunks + k] = chunk_grad_sums(group, split, k, size, shared);
}

// Chunk k of group task: rstd·(g − mean(g) − x̂·mean(g·x̂)), the means over
// the whole group (from this block with one chunk, else from pass 1).
template <typename T>
__global__ void __launch_bounds__(kGroupThreads) backward_kernel(
    const T* __restrict__ grad, // [N, C, H·W]
    const T* __restrict__ x, // [N, C, H·W]
    const float* __restrict__ mean, // [N, G]
    const float* __restrict__ rstd, // [N, G]
    const float2* __restrict__ partial, // [N·G, chunks] or nullptr
    const Affine<T> affine,
    T* __restrict__ out, // [N, C, H·W]
    Split split,
    int groups,
    int plane,
    int size) {
  __shared__ float shared[kWarps];
  const int64_t task = blockIdx.x;
  const int k = blockIdx.y;
  const GroupGrad<T> group(grad, x, mean, rstd, affine, task, groups, plane, size);
  float2 sums = make_float2(0.0f, 0.0f);
  if (split.chunks == 1) {
    sums = chunk_grad_sums(group, split, 0, size, shared);
  } else {
    for (int i = 0; i < split.chunks; ++i) {
      const float2 p = partial[task * split.chunks + i];
      sums.x += p.x;
      sums.y += p.y;
    }
  }
  const float mean_g = sums.x / size, mean_gx = sums.y / size;
  T* og = out + task * size;
  for (int64_t j = split.begin(k) + threadIdx.x; j < split.end(k, size);
       j += kGroupThreads) {
    float xhat;
    const float g = group.at(j, xhat);
    og[j] = static_cast<T>(group.r * (g - mean_g - xhat * mean_gx));
  }
}

// The current device's multiprocessor count, asked once per device.
int64_t multiprocessors() {
  static std::array<std::atomic<int>, 64> known{};
  const int device = c10::cuda::current_device();
  int count = device < 64 ? known[device].load(std::memory_order_relaxed) : 0;
  if (count == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
    if (device < 64) {
      known[device].store(count, std::memory_order_relaxed);
    }
  }
  return count;
}

// Chunks per group: enough blocks for two per SM, none under kMinChunk
// elements (and one chunk for small groups, which need no pass 1).
Split split_groups(int64_t tasks, int64_t size) {
  const int64_t sms = multiprocessors();
  const int64_t wanted = (2 * sms + tasks - 1) / tasks;
  const int64_t most = std::max<int64_t>(1, size / kMinChunk);
  const int64_t chunks = std::min({wanted, most, int64_t{65535}});
  const int64_t length = (size + chunks - 1) / chunks;
  // Recount: with ceil-length chunks the last one could otherwise be empty.
  return {static_cast<int>((size + length - 1) / length), static_cast<int>(length)};
}

// The grid of a launch, (N·G, chunks), and the chunks' partial results when a
// group is split.
struct Launch {
  Split split;
  dim3 grid;
  at::Tensor partial; // [N·G, chunks, 2] float32, or undefined with one chunk

  Launch(const at::Tensor& x, const GroupShape& s) {
    const int64_t tasks = s.n * s.groups;
    split = split_groups(tasks, s.per_group());
    grid = dim3(static_cast<unsigned int>(tasks), static_cast<unsigned int>(split.chunks));
    if (split.chunks > 1) {
      partial = at::empty({tasks, split.chunks, 2}, x.options().dtype(at::kFloat));
    }
  }

  float2* partial_ptr() const {
    return partial.defined() ? reinterpret_cast<float2*>(partial.data_ptr<float>()) : nullptr;
  }
};

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
  const Launch launch(x, s);
  const Split split = launch.split;
  float2* const partial_ptr = launch.partial_ptr();
  FASTEM_DISPATCH_GROUP_NORM_TYPES(
      x.scalar_type(), "group_norm_silu", [&] {
        if (split.chunks > 1) {
          forward_partial_kernel<scalar_t><<<launch.grid, kGroupThreads, 0, stream>>>(
              x.data_ptr<scalar_t>(), partial_ptr, split, static_cast<int>(s.per_group()));
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
        forward_kernel<scalar_t><<<launch.grid, kGroupThreads, 0, stream>>>(
            x.data_ptr<scalar_t>(),
            partial_ptr,
            group_norm_affine<scalar_t, int>(weight, bias, scale, shift),
            y.data_ptr<scalar_t>(),
            mean.data_ptr<float>(),
            rstd.data_ptr<float>(),
            split,
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
  const Launch launch(x, s);
  const Split split = launch.split;
  float2* const partial_ptr = launch.partial_ptr();
  FASTEM_DISPATCH_GROUP_NORM_TYPES(
      x.scalar_type(), "group_norm_silu_backward", [&] {
        const auto affine = group_norm_affine<scalar_t, int>(weight, bias, scale, shift);
        if (split.chunks > 1) {
          backward_partial_kernel<scalar_t><<<launch.grid, kGroupThreads, 0, stream>>>(
              grad.data_ptr<scalar_t>(),
              x.data_ptr<scalar_t>(),
              mean.data_ptr<float>(),
              rstd.data_ptr<float>(),
              affine,
              partial_ptr,
              split,
              static_cast<int>(groups),
              static_cast<int>(s.plane),
              static_cast<int>(s.per_group()));
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
        backward_kernel<scalar_t><<<launch.grid, kGroupThreads, 0, stream>>>(
            grad.data_ptr<scalar_t>(),
            x.data_ptr<scalar_t>(),
            mean.data_ptr<float>(),
            rstd.data_ptr<float>(),
            partial_ptr,
            affine,
            out.data_ptr<scalar_t>(),
            split,
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
