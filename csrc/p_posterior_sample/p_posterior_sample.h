// p_posterior_sample: x_{t-1} ~ p(x_{t-1} | x_t) with soft x0 = softmax(logits) (D3PM
// x0-parameterisation), one pixel at a time.
//
// p(x_{t-1} = k | x_t) ∝ q(x_t | x_{t-1} = k) * sum_j q(x_{t-1} = k | x0 = j) p_j is a mixture of
// three parts (ddps/ops/_tables.py, p_posterior_table): "x_{t-1} = x_t" with weight
// w0 * p[x_t] + w1, "a draw from p" with weight w2, "uniform over the K classes" with weight w3.
// All weights are scaled by the softmax denominator s so no division is needed; the draw from p
// is an inverse-CDF scan in class order. Pixels whose logits hold NaN or +inf, or are all -inf,
// keep x_t.
#pragma once

#include "common/labels.h"
#include "common/math.h"

namespace ddps {

// load(k): the pixel's logit of class k as float.
template <typename Load>
DDPS_HD int64_t p_posterior_label(const Load& load, int64_t xt, const float* weights,
                                  const LabelSpace& space, Philox4 r) {
  if (space.ignored(xt)) return xt;
  const int64_t num_classes = space.num_classes;
  float m = load(0);
  bool bad = m != m;
  for (int64_t k = 1; k < num_classes; ++k) {
    const float v = load(k);
    bad = bad || v != v;
    m = v > m ? v : m;
  }
  if (bad || m == INFINITY || m == -INFINITY) return xt;
  float s = 0.0f;
  for (int64_t k = 0; k < num_classes; ++k) s = fadd(s, exp_neg(fadd(load(k), -m)));
  const float* w = weights + (xt == space.mask_index ? 4 : 0);
  const float e_xt = xt == space.mask_index ? 0.0f : exp_neg(fadd(load(xt), -m));
  const float keep = fadd(fmul(w[0], e_xt), fmul(w[1], s));
  const float keep_or_soft = fadd(keep, fmul(w[2], s));
  const float total = fadd(keep_or_soft, fmul(w[3], s));
  if (!(total > 0.0f)) return xt;
  const float x = fmul(uniform24(r.w0), total);
  if (x < keep) return xt;
  if (x < keep_or_soft) {
    const float y = fmul(uniform24(r.w1), s);
    float cum = 0.0f;
    int64_t last = 0;
    for (int64_t k = 0; k < num_classes; ++k) {
      const float e = exp_neg(fadd(load(k), -m));
      cum = fadd(cum, e);
      if (e > 0.0f) last = k;
      if (y < cum) return k;
    }
    return last;  // y landed in the rounding gap above the last partial sum
  }
  return static_cast<int64_t>(uniform_below(r.w2, space.num_classes));
}

}  // namespace ddps

#include "common/logits.h"

namespace ddps {

// One pixel of ddps::p_posterior_sample; table: [T][2][4] float mixture weights.
template <typename scalar_t, typename label_t>
struct PPosteriorSampleFn {
  const scalar_t* logits;
  const label_t* xt;
  label_t* out;
  const int64_t* t;
  const float* table;
  int64_t plane;
  uint64_t seed;
  LabelSpace space;

  template <typename Load>
  DDPS_HD void pixel(const Load& load, int64_t b, int64_t i) const {
    out[i] = static_cast<label_t>(p_posterior_label(load, static_cast<int64_t>(xt[i]), table + 8 * t[b], space,
                                                    philox4x32_10(static_cast<uint64_t>(i), seed)));
  }

  DDPS_HD void operator()(int64_t b, int64_t i) const {
    pixel(pixel_logits(logits, space.num_classes, plane, b, i), b, i);
  }
};

}  // namespace ddps
