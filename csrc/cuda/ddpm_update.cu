// The DDPM step on CUDA: clamped x̂0 from ε and the guided ancestral update in
// one pass. Step scalars are read on the device.
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <tuple>

#include "../checks.h"
#include "../coefficients.h"
#include "common.cuh"

namespace fastem {
namespace {

// Grid: (blocks striding over one particle's C·H·W elements, particles) — no
// element index is divided. The step's scalars are loaded once per thread.
template <bool kUpdate, bool kGuided>
__global__ void ddpm_kernel(
    const float* __restrict__ x_t, // [n, C, H, W]
    const float* __restrict__ eps, // [n, >=C, H, W], particle stride eps_stride
    const float* __restrict__ noise, // [n, C, H, W] if kUpdate
    const float* __restrict__ grad, // [n, C, H, W] if kGuided
    const float* __restrict__ coefs, // [6, S]
    const int64_t* __restrict__ step, // []
    float* __restrict__ x_prev, // [n, C, H, W] if kUpdate
    float* __restrict__ x0, // [n, C, H, W]
    int64_t per_particle,
    int64_t eps_stride,
    int64_t steps,
    float scale) {
  const int64_t s = read_step(step, steps);
  const float sqrt_ac = coefs[kSqrtAc * steps + s];
  const float sqrt_one_minus_ac = coefs[kSqrtOneMinusAc * steps + s];
  const int64_t particle = blockIdx.y;
  const float* eps_i = eps + particle * eps_stride;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       j < per_particle;
       j += stride) {
    const int64_t e = particle * per_particle + j;
    const float x = x_t[e];
    const float v =
        fminf(fmaxf((x - sqrt_one_minus_ac * eps_i[j]) / sqrt_ac, -1.0f), 1.0f);
    x0[e] = (v + 1.0f) / 2.0f;
    if constexpr (kUpdate) {
      float out = coefs[kCoefX0 * steps + s] * v +
          coefs[kCoefXt * steps + s] * x + coefs[kNoiseStd * steps + s] * noise[e];
      if constexpr (kGuided) {
        out += (scale * coefs[kWeight * steps + s]) * grad[e];
      }
      x_prev[e] = out;
    }
  }
}

struct Launch {
  dim3 blocks;
  cudaStream_t stream;
  int64_t per_particle, eps_stride, steps;
};

Launch prepare(
    const at::Tensor& x_t,
    const at::Tensor& eps,
    const at::Tensor& coefs,
    const at::Tensor& step,
    int64_t rows) {
  FASTEM_CHECK(x_t.is_cuda(), "x_t must be a CUDA tensor");
  const int64_t eps_stride =
      check_diffusion_inputs(x_t, eps, coefs, step, rows);
  FASTEM_CHECK(
      x_t.size(0) >= 1 && x_t.size(0) <= 65535, "1 <= n <= 65535 particles");
  const int64_t per_particle = x_t.numel() / x_t.size(0);
  // At most 1024 blocks per particle: a grid-stride loop covers the rest.
  const unsigned int blocks =
      std::max(1u, std::min(blocks_for(per_particle), 1024u));
  return {
      dim3(blocks, static_cast<unsigned int>(x_t.size(0))),
      c10::cuda::getCurrentCUDAStream(),
      per_particle,
      eps_stride,
      coefs.size(1)};
}

at::Tensor predict_x0_cuda(
    const at::Tensor& x_t,
    const at::Tensor& eps,
    const at::Tensor& coefs,
    const at::Tensor& step) {
  const c10::cuda::CUDAGuard guard(x_t.device());
  const Launch l = prepare(x_t, eps, coefs, step, kSqrtOneMinusAc + 1);
  auto x0 = at::empty_like(x_t);
  if (x_t.numel() == 0) {
    return x0;
  }
  ddpm_kernel<false, false><<<l.blocks, kThreads, 0, l.stream>>>(
      x_t.data_ptr<float>(),
      eps.data_ptr<float>(),
      nullptr,
      nullptr,
      coefs.data_ptr<float>(),
      step.data_ptr<int64_t>(),
      nullptr,
      x0.data_ptr<float>(),
      l.per_particle,
      l.eps_stride,
      l.steps,
      0.0f);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return x0;
}

std::tuple<at::Tensor, at::Tensor> ddpm_update_cuda(
    const at::Tensor& x_t,
    const at::Tensor& eps,
    const at::Tensor& coefs,
    const at::Tensor& step,
    const at::Tensor& noise,
    const c10::optional<at::Tensor>& grad,
    double scale) {
  const c10::cuda::CUDAGuard guard(x_t.device());
  const Launch l = prepare(x_t, eps, coefs, step, kRows);
  check_like(noise, "noise", x_t);
  check_like(grad, "grad", x_t);
  auto x_prev = at::empty_like(x_t);
  auto x0 = at::empty_like(x_t);
  if (x_t.numel() == 0) {
    return {x_prev, x0};
  }
  const float* g = grad.has_value() ? grad->data_ptr<float>() : nullptr;
#define FASTEM_DDPM(GUIDED)                                      \
  ddpm_kernel<true, GUIDED><<<l.blocks, kThreads, 0, l.stream>>>( \
      x_t.data_ptr<float>(),                                     \
      eps.data_ptr<float>(),                                     \
      noise.data_ptr<float>(),                                   \
      g,                                                         \
      coefs.data_ptr<float>(),                                   \
      step.data_ptr<int64_t>(),                                  \
      x_prev.data_ptr<float>(),                                  \
      x0.data_ptr<float>(),                                      \
      l.per_particle,                                            \
      l.eps_stride,                                              \
      l.steps,                                                   \
      static_cast<float>(scale))
  if (g != nullptr) {
    FASTEM_DDPM(true);
  } else {
    FASTEM_DDPM(false);
  }
#undef FASTEM_DDPM
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {x_prev, x0};
}

} // namespace

TORCH_LIBRARY_IMPL(fastem, CUDA, m) {
  m.impl("predict_x0", &predict_x0_cuda);
  m.impl("ddpm_update", &ddpm_update_cuda);
}

} // namespace fastem
