// M-step spectra on the CPU: the loop-invariant sums of Eq. 24 and the
// per-iteration Z-update.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/complex.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "../checks.h"

namespace fastem {
namespace {

using cfloat = c10::complex<float>;

// Frequencies per task: three double accumulators of this length stay in L1.
constexpr int64_t kChunk = 512;

std::tuple<at::Tensor, at::Tensor> spectral_sums_cpu(
    const at::Tensor& spec_y,
    const at::Tensor& spec_x) {
  const auto s = check_spectra(spec_x, "spec_x", spec_x.device());
  FASTEM_CHECK(spec_x.is_cpu(), "spec_x must be a CPU tensor");
  const bool shared = check_target(spec_y, s, spec_x.device());
  auto cross = at::empty({s.height, s.half_width}, spec_x.options());
  auto energy =
      at::empty({s.height, s.half_width}, spec_x.options().dtype(at::kFloat));
  const int64_t freqs = s.freqs();
  const cfloat* __restrict__ x = spec_x.data_ptr<cfloat>(); // [n, C, F]
  const cfloat* __restrict__ y =
      spec_y.data_ptr<cfloat>(); // [C, F] or [n, C, F]
  cfloat* __restrict__ a = cross.data_ptr<cfloat>(); // [F]
  float* __restrict__ b = energy.data_ptr<float>(); // [F]
  at::parallel_for(
      0, (freqs + kChunk - 1) / kChunk, 1, [&](int64_t lo, int64_t hi) {
        // Double accumulators: the sum runs over up to n·C terms in a fixed
        // order.
        double acc_re[kChunk], acc_im[kChunk], acc_e[kChunk], sum_re[kChunk],
            sum_im[kChunk];
        for (int64_t chunk = lo; chunk < hi; ++chunk) {
          const int64_t f0 = chunk * kChunk;
          const int64_t len = std::min(kChunk, freqs - f0);
          std::fill_n(acc_re, len, 0.0);
          std::fill_n(acc_im, len, 0.0);
          std::fill_n(acc_e, len, 0.0);
          for (int64_t c = 0; c < s.channels; ++c) {
            std::fill_n(sum_re, len, 0.0);
            std::fill_n(sum_im, len, 0.0);
            for (int64_t i = 0; i < s.n; ++i) {
              const cfloat* xp = x + (i * s.channels + c) * freqs + f0;
              const cfloat* yp =
                  y + (shared ? c : i * s.channels + c) * freqs + f0;
              for (int64_t f = 0; f < len; ++f) {
                const double xr = xp[f].real(), xi = xp[f].imag();
                acc_e[f] += xr * xr + xi * xi;
                if (shared) { // Σ_i conj(X_i) · Y_c: multiply once per channel
                              // below
                  sum_re[f] += xr;
                  sum_im[f] += xi;
                } else {
                  const double yr = yp[f].real(), yi = yp[f].imag();
                  acc_re[f] += xr * yr + xi * yi;
                  acc_im[f] += xr * yi - xi * yr;
                }
              }
            }
            if (shared) {
              const cfloat* yp = y + c * freqs + f0;
              for (int64_t f = 0; f < len; ++f) {
                const double yr = yp[f].real(), yi = yp[f].imag();
                acc_re[f] += sum_re[f] * yr + sum_im[f] * yi;
                acc_im[f] += sum_re[f] * yi - sum_im[f] * yr;
              }
            }
          }
          for (int64_t f = 0; f < len; ++f) {
            a[f0 + f] = cfloat(
                static_cast<float>(acc_re[f]), static_cast<float>(acc_im[f]));
            b[f0 + f] = static_cast<float>(acc_e[f]);
          }
        }
      });
  return {cross, energy};
}

at::Tensor wiener_z_cpu(
    const at::Tensor& cross,
    const at::Tensor& energy,
    const at::Tensor& otf,
    const at::Tensor& shift,
    const at::Tensor& step,
    double coupling) {
  FASTEM_CHECK(cross.is_cpu(), "cross must be a CPU tensor");
  check_input(cross, "cross", at::kComplexFloat, cross.device());
  FASTEM_CHECK(
      cross.dim() == 2, "cross must be [H, W//2+1], got ", cross.sizes());
  const SpectraShape s{1, 1, cross.size(0), cross.size(1)};
  check_plane(energy, "energy", at::kFloat, s, cross.device());
  check_plane(otf, "otf", at::kComplexFloat, s, cross.device());
  check_table(shift, "shift", step, cross.device());
  const int64_t index = step.item<int64_t>();
  FASTEM_CHECK(
      index >= 0 && index < shift.numel(),
      "step ",
      index,
      " is outside the table");
  const float denominator_shift = shift.data_ptr<float>()[index];
  const float c = static_cast<float>(coupling);
  auto out = at::empty_like(cross);
  const cfloat* __restrict__ a = cross.data_ptr<cfloat>(); // [F]
  const float* __restrict__ b = energy.data_ptr<float>(); // [F]
  const cfloat* __restrict__ k = otf.data_ptr<cfloat>(); // [F]
  cfloat* __restrict__ z = out.data_ptr<cfloat>(); // [F]
  at::parallel_for(0, s.freqs(), 4096, [&](int64_t lo, int64_t hi) {
    for (int64_t f = lo; f < hi; ++f) {
      const float d = b[f] + denominator_shift;
      z[f] = cfloat(
          (a[f].real() + c * k[f].real()) / d,
          (a[f].imag() + c * k[f].imag()) / d);
    }
  });
  return out;
}

} // namespace

TORCH_LIBRARY_IMPL(fastem, CPU, m) {
  m.impl("spectral_sums", &spectral_sums_cpu);
  m.impl("wiener_z", &wiener_z_cpu);
}

} // namespace fastem
