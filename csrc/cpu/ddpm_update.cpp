// The DDPM step on the CPU: the clamped Tweedie estimate x̂0 from ε, and the
// guided ancestral update x_{t-1} = coef_x0·x̂0 + coef_xt·x_t + √β̃·z + w·g, in
// one pass over the particles.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "../checks.h"
#include "../coefficients.h"

namespace fastem {
namespace {

struct Step {
  int64_t index;
  float coef[kRows];
};

Step read_step(const at::Tensor& coefs, const at::Tensor& step, int64_t rows) {
  Step s{step.item<int64_t>(), {}};
  const int64_t steps = coefs.size(1);
  FASTEM_CHECK(
      s.index >= 0 && s.index < steps,
      "step ",
      s.index,
      " is outside the table");
  for (int64_t row = 0; row < rows; ++row) {
    s.coef[row] = coefs.data_ptr<float>()[row * steps + s.index];
  }
  return s;
}

float clamped_x0(float x_t, float eps, const Step& s) {
  const float x0 = (x_t - s.coef[kSqrtOneMinusAc] * eps) / s.coef[kSqrtAc];
  return std::min(std::max(x0, -1.0f), 1.0f);
}

at::Tensor predict_x0_cpu(
    const at::Tensor& x_t,
    const at::Tensor& eps,
    const at::Tensor& coefs,
    const at::Tensor& step) {
  FASTEM_CHECK(x_t.is_cpu(), "x_t must be a CPU tensor");
  const int64_t eps_stride =
      check_diffusion_inputs(x_t, eps, coefs, step, kSqrtOneMinusAc + 1);
  const Step s = read_step(coefs, step, kSqrtOneMinusAc + 1);
  auto x0 = at::empty_like(x_t);
  const int64_t per_particle = x_t.numel() / std::max<int64_t>(x_t.size(0), 1);
  const float* __restrict__ xp = x_t.data_ptr<float>(); // [n, C, H, W]
  const float* __restrict__ ep =
      eps.data_ptr<float>(); // [n, ≥C, H, W], particle stride
  float* __restrict__ op = x0.data_ptr<float>(); // [n, C, H, W]
  at::parallel_for(0, x_t.size(0), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      for (int64_t j = 0; j < per_particle; ++j) {
        const int64_t e = i * per_particle + j;
        op[e] = (clamped_x0(xp[e], ep[i * eps_stride + j], s) + 1.0f) / 2.0f;
      }
    }
  });
  return x0;
}

// One particle's elements [begin, begin + count) of the flat [n, C, H, W]
// index space. The guidance is a template parameter so that the unguided loop
// has no branch.
template <bool kGuided>
void update_particle(
    const float* __restrict__ x_t, // [P], P = C·H·W
    const float* __restrict__ eps, // [P]
    const float* __restrict__ noise, // [P]
    const float* __restrict__ grad, // [P] if kGuided
    float* __restrict__ x_prev, // [P]
    float* __restrict__ x0, // [P]
    int64_t count,
    const Step& s,
    float weight) {
  for (int64_t j = 0; j < count; ++j) {
    const float v = clamped_x0(x_t[j], eps[j], s);
    float out = s.coef[kCoefX0] * v + s.coef[kCoefXt] * x_t[j] +
        s.coef[kNoiseStd] * noise[j];
    if constexpr (kGuided) {
      out += weight * grad[j];
    }
    x_prev[j] = out;
    x0[j] = (v + 1.0f) / 2.0f;
  }
}

std::tuple<at::Tensor, at::Tensor> ddpm_update_cpu(
    const at::Tensor& x_t,
    const at::Tensor& eps,
    const at::Tensor& coefs,
    const at::Tensor& step,
    const at::Tensor& noise,
    const c10::optional<at::Tensor>& grad,
    double scale) {
  FASTEM_CHECK(x_t.is_cpu(), "x_t must be a CPU tensor");
  const int64_t eps_stride =
      check_diffusion_inputs(x_t, eps, coefs, step, kRows);
  check_like(noise, "noise", x_t);
  check_like(grad, "grad", x_t);
  const Step s = read_step(coefs, step, kRows);
  // As the reference: the guidance weight (scale · w) is formed before it
  // multiplies g.
  const float weight = static_cast<float>(scale) * s.coef[kWeight];
  auto x_prev = at::empty_like(x_t);
  auto x0 = at::empty_like(x_t);
  const int64_t per_particle = x_t.numel() / std::max<int64_t>(x_t.size(0), 1);
  const float* xp = x_t.data_ptr<float>(); // [n, C, H, W]
  const float* ep =
      eps.data_ptr<float>(); // [n, ≥C, H, W], particle stride eps_stride
  const float* zp = noise.data_ptr<float>(); // [n, C, H, W]
  const float* gp = grad.has_value() ? grad->data_ptr<float>() : nullptr;
  float* pp = x_prev.data_ptr<float>();
  float* op = x0.data_ptr<float>();
  // Tasks are chunks of one particle: grain-sized pieces keep both cores busy
  // at small n.
  constexpr int64_t kChunk = 4096;
  const int64_t chunks = (per_particle + kChunk - 1) / kChunk;
  at::parallel_for(0, x_t.size(0) * chunks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t i = task / chunks, begin = (task % chunks) * kChunk;
      const int64_t count = std::min(kChunk, per_particle - begin);
      const int64_t e = i * per_particle + begin;
      const float* eps_i = ep + i * eps_stride + begin;
      if (gp != nullptr) {
        update_particle<true>(
            xp + e, eps_i, zp + e, gp + e, pp + e, op + e, count, s, weight);
      } else {
        update_particle<false>(
            xp + e, eps_i, zp + e, nullptr, pp + e, op + e, count, s, weight);
      }
    }
  });
  return {x_prev, x0};
}

} // namespace

TORCH_LIBRARY_IMPL(fastem, CPU, m) {
  m.impl("predict_x0", &predict_x0_cpu);
  m.impl("ddpm_update", &ddpm_update_cpu);
}

} // namespace fastem
