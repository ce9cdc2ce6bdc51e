// Float helpers shared by every backend's per-element math. Only IEEE +, * and integer bit
// operations, in a fixed order, so that the CPU loop (built with -ffp-contract=off), the CUDA
// kernels (explicit round-to-nearest intrinsics) and the Triton kernels (kernels/_common.py, the
// same formula) produce the same bits.
#pragma once

#include <cstdint>
#include <cmath>
#include <cstring>

#include "common/philox.h"

namespace ddps {

#if defined(__CUDA_ARCH__)
DDPS_HD float fmul(float a, float b) { return __fmul_rn(a, b); }
DDPS_HD float fadd(float a, float b) { return __fadd_rn(a, b); }
DDPS_HD float bits_to_float(uint32_t u) { return __uint_as_float(u); }
#else
DDPS_HD float fmul(float a, float b) { return a * b; }
DDPS_HD float fadd(float a, float b) { return a + b; }
DDPS_HD float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
#endif

// Uniform float in [0, 1) with 24 random bits: exactly representable, the same everywhere.
DDPS_HD float uniform24(uint32_t word) { return static_cast<float>(word >> 8) * 5.9604644775390625e-08f; }

// exp(x) for x <= 0 (softmax numerators after max subtraction), 0 below -87. Cody-Waite range
// reduction x = n ln2 + r, |r| <= ln2 / 2, degree-7 Taylor polynomial (relative error < 2e-7),
// then 2^n through the exponent bits. Written here (not expf) so every backend agrees bitwise.
DDPS_HD float exp_neg(float x) {
  if (!(x >= -87.0f)) return x != x ? x : 0.0f;  // NaN stays NaN; -inf and tiny give 0
  const float n = floorf(fadd(fmul(x, 1.44269502f), 0.5f));
  const float r = fadd(fadd(x, fmul(n, -0.693145752f)), fmul(n, -1.42860677e-06f));
  float p = 1.98412698e-04f;
  p = fadd(fmul(p, r), 1.38888889e-03f);
  p = fadd(fmul(p, r), 8.33333333e-03f);
  p = fadd(fmul(p, r), 4.16666667e-02f);
  p = fadd(fmul(p, r), 1.66666667e-01f);
  p = fadd(fmul(p, r), 0.5f);
  p = fadd(fmul(p, r), 1.0f);
  p = fadd(fmul(p, r), 1.0f);
  const uint32_t scale_bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  return fmul(p, bits_to_float(scale_bits));
}

}  // namespace ddps
