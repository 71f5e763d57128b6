// The UNet's norm and activation on the CPU, y = SiLU(GN(x)·(1+scale) + shift),
// and its input-VJP (fastem_ext/ops/group_norm_silu.py). One task per (sample,
// group); everything is computed in float32 from x, the group's sums in double.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <vector>

#include "../checks.h"

namespace fastem {
namespace {

// The affine map of channel c of sample n after normalisation:
// a = x̂·gain + offset with gain = γ(1+s), offset = β(1+s) + t.
template <typename T>
struct Affine {
  const float* __restrict__ weight; // [C]
  const float* __restrict__ bias; // [C]
  const T* __restrict__ scale; // [N, C] or nullptr
  const T* __restrict__ shift; // [N, C] or nullptr
  int64_t channels;

  void at(int64_t n, int64_t c, float& gain, float& offset) const {
    gain = weight[c];
    offset = bias[c];
    if (scale != nullptr) {
      const float mult = 1.0f + static_cast<float>(scale[n * channels + c]);
      gain *= mult;
      offset = offset * mult + static_cast<float>(shift[n * channels + c]);
    }
  }
};

template <typename T>
Affine<T> affine(
    const at::Tensor& weight,
    const at::Tensor& bias,
    const c10::optional<at::Tensor>& scale,
    const c10::optional<at::Tensor>& shift) {
  return {
      weight.data_ptr<float>(),
      bias.data_ptr<float>(),
      scale.has_value() ? scale->data_ptr<T>() : nullptr,
      shift.has_value() ? shift->data_ptr<T>() : nullptr,
      weight.size(0)};
}

inline float sigmoid(float a) {
  return 1.0f / (1.0f + std::exp(-a));
}

template <typename T>
void forward_groups(
    const T* __restrict__ x, // [N, C, H·W]
    const Affine<T>& affine,
    T* __restrict__ y, // [N, C, H·W]
    float* __restrict__ mean, // [N, G]
    float* __restrict__ rstd, // [N, G]
    const GroupShape& s,
    float eps) {
  const int64_t size = s.per_group(), per_group = s.channels / s.groups;
  at::parallel_for(0, s.n * s.groups, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t task = lo; task < hi; ++task) {
      const T* xg = x + task * size;
      T* yg = y + task * size;
      double sum = 0.0, sum_sq = 0.0;
      for (int64_t j = 0; j < size; ++j) {
        const double v = static_cast<float>(xg[j]);
        sum += v;
        sum_sq += v * v;
      }
      const double mu = sum / size;
      const double var = std::max(sum_sq / size - mu * mu, 0.0);
      const float m = static_cast<float>(mu);
      const float r = static_cast<float>(1.0 / std::sqrt(var + eps));
      mean[task] = m;
      rstd[task] = r;
      const int64_t n = task / s.groups;
      const int64_t first = (task % s.groups) * per_group;
      for (int64_t k = 0; k < per_group; ++k) {
        float gain, offset;
        affine.at(n, first + k, gain, offset);
        gain *= r;
        const T* xc = xg + k * s.plane;
        T* yc = yg + k * s.plane;
        for (int64_t j = 0; j < s.plane; ++j) {
          const float a = (static_cast<float>(xc[j]) - m) * gain + offset;
          yc[j] = static_cast<T>(a * sigmoid(a));
        }
      }
    }
  });
}

template <typename T>
void backward_groups(
    const T* __restrict__ grad, // [N, C, H·W]
    const T* __restrict__ x, // [N, C, H·W]
    const float* __restrict__ mean, // [N, G]
    const float* __restrict__ rstd, // [N, G]
    const Affine<T>& affine,
    T* __restrict__ out, // [N, C, H·W]
    const GroupShape& s) {
  const int64_t size = s.per_group(), per_group = s.channels / s.groups;
  at::parallel_for(0, s.n * s.groups, 1, [&](int64_t lo, int64_t hi) {
    // g = ∂L/∂x̂ of one group, kept so that the second pass needs no exp.
    std::vector<float> g(size);
    for (int64_t task = lo; task < hi; ++task) {
      const T* xg = x + task * size;
      const T* dy = grad + task * size;
      const float m = mean[task], r = rstd[task];
      const int64_t n = task / s.groups;
      const int64_t first = (task % s.groups) * per_group;
      double sum_g = 0.0, sum_gx = 0.0;
      for (int64_t k = 0; k < per_group; ++k) {
        float gain, offset;
        affine.at(n, first + k, gain, offset);
        for (int64_t j = k * s.plane; j < (k + 1) * s.plane; ++j) {
          const float xhat = (static_cast<float>(xg[j]) - m) * r;
          const float a = xhat * gain + offset;
          const float sig = sigmoid(a);
          // SiLU'(a) = σ(a)(1 + a(1 − σ(a)))
          g[j] = static_cast<float>(dy[j]) * sig * (1.0f + a * (1.0f - sig)) *
              gain;
          sum_g += g[j];
          sum_gx += static_cast<double>(g[j]) * xhat;
        }
      }
      const float mean_g = static_cast<float>(sum_g / size);
      const float mean_gx = static_cast<float>(sum_gx / size);
      T* og = out + task * size;
      for (int64_t j = 0; j < size; ++j) {
        const float xhat = (static_cast<float>(xg[j]) - m) * r;
        og[j] = static_cast<T>(r * (g[j] - mean_g - xhat * mean_gx));
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu_cpu(
    const at::Tensor& x,
    const at::Tensor& weight,
    const at::Tensor& bias,
    const c10::optional<at::Tensor>& scale,
    const c10::optional<at::Tensor>& shift,
    int64_t groups,
    double eps) {
  FASTEM_CHECK(x.is_cpu(), "x must be a CPU tensor");
  const GroupShape s =
      check_group_norm_inputs(x, weight, bias, scale, shift, groups);
  auto y = at::empty_like(x);
  auto mean = at::empty({s.n, groups}, x.options().dtype(at::kFloat));
  auto rstd = at::empty_like(mean);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "group_norm_silu", [&] {
        forward_groups<scalar_t>(
            x.data_ptr<scalar_t>(),
            affine<scalar_t>(weight, bias, scale, shift),
            y.data_ptr<scalar_t>(),
            mean.data_ptr<float>(),
            rstd.data_ptr<float>(),
            s,
            static_cast<float>(eps));
      });
  return {y, mean, rstd};
}

at::Tensor group_norm_silu_backward_cpu(
    const at::Tensor& grad,
    const at::Tensor& x,
    const at::Tensor& mean,
    const at::Tensor& rstd,
    const at::Tensor& weight,
    const at::Tensor& bias,
    const c10::optional<at::Tensor>& scale,
    const c10::optional<at::Tensor>& shift,
    int64_t groups) {
  FASTEM_CHECK(x.is_cpu(), "x must be a CPU tensor");
  const GroupShape s =
      check_group_norm_inputs(x, weight, bias, scale, shift, groups);
  check_group_norm_backward(grad, x, mean, rstd, s);
  auto out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "group_norm_silu_backward", [&] {
        backward_groups<scalar_t>(
            grad.data_ptr<scalar_t>(),
            x.data_ptr<scalar_t>(),
            mean.data_ptr<float>(),
            rstd.data_ptr<float>(),
            affine<scalar_t>(weight, bias, scale, shift),
            out.data_ptr<scalar_t>(),
            s);
      });
  return out;
}

} // namespace

TORCH_LIBRARY_IMPL(fastem, CPU, m) {
  m.impl("group_norm_silu", &group_norm_silu_cpu);
  m.impl("group_norm_silu_backward", &group_norm_silu_backward_cpu);
}

} // namespace fastem
