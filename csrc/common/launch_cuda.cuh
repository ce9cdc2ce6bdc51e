// CUDA launcher: f(b, i[, words]) for every element i of a [B, plane] index space, grid-stride, 64-bit
// indices (label tensors past 2^31 elements are expected at large batch).
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <type_traits>

#include "common/philox.h"

namespace ddps {

template <typename F>
__global__ void for_each_kernel(int64_t n, int64_t plane, F f) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    // Label ops take the element's two Philox words (see cpu_for_each); the logits ops draw their own.
    if constexpr (std::is_invocable_v<const F&, int64_t, int64_t, Words2>)
      f(i / plane, i, element_words(static_cast<uint64_t>(i), f.seed));
    else
      f(i / plane, i);
  }
}

template <typename F>
void cuda_for_each(const c10::Device& device, int64_t n, int64_t plane, const F& f) {
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(device);
  int sm_count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device.index()));
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((n + threads - 1) / threads, int64_t{sm_count} * 32);
  for_each_kernel<<<static_cast<int>(blocks), threads, 0, c10::cuda::getCurrentCUDAStream()>>>(n, plane, f);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace ddps
