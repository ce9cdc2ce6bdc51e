// Reading one pixel's K logits from a contiguous [B, K, *spatial] tensor, as float.
#pragma once

#include "common/philox.h"

namespace ddps {

template <typename scalar_t>
struct PixelLogits {
  const scalar_t* base;  // the pixel's class-0 logit
  int64_t class_stride;  // pixels per sample

  DDPS_HD float operator()(int64_t k) const { return static_cast<float>(base[k * class_stride]); }
};

// Pixel i (batch b) of a [B, K, plane] logits tensor.
template <typename scalar_t>
DDPS_HD PixelLogits<scalar_t> pixel_logits(const scalar_t* logits, int64_t num_classes, int64_t plane,
                                           int64_t b, int64_t i) {
  return PixelLogits<scalar_t>{logits + b * (num_classes - 1) * plane + i, plane};
}

}  // namespace ddps
