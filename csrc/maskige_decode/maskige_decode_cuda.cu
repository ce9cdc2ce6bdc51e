// ddps::maskige_decode on CUDA: the per-pixel functor of maskige_decode.h, one thread per pixel.
#include <torch/library.h>

#include "common/launch_cuda.cuh"
#include "maskige_decode/maskige_decode_op.h"

namespace ddps {
namespace {

at::Tensor maskige_decode_cuda(const at::Tensor& maskige, const at::Tensor& palette) {
  return maskige_decode_impl(maskige, palette,
                             [&](int64_t n, int64_t plane, const auto& fn) { cuda_for_each(maskige.device(), n, plane, fn); });
}

}  // namespace

TORCH_LIBRARY_IMPL(ddps, CUDA, m) { m.impl("maskige_decode", &maskige_decode_cuda); }

}  // namespace ddps
