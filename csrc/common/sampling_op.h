// Host-side glue shared by the sampling ops' CPU and CUDA implementations: argument checks
// (the Python layer has already raised ValueError/TypeError for user errors; these guard direct
// torch.ops calls), the seed and the label space.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include "common/labels.h"

namespace ddps {

inline void check_levels(const char* op, const at::Tensor& labels, const at::Tensor& t,
                         const at::Tensor& table) {
  TORCH_CHECK(labels.dim() >= 1, op, ": labels must have a batch dimension");
  TORCH_CHECK(t.dim() == 1 && t.size(0) == labels.size(0) && t.scalar_type() == at::kLong, op,
              ": t must be int64 [B] with B = the batch size");
  TORCH_CHECK(t.device() == labels.device() && table.device() == labels.device(), op,
              ": inputs and the level table must be on one device");
  TORCH_CHECK(table.is_contiguous(), op, ": the level table must be contiguous");
}

inline uint64_t read_seed(const char* op, const at::Tensor& seed) {
  TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong && seed.device().is_cpu(), op,
              ": seed must be a CPU int64 scalar tensor");
  return static_cast<uint64_t>(seed.item<int64_t>());
}

inline LabelSpace label_space(int64_t num_classes, int64_t mask_index,
                              const c10::optional<int64_t>& ignore_index) {
  TORCH_CHECK(num_classes >= 2 && num_classes < (int64_t{1} << 31), "num_classes out of range");
  return LabelSpace{static_cast<uint32_t>(num_classes), mask_index, ignore_index.value_or(0),
                    ignore_index.has_value()};
}

// [B, K, *spatial] logits -> (batch, classes, pixels per sample).
inline void check_logits(const char* op, const at::Tensor& logits, int64_t num_classes) {
  TORCH_CHECK(logits.dim() >= 2 && logits.size(1) == num_classes, op,
              ": logits must be [B, K, *spatial] with K = num_classes");
}

}  // namespace ddps
