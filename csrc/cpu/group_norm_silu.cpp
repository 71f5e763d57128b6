// The UNet's norm and activation on the CPU, y = SiLU(GN(x)·(1+scale) + shift),
// and its input-VJP (fastem_ext/ops/group_norm_silu.py). One task per (sample,
// group); everything is computed in float32 from x, the group's sums in double
// over float chunks.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <utility>
#include <vector>

#include "../checks.h"
#include "../group_norm_affine.h"

namespace fastem {
namespace {

// On x86-64 Linux with GCC or Clang the per-group functions are compiled
// twice: as plain code (the baseline target: 4 floats wide, no FMA) and for
// AVX2 + FMA, picked at run time by __builtin_cpu_supports (about 3x faster on
// the EPYC of benchmarks/RESULTS.md). Everything that the AVX2 copies call is
// forced inline, so that it is compiled for their target. Other compilers and
// platforms build the plain code only.
#if defined(__x86_64__) && defined(__linux__) && \
    (defined(__GNUC__) || defined(__clang__))
#define FASTEM_GN_AVX2 1
#define FASTEM_INLINE __attribute__((always_inline)) inline
#define FASTEM_LAMBDA_INLINE __attribute__((always_inline))
#else
#define FASTEM_GN_AVX2 0
#define FASTEM_INLINE inline
#define FASTEM_LAMBDA_INLINE
#endif

template <typename T>
using Affine = GroupNormAffine<T, int64_t>;

// e^x without a libm call, so that the loops vectorise: Cephes' expf,
// 2^n·e^r with r = x − n·ln 2 in [−ln2/2, ln2/2] and a degree-6 polynomial
// (about 1 ulp). x is clamped to [−87, 88], where 2^n stays a normal float:
// the sigmoid below then saturates at 1 and at ~6e-39 instead of 0. A NaN x
// becomes 88 (the int conversion of a NaN would be undefined); a·σ(a) and its
// derivative still come out NaN through a.
FASTEM_INLINE float exp_approx(float x) {
  x = x < 88.0f ? x : 88.0f;
  x = x > -87.0f ? x : -87.0f;
  const float t = x * 1.44269504088896341f;
  const int32_t n = static_cast<int32_t>(t + (t >= 0.0f ? 0.5f : -0.5f));
  const float nf = static_cast<float>(n);
  const float r = (x - nf * 0.693359375f) + nf * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (n + 127) << 23; // 2^n, n in [−126, 127]
  float pow2;
  std::memcpy(&pow2, &bits, sizeof pow2);
  return p * pow2;
}

FASTEM_INLINE float sigmoid(float a) {
  return 1.0f / (1.0f + exp_approx(-a));
}

// (Σ u, Σ v) of (u, v) = f(j) over j < count: float lanes within 256-element
// chunks (vectorisable, and short sums stay accurate), the chunks added in
// double.
template <typename F>
FASTEM_INLINE std::pair<double, double> sums(int64_t count, const F& f) {
  constexpr int64_t kChunk = 256;
  constexpr int kLanes = 8;
  double total_u = 0.0, total_v = 0.0;
  for (int64_t begin = 0; begin < count; begin += kChunk) {
    const int64_t end = count < begin + kChunk ? count : begin + kChunk;
    float u[kLanes] = {}, v[kLanes] = {};
    int64_t j = begin;
    for (; j + kLanes <= end; j += kLanes) {
      for (int k = 0; k < kLanes; ++k) {
        const auto [a, b] = f(j + k);
        u[k] += a;
        v[k] += b;
      }
    }
    for (; j < end; ++j) {
      const auto [a, b] = f(j);
      u[0] += a;
      v[0] += b;
    }
    for (int k = 0; k < kLanes; ++k) {
      total_u += u[k];
      total_v += v[k];
    }
  }
  return {total_u, total_v};
}

// One (sample n, group) task: x, y [C/G, H·W] from channel `first` on.
// Returns (mean, rstd).
template <typename T>
FASTEM_INLINE std::pair<float, float> forward_group(
    const T* __restrict__ x,
    T* __restrict__ y,
    const Affine<T>& affine,
    int64_t n,
    int64_t first,
    int64_t channels,
    int64_t plane,
    float eps) {
  const int64_t size = channels * plane;
  // Two passes, as torch: the mean, then the centred squares (no
  // cancellation).
  const float m = static_cast<float>(
      sums(size,
           [&](int64_t j) FASTEM_LAMBDA_INLINE {
             return std::pair{static_cast<float>(x[j]), 0.0f};
           })
          .first /
      size);
  const double var =
      sums(size,
           [&](int64_t j) FASTEM_LAMBDA_INLINE {
             const float d = static_cast<float>(x[j]) - m;
             return std::pair{d * d, 0.0f};
           })
          .first /
      size;
  const float r = static_cast<float>(1.0 / std::sqrt(var + eps));
  for (int64_t k = 0; k < channels; ++k) {
    float gain, offset;
    affine.at(n, first + k, gain, offset);
    gain *= r;
    const T* __restrict__ xc = x + k * plane;
    T* __restrict__ yc = y + k * plane;
    for (int64_t j = 0; j < plane; ++j) {
      const float a = (static_cast<float>(xc[j]) - m) * gain + offset;
      yc[j] = static_cast<T>(a * sigmoid(a));
    }
  }
  return {m, r};
}

// The input-VJP of one task: grad, x, out [C/G, H·W]; g [C/G·H·W] scratch.
template <typename T>
FASTEM_INLINE void backward_group(
    const T* __restrict__ grad,
    const T* __restrict__ x,
    T* __restrict__ out,
    float* __restrict__ g,
    const Affine<T>& affine,
    int64_t n,
    int64_t first,
    int64_t channels,
    int64_t plane,
    float m,
    float r) {
  const int64_t size = channels * plane;
  // g = ∂L/∂x̂, kept so that the second pass needs no exp.
  for (int64_t k = 0; k < channels; ++k) {
    float gain, offset;
    affine.at(n, first + k, gain, offset);
    for (int64_t j = k * plane; j < (k + 1) * plane; ++j) {
      const float a = (static_cast<float>(x[j]) - m) * r * gain + offset;
      const float sig = sigmoid(a);
      // SiLU'(a) = σ(a)(1 + a(1 − σ(a)))
      g[j] = static_cast<float>(grad[j]) * sig * (1.0f + a * (1.0f - sig)) *
          gain;
    }
  }
  const auto [sum_g, sum_gx] =
      sums(size, [&](int64_t j) FASTEM_LAMBDA_INLINE {
        return std::pair{g[j], g[j] * ((static_cast<float>(x[j]) - m) * r)};
      });
  const float mean_g = static_cast<float>(sum_g / size);
  const float mean_gx = static_cast<float>(sum_gx / size);
  for (int64_t j = 0; j < size; ++j) {
    const float xhat = (static_cast<float>(x[j]) - m) * r;
    out[j] = static_cast<T>(r * (g[j] - mean_g - xhat * mean_gx));
  }
}

#if FASTEM_GN_AVX2
template <typename T>
__attribute__((target("avx2,fma"))) std::pair<float, float> forward_group_avx2(
    const T* __restrict__ x,
    T* __restrict__ y,
    const Affine<T>& affine,
    int64_t n,
    int64_t first,
    int64_t channels,
    int64_t plane,
    float eps) {
  return forward_group(x, y, affine, n, first, channels, plane, eps);
}

template <typename T>
__attribute__((target("avx2,fma"))) void backward_group_avx2(
    const T* __restrict__ grad,
    const T* __restrict__ x,
    T* __restrict__ out,
    float* __restrict__ g,
    const Affine<T>& affine,
    int64_t n,
    int64_t first,
    int64_t channels,
    int64_t plane,
    float m,
    float r) {
  backward_group(grad, x, out, g, affine, n, first, channels, plane, m, r);
}

bool has_avx2() {
  static const bool yes =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}
#endif

// The per-group functions for this CPU.
template <typename T>
auto forward_group_fn() {
#if FASTEM_GN_AVX2
  if (has_avx2()) {
    return &forward_group_avx2<T>;
  }
#endif
  return &forward_group<T>;
}

template <typename T>
auto backward_group_fn() {
#if FASTEM_GN_AVX2
  if (has_avx2()) {
    return &backward_group_avx2<T>;
  }
#endif
  return &backward_group<T>;
}

template <typename T>
void forward_groups(
    const T* x, // [N, C, H·W]
    const Affine<T>& affine,
    T* y, // [N, C, H·W]
    float* mean, // [N, G]
    float* rstd, // [N, G]
    const GroupShape& s,
    float eps) {
  const int64_t size = s.per_group(), per_group = s.channels / s.groups;
  const auto group = forward_group_fn<T>();
  at::parallel_for(0, s.n * s.groups, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t task = lo; task < hi; ++task) {
      const auto [m, r] = group(
          x + task * size,
          y + task * size,
          affine,
          task / s.groups,
          (task % s.groups) * per_group,
          per_group,
          s.plane,
          eps);
      mean[task] = m;
      rstd[task] = r;
    }
  });
}

