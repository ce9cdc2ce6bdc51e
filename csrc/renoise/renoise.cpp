// ddps::renoise on the CPU.
#include <torch/library.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include "renoise/renoise_op.h"

namespace ddps {
namespace {

// The running argmax of a chunk of pixels advances class by class over contiguous rows of the
// [B, K, plane] logits (one pass over memory, vectorised), then each pixel is noised.
// One class row of the running argmax over `count` pixels. Built for AVX2 as well as the portable
// baseline; the loader picks the clone the CPU supports (the math is the same either way).
template <typename scalar_t>
__attribute__((target_clones("avx2", "default")))
void argmax_row(const scalar_t* row, int32_t k, int64_t count, float* best, int32_t* arg) {
  for (int64_t p = 0; p < count; ++p) argmax_step(static_cast<float>(row[p]), k, best[p], arg[p]);
}

template <typename scalar_t>
void renoise_cpu_loop(const scalar_t* logits, int64_t n, int64_t plane, const RenoiseFn<scalar_t>& fn) {
  constexpr int64_t kPixels = 1024;
  const int64_t num_classes = fn.space.num_classes;
  const int64_t chunks_per_row = (plane + kPixels - 1) / kPixels;
  at::parallel_for(0, (n / plane) * chunks_per_row, 4, [&](int64_t begin, int64_t end) {
    float best[kPixels];
    int32_t arg[kPixels];
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t b = chunk / chunks_per_row;
      const int64_t p0 = (chunk % chunks_per_row) * kPixels;
      const int64_t count = std::min(kPixels, plane - p0);
      const scalar_t* src = logits + b * num_classes * plane + p0;
      for (int64_t p = 0; p < count; ++p) {
        best[p] = static_cast<float>(src[p]);
        arg[p] = 0;
      }
      for (int64_t k = 1; k < num_classes; ++k) argmax_row(src + k * plane, static_cast<int32_t>(k), count, best, arg);
      for (int64_t p = 0; p < count; ++p) fn.finish(arg[p], b, b * plane + p0 + p);
    }
  });
}

at::Tensor renoise_cpu(const at::Tensor& logits, const at::Tensor& t, const at::Tensor& table, const at::Tensor& seed, int64_t num_classes, int64_t mask_index) {
  return renoise_impl(logits, t, table, seed, num_classes, mask_index,
                      [](const auto* data, int64_t n, int64_t plane, const auto& fn) {
                        renoise_cpu_loop(data, n, plane, fn);
                      });
}

}  // namespace

TORCH_LIBRARY_IMPL(ddps, CPU, m) { m.impl("renoise", &renoise_cpu); }

}  // namespace ddps
