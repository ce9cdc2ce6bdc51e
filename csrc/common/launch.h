// CPU launcher of the label ops: f(b, i, words) for every element i of a [B, plane] index space
// (sample b), with the element's two Philox words; one Philox call serves each pair of elements.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "common/logits.h"

namespace ddps {

template <typename F>
void cpu_for_each(int64_t n, int64_t plane, int64_t grain, const F& f) {
  at::parallel_for(0, (n + 1) / 2, grain, [&](int64_t begin, int64_t end) {
    // Track the sample row incrementally: no per-element division.
    int64_t b = 2 * begin / plane;
    int64_t row_end = (b + 1) * plane;
    auto visit = [&](int64_t i, Words2 r) {
      while (i >= row_end) {
        ++b;
        row_end += plane;
      }
      f(b, i, r);
    };
    for (int64_t j = begin; j < end; ++j) {
      const Philox4 r = philox4x32_10(static_cast<uint64_t>(j), f.seed);
      visit(2 * j, pair_words(r, false));
      if (2 * j + 1 < n) visit(2 * j + 1, pair_words(r, true));
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
