// Counter-based Gaussian noise shared by the CPU and CUDA kernels (and matched
// bit for bit by the Triton kernel and the pure-torch reference in
// fastem_ext/ops/ddpm_update.py).
//
// Philox-4x32-10 (Salmon et al., SC'11) with counter (index, step, 0, 0) and
// key (seed low, seed high); the first two output words give one Box-Muller
// normal. Uniforms keep 24 bits so that every backend converts them to float
// exactly.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FASTEM_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FASTEM_HOST_DEVICE inline
#endif

namespace fastem {

struct PhiloxWords {
  uint32_t x, y, z, w;
};

FASTEM_HOST_DEVICE uint32_t mul_hi_lo(uint32_t a, uint32_t b, uint32_t* hi) {
  const uint64_t product = static_cast<uint64_t>(a) * b;
  *hi = static_cast<uint32_t>(product >> 32);
  return static_cast<uint32_t>(product);
}

FASTEM_HOST_DEVICE PhiloxWords
philox4x32_10(PhiloxWords c, uint32_t k0, uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, hi1;
    const uint32_t lo0 = mul_hi_lo(0xD2511F53u, c.x, &hi0);
    const uint32_t lo1 = mul_hi_lo(0xCD9E8D57u, c.z, &hi1);
    c = PhiloxWords{hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0};
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c;
}

// A standard normal for element `index` at diffusion step `step`.
FASTEM_HOST_DEVICE float
philox_normal(uint64_t seed, uint32_t index, uint32_t step) {
  const PhiloxWords r = philox4x32_10(
      PhiloxWords{index, step, 0u, 0u},
      static_cast<uint32_t>(seed),
      static_cast<uint32_t>(seed >> 32));
  // (k + 1/2) / 2^24 lies strictly inside (0, 1): the logarithm is finite.
  const float u1 = (static_cast<float>(r.x >> 8) + 0.5f) * 0x1p-24f;
  const float u2 = (static_cast<float>(r.y >> 8) + 0.5f) * 0x1p-24f;
  // The angle lies in (-π, π), where every backend's cosine is accurate; u2 -
  // 1/2 is exact.
  return sqrtf(-2.0f * logf(u1)) * cosf(6.2831855f * (u2 - 0.5f));
}

} // namespace fastem
