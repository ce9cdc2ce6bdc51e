// ddps::renoise on the CPU.
#include <torch/library.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>

#include "common/philox_cpu.h"
#include "common/vec.h"
#include "renoise/renoise_op.h"

namespace ddps {
namespace {

// A tile of kTile neighbouring pixels keeps its running argmax in kVectors vector registers
// (GCC vector extensions: one AVX-512 register per vector, or two AVX2 / four SSE2 ones, by the
// clone the CPU runs) while the class rows stream past: a load, a compare, two selects and the
// NaN probe's add per vector and class, nothing stored until the end.
constexpr int kVectors = 8;  // 24 of AVX-512's 32 registers; 512 contiguous bytes per class row
constexpr int64_t kTile = kLanes * kVectors;

// The argmax of kWidth * kLanes pixels (class-0 logits at src, classes `plane` apart) into arg;
// `next` is the tile the caller reads after this one. Without NaN, torch.argmax's rule is
// "strictly greater wins", which is all the vector loop does; a tile that holds a NaN returns
// false and is redone with the exact scalar rule (argmax_step). The NaN test
// is a running sum of the logits (a NaN propagates through it; +inf + -inf only costs a redo),
// one add per vector: GCC turns a per-class `v != v` into a scalar test per lane.
template <int kWidth, typename scalar_t>
DDPS_CLONES bool argmax_tile(const scalar_t* src, const scalar_t* next, int64_t plane, int32_t num_classes,
                             int32_t* arg) {
  FloatV best[kWidth];
  IntV best_class[kWidth];
  FloatV sum[kWidth];
  for (int j = 0; j < kWidth; ++j) {
    best[j] = sum[j] = load_lanes(src + j * kLanes);
    best_class[j] = IntV{};
  }
  for (int32_t k = 1; k < num_classes; ++k) {
    const scalar_t* row = src + k * plane;
    // The class rows are too many streams for the hardware prefetcher: fetch the same row of the
    // next tile (`next`) into L2 while this one computes (a whole tile does not fit in L1).
    for (int64_t byte = 0; byte < kWidth * kLanes * int64_t{sizeof(scalar_t)}; byte += 64)
      __builtin_prefetch(reinterpret_cast<const char*>(next + k * plane) + byte, 0, 2);
    const IntV kv = IntV{} + k;
    for (int j = 0; j < kWidth; ++j)
      argmax_lanes(load_lanes(row + j * kLanes), kv, best[j], best_class[j], sum[j]);
  }
  if (any_nan(sum, kWidth)) return false;
  std::memcpy(arg, best_class, sizeof best_class);
  return true;
}

// The argmax of `count` <= kTile pixels: a full tile at once, a partial one (the end of a sample's
// plane) by vectors, then pixel by pixel; all of it pixel by pixel if a NaN turns up.
template <typename scalar_t>
void argmax_pixels(const scalar_t* src, const scalar_t* next, int64_t plane, int32_t num_classes, int64_t count,
                   int32_t* arg) {
  bool exact = true;
  int64_t done = 0;
  if (count == kTile) {
    exact = argmax_tile<kVectors>(src, next, plane, num_classes, arg);
    done = kTile;
  }
  for (; exact && done + kLanes <= count; done += kLanes)
    exact = argmax_tile<1>(src + done, next, plane, num_classes, arg + done);
  if (!exact) done = 0;
  for (int64_t p = done; p < count; ++p)
    arg[p] = static_cast<int32_t>(argmax_label(PixelLogits<scalar_t>{src + p, plane}, num_classes));
}

template <typename scalar_t>
void renoise_cpu_loop(const scalar_t* logits, int64_t n, int64_t plane, const RenoiseFn<scalar_t>& fn) {
  const int32_t num_classes = static_cast<int32_t>(fn.space.num_classes);
  const int64_t tiles_per_row = (plane + kTile - 1) / kTile;
  const int64_t batch = n / plane;
  // Tiles ordered pixel-major, sample-minor: every thread gets a share of every sample, so the
  // samples whose tiles are skipped do not leave a thread idle.
  at::parallel_for(0, batch * tiles_per_row, 4, [&](int64_t begin, int64_t end) {
    Words2 words[kTile];
    int32_t arg[kTile];
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t b = tile % batch;
      const int64_t p0 = (tile / batch) * kTile;
      const int64_t next_b = (tile + 1) % batch, next_p0 = std::min((tile + 1) / batch * kTile, plane - 1);
      const int64_t count = std::min(kTile, plane - p0);
      const int64_t first = b * plane + p0;
      element_words_range(static_cast<uint64_t>(first), count, fn.seed, words);
      bool needed = false;
      for (int64_t p = 0; p < count; ++p) needed |= fn.keeps_label(b, words[p]);
      if (needed) {
        const scalar_t* src = logits + b * num_classes * plane + p0;
        argmax_pixels(src, logits + next_b * num_classes * plane + next_p0, plane, num_classes, count, arg);
      }
      // Where no pixel keeps its label, the argmax is never used: any class will do.
      for (int64_t p = 0; p < count; ++p) fn.finish(needed ? arg[p] : 0, b, first + p, words[p]);
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
