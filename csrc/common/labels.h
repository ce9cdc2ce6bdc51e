// Label tensors and label spaces shared by the sampling ops.
#pragma once

#include <ATen/Dispatch.h>

#include "common/philox.h"

// Label tensors accepted by the sampling ops: int64, int32 and uint8.
#define DDPS_DISPATCH_LABELS(TYPE, NAME, ...)                   \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                \
                     AT_DISPATCH_CASE(at::kLong, __VA_ARGS__)   \
                     AT_DISPATCH_CASE(at::kInt, __VA_ARGS__)    \
                     AT_DISPATCH_CASE(at::kByte, __VA_ARGS__))

namespace ddps {

// K real classes 0..K-1, an optional absorbing [MASK] state (index K, or -1 when the transition
// has none) and an optional ignore value that passes through every sampler unchanged.
struct LabelSpace {
  uint32_t num_classes;
  int64_t mask_index;
  int64_t ignore_index;
  bool has_ignore;

  DDPS_HD bool ignored(int64_t label) const { return has_ignore && label == ignore_index; }
};

// The idx-th real class in increasing order once the classes lo <= hi are left out (lo == hi:
// only one is left out).
DDPS_HD int64_t skip_excluded(int64_t idx, int64_t lo, int64_t hi) {
  if (idx >= lo) ++idx;
  if (hi != lo && idx >= hi) ++idx;
  return idx;
}

}  // namespace ddps
