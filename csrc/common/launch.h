// CPU launcher: f(b, i) for every element i of a [B, plane] index space, in parallel chunks walked
// one sample row at a time (no per-element division; a constant per-row level).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>

namespace ddps {

template <typename F>
void cpu_for_each(int64_t n, int64_t plane, int64_t grain, const F& f) {
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row_start = begin; row_start < end;) {
      const int64_t b = row_start / plane;
      const int64_t row_end = std::min(end, (b + 1) * plane);
      for (int64_t i = row_start; i < row_end; ++i) f(b, i);
      row_start = row_end;
    }
  });
}

}  // namespace ddps
