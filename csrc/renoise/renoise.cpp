// ddps::renoise on the CPU.
#include <torch/library.h>

#include "common/launch.h"
#include "renoise/renoise_op.h"

namespace ddps {
namespace {

at::Tensor renoise_cpu(const at::Tensor& logits, const at::Tensor& t, const at::Tensor& table, const at::Tensor& seed, int64_t num_classes, int64_t mask_index) {
  // A pixel reads K logits: smaller chunks than the label-only ops.
  return renoise_impl(logits, t, table, seed, num_classes, mask_index,
                    [](int64_t n, int64_t plane, const auto& fn) { cpu_for_each(n, plane, 1 << 10, fn); });
}

}  // namespace

TORCH_LIBRARY_IMPL(ddps, CPU, m) { m.impl("renoise", &renoise_cpu); }

}  // namespace ddps
