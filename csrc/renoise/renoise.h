// renoise: q_sample(argmax(logits)) for one pixel, reading its K logits once. Ties resolve to the
// lowest class and a NaN logit wins, as in torch.argmax.
#pragma once

#include "q_sample/q_sample.h"

namespace ddps {

// One class of a running argmax: ties keep the lower class; the first NaN wins and stays.
// Branch-free; F, I: float and int32_t, or CPU vectors of them (one pixel per lane).
template <typename F, typename I>
DDPS_HD void argmax_step(F v, I k, F& best, I& arg) {
  const auto take = (v > best || v != v) && best == best;
  best = take ? v : best;
  arg = take ? k : arg;
}

template <typename Load>
DDPS_HD int64_t argmax_label(const Load& load, int64_t num_classes) {
  float best = load(0);
  int32_t arg = 0;
  for (int64_t k = 1; k < num_classes; ++k) argmax_step(load(k), static_cast<int32_t>(k), best, arg);
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

  // Whether draw r of sample b keeps the pixel's label; when it does not, the sample is the same
  // whatever the argmax, so a loop may skip reading that pixel's logits.
  DDPS_HD bool keeps_label(int64_t b, Words2 r) const { return static_cast<uint64_t>(r.first) < table[2 * t[b]]; }

  // Pixel i (sample b) whose argmax is x0, with its words r. The counter is the label's index, as
  // in q_sample: renoise(l) == q_sample(argmax(l)) bitwise.
  DDPS_HD void finish(int64_t x0, int64_t b, int64_t i, Words2 r) const {
    const int64_t* row = table + 2 * t[b];
    out[i] = q_sample_label(x0, row[0], row[1], space, r);
  }

  DDPS_HD void operator()(int64_t b, int64_t i) const {
    finish(argmax_label(pixel_logits(logits, space.num_classes, plane, b, i), space.num_classes), b, i,
           element_words(static_cast<uint64_t>(i), seed));
  }
};

}  // namespace ddps
