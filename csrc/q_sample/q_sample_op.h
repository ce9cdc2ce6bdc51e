// Declarations shared by the CPU and CUDA implementations of ddps::q_sample.
#pragma once

#include <ATen/ATen.h>

namespace ddps {

// Checks that both backends apply before launching; the Python layer has already raised
// ValueError/TypeError for user errors, these guard direct torch.ops calls.
void q_sample_check(const at::Tensor& x0, const at::Tensor& t, const at::Tensor& keep_threshold,
                    const at::Tensor& seed, int64_t num_classes);

at::Tensor q_sample_cpu(const at::Tensor& x0, const at::Tensor& t,
                        const at::Tensor& keep_threshold, const at::Tensor& seed,
                        int64_t num_classes);

#ifdef DDPS_WITH_CUDA
at::Tensor q_sample_cuda(const at::Tensor& x0, const at::Tensor& t,
                         const at::Tensor& keep_threshold, const at::Tensor& seed,
                         int64_t num_classes);
#endif

}  // namespace ddps
