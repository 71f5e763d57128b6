#pragma once
// The per-channel affine map shared by the CPU and CUDA group_norm_silu
// kernels.

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>

#include <optional>

namespace fastem {

// The affine map of channel c of sample n after normalisation:
// a = x̂·gain + offset with gain = γ(1+s), offset = β(1+s) + t. Index is the
// kernels' index type (int64_t on the CPU, int on CUDA). Always inlined: the
// CPU's AVX2 copies must compile it for their own target.
template <typename T, typename Index>
struct GroupNormAffine {
  const float* __restrict__ weight; // [C]
  const float* __restrict__ bias; // [C]
  const T* __restrict__ scale; // [N, C] or nullptr
  const T* __restrict__ shift; // [N, C] or nullptr
  Index channels;

  C10_HOST_DEVICE C10_ALWAYS_INLINE void at(
      Index n,
      Index c,
      float& gain,
      float& offset) const {
    gain = weight[c];
    offset = bias[c];
    if (scale != nullptr) {
      const float mult = 1.0f + static_cast<float>(scale[n * channels + c]);
      gain *= mult;
      offset = offset * mult + static_cast<float>(shift[n * channels + c]);
    }
  }
};

template <typename T, typename Index>
GroupNormAffine<T, Index> group_norm_affine(
    const at::Tensor& weight,
    const at::Tensor& bias,
    const std::optional<at::Tensor>& scale,
    const std::optional<at::Tensor>& shift) {
  return {
      weight.data_ptr<float>(),
      bias.data_ptr<float>(),
      scale.has_value() ? scale->data_ptr<T>() : nullptr,
      shift.has_value() ? shift->data_ptr<T>() : nullptr,
      static_cast<Index>(weight.size(0))};
}

} // namespace fastem
