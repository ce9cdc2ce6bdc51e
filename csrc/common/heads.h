// The q, k, v views the attention kernels take: [B, heads, D, N] with a token's D values contiguous
// and tokens strided (a channels-last qkv convolution's output), addressed per (sample, head) pair;
// float32, bfloat16 or float16 (scalar_t), read through vec.h's load_lanes as float.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <type_traits>
#include <vector>

#include "common/vec.h"

namespace ddps {

// One (sample, head) of such a view: token n's row.
template <typename scalar_t>
struct Rows {
  const scalar_t* base;
  int64_t stride;
  const scalar_t* operator()(int64_t n) const { return base + n * stride; }
};

// Every (sample, head) of such a view. Pointer and strides are read from the tensor once:
// data_ptr() per token costs more than the token's arithmetic.
template <typename scalar_t>
struct Heads {
  const scalar_t* data;
  int64_t sample_stride, head_stride, token_stride, heads;
  explicit Heads(const at::Tensor& t)
      : data(t.data_ptr<scalar_t>()), sample_stride(t.stride(0)), head_stride(t.stride(1)), token_stride(t.stride(3)),
        heads(t.size(1)) {}
  Heads(const scalar_t* data, int64_t sample_stride, int64_t head_stride, int64_t token_stride, int64_t heads)
      : data(data), sample_stride(sample_stride), head_stride(head_stride), token_stride(token_stride), heads(heads) {}
  Rows<scalar_t> operator()(int64_t pair) const {
    return {data + pair / heads * sample_stride + pair % heads * head_stride, token_stride};
  }
};

// Checks q, k, v as the kernels take them: [B, heads, D, N] views of one shape and one dtype with
// D contiguous, D = 16, 32, 48 or 64, N >= 1; op names the kernel in the error. (dispatch_activations
// checks that the dtype is float32, bfloat16 or float16.)
inline void check_heads(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  for (const at::Tensor* t : {&q, &k, &v})
    TORCH_CHECK(t->dim() == 4 && t->scalar_type() == q.scalar_type() && t->sizes() == q.sizes() && t->stride(2) == 1,
                op, " (cpu): q, k, v must be [B, heads, D, N] views of one dtype with D contiguous, got ",
                t->scalar_type(), " ", t->sizes(), " with strides ", t->strides());
  TORCH_CHECK(q.size(2) % kLanes == 0 && q.size(2) <= 4 * kLanes && q.size(3) > 0, op,
              " (cpu): D must be a multiple of 16 up to 64 and N >= 1, got D=", q.size(2), ", N=", q.size(3));
}

// dq, dk, dv of the attention kernels' backwards for q of shape [B, heads, D, N], laid out
// token-major. packed: dq, dk, dv side by side per token, [B, N, 3, heads, D] in memory, the
// gradient of the channels-last qkv convolution's output as one tensor (which autograd would
// otherwise concatenate from three). Else three [B, N, heads, D] tensors: separate allocations,
// which stay below the allocator's threshold for fresh (page-faulting) memory where one of three
// times the size does not. In q's dtype.
template <typename scalar_t>
struct QkvGrads {
  std::vector<at::Tensor> tensors;
  scalar_t *dq, *dk, *dv;
  int64_t token_stride;  // elements from one token's rows to the next's

  QkvGrads(const at::Tensor& q, bool packed) : token_stride((packed ? 3 : 1) * q.size(1) * q.size(2)) {
    for (int i = 0; i < (packed ? 1 : 3); ++i)
      tensors.push_back(at::empty({q.size(0), q.size(3), token_stride}, q.options()));
    const int64_t hd = q.size(1) * q.size(2);
    dq = tensors[0].data_ptr<scalar_t>();
    dk = packed ? dq + hd : tensors[1].data_ptr<scalar_t>();
    dv = packed ? dk + hd : tensors[2].data_ptr<scalar_t>();
  }

  // packed: d(qkv) [B, 3 * heads * D, N]; else dq, dk, dv as [B, heads, D, N] views, q's layout.
  std::vector<at::Tensor> results(const at::Tensor& q) const {
    if (tensors.size() == 1) return {tensors[0].transpose(1, 2)};
    std::vector<at::Tensor> out;
    for (const at::Tensor& g : tensors)
      out.push_back(g.view({q.size(0), q.size(3), q.size(1), q.size(2)}).permute({0, 2, 3, 1}));
    return out;
  }
};

// f(std::integral_constant<int, D / 16>{}, scalar_t{}) for inputs like t: the kernels are compiled
// per head width and dtype.
template <typename F>
auto by_width(const at::Tensor& t, const char* op, F f) {
  using Result = decltype(f(std::integral_constant<int, 1>{}, float{}));
  Result result;
  dispatch_activations(t.scalar_type(), op, [&](auto zero) {
    switch (t.size(2) / kLanes) {
      case 1: result = f(std::integral_constant<int, 1>{}, zero); break;
      case 2: result = f(std::integral_constant<int, 2>{}, zero); break;
      case 3: result = f(std::integral_constant<int, 3>{}, zero); break;
      default: result = f(std::integral_constant<int, 4>{}, zero);
    }
  });
  return result;
}

}  // namespace ddps
