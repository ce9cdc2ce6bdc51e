// ddps::maskige_decode on the CPU: kVectors * 16 neighbouring pixels at a time, one pixel per vector
// lane, their three channels and running nearest row in registers while the palette rows stream
// past (one broadcast per channel and row). Ends of a sample's plane, and tiles with a NaN, go
// pixel by pixel through the functor the CUDA kernel runs; both use maskige_decode.h's distance.
#include <torch/library.h>

#include <ATen/Parallel.h>

#include <algorithm>

#include "common/vec.h"
#include "maskige_decode/maskige_decode_op.h"

namespace ddps {
namespace {

constexpr int kVectors = 2;  // 3 channels, best, row and NaN probe per vector: 12 of AVX-512's 32 registers
constexpr int64_t kTile = kLanes * kVectors;

// The nearest rows of the kTile pixels at x (channel c at x + c * plane) into out. Without NaN the
// exact rule (argmax_step) reduces to "strictly greater wins", which is all the vector loop does
// (a per-lane `v != v` is what GCC cannot keep in vectors); a NaN distance shows in a running sum
// of them (they are <= 0, so no inf - inf), and the tile returns false to be redone exactly.
template <typename scalar_t>
DDPS_CLONES bool decode_tile(const scalar_t* x, int64_t plane, const float* palette, int32_t rows, int64_t* out) {
  FloatV x0[kVectors], x1[kVectors], x2[kVectors], best[kVectors], sum[kVectors];
  IntV arg[kVectors];
  for (int j = 0; j < kVectors; ++j) {
    x0[j] = load_lanes(x + j * kLanes);
    x1[j] = load_lanes(x + plane + j * kLanes);
    x2[j] = load_lanes(x + 2 * plane + j * kLanes);
    best[j] = sum[j] = negated_distance(x0[j], x1[j], x2[j], palette);
    arg[j] = IntV{};
  }
  for (int32_t k = 1; k < rows; ++k) {
    const IntV row = IntV{} + k;
    for (int j = 0; j < kVectors; ++j)
      argmax_lanes(negated_distance(x0[j], x1[j], x2[j], palette + 3 * k), row, best[j], arg[j], sum[j]);
  }
  if (any_nan(sum, kVectors)) return false;
  for (int j = 0; j < kVectors; ++j)
    for (int l = 0; l < kLanes; ++l) out[j * kLanes + l] = arg[j][l];
  return true;
}

template <typename scalar_t>
void maskige_decode_cpu_loop(int64_t n, int64_t plane, const MaskigeDecodeFn<scalar_t>& fn) {
  const int64_t tiles_per_plane = (plane + kTile - 1) / kTile;
  at::parallel_for(0, n / plane * tiles_per_plane, 1, [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t b = tile / tiles_per_plane, p0 = tile % tiles_per_plane * kTile;
      const bool full = p0 + kTile <= plane;
      if (!full || !decode_tile(fn.maskige + 3 * b * plane + p0, plane, fn.palette, fn.rows, fn.out + b * plane + p0))
        for (int64_t p = p0; p < std::min(p0 + kTile, plane); ++p) fn(b, b * plane + p);
    }
  });
}

at::Tensor maskige_decode_cpu(const at::Tensor& maskige, const at::Tensor& palette) {
  return maskige_decode_impl(maskige, palette,
                             [](int64_t n, int64_t plane, const auto& fn) { maskige_decode_cpu_loop(n, plane, fn); });
}

}  // namespace

TORCH_LIBRARY_IMPL(ddps, CPU, m) { m.impl("maskige_decode", &maskige_decode_cpu); }

}  // namespace ddps
