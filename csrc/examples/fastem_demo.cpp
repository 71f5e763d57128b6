// fastem from C++ without Python: estimate a blur kernel from a sharp/blurry
// pair with the fused M-step ops, called through the PyTorch dispatcher (as a
// camera pipeline embedding libfastem would), and check every op against the
// same formula written with ATen operators.
//
// Exit status 0 when every check passes. Runs on the CPU; pass "cuda" to run on
// a GPU build.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>
#include <string>
#include <tuple>

namespace {

using at::Tensor;

template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow(name, "")
      .typed<Signature>();
}

int failures = 0;

void check(
    const char* what,
    const Tensor& got,
    const Tensor& expected,
    double tolerance) {
  const double error = (got - expected).abs().max().item<double>();
  const double scale = expected.abs().max().item<double>();
  const bool ok = error <= tolerance * scale;
  std::printf(
      "%-44s max error %.2e (scale %.2e) %s\n",
      what,
      error,
      scale,
      ok ? "ok" : "FAIL");
  failures += ok ? 0 : 1;
}

// The kernel [K, K] zero-padded to [H, W] with its centre rolled to the origin.
Tensor kernel_grid(const Tensor& kernel, int64_t height, int64_t width) {
  const int64_t size = kernel.size(0);
  auto grid = at::zeros({height, width}, kernel.options());
  grid.slice(0, 0, size).slice(1, 0, size).copy_(kernel);
  return at::roll(grid, {-(size / 2), -(size / 2)}, {0, 1});
}

Tensor gaussian(int64_t size, double std, const at::TensorOptions& options) {
  const auto offsets =
      at::arange(size, options) - static_cast<double>(size / 2);
  const auto profile = at::exp(-0.5 * (offsets / std).square());
  const auto kernel = profile.unsqueeze(1) * profile.unsqueeze(0);
  return kernel / kernel.sum();
}

} // namespace

int main(int argc, char** argv) {
  const at::Device device(argc > 1 ? std::string(argv[1]) : std::string("cpu"));
  const auto options = at::TensorOptions().dtype(at::kFloat).device(device);
  at::manual_seed(0);
  const int64_t n = 2, channels = 3, height = 48, width = 40, size = 9,
                iters = 10;
  const double sigma = 0.01, beta = 1e5;

  // A sharp pair of "particles", an anisotropic true kernel, and the blurry
  // observation.
  const auto sharp = at::rand({n, channels, height, width}, options);
  auto truth = gaussian(size, 1.5, options) *
      gaussian(size, 0.8, options).t().contiguous();
  truth = truth / truth.sum();
  const auto spec_x = at::fft_rfft2(sharp);
  const auto otf_true = at::fft_rfft2(kernel_grid(truth, height, width));
  const auto y =
      at::fft_irfft2(spec_x.select(0, 0) * otf_true, {{height, width}}) +
      sigma * at::randn({channels, height, width}, options);
  const auto spec_y = at::fft_rfft2(y);

  const auto spectral_sums =
      op<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&)>(
          "fastem::spectral_sums");
  const auto wiener_z = op<Tensor(
      const Tensor&,
      const Tensor&,
      const Tensor&,
      const Tensor&,
      const Tensor&,
      double)>("fastem::wiener_z");
  const auto kernel_project = op<std::tuple<Tensor, Tensor>(
      const Tensor&, const Tensor&, double, bool)>("fastem::kernel_project");

  // Only particle 0 explains y here; the second particle checks the sums over
  // n.
  const auto [cross, energy] = spectral_sums.call(spec_y, spec_x);
  check(
      "spectral_sums: cross",
      cross,
      (spec_x.conj() * spec_y).sum({0, 1}),
      1e-5);
  check(
      "spectral_sums: energy", energy, spec_x.abs().square().sum({0, 1}), 1e-5);
  const auto [cross1, energy1] =
      spectral_sums.call(spec_y, spec_x.narrow(0, 0, 1));

  const double coupling = 1 * sigma * sigma * beta;
  const auto shift = at::full({1}, coupling, options);
  const auto step = at::zeros({}, options.dtype(at::kLong));
  auto kernel = gaussian(size, size / 8.0, options);
  auto grid = kernel_grid(kernel, height, width);
  for (int64_t j = 0; j < iters; ++j) {
    const auto otf = at::fft_rfft2(grid);
    const auto z_spec =
        wiener_z.call(cross1, energy1, otf, shift, step, coupling);
    if (j == 0) {
      check(
          "wiener_z",
          z_spec,
          (cross1 + coupling * otf) / (energy1 + coupling),
          1e-5);
    }
    const auto z = at::fft_irfft2(z_spec, {{height, width}});
    std::tie(kernel, grid) =
        kernel_project.call(z, kernel, 0.0, j == iters - 1);
  }
  check(
      "kernel_project: grid of the kernel",
      grid,
      kernel_grid(kernel, height, width),
      0.0);
  check("estimated kernel vs the true kernel", kernel, truth, 0.1);

  // The DDPM update with given noise and guidance against its formula.
  const auto x_t = at::randn({n, channels, height, width}, options);
  const auto eps = at::randn({n, channels, height, width}, options);
  const auto noise = at::randn({n, channels, height, width}, options);
  const auto grad = at::randn({n, channels, height, width}, options);
  const auto coefs = at::rand({6, 4}, options) + 0.5;
  const auto ddpm_update = op<std::tuple<Tensor, Tensor>(
      const Tensor&,
      const Tensor&,
      const Tensor&,
      const Tensor&,
      const Tensor&,
      const std::optional<Tensor>&,
      double)>("fastem::ddpm_update");
  const auto index = at::full({}, 2, options.dtype(at::kLong));
  const auto [x_prev, x0] =
      ddpm_update.call(x_t, eps, coefs, index, noise, grad, 0.5);
  const auto c = coefs.select(1, 2);
  const auto x0_net = ((x_t - c[1] * eps) / c[0]).clamp(-1.0, 1.0);
  check("ddpm_update: x0", x0, (x0_net + 1.0) / 2.0, 1e-6);
  check(
      "ddpm_update: x_prev",
      x_prev,
      c[2] * x0_net + c[3] * x_t + c[4] * noise + 0.5 * c[5] * grad,
      1e-5);

  std::printf(
      "fastem_demo on %s: %s\n",
      device.str().c_str(),
      failures ? "FAILED" : "all ok");
  return failures ? 1 : 0;
}
