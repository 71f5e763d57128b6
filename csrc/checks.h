// Host-side input validation shared by the CPU and CUDA entry points: every op
// checks device, dtype, shape and contiguity here once, so the kernels can
// index raw pointers.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

namespace fastem {

// Error messages are assembled with std::string and std::to_string, never
// with std::ostream (which TORCH_CHECK's own formatting uses): on a machine
// whose host compilers and libstdc++ disagree, formatting a number through an
// ostream inside the extension was seen to segfault (an H100 image, 2026-11-26)
// instead of raising.
inline void append(std::string& out, const char* text) {
  out += text;
}
inline void append(std::string& out, const std::string& text) {
  out += text;
}
inline void append(std::string& out, at::IntArrayRef values) {
  out += '[';
  for (size_t i = 0; i < values.size(); ++i) {
    out += (i == 0 ? "" : ", ") + std::to_string(values[i]);
  }
  out += ']';
}
inline void append(std::string& out, at::ScalarType dtype) {
  out += c10::toString(dtype);
}
inline void append(std::string& out, const at::Device& device) {
  out += device.str();
}
template <typename T, std::enable_if_t<std::is_arithmetic_v<T>, int> = 0>
inline void append(std::string& out, T value) {
  out += std::to_string(value);
}

template <typename... Parts>
std::string message(const Parts&... parts) {
  std::string out;
  (append(out, parts), ...);
  return out;
}

} // namespace fastem

// TORCH_CHECK with a message built by fastem::message (evaluated on failure
// only).
#define FASTEM_CHECK(cond, ...)                                   \
  do {                                                            \
    if (C10_UNLIKELY(!(cond))) {                                  \
      TORCH_CHECK(false, ::fastem::message(__VA_ARGS__).c_str()); \
    }                                                             \
  } while (0)