template <typename T>
void backward_groups(
    const T* grad, // [N, C, H·W]
    const T* x, // [N, C, H·W]
    const float* mean, // [N, G]
    const float* rstd, // [N, G]
    const Affine<T>& affine,
    T* out, // [N, C, H·W]
    const GroupShape& s) {
  const int64_t size = s.per_group(), per_group = s.channels / s.groups;
  const auto group = backward_group_fn<T>();
  at::parallel_for(0, s.n * s.groups, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> g(size);
    for (int64_t task = lo; task < hi; ++task) {
      group(
          grad + task * size,
          x + task * size,
          out + task * size,
          g.data(),
          affine,
          task / s.groups,
          (task % s.groups) * per_group,
          per_group,
          s.plane,
          mean[task],
          rstd[task]);
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
  FASTEM_DISPATCH_GROUP_NORM_TYPES(
      x.scalar_type(), "group_norm_silu", [&] {
        forward_groups<scalar_t>(
            x.data_ptr<scalar_t>(),
            group_norm_affine<scalar_t, int64_t>(weight, bias, scale, shift),
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
  FASTEM_DISPATCH_GROUP_NORM_TYPES(
      x.scalar_type(), "group_norm_silu_backward", [&] {
        backward_groups<scalar_t>(
            grad.data_ptr<scalar_t>(),
            x.data_ptr<scalar_t>(),
            mean.data_ptr<float>(),
            rstd.data_ptr<float>(),
            group_norm_affine<scalar_t, int64_t>(weight, bias, scale, shift),
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
