// q_posterior_sample: x_{t-1} ~ q(x_{t-1} | x_t, x_0) for label x0, one label at a time.
//
// Per pixel the posterior has at most three distinct values: x_{t-1} = x_t, x_{t-1} = x0, and
// "any other real class" (uniform). thresholds: the level's [3 cases][2] cumulative thresholds of
// (x_t, x0) (ddps/ops/_tables.py); case 0: x_t == x0, 1: x_t != x0 (both real), 2: x_t is [MASK].
#pragma once

#include "common/labels.h"

namespace ddps {

DDPS_HD int64_t q_posterior_label(int64_t x0, int64_t xt, const int64_t* thresholds,
                                  const LabelSpace& space, Words2 r) {
  if (space.ignored(xt) || space.ignored(x0)) return xt;
  const int c = xt == space.mask_index ? 2 : (xt == x0 ? 0 : 1);
  const uint64_t w = r.first;
  if (w < static_cast<uint64_t>(thresholds[2 * c])) return xt;
  if (w < static_cast<uint64_t>(thresholds[2 * c + 1])) return x0;
  const int64_t lo = c == 1 && xt < x0 ? xt : x0;
  const int64_t hi = c == 1 && xt > x0 ? xt : x0;
  const uint32_t others = space.num_classes - (c == 1 ? 2u : 1u);
  // Rounding of the thresholds can leave a sliver above them when no other class has mass.
  if (others == 0) return x0;
  return skip_excluded(uniform_below(r.second, others), lo, hi);
}

}  // namespace ddps

namespace ddps {

// One element of ddps::q_posterior_sample; table: [T][3][2] thresholds.
template <typename scalar_t>
struct QPosteriorSampleFn {
  const scalar_t* x0;
  const scalar_t* xt;
  scalar_t* out;
  const int64_t* t;
  const int64_t* table;
  uint64_t seed;
  LabelSpace space;

  DDPS_HD void operator()(int64_t b, int64_t i, Words2 r) const {
    out[i] = static_cast<scalar_t>(q_posterior_label(static_cast<int64_t>(x0[i]), static_cast<int64_t>(xt[i]),
                                                     table + 6 * t[b], space, r));
  }
};

}  // namespace ddps