namespace fastem {

inline void check_input(
    const at::Tensor& t,
    const char* name,
    at::ScalarType dtype,
    const at::Device& device) {
  FASTEM_CHECK(
      t.device() == device, name, " must be on ", device, ", got ", t.device());
  FASTEM_CHECK(
      t.scalar_type() == dtype,
      name,
      " must be ",
      dtype,
      ", got ",
      t.scalar_type());
  FASTEM_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// A per-step scalar: `table` [S] float32 read at the 0-d int64 `step` (on the
// same device).
inline void check_table(
    const at::Tensor& table,
    const char* name,
    const at::Tensor& step,
    const at::Device& device) {
  check_input(table, name, at::kFloat, device);
  FASTEM_CHECK(
      table.dim() == 1 && table.numel() >= 1,
      name,
      " must be a non-empty 1-D table");
  check_input(step, "step", at::kLong, device);
  FASTEM_CHECK(step.dim() == 0, "step must be a 0-d tensor, got ", step.sizes());
}

// The shape of a batch of spectra `spec` [n, C, H, Wh] (complex64).
struct SpectraShape {
  int64_t n, channels, height, half_width;
  int64_t freqs() const {
    return height * half_width;
  }
};

inline SpectraShape check_spectra(
    const at::Tensor& spec,
    const char* name,
    const at::Device& device) {
  check_input(spec, name, at::kComplexFloat, device);
  FASTEM_CHECK(
      spec.dim() == 4, name, " must be [n, C, H, W//2+1], got ", spec.sizes());
  return {spec.size(0), spec.size(1), spec.size(2), spec.size(3)};
}

// A frequency map [H, Wh] of the given dtype (an OTF, Σ|X|², ...).
inline void check_plane(
    const at::Tensor& t,
    const char* name,
    at::ScalarType dtype,
    const SpectraShape& s,
    const at::Device& device) {
  check_input(t, name, dtype, device);
  FASTEM_CHECK(
      t.dim() == 2 && t.size(0) == s.height && t.size(1) == s.half_width,
      name,
      " must be [",
      s.height,
      ", ",
      s.half_width,
      "], got ",
      t.sizes());
}

// The observation spectrum: [C, H, Wh] shared by all particles (returns true)
// or [n, C, H, Wh], one per particle (returns false).
inline bool check_target(
    const at::Tensor& spec_y,
    const SpectraShape& s,
    const at::Device& device) {
  check_input(spec_y, "spec_y", at::kComplexFloat, device);
  const bool shared = spec_y.dim() == 3;
  const auto expected = shared
      ? std::vector<int64_t>{s.channels, s.height, s.half_width}
      : std::vector<int64_t>{s.n, s.channels, s.height, s.half_width};
  FASTEM_CHECK(
      spec_y.sizes() == at::IntArrayRef(expected),
      "spec_y must be [C, H, W//2+1] or [n, C, H, W//2+1] = ",
      at::IntArrayRef(expected),
      ", got ",
      spec_y.sizes());
  return shared;
}

// x_t [n, C, H, W] contiguous float32; eps of the same shape whose particles
// may be strided (the first C channels of a [n, 2C, H, W] learned-variance
// output). Returns eps's batch stride.
inline int64_t check_diffusion_inputs(
    const at::Tensor& x_t,
    const at::Tensor& eps,
    const at::Tensor& coefs,
    const at::Tensor& step,
    int64_t rows) {
  const auto device = x_t.device();
  check_input(x_t, "x_t", at::kFloat, device);
  FASTEM_CHECK(x_t.dim() == 4, "x_t must be [n, C, H, W], got ", x_t.sizes());
  FASTEM_CHECK(eps.device() == device, "eps must be on ", device);
  FASTEM_CHECK(eps.scalar_type() == at::kFloat, "eps must be float32");
  FASTEM_CHECK(
      eps.sizes() == x_t.sizes(),
      "eps must be ",
      x_t.sizes(),
      ", got ",
      eps.sizes());
  const int64_t plane = x_t.size(2) * x_t.size(3);
  FASTEM_CHECK(
      eps.stride(3) == 1 && eps.stride(2) == x_t.size(3) &&
          eps.stride(1) == plane && eps.stride(0) >= x_t.size(1) * plane,
      "each particle of eps must be a contiguous [C, H, W] block");
  check_input(coefs, "coefs", at::kFloat, device);
  FASTEM_CHECK(
      coefs.dim() == 2 && coefs.size(0) >= rows && coefs.size(1) >= 1,
      "coefs must be [6, S] (see ddpm_coefficients), got ",
      coefs.sizes());
  check_input(step, "step", at::kLong, device);
  FASTEM_CHECK(step.dim() == 0, "step must be a 0-d tensor, got ", step.sizes());
  return eps.stride(0);
}

inline void check_like(
    const at::Tensor& t,
    const char* name,
    const at::Tensor& like) {
  check_input(t, name, at::kFloat, like.device());
  FASTEM_CHECK(
      t.sizes() == like.sizes(),
      name,
      " must be ",
      like.sizes(),
      ", got ",
      t.sizes());
}

inline void check_like(
    const c10::optional<at::Tensor>& t,
    const char* name,
    const at::Tensor& like) {
  if (t.has_value()) {
    check_like(*t, name, like);
  }
}

// kernel_project runs in one CTA / program per grid tile holding the whole K×K
// support.
constexpr int64_t kMaxKernelSize = 64;

inline void check_projection_inputs(
    const at::Tensor& z,
    const at::Tensor& fallback) {
  check_input(z, "z", at::kFloat, z.device());
  FASTEM_CHECK(
      z.dim() == 2, "z must be a full-grid [H, W] kernel, got ", z.sizes());
  check_input(fallback, "fallback", at::kFloat, z.device());
  const int64_t k = fallback.size(-1);
  FASTEM_CHECK(
      fallback.dim() == 2 && fallback.size(0) == k,
      "fallback must be a square [K, K] kernel, got ",
      fallback.sizes());
  FASTEM_CHECK(
      k >= 1 && k <= kMaxKernelSize && k <= z.size(0) && k <= z.size(1),
      "kernel size ",
      k,
      " must be in [1, min(64, H, W)] for z of shape ",
      z.sizes());
}

// A float32/bfloat16/float16 tensor of the given shape (group_norm_silu's
// per-channel and per-group inputs).
inline void check_shaped(
    const at::Tensor& t,
    const char* name,
    at::ScalarType dtype,
    at::IntArrayRef shape,
    const at::Device& device) {
  check_input(t, name, dtype, device);
  FASTEM_CHECK(
      t.sizes() == shape, name, " must be ", shape, ", got ", t.sizes());
}

// group_norm_silu: x [N, C, H, W] contiguous float32/bfloat16/float16; weight,
// bias [C] float32; scale, shift [N, C] of x's dtype, both or neither.
struct GroupShape {
  int64_t n, channels, plane, groups;
  int64_t per_group() const {
    return channels / groups * plane;
  }
};

inline GroupShape check_group_norm_inputs(
    const at::Tensor& x,
    const at::Tensor& weight,
    const at::Tensor& bias,
    const c10::optional<at::Tensor>& scale,
    const c10::optional<at::Tensor>& shift,
    int64_t groups) {
  const auto device = x.device();
  FASTEM_CHECK(
      x.dim() == 4 && x.size(0) >= 1,
      "x must be [N, C, H, W] with N >= 1, got ",
      x.sizes());
  const auto dtype = x.scalar_type();
  FASTEM_CHECK(
      dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
      "x must be float32, bfloat16 or float16, got ",
      dtype);
  check_input(x, "x", dtype, device);
  const int64_t n = x.size(0), channels = x.size(1);
  FASTEM_CHECK(
      groups >= 1 && channels % groups == 0,
      "the channels (",
      channels,
      ") must be a multiple of groups (",
      groups,
      ")");
  check_shaped(weight, "weight", at::kFloat, {channels}, device);
  check_shaped(bias, "bias", at::kFloat, {channels}, device);
  FASTEM_CHECK(
      scale.has_value() == shift.has_value(),
      "scale and shift must be given together");
  if (scale.has_value()) {
    check_shaped(*scale, "scale", dtype, {n, channels}, device);
    check_shaped(*shift, "shift", dtype, {n, channels}, device);
  }
  return {n, channels, x.size(2) * x.size(3), groups};
}

// Runs the lambda with scalar_t = float, at::Half or at::BFloat16: the dtypes
// that check_group_norm_inputs admits (needs <ATen/Dispatch.h>).
#define FASTEM_DISPATCH_GROUP_NORM_TYPES(TYPE, NAME, ...) \
  AT_DISPATCH_SWITCH(                                     \
      TYPE,                                               \
      NAME,                                               \
      AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)           \
          AT_DISPATCH_CASE_REDUCED_FLOATING_TYPES(__VA_ARGS__))

// The backward's extra inputs: grad like x, mean and rstd [N, groups] float32.
inline void check_group_norm_backward(
    const at::Tensor& grad,
    const at::Tensor& x,
    const at::Tensor& mean,
    const at::Tensor& rstd,
    const GroupShape& s) {
  check_shaped(grad, "grad", x.scalar_type(), x.sizes(), x.device());
  check_shaped(mean, "mean", at::kFloat, {s.n, s.groups}, x.device());
  check_shaped(rstd, "rstd", at::kFloat, {s.n, s.groups}, x.device());
}

} // namespace fastem
