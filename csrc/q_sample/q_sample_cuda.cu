// ddps::q_sample on CUDA: the same per-element functor as the CPU loop (q_sample.h).
#include <torch/library.h>

#include "common/launch_cuda.cuh"
#include "q_sample/q_sample_op.h"

namespace ddps {
namespace {

at::Tensor q_sample_cuda(const at::Tensor& x0, const at::Tensor& t, const at::Tensor& table,
                         const at::Tensor& seed, int64_t num_classes, int64_t mask_index,
                         c10::optional<int64_t> ignore_index) {
  return q_sample_impl(x0, t, table, seed, num_classes, mask_index, ignore_index,
                       [&](int64_t n, int64_t plane, const auto& fn) { cuda_for_each(x0.device(), n, plane, fn); });
}

}  // namespace

TORCH_LIBRARY_IMPL(ddps, CUDA, m) { m.impl("q_sample", &q_sample_cuda); }

}  // namespace ddps
