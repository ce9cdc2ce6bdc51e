// renoise: q_sample(argmax(logits)) for one pixel, reading its K logits once. Ties resolve to the
// lowest class and a NaN logit wins, as in torch.argmax.
#pragma once

#include "q_sample/q_sample.h"

namespace ddps {

template <typename Load>
DDPS_HD int64_t argmax_label(const Load& load, int64_t num_classes) {
  float best = load(0);
  int64_t arg = 0;
  for (int64_t k = 1; k < num_classes && best == best; ++k) {
    const float v = load(k);
    if (v > best || v != v) {
      best = v;
      arg = k;
    }
  }
  return arg;
}

}  // namespace ddps

#include "common/logits.h"

namespace ddps {

// One pixel of ddps::renoise; table: q_sample's [T + 1][2] thresholds.
template <typename scalar_t>
struct RenoiseFn {
  const scalar_t* logits;
  int64_t* out;
  const int64_t* t;
  const int64_t* table;
  int64_t plane;
  uint64_t seed;
  LabelSpace space;

  DDPS_HD void operator()(int64_t b, int64_t i) const {
    const int64_t* row = table + 2 * t[b];
    const int64_t x0 = argmax_label(pixel_logits(logits, space.num_classes, plane, b, i), space.num_classes);
    // The counter is the label's index, as in q_sample: renoise(l) == q_sample(argmax(l)) bitwise.
    out[i] = q_sample_label(x0, row[0], row[1], space, philox4x32_10(static_cast<uint64_t>(i), seed));
  }
};

}  // namespace ddps
