// ddps::renoise, device-independent part (see q_sample_op.h).
#pragma once

#include "common/sampling_op.h"
#include "renoise/renoise.h"

namespace ddps {

template <typename Launch>
at::Tensor renoise_impl(const at::Tensor& logits_in, const at::Tensor& t_in, const at::Tensor& table,
                        const at::Tensor& seed, int64_t num_classes, int64_t mask_index, const Launch& launch) {
  check_logits("renoise", logits_in, num_classes);
  check_levels("renoise", logits_in, t_in, table);
  const LabelSpace space = label_space(num_classes, mask_index, c10::nullopt);
  const uint64_t s = read_seed("renoise", seed);
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor t = t_in.contiguous();
  std::vector<int64_t> shape(logits.sizes().begin(), logits.sizes().end());
  shape.erase(shape.begin() + 1);
  at::Tensor out = at::empty(shape, logits.options().dtype(at::kLong));
  const int64_t n = out.numel();
  if (n == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "renoise", [&] {
    launch(logits.data_ptr<scalar_t>(), n, n / out.size(0),
           RenoiseFn<scalar_t>{logits.data_ptr<scalar_t>(), out.data_ptr<int64_t>(), t.data_ptr<int64_t>(),
                               table.data_ptr<int64_t>(), n / out.size(0), s, space});
  });
  return out;
}

}  // namespace ddps
