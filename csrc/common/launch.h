// CPU launcher of the label ops: f(b, i, words) for every element i of a [B, plane] index space
// (sample b), with the element's two Philox words, drawn a block at a time (philox_cpu.h).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "common/logits.h"
#include "common/philox_cpu.h"

namespace ddps {

template <typename F>
void cpu_for_each(int64_t n, int64_t plane, int64_t grain, const F& f) {
  constexpr int64_t kBlock = 256;
  at::parallel_for(0, (n + kBlock - 1) / kBlock, std::max<int64_t>(grain / kBlock, 1), [&](int64_t begin, int64_t end) {
    Words2 words[kBlock];
    // Track the sample row incrementally: no per-element division.
    int64_t b = begin * kBlock / plane;
    int64_t row_end = (b + 1) * plane;
    for (int64_t block = begin; block < end; ++block) {
      const int64_t first = block * kBlock, count = std::min(kBlock, n - first);
      element_words_range(static_cast<uint64_t>(first), count, f.seed, words);
      for (int64_t j = 0; j < count; ++j) {
        while (first + j >= row_end) {
          ++b;
          row_end += plane;
        }
        f(b, first + j, words[j]);
      }
    }
  });
}

}  // namespace ddps

namespace ddps {

// CPU launcher of the per-pixel logits ops (fn.pixel(load, b, i)): a pixel's K logits lie
// `plane` elements apart, so reading them pixel by pixel strides through memory. Instead, each
// chunk of up to kPixels pixels is copied class row by class row (contiguous reads) into a
// pixel-major float buffer, and the shared per-pixel math reads that.
template <typename scalar_t, typename F>
void cpu_for_each_pixel(const scalar_t* logits, int64_t num_classes, int64_t n, int64_t plane, const F& fn) {
  constexpr int64_t kPixels = 32;
  const int64_t chunks_per_row = (plane + kPixels - 1) / kPixels;
  const int64_t batch = n / plane;
  at::parallel_for(0, batch * chunks_per_row, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> buffer(static_cast<size_t>(kPixels * num_classes));
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t b = chunk / chunks_per_row;
      const int64_t p0 = (chunk % chunks_per_row) * kPixels;
      const int64_t count = std::min(kPixels, plane - p0);
      const scalar_t* src = logits + b * num_classes * plane + p0;
      for (int64_t k = 0; k < num_classes; ++k)
        for (int64_t p = 0; p < count; ++p) buffer[p * num_classes + k] = static_cast<float>(src[k * plane + p]);
      for (int64_t p = 0; p < count; ++p)
        fn.pixel(PixelLogits<float>{buffer.data() + p * num_classes, 1}, b, b * plane + p0 + p);
    }
  });
}

}  // namespace ddps
