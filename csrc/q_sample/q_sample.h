// q_sample: x_t ~ q(x_t | x_0) for the uniform transition, one label at a time.
//
// q(x_t | x_0 = i) = att * onehot(i) + btt with btt = (1 - att) / K. Drawing "keep i with
// probability att, otherwise a class uniform over all K" gives exactly that: P(i) = att + btt,
// P(k != i) = btt. The keep probability arrives as an integer threshold att * 2^32 (computed once
// per schedule on the host, in float64), so the per-element work is integer-only and bitwise
// identical on every backend.
#pragma once

#include "common/philox.h"

namespace ddps {

DDPS_HD int64_t q_sample_label(int64_t x0, uint64_t keep_threshold, uint32_t num_classes,
                               Philox4 r) {
  if (static_cast<uint64_t>(r.w0) < keep_threshold) return x0;
  return static_cast<int64_t>(uniform_below(r.w1, num_classes));
}

}  // namespace ddps
