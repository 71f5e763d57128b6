// Guidance spectra on CUDA (blur K·X, residual Y - K·X, ΠGDM filter in one
// pass) and the direct 'valid' convolution of the non-circular model
// (shared-memory tiles).
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/complex.h>
#include <torch/library.h>

#include "../checks.h"
#include "common.cuh"

namespace fastem {
namespace {

// Grid: (frequency blocks, n·C planes). kResidual: R = Y - K·X (else R = X, or
// K·X if !kFilter); kFilter: out = conj(K)·R / (r²|K|² + σ²).
template <bool kResidual, bool kFilter>
__global__ void spectral_kernel(
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
  } else if constexpr (!kFilter) {
    r = make_float2(k.x * v.x - k.y * v.y, k.x * v.y + k.y * v.x);
  }
  if constexpr (kFilter) {
    const float d =
        r2[read_step(step, steps)] * (k.x * k.x + k.y * k.y) + noise_var;
    r = make_float2((k.x * r.x + k.y * r.y) / d, (k.x * r.y - k.y * r.x) / d);
  }
  out[plane * freqs + f] = r;
}

constexpr int kTile = 16; // outputs per block side of blur_valid

__global__ void blur_valid_kernel(
    const float* __restrict__ x, // [B, H, W]
    const float* __restrict__ k, // [K, K]
    float* __restrict__ out, // [B, H-K+1, W-K+1]
    int64_t height,
    int64_t width,
    int64_t out_h,
    int64_t out_w,
    int size) {
  extern __shared__ float smem[];
  const int span = kTile + size - 1;
  float* patch = smem; // [span, span] input pixels of this tile
  float* weights = smem + span * span; // [K, K], flipped: a true convolution
  const int64_t image = blockIdx.z;
  const int64_t p0 = blockIdx.y * static_cast<int64_t>(kTile);
  const int64_t q0 = blockIdx.x * static_cast<int64_t>(kTile);
  const int tid = threadIdx.y * kTile + threadIdx.x;
  for (int e = tid; e < size * size; e += kTile * kTile) {
    weights[e] = k[size * size - 1 - e];
  }
  const float* src = x + image * height * width;
  for (int e = tid; e < span * span; e += kTile * kTile) {
    const int64_t r = p0 + e / span, c = q0 + e % span;
    patch[e] = (r < height && c < width) ? src[r * width + c] : 0.0f;
  }
  __syncthreads();
  const int64_t p = p0 + threadIdx.y, q = q0 + threadIdx.x;
  if (p >= out_h || q >= out_w) {
    return;
  }
  // out[p, q] = Σ_{a,b} k[K-1-a, K-1-b] · x[p + a, q + b]
  float acc = 0.0f;
  for (int a = 0; a < size; ++a) {
    const float* row = patch + (threadIdx.y + a) * span + threadIdx.x;
    for (int b = 0; b < size; ++b) {
      acc += weights[a * size + b] * row[b];
    }
  }
  out[(image * out_h + p) * out_w + q] = acc;
}

const float2* as_float2(const at::Tensor& t) {
  return reinterpret_cast<const float2*>(t.data_ptr<c10::complex<float>>());
}

at::Tensor launch_spectral(
    const at::Tensor& spec,
    const at::Tensor& otf,
    const c10::optional<at::Tensor>& spec_y,
    const at::Tensor* r2,
    const at::Tensor* step,
    double sigma) {
  FASTEM_CHECK(spec.is_cuda(), "spec must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(spec.device());
  const auto s = check_spectra(spec, "spec", spec.device());
  check_plane(otf, "otf", at::kComplexFloat, s, spec.device());
  const bool shared =
      spec_y.has_value() ? check_target(*spec_y, s, spec.device()) : true;
  if (r2 != nullptr) {
    check_table(*r2, "r2", *step, spec.device());
  }
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
  const float* table = r2 != nullptr ? r2->data_ptr<float>() : nullptr;
  const int64_t* index = step != nullptr ? step->data_ptr<int64_t>() : nullptr;
  const int64_t steps = r2 != nullptr ? r2->numel() : 0;
  const auto noise_var = static_cast<float>(sigma * sigma);
  auto* o = reinterpret_cast<float2*>(out.data_ptr<c10::complex<float>>());
#define FASTEM_SPECTRAL(RESIDUAL, FILTER)                             \
  spectral_kernel<RESIDUAL, FILTER><<<blocks, kThreads, 0, stream>>>( \
      as_float2(spec),                                                \
      as_float2(otf),                                                 \
      y,                                                              \
      shared,                                                         \
      table,                                                          \
      index,                                                          \
      steps,                                                          \
      noise_var,                                                      \
      o,                                                              \
      s.channels,                                                     \
      freqs)
  if (y != nullptr && table != nullptr) {
    FASTEM_SPECTRAL(true, true);
  } else if (y != nullptr) {
    FASTEM_SPECTRAL(true, false);
  } else if (table != nullptr) {
    FASTEM_SPECTRAL(false, true);
  } else {
    FASTEM_SPECTRAL(false, false);
  }
#undef FASTEM_SPECTRAL
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor particle_blur_cuda(
    const at::Tensor& spec,
    const at::Tensor& otf,
    const c10::optional<at::Tensor>& spec_y) {
  return launch_spectral(spec, otf, spec_y, nullptr, nullptr, 0.0);
}

at::Tensor pigdm_filter_cuda(
    const at::Tensor& spec,
    const at::Tensor& otf,
    const c10::optional<at::Tensor>& spec_y,
    const at::Tensor& r2,
    const at::Tensor& step,
    double sigma) {
  return launch_spectral(spec, otf, spec_y, &r2, &step, sigma);
}

at::Tensor blur_valid_cuda(const at::Tensor& x, const at::Tensor& kernel) {
  FASTEM_CHECK(x.is_cuda(), "x must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x.device());
  check_blur_inputs(x, kernel);
  const int64_t height = x.size(-2), width = x.size(-1), size = kernel.size(0);
  const int64_t out_h = height - size + 1, out_w = width - size + 1;
  auto sizes = x.sizes().vec();
  sizes[sizes.size() - 2] = out_h;
  sizes[sizes.size() - 1] = out_w;
  auto out = at::empty(sizes, x.options());
  const int64_t images = x.numel() / (height * width);
  FASTEM_CHECK(images <= 65535, "at most 65535 images per call");
  if (out.numel() == 0) {
    return out;
  }
  const int64_t span = kTile + size - 1;
  const size_t smem =
      (span * span + size * size) * sizeof(float); // <= 41 KB for K <= 64
  const dim3 blocks(
      blocks_for(out_w, kTile),
      blocks_for(out_h, kTile),
      static_cast<unsigned int>(images));
  blur_valid_kernel<<<
      blocks,
      dim3(kTile, kTile),
      smem,
      c10::cuda::getCurrentCUDAStream()>>>(
      x.data_ptr<float>(),
      kernel.data_ptr<float>(),
      out.data_ptr<float>(),
      height,
      width,
      out_h,
      out_w,
      static_cast<int>(size));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

} // namespace

TORCH_LIBRARY_IMPL(fastem, CUDA, m) {
  m.impl("particle_blur", &particle_blur_cuda);
  m.impl("pigdm_filter", &pigdm_filter_cuda);
  m.impl("blur_valid", &blur_valid_cuda);
}

} // namespace fastem
