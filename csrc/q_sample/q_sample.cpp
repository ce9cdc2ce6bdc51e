// ddps::q_sample on the CPU: one pass over the labels, at::parallel_for over elements.
#include "q_sample/q_sample_op.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <torch/library.h>

#include "common/labels.h"
#include "q_sample/q_sample.h"

namespace ddps {

void q_sample_check(const at::Tensor& x0, const at::Tensor& t, const at::Tensor& keep_threshold,
                    const at::Tensor& seed, int64_t num_classes) {
  TORCH_CHECK(x0.dim() >= 1, "q_sample: x0 must have a batch dimension");
  TORCH_CHECK(t.dim() == 1 && t.size(0) == x0.size(0) && t.scalar_type() == at::kLong,
              "q_sample: t must be int64 [B] with B = x0.size(0)");
  TORCH_CHECK(keep_threshold.dim() == 1 && keep_threshold.scalar_type() == at::kLong,
              "q_sample: keep_threshold must be int64 [T + 1]");
  TORCH_CHECK(t.device() == x0.device() && keep_threshold.device() == x0.device(),
              "q_sample: x0, t and keep_threshold must be on one device");
  TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong && seed.device().is_cpu(),
              "q_sample: seed must be a CPU int64 scalar tensor");
  TORCH_CHECK(num_classes >= 1 && num_classes <= (int64_t{1} << 31),
              "q_sample: num_classes out of range");
}

at::Tensor q_sample_cpu(const at::Tensor& x0_in, const at::Tensor& t_in,
                        const at::Tensor& keep_in, const at::Tensor& seed_t,
                        int64_t num_classes) {
  q_sample_check(x0_in, t_in, keep_in, seed_t, num_classes);
  const at::Tensor x0 = x0_in.contiguous();
  const at::Tensor t = t_in.contiguous();
  const at::Tensor keep = keep_in.contiguous();
  at::Tensor out = at::empty_like(x0, at::MemoryFormat::Contiguous);
  const int64_t n = x0.numel();
  if (n == 0) return out;
  const int64_t plane = n / x0.size(0);
  const uint64_t seed = static_cast<uint64_t>(seed_t.item<int64_t>());
  const uint32_t k = static_cast<uint32_t>(num_classes);
  const int64_t* tp = t.data_ptr<int64_t>();
  const int64_t* kp = keep.data_ptr<int64_t>();
  DDPS_DISPATCH_LABELS(x0.scalar_type(), "q_sample_cpu", [&] {
    const scalar_t* src = x0.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, n, 1 << 14, [&](int64_t begin, int64_t end) {
      // Walk the chunk one sample at a time so the inner loop has a constant threshold and no
      // per-element division (it then vectorises).
      for (int64_t row_start = begin; row_start < end;) {
        const int64_t b = row_start / plane;
        const int64_t row_end = std::min(end, (b + 1) * plane);
        const uint64_t keep_threshold = static_cast<uint64_t>(kp[tp[b]]);
        for (int64_t i = row_start; i < row_end; ++i) {
          const Philox4 r = philox4x32_10(static_cast<uint64_t>(i), seed);
          dst[i] = static_cast<scalar_t>(
              q_sample_label(static_cast<int64_t>(src[i]), keep_threshold, k, r));
        }
        row_start = row_end;
      }
    });
  });
  return out;
}

TORCH_LIBRARY_IMPL(ddps, CPU, m) { m.impl("q_sample", &q_sample_cpu); }

}  // namespace ddps
