// M-step spectra on CUDA: the loop-invariant sums of Eq. 24 and the
// per-iteration Z-update.
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/complex.h>
#include <torch/library.h>

#include <tuple>

#include "../checks.h"
#include "common.cuh"

namespace fastem {
namespace {

// One thread per frequency walking the n·C planes in order (coalesced across
// the warp); double accumulators keep the sum of up to n·C terms at float32
// accuracy.
template <bool kSharedY>
__global__ void spectral_sums_kernel(
    const float2* __restrict__ x, // [n, C, F]
    const float2* __restrict__ y, // [C, F] if kSharedY else [n, C, F]
    float2* __restrict__ cross, // [F]
    float* __restrict__ energy, // [F]
    int64_t n,
    int64_t channels,
    int64_t freqs) {
  const int64_t f = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (f >= freqs) {
    return;
  }
  double acc_re = 0.0, acc_im = 0.0, acc_e = 0.0;
  for (int64_t c = 0; c < channels; ++c) {
    double sum_re = 0.0, sum_im = 0.0;
#pragma unroll 4
    for (int64_t i = 0; i < n; ++i) {
      const int64_t plane = i * channels + c;
      const float2 v = x[plane * freqs + f];
      const double xr = v.x, xi = v.y;
      acc_e += xr * xr + xi * xi;
      if constexpr (kSharedY) { // Σ_i conj(X_i) · Y_c: one product per channel
        sum_re += xr;
        sum_im += xi;
      } else {
        const float2 w = y[plane * freqs + f];
        acc_re += xr * w.x + xi * w.y;
        acc_im += xr * w.y - xi * w.x;
      }
    }
    if constexpr (kSharedY) {
      const float2 w = y[c * freqs + f];
      acc_re += sum_re * w.x + sum_im * w.y;
      acc_im += sum_re * w.y - sum_im * w.x;
    }
  }
  cross[f] =
      make_float2(static_cast<float>(acc_re), static_cast<float>(acc_im));
  energy[f] = static_cast<float>(acc_e);
}

__global__ void wiener_z_kernel(
    const float2* __restrict__ cross, // [F]
    const float* __restrict__ energy, // [F]
    const float2* __restrict__ otf, // [F]
    const float* __restrict__ shift, // [S]
    const int64_t* __restrict__ step, // []
    int64_t steps,
    float coupling,
    float2* __restrict__ out, // [F]
    int64_t freqs) {
  const int64_t f = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (f >= freqs) {
    return;
  }
  const float d = energy[f] + shift[read_step(step, steps)];
  const float2 a = cross[f], k = otf[f];
  out[f] = make_float2((a.x + coupling * k.x) / d, (a.y + coupling * k.y) / d);
}

const float2* as_float2(const at::Tensor& t) {
  return reinterpret_cast<const float2*>(t.data_ptr<c10::complex<float>>());
}

std::tuple<at::Tensor, at::Tensor> spectral_sums_cuda(
    const at::Tensor& spec_y,
    const at::Tensor& spec_x) {
  FASTEM_CHECK(spec_x.is_cuda(), "spec_x must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(spec_x.device());
  const auto s = check_spectra(spec_x, "spec_x", spec_x.device());
  const bool shared = check_target(spec_y, s, spec_x.device());
  auto cross = at::empty({s.height, s.half_width}, spec_x.options());
  auto energy =
      at::empty({s.height, s.half_width}, spec_x.options().dtype(at::kFloat));
  const int64_t freqs = s.freqs();
  if (freqs == 0) {
    return {cross, energy};
  }
  const auto stream = c10::cuda::getCurrentCUDAStream();
  auto* a = reinterpret_cast<float2*>(cross.data_ptr<c10::complex<float>>());
  const auto kernel =
      shared ? spectral_sums_kernel<true> : spectral_sums_kernel<false>;
  kernel<<<blocks_for(freqs), kThreads, 0, stream>>>(
      as_float2(spec_x),
      as_float2(spec_y),
      a,
      energy.data_ptr<float>(),
      s.n,
      s.channels,
      freqs);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {cross, energy};
}

at::Tensor wiener_z_cuda(
    const at::Tensor& cross,
    const at::Tensor& energy,
    const at::Tensor& otf,
    const at::Tensor& shift,
    const at::Tensor& step,
    double coupling) {
  FASTEM_CHECK(cross.is_cuda(), "cross must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(cross.device());
  check_input(cross, "cross", at::kComplexFloat, cross.device());
  FASTEM_CHECK(
      cross.dim() == 2, "cross must be [H, W//2+1], got ", cross.sizes());
  const SpectraShape s{1, 1, cross.size(0), cross.size(1)};
  check_plane(energy, "energy", at::kFloat, s, cross.device());
  check_plane(otf, "otf", at::kComplexFloat, s, cross.device());
  check_table(shift, "shift", step, cross.device());
  auto out = at::empty_like(cross);
  const int64_t freqs = s.freqs();
  if (freqs == 0) {
    return out;
  }
  wiener_z_kernel<<<
      blocks_for(freqs),
      kThreads,
      0,
      c10::cuda::getCurrentCUDAStream()>>>(
      as_float2(cross),
      energy.data_ptr<float>(),
      as_float2(otf),
      shift.data_ptr<float>(),
      step.data_ptr<int64_t>(),
      shift.numel(),
      static_cast<float>(coupling),
      reinterpret_cast<float2*>(out.data_ptr<c10::complex<float>>()),
      freqs);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

} // namespace

TORCH_LIBRARY_IMPL(fastem, CUDA, m) {
  m.impl("spectral_sums", &spectral_sums_cuda);
  m.impl("wiener_z", &wiener_z_cuda);
}

} // namespace fastem
