// Label tensors accepted by the sampling ops: int64, int32 and uint8.
#pragma once

#include <ATen/Dispatch.h>

#define DDPS_DISPATCH_LABELS(TYPE, NAME, ...)                   \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                \
                     AT_DISPATCH_CASE(at::kLong, __VA_ARGS__)   \
                     AT_DISPATCH_CASE(at::kInt, __VA_ARGS__)    \
                     AT_DISPATCH_CASE(at::kByte, __VA_ARGS__))
