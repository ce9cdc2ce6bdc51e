// q_sample: x_t ~ q(x_t | x_0), one label at a time.
//
// q(x_t | x_0 = i) = att * onehot(i) + btt (+ ctt on [MASK]) with K * btt = 1 - att - ctt.
// Drawing "keep i with probability att, else [MASK] with probability ctt, else a class uniform
// over all K" gives exactly that. The probabilities arrive as integer thresholds (probability *
// 2^32, ddps/ops/_tables.py), so the work is integer-only and bitwise identical on every backend.
#pragma once

#include "common/labels.h"

namespace ddps {

// keep = threshold of "keep x0"; keep_or_mask = that plus the [MASK] probability.
DDPS_HD int64_t q_sample_label(int64_t x0, uint64_t keep, uint64_t keep_or_mask,
                               const LabelSpace& space, Words2 r) {
  if (space.ignored(x0)) return x0;
  if (static_cast<uint64_t>(r.first) < keep) return x0;
  if (static_cast<uint64_t>(r.first) < keep_or_mask) return space.mask_index;
  return static_cast<int64_t>(uniform_below(r.second, space.num_classes));
}

}  // namespace ddps

namespace ddps {

// One element of ddps::q_sample; table: [T + 1][2] thresholds, indexed by the sample's level.
template <typename scalar_t>
struct QSampleFn {
  const scalar_t* x0;
  scalar_t* out;
  const int64_t* t;
  const int64_t* table;
  uint64_t seed;
  LabelSpace space;

  DDPS_HD void operator()(int64_t b, int64_t i, Words2 r) const {
    const int64_t* row = table + 2 * t[b];
    out[i] = static_cast<scalar_t>(q_sample_label(static_cast<int64_t>(x0[i]), row[0], row[1], space, r));
  }
};

}  // namespace ddps
