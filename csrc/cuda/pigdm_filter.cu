// The ΠGDM filter of the guidance on CUDA: conj(K)·R / (r²|K|² + σ²), with the
// residual R = Y - K·X formed in the same pass.
#include <ATen/ops/empty_like.h>
#include <c10/util/complex.h>
#include <torch/library.h>

#include "../checks.h"
#include "common.cuh"

namespace fastem {
namespace {

// Grid: (frequency blocks, n·C planes). kResidual: R = Y - K·X (else R = X);
// out = conj(K)·R / (r²|K|² + σ²).
template <bool kResidual>
__global__ void pigdm_kernel(
    const float2* __restrict__ x, // [n·C, F]
    const float2* __restrict__ otf, // [F]
    const float2* __restrict__ y, // [C, F] if y_shared else [n·C, F]
    bool y_shared,
    const float* __restrict__ r2, // [S]
    const int64_t* __restrict__ step, // []
    int64_t steps,
    float noise_var,
    float2* __restrict__ out, // [n·C, F]
    int64_t channels,
    int64_t freqs) {
  const int64_t f = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (f >= freqs) {
    return;
  }
  const int64_t plane = blockIdx.y;
  const float2 v = x[plane * freqs + f], k = otf[f];
  float2 r = v;
  if constexpr (kResidual) {
    const float2 w = y[(y_shared ? plane % channels : plane) * freqs + f];
    r = make_float2(
        w.x - (k.x * v.x - k.y * v.y), w.y - (k.x * v.y + k.y * v.x));
  }
  const float d =
      r2[read_step(step, steps)] * (k.x * k.x + k.y * k.y) + noise_var;
  out[plane * freqs + f] =
      make_float2((k.x * r.x + k.y * r.y) / d, (k.x * r.y - k.y * r.x) / d);
}

const float2* as_float2(const at::Tensor& t) {
  return reinterpret_cast<const float2*>(t.data_ptr<c10::complex<float>>());
}

at::Tensor pigdm_filter_cuda(
    const at::Tensor& spec,
    const at::Tensor& otf,
    const c10::optional<at::Tensor>& spec_y,
    const at::Tensor& r2,
    const at::Tensor& step,
    double sigma) {
  FASTEM_CHECK(spec.is_cuda(), "spec must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(spec.device());
  const auto s = check_spectra(spec, "spec", spec.device());
  check_plane(otf, "otf", at::kComplexFloat, s, spec.device());
  const bool shared =
      spec_y.has_value() ? check_target(*spec_y, s, spec.device()) : true;
  check_table(r2, "r2", step, spec.device());
  FASTEM_CHECK(
      s.n * s.channels <= 65535, "at most 65535 particle-channel planes");
  auto out = at::empty_like(spec);
  const int64_t freqs = s.freqs();
  if (freqs == 0 || s.n * s.channels == 0) {
    return out;
  }
  const dim3 blocks(
      blocks_for(freqs), static_cast<unsigned int>(s.n * s.channels));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const float2* y = spec_y.has_value() ? as_float2(*spec_y) : nullptr;
  const auto noise_var = static_cast<float>(sigma * sigma);
  auto* o = reinterpret_cast<float2*>(out.data_ptr<c10::complex<float>>());
#define FASTEM_PIGDM(RESIDUAL)                                \
  pigdm_kernel<RESIDUAL><<<blocks, kThreads, 0, stream>>>( \
      as_float2(spec),                                      \
      as_float2(otf),                                       \
      y,                                                    \
      shared,                                               \
      r2.data_ptr<float>(),                                 \
      step.data_ptr<int64_t>(),                             \
      r2.numel(),                                           \
      noise_var,                                            \
      o,                                                    \
      s.channels,                                           \
      freqs)
  if (y != nullptr) {
    FASTEM_PIGDM(true);
  } else {
    FASTEM_PIGDM(false);
  }
#undef FASTEM_PIGDM
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

} // namespace

TORCH_LIBRARY_IMPL(fastem, CUDA, m) {
  m.impl("pigdm_filter", &pigdm_filter_cuda);
}

} // namespace fastem
