// Guidance spectra on the CPU: the blur of n particles by one kernel
// (optionally as the residual Y - K·X), the ΠGDM filter conj(K)·R / (r²|K|² +
// σ²) in the same pass, and the direct 'valid' convolution of the non-circular
// model.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/complex.h>
#include <torch/library.h>

#include <algorithm>

#include "../checks.h"

namespace fastem {
namespace {

using cfloat = c10::complex<float>;

struct Spectra {
  SpectraShape shape;
  const cfloat* y; // [C, F] or [n, C, F], or nullptr
  bool shared;
};

Spectra check_blur_spectra(
    const at::Tensor& spec,
    const at::Tensor& otf,
    const c10::optional<at::Tensor>& spec_y) {
  FASTEM_CHECK(spec.is_cpu(), "spec must be a CPU tensor");
  const auto s = check_spectra(spec, "spec", spec.device());
  check_plane(otf, "otf", at::kComplexFloat, s, spec.device());
  if (!spec_y.has_value()) {
    return {s, nullptr, true};
  }
  const bool shared = check_target(*spec_y, s, spec.device());
  return {s, spec_y->data_ptr<cfloat>(), shared};
}

// out[p, f] = body(p, f, K_f, R_pf) over planes p = (i, c) and frequencies f,
// where R is the residual Y - K·X when spec_y is given and the input spectrum
// itself otherwise.
template <typename Body>
at::Tensor spectral_map(
    const at::Tensor& spec,
    const at::Tensor& otf,
    const Spectra& in,
    Body body) {
  auto out = at::empty_like(spec);
  const int64_t freqs = in.shape.freqs(), channels = in.shape.channels;
  const cfloat* __restrict__ x = spec.data_ptr<cfloat>(); // [n, C, F]
  const cfloat* __restrict__ k = otf.data_ptr<cfloat>(); // [F]
  cfloat* __restrict__ o = out.data_ptr<cfloat>(); // [n, C, F]
  at::parallel_for(0, in.shape.n * channels, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t p = lo; p < hi; ++p) {
      const cfloat* yp = in.y == nullptr
          ? nullptr
          : in.y + (in.shared ? p % channels : p) * freqs;
      for (int64_t f = 0; f < freqs; ++f) {
        const cfloat v = x[p * freqs + f];
        o[p * freqs + f] = body(k[f], yp == nullptr ? v : yp[f] - k[f] * v);
      }
    }
  });
  return out;
}

at::Tensor particle_blur_cpu(
    const at::Tensor& spec,
    const at::Tensor& otf,
    const c10::optional<at::Tensor>& spec_y) {
  const auto in = check_blur_spectra(spec, otf, spec_y);
  if (in.y == nullptr) {
    return spectral_map(
        spec, otf, in, [](cfloat k, cfloat x) { return k * x; });
  }
  return spectral_map(
      spec, otf, in, [](cfloat, cfloat residual) { return residual; });
}

at::Tensor pigdm_filter_cpu(
    const at::Tensor& spec,
    const at::Tensor& otf,
    const c10::optional<at::Tensor>& spec_y,
    const at::Tensor& r2,
    const at::Tensor& step,
    double sigma) {
  const auto in = check_blur_spectra(spec, otf, spec_y);
  check_table(r2, "r2", step, spec.device());
  const int64_t index = step.item<int64_t>();
  FASTEM_CHECK(
      index >= 0 && index < r2.numel(),
      "step ",
      index,
      " is outside the table");
  const float r = r2.data_ptr<float>()[index];
  const auto noise = static_cast<float>(sigma * sigma);
  return spectral_map(spec, otf, in, [r, noise](cfloat k, cfloat residual) {
    const float gain = k.real() * k.real() + k.imag() * k.imag();
    return std::conj(k) * residual / (r * gain + noise);
  });
}

at::Tensor blur_valid_cpu(const at::Tensor& x, const at::Tensor& kernel) {
  FASTEM_CHECK(x.is_cpu(), "x must be a CPU tensor");
  check_blur_inputs(x, kernel);
  const int64_t height = x.size(-2), width = x.size(-1), size = kernel.size(0);
  const int64_t out_h = height - size + 1, out_w = width - size + 1;
  auto sizes = x.sizes().vec();
  sizes[sizes.size() - 2] = out_h;
  sizes[sizes.size() - 1] = out_w;
  auto out = at::empty(sizes, x.options());
  const int64_t images = x.numel() / (height * width);
  const float* __restrict__ xp = x.data_ptr<float>(); // [B, H, W]
  const float* __restrict__ kp = kernel.data_ptr<float>(); // [K, K]
  float* __restrict__ op = out.data_ptr<float>(); // [B, H-K+1, W-K+1]
  at::parallel_for(0, images * out_h, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t image = task / out_h, p = task % out_h;
      float* __restrict__ row = op + task * out_w;
      std::fill(row, row + out_w, 0.0f);
      // True convolution: out[p, q] = Σ_{a,b} k[a, b] · x[p + K-1-a, q +
      // K-1-b]; the q loop is contiguous and vectorises, the output row stays
      // in L1 over the K² taps.
      for (int64_t a = 0; a < size; ++a) {
        const float* src =
            xp + (image * height + p + size - 1 - a) * width + size - 1;
        for (int64_t b = 0; b < size; ++b) {
          const float w = kp[a * size + b];
          const float* __restrict__ s = src - b;
          for (int64_t q = 0; q < out_w; ++q) {
            row[q] += w * s[q];
          }
        }
      }
    }
  });
  return out;
}

} // namespace

TORCH_LIBRARY_IMPL(fastem, CPU, m) {
  m.impl("particle_blur", &particle_blur_cpu);
  m.impl("pigdm_filter", &pigdm_filter_cpu);
  m.impl("blur_valid", &blur_valid_cpu);
}

} // namespace fastem
