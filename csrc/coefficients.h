#pragma once
// The per-step coefficient table shared by the CPU and CUDA ddpm_update kernels.

#include <cstdint>

namespace fastem {

// Rows of the coefficient table built by fastem_ext.ops.ddpm_coefficients.
enum Row : int64_t {
  kSqrtAc,
  kSqrtOneMinusAc,
  kCoefX0,
  kCoefXt,
  kNoiseStd,
  kWeight,
  kRows
};

} // namespace fastem
