// ddps::q_posterior_sample, device-independent part (see q_sample_op.h).
#pragma once

#include "common/sampling_op.h"
#include "q_posterior_sample/q_posterior_sample.h"

namespace ddps {

template <typename Launch>
at::Tensor q_posterior_sample_impl(const at::Tensor& x0_in, const at::Tensor& xt_in, const at::Tensor& t_in,
                                   const at::Tensor& table, const at::Tensor& seed, int64_t num_classes,
                                   int64_t mask_index, c10::optional<int64_t> ignore_index,
                                   const Launch& launch) {
  check_levels("q_posterior_sample", xt_in, t_in, table);
  TORCH_CHECK(x0_in.sizes() == xt_in.sizes() && x0_in.scalar_type() == xt_in.scalar_type() &&
                  x0_in.device() == xt_in.device(),
              "q_posterior_sample: x0 and x_t must share shape, dtype and device");
  const LabelSpace space = label_space(num_classes, mask_index, ignore_index);
  const uint64_t s = read_seed("q_posterior_sample", seed);
  const at::Tensor x0 = x0_in.contiguous();
  const at::Tensor xt = xt_in.contiguous();
  const at::Tensor t = t_in.contiguous();
  at::Tensor out = at::empty_like(xt, at::MemoryFormat::Contiguous);
  const int64_t n = xt.numel();
  if (n == 0) return out;
  DDPS_DISPATCH_LABELS(xt.scalar_type(), "q_posterior_sample", [&] {
    launch(n, n / xt.size(0),
           QPosteriorSampleFn<scalar_t>{x0.data_ptr<scalar_t>(), xt.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                                        t.data_ptr<int64_t>(), table.data_ptr<int64_t>(), s, space});
  });
  return out;
}

}  // namespace ddps
