// The ΠGDM filter of the guidance on the CPU: conj(K)·R / (r²|K|² + σ²), with
// the residual R = Y - K·X formed in the same pass.
#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/complex.h>
#include <torch/library.h>

#include "../checks.h"

namespace fastem {
namespace {

using cfloat = c10::complex<float>;

struct Spectra {
  SpectraShape shape;
  const cfloat* y; // [C, F] or [n, C, F], or nullptr
  bool shared;
};

Spectra check_filter_spectra(
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

// out[p, f] = body(K_f, R_pf) over planes p = (i, c) and frequencies f, where
// R is the residual Y - K·X when spec_y is given and the input spectrum itself
// otherwise.
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

at::Tensor pigdm_filter_cpu(
    const at::Tensor& spec,
    const at::Tensor& otf,
    const c10::optional<at::Tensor>& spec_y,
    const at::Tensor& r2,
    const at::Tensor& step,
    double sigma) {
  const auto in = check_filter_spectra(spec, otf, spec_y);
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

} // namespace

TORCH_LIBRARY_IMPL(fastem, CPU, m) {
  m.impl("pigdm_filter", &pigdm_filter_cpu);
}

} // namespace fastem
