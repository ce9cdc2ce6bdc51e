// ddps::q_sample on the CPU.
#include <torch/library.h>

#include "common/launch.h"
#include "q_sample/q_sample_op.h"

namespace ddps {
namespace {

at::Tensor q_sample_cpu(const at::Tensor& x0, const at::Tensor& t, const at::Tensor& table,
                        const at::Tensor& seed, int64_t num_classes, int64_t mask_index,
                        c10::optional<int64_t> ignore_index) {
  return q_sample_impl(x0, t, table, seed, num_classes, mask_index, ignore_index,
                       [](int64_t n, int64_t plane, const auto& fn) { cpu_for_each(n, plane, 1 << 14, fn); });
}

}  // namespace

TORCH_LIBRARY_IMPL(ddps, CPU, m) { m.impl("q_sample", &q_sample_cpu); }

}  // namespace ddps
