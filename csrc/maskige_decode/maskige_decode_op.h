// ddps::maskige_decode, device-independent part: checks, output, dtype dispatch.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include "maskige_decode/maskige_decode.h"

namespace ddps {

template <typename Launch>
at::Tensor maskige_decode_impl(const at::Tensor& maskige_in, const at::Tensor& palette_in, const Launch& launch) {
  TORCH_CHECK(maskige_in.dim() >= 2 && maskige_in.size(1) == 3, "maskige_decode: maskige must be [B, 3, *spatial]");
  TORCH_CHECK(palette_in.dim() == 2 && palette_in.size(1) == 3 && palette_in.size(0) >= 1 &&
                  palette_in.size(0) < (int64_t{1} << 31) && palette_in.scalar_type() == at::kFloat,
              "maskige_decode: palette must be float32 [rows, 3]");
  TORCH_CHECK(palette_in.device() == maskige_in.device(), "maskige_decode: maskige and palette must be on one device");
  const at::Tensor maskige = maskige_in.contiguous();
  const at::Tensor palette = palette_in.contiguous();
  std::vector<int64_t> shape(maskige.sizes().begin(), maskige.sizes().end());
  shape.erase(shape.begin() + 1);
  at::Tensor out = at::empty(shape, maskige.options().dtype(at::kLong));
  const int64_t n = out.numel();
  if (n == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, maskige.scalar_type(), "maskige_decode", [&] {
    launch(n, n / out.size(0),
           MaskigeDecodeFn<scalar_t>{maskige.data_ptr<scalar_t>(), palette.data_ptr<float>(), out.data_ptr<int64_t>(),
                                     n / out.size(0), static_cast<int32_t>(palette.size(0))});
  });
  return out;
}

}  // namespace ddps
