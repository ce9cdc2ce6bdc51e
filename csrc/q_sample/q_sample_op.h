// ddps::q_sample, device-independent part: checks, allocation, dtype dispatch. `launch(n, plane,
// fn)` runs fn(b, i) over every element on the CPU or the GPU.
#pragma once

#include "common/sampling_op.h"
#include "q_sample/q_sample.h"

namespace ddps {

template <typename Launch>
at::Tensor q_sample_impl(const at::Tensor& x0_in, const at::Tensor& t_in, const at::Tensor& table,
                         const at::Tensor& seed, int64_t num_classes, int64_t mask_index,
                         c10::optional<int64_t> ignore_index, const Launch& launch) {
  check_levels("q_sample", x0_in, t_in, table);
  const LabelSpace space = label_space(num_classes, mask_index, ignore_index);
  const uint64_t s = read_seed("q_sample", seed);
  const at::Tensor x0 = x0_in.contiguous();
  const at::Tensor t = t_in.contiguous();
  at::Tensor out = at::empty_like(x0, at::MemoryFormat::Contiguous);
  const int64_t n = x0.numel();
  if (n == 0) return out;
  DDPS_DISPATCH_LABELS(x0.scalar_type(), "q_sample", [&] {
    launch(n, n / x0.size(0),
           QSampleFn<scalar_t>{x0.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), t.data_ptr<int64_t>(),
                               table.data_ptr<int64_t>(), s, space});
  });
  return out;
}

}  // namespace ddps
