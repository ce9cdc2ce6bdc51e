// ddps::renoise on CUDA: the same per-pixel functor as the CPU loop.
#include <torch/library.h>

#include "common/launch_cuda.cuh"
#include "renoise/renoise_op.h"

namespace ddps {
namespace {

at::Tensor renoise_cuda(const at::Tensor& logits, const at::Tensor& t, const at::Tensor& table, const at::Tensor& seed, int64_t num_classes, int64_t mask_index) {
  return renoise_impl(logits, t, table, seed, num_classes, mask_index,
                    [&](const auto*, int64_t n, int64_t plane, const auto& fn) { cuda_for_each(logits.device(), n, plane, fn); });
}

}  // namespace

TORCH_LIBRARY_IMPL(ddps, CUDA, m) { m.impl("renoise", &renoise_cuda); }

}  // namespace ddps
