// ddps::p_posterior_sample on the CPU.
#include <torch/library.h>

#include "common/launch.h"
#include "p_posterior_sample/p_posterior_sample_op.h"

namespace ddps {
namespace {

at::Tensor p_posterior_sample_cpu(const at::Tensor& logits, const at::Tensor& xt, const at::Tensor& t, const at::Tensor& table, const at::Tensor& seed, int64_t num_classes, int64_t mask_index, c10::optional<int64_t> ignore_index) {
  return p_posterior_sample_impl(logits, xt, t, table, seed, num_classes, mask_index, ignore_index,
                    [&](const auto* data, int64_t n, int64_t plane, const auto& fn) {
                      cpu_for_each_pixel(data, num_classes, n, plane, fn);
                    });
}

}  // namespace

TORCH_LIBRARY_IMPL(ddps, CPU, m) { m.impl("p_posterior_sample", &p_posterior_sample_cpu); }

}  // namespace ddps
