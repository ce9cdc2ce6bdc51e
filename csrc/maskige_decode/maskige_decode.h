// maskige_decode: the palette row nearest to one maskige pixel, reading its three channels once and
// the palette row by row, O(K) per pixel. The distance is GSS's ((x - colour)^2).sum() in float32,
// rounded in torch's order, (d0^2 + d1^2) + d2^2; the nearest row is the one torch.argmin picks
// (ties: the lowest row; a NaN pixel: row 0), found as the argmax of the negated distances by
// renoise's rule (argmax_step), which resolves ties and NaN exactly so.
#pragma once

#include "common/math.h"
#include "renoise/renoise.h"

namespace ddps {

// T: float, or a CPU vector of floats (one pixel per lane; built with -ffp-contract=off, so the
// products and sums round as written). On CUDA the intrinsics keep nvcc from fusing them.
template <typename T>
DDPS_HD T negated_distance(T x0, T x1, T x2, const float* colour) {
  const T d0 = x0 - colour[0], d1 = x1 - colour[1], d2 = x2 - colour[2];
#if defined(__CUDA_ARCH__)
  return -fadd(fadd(fmul(d0, d0), fmul(d1, d1)), fmul(d2, d2));
#else
  return -(d0 * d0 + d1 * d1 + d2 * d2);
#endif
}

// Pixel i (sample b) of a contiguous [B, 3, plane] maskige; palette: contiguous float32 [rows, 3].
template <typename scalar_t>
struct MaskigeDecodeFn {
  const scalar_t* maskige;
  const float* palette;
  int64_t* out;
  int64_t plane;
  int32_t rows;

  DDPS_HD void operator()(int64_t b, int64_t i) const {
    const scalar_t* x = maskige + 2 * b * plane + i;  // channel 0 of pixel i
    const float x0 = static_cast<float>(x[0]), x1 = static_cast<float>(x[plane]), x2 = static_cast<float>(x[2 * plane]);
    float best = negated_distance(x0, x1, x2, palette);
    int32_t arg = 0;
    for (int32_t k = 1; k < rows; ++k) argmax_step(negated_distance(x0, x1, x2, palette + 3 * k), k, best, arg);
    out[i] = arg;
  }
};

}  // namespace ddps
