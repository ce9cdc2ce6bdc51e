// ddps::p_posterior_sample, device-independent part (see q_sample_op.h).
#pragma once

#include "common/sampling_op.h"
#include "p_posterior_sample/p_posterior_sample.h"

namespace ddps {

template <typename Launch>
at::Tensor p_posterior_sample_impl(const at::Tensor& logits_in, const at::Tensor& xt_in, const at::Tensor& t_in,
                                   const at::Tensor& table, const at::Tensor& seed, int64_t num_classes,
                                   int64_t mask_index, c10::optional<int64_t> ignore_index,
                                   const Launch& launch) {
  check_logits("p_posterior_sample", logits_in, num_classes);
  check_levels("p_posterior_sample", xt_in, t_in, table);
  TORCH_CHECK(logits_in.device() == xt_in.device() && logits_in.size(0) == xt_in.size(0) &&
                  logits_in.numel() == xt_in.numel() * num_classes,
              "p_posterior_sample: logits must be [B, K, *spatial] for x_t [B, *spatial] on its device");
  TORCH_CHECK(table.scalar_type() == at::kFloat, "p_posterior_sample: the level table must be float32");
  const LabelSpace space = label_space(num_classes, mask_index, ignore_index);
  const uint64_t s = read_seed("p_posterior_sample", seed);
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor xt = xt_in.contiguous();
  const at::Tensor t = t_in.contiguous();
  at::Tensor out = at::empty_like(xt, at::MemoryFormat::Contiguous);
  const int64_t n = xt.numel();
  if (n == 0) return out;
  const int64_t plane = n / xt.size(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "p_posterior_sample", [&] {
    using logit_t = scalar_t;
    DDPS_DISPATCH_LABELS(xt.scalar_type(), "p_posterior_sample", [&] {
      launch(logits.data_ptr<logit_t>(), n, plane,
             PPosteriorSampleFn<logit_t, scalar_t>{logits.data_ptr<logit_t>(), xt.data_ptr<scalar_t>(),
                                                   out.data_ptr<scalar_t>(), t.data_ptr<int64_t>(),
                                                   table.data_ptr<float>(), plane, s, space});
    });
  });
  return out;
}

}  // namespace ddps
