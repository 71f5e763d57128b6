// Kernel projection on the CPU: crop the full-grid z to the K×K support, clamp
// ≥ 0, normalise, soft-threshold and normalise again, optionally re-centre on
// the centre of mass, and emit the zero-padded, origin-centred grid that the
// next Z-update transforms.
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "../checks.h"

namespace fastem {
namespace {

// Below this mass a projection keeps its fallback instead of dividing by ~0 (as
// project_kernel).
constexpr double kMinMass = 1e-12;

// values ← clamp(values, 0) / Σ, or ← fallback when the mass vanishes.
void project(std::vector<double>& values, const std::vector<double>& fallback) {
  double mass = 0.0;
  for (double& v : values) {
    v = std::max(v, 0.0);
    mass += v;
  }
  for (size_t i = 0; i < values.size(); ++i) {
    values[i] = mass > kMinMass ? values[i] / mass : fallback[i];
  }
}

// Whole-pixel shift that moves the centre of mass of `k` [K, K] to (K/2, K/2),
// then projection.
std::vector<double> recenter(const std::vector<double>& k, int64_t size) {
  double mass = 0.0, row = 0.0, col = 0.0;
  for (int64_t a = 0; a < size; ++a) {
    for (int64_t b = 0; b < size; ++b) {
      const double v = k[a * size + b];
      mass += v;
      row += v * a;
      col += v * b;
    }
  }
  mass = std::max(mass, static_cast<double>(std::numeric_limits<float>::min()));
  const int64_t centre = size / 2;
  // nearbyint rounds half to even, like torch.round in the reference.
  const auto shift_row =
      static_cast<int64_t>(std::nearbyint(centre - row / mass));
  const auto shift_col =
      static_cast<int64_t>(std::nearbyint(centre - col / mass));
  std::vector<double> shifted(k.size(), 0.0);
  for (int64_t a = 0; a < size; ++a) {
    for (int64_t b = 0; b < size; ++b) {
      const int64_t src_a = a - shift_row, src_b = b - shift_col;
      if (src_a >= 0 && src_a < size && src_b >= 0 && src_b < size) {
        shifted[a * size + b] = k[src_a * size + src_b];
      }
    }
  }
  project(shifted, k);
  return shifted;
}

std::tuple<at::Tensor, at::Tensor> kernel_project_cpu(
    const at::Tensor& z,
    const at::Tensor& fallback,
    double threshold,
    bool recenter_mass) {
  FASTEM_CHECK(z.is_cpu(), "z must be a CPU tensor");
  check_projection_inputs(z, fallback);
  FASTEM_CHECK(threshold >= 0.0, "threshold must be >= 0, got ", threshold);
  const int64_t height = z.size(0), width = z.size(1), size = fallback.size(0);
  const int64_t centre = size / 2;
  const float* __restrict__ zp =
      z.data_ptr<float>(); // [H, W], kernel centre at the origin
  const float* __restrict__ fp = fallback.data_ptr<float>(); // [K, K]

  // The K×K window of z around the origin (otf2psf): entry (a, b) sits at (a -
  // K/2, b - K/2).
  std::vector<double> k1(size * size), fall(fp, fp + size * size);
  for (int64_t a = 0; a < size; ++a) {
    const int64_t r = (a - centre + height) % height;
    for (int64_t b = 0; b < size; ++b) {
      k1[a * size + b] = zp[r * width + (b - centre + width) % width];
    }
  }
  project(k1, fall);
  std::vector<double> k2(k1);
  for (double& v : k2) {
    v = std::max(v - threshold, 0.0);
  }
  project(k2, k1);
  if (recenter_mass) {
    k2 = recenter(k2, size);
  }

  auto kernel = at::empty({size, size}, fallback.options());
  auto grid = at::zeros({height, width}, z.options());
  float* __restrict__ kp = kernel.data_ptr<float>(); // [K, K]
  float* __restrict__ gp = grid.data_ptr<float>(); // [H, W]
  for (int64_t a = 0; a < size; ++a) {
    const int64_t r = (a - centre + height) % height;
    for (int64_t b = 0; b < size; ++b) {
      const auto v = static_cast<float>(k2[a * size + b]);
      kp[a * size + b] = v;
      gp[r * width + (b - centre + width) % width] = v;
    }
  }
  return {kernel, grid};
}

} // namespace

TORCH_LIBRARY_IMPL(fastem, CPU, m) {
  m.impl("kernel_project", &kernel_project_cpu);
}

} // namespace fastem
