// ddps::q_sample on CUDA: the same per-element math as the CPU loop (q_sample.h).
// Only c10/cuda headers: ATen/cuda/CUDAContext.h pulls in cuSPARSE/cuBLAS headers, which a
// compile-only toolkit (CI) lacks and these kernels do not need.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/labels.h"
#include "q_sample/q_sample.h"
#include "q_sample/q_sample_op.h"

namespace ddps {

template <typename scalar_t>
__global__ void q_sample_kernel(const scalar_t* __restrict__ src, scalar_t* __restrict__ dst,
                                const int64_t* __restrict__ t, const int64_t* __restrict__ keep,
                                int64_t n, int64_t plane, uint64_t seed, uint32_t num_classes) {
  // 64-bit indices throughout: label tensors past 2^31 elements are expected at large batch.
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    const uint64_t keep_threshold = static_cast<uint64_t>(keep[t[i / plane]]);
    const Philox4 r = philox4x32_10(static_cast<uint64_t>(i), seed);
    dst[i] = static_cast<scalar_t>(
        q_sample_label(static_cast<int64_t>(src[i]), keep_threshold, num_classes, r));
  }
}

at::Tensor q_sample_cuda(const at::Tensor& x0_in, const at::Tensor& t_in,
                         const at::Tensor& keep_in, const at::Tensor& seed_t,
                         int64_t num_classes) {
  q_sample_check(x0_in, t_in, keep_in, seed_t, num_classes);
  const c10::cuda::CUDAGuard guard(x0_in.device());
  const at::Tensor x0 = x0_in.contiguous();
  const at::Tensor t = t_in.contiguous();
  const at::Tensor keep = keep_in.contiguous();
  at::Tensor out = at::empty_like(x0, at::MemoryFormat::Contiguous);
  const int64_t n = x0.numel();
  if (n == 0) return out;
  const int64_t plane = n / x0.size(0);
  const uint64_t seed = static_cast<uint64_t>(seed_t.item<int64_t>());
  const int threads = 256;
  int sm_count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount,
                                        x0.device().index()));
  const int64_t max_blocks = static_cast<int64_t>(sm_count) * 32;
  const int blocks = static_cast<int>(std::min((n + threads - 1) / threads, max_blocks));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  DDPS_DISPATCH_LABELS(x0.scalar_type(), "q_sample_cuda", [&] {
    q_sample_kernel<scalar_t><<<blocks, threads, 0, stream>>>(
        x0.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), t.data_ptr<int64_t>(),
        keep.data_ptr<int64_t>(), n, plane, seed, static_cast<uint32_t>(num_classes));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

TORCH_LIBRARY_IMPL(ddps, CUDA, m) { m.impl("q_sample", &q_sample_cuda); }

}  // namespace ddps
