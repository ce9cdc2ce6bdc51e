// ddps::channel_layer_norm on the CPU for channel-major activations: x [B, C, P] contiguous (the
// NCHW tensors of a user's own model; channels-last input goes to torch's layer_norm instead),
// float32, bfloat16 or float16 loaded as float, computed in float (the statistics' sums in double),
// outputs rounded once on store.
// Each task takes a tile of kTile pixels of one sample and walks the channels' rows of that tile
// in order (kTile contiguous values per row, which the prefetcher streams), keeping per-pixel sums
// in an L1 buffer. Forward: one pass for the statistics, one for y. Backward: one pass for the
// per-pixel sums, one for dx; dg from per-tile partials summed in a fixed order, so results do not
// depend on the thread count.
// No fused multiply-adds (the extension's default), although nothing here must match another
// backend bit for bit: the passes are bound by memory, and a fused u - mean_c(u) in the backward
// would leave u's rounding where C = 1 makes dx exactly 0.

#include <torch/library.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/vec.h"

namespace ddps {
namespace {

// Pixels per task: a row of the tile is 2 KB of float, and the tile's buffers (3 x 2 KB) stay in
// L1 while the rows stream past. Rows C apart in memory are P floats apart, a power of two for the
// UNet's shapes: walking one short tile column down the channels instead maps every row to the
// same cache sets.
constexpr int64_t kTile = 512;

typedef double DoubleV __attribute__((vector_size(8 * kLanes)));

struct Tile {
  int64_t C, P, b, p0, n;  // sample b, pixels p0 .. p0 + n - 1
  int64_t row(int64_t c) const { return (b * C + c) * P + p0; }
};

// f(p, count) for every vector of the tile's pixels; count < kLanes only at the tile's end, and a
// constant elsewhere (a count known only at run time sends every load and store through memory).
template <typename F>
DDPS_INLINE inline void tile_vectors(const Tile& t, F&& f) {
  int64_t p = 0;
  for (; p + kLanes <= t.n; p += kLanes) f(p, kLanes);
  if (p < t.n) f(p, static_cast<int>(t.n - p));
}

// mean and rstd of the tile's pixels, and y. The sums are of x minus the pixel's channel-0 value
// (shifted by a sample of the data, the variance does not cancel catastrophically when the mean is
// large against the spread), in double: in float, sums over 256 channels put 2.7e-6 of relative
// error into rstd against the reference's 4e-7, and the pass is bound by memory, not by the adds.
template <typename scalar_t>
DDPS_CLONES void forward_tile(const Tile& t, const scalar_t* x, const float* g, double eps, scalar_t* y,
                              float* mean, float* rstd) {
  alignas(64) float origin[kTile], m[kTile], r[kTile];
  alignas(64) double s1[kTile] = {}, s2[kTile] = {};
  tile_vectors(t, [&](int64_t p, int count) DDPS_INLINE {
    store_lanes(origin + p, load_lanes(x + t.row(0) + p, count));
  });
  for (int64_t c = 1; c < t.C; ++c) {
    const scalar_t* row = x + t.row(c);
    tile_vectors(t, [&](int64_t p, int count) DDPS_INLINE {
      const DoubleV d = __builtin_convertvector(load_lanes(row + p, count) - load_lanes(origin + p), DoubleV);
      *reinterpret_cast<DoubleV*>(s1 + p) += d;
      *reinterpret_cast<DoubleV*>(s2 + p) += d * d;
    });
  }
  const int64_t stat = t.b * t.P + t.p0;
  for (int64_t p = 0; p < t.n; ++p) {
    const double shift = s1[p] / static_cast<double>(t.C);
    const double var = std::max(s2[p] / static_cast<double>(t.C) - shift * shift, 0.0);
    mean[stat + p] = m[p] = static_cast<float>(origin[p] + shift);
    rstd[stat + p] = r[p] = static_cast<float>(1.0 / std::sqrt(var + eps));
  }
  for (int64_t c = 0; c < t.C; ++c) {
    const scalar_t* row = x + t.row(c);
    const float gc = g[c];
    tile_vectors(t, [&](int64_t p, int count) DDPS_INLINE {
      const FloatV v = (load_lanes(row + p, count) - load_lanes(m + p)) * (load_lanes(r + p) * gc);
      store_lanes(y + t.row(c) + p, v, count);
    });
  }
}

// dx of the tile, and dg's partial sums over its pixels (dg_part[0 .. C)). With xh = (x - mean)
// * rstd and u = dy * g: dx = rstd * (u - mean_c(u) - xh * mean_c(u * xh)), dg = sum dy * xh.
template <typename scalar_t>
DDPS_CLONES void backward_tile(const Tile& t, const scalar_t* dy, const scalar_t* x, const float* g,
                               const float* mean, const float* rstd, scalar_t* dx, float* dg_part) {
  alignas(64) float m[kTile], r[kTile], a1[kTile] = {}, a2[kTile] = {};
  const int64_t stat = t.b * t.P + t.p0;
  tile_vectors(t, [&](int64_t p, int count) DDPS_INLINE {
    store_lanes(m + p, load_lanes(mean + stat + p, count));
    store_lanes(r + p, load_lanes(rstd + stat + p, count));
  });
  // Lanes past the tile's end load zeros: their xh and dy are 0 and add nothing.
  auto xhat = [&](const scalar_t* row, int64_t p, int count) DDPS_INLINE {
    return (load_lanes(row + p, count) - load_lanes(m + p)) * load_lanes(r + p);
  };
  for (int64_t c = 0; c < t.C; ++c) {
    const scalar_t *xr = x + t.row(c), *dyr = dy + t.row(c);
    const float gc = g[c];
    FloatV dg{};
    tile_vectors(t, [&](int64_t p, int count) DDPS_INLINE {
      const FloatV xh = xhat(xr, p, count), d = load_lanes(dyr + p, count);
      dg += d * xh;
      store_lanes(a1 + p, load_lanes(a1 + p) + d * gc);
      store_lanes(a2 + p, load_lanes(a2 + p) + d * gc * xh);
    });
    dg_part[c] = lanes_sum(dg)[0];
  }
  const float inv_c = 1.0f / static_cast<float>(t.C);
  tile_vectors(t, [&](int64_t p, int) DDPS_INLINE {
    store_lanes(a1 + p, load_lanes(a1 + p) * inv_c);
    store_lanes(a2 + p, load_lanes(a2 + p) * inv_c);
  });
  for (int64_t c = 0; c < t.C; ++c) {
    const scalar_t *xr = x + t.row(c), *dyr = dy + t.row(c);
    const float gc = g[c];
    tile_vectors(t, [&](int64_t p, int count) DDPS_INLINE {
      const FloatV u = load_lanes(dyr + p, count) * gc;
      const FloatV v = (u - load_lanes(a1 + p) - xhat(xr, p, count) * load_lanes(a2 + p)) * load_lanes(r + p);
      store_lanes(dx + t.row(c) + p, v, count);
    });
  }
}

struct Shape {
  int64_t B, C, P;
  int64_t tiles() const { return (P + kTile - 1) / kTile; }  // per sample
};

// x's shape, once x and g are checked.
Shape checked_shape(const at::Tensor& x, const at::Tensor& g) {
  TORCH_CHECK(x.dim() >= 3 && x.is_contiguous() && x.numel() > 0,
              "channel_layer_norm (cpu): x must be a non-empty contiguous [B, C, *spatial] tensor");
  TORCH_CHECK(g.numel() == x.size(1) && g.is_contiguous() && g.scalar_type() == at::kFloat,
              "channel_layer_norm (cpu): g must be contiguous float32 with C elements");
  return {x.size(0), x.size(1), x.numel() / (x.size(0) * x.size(1))};
}

// f(tile, index) for every tile of every sample, in parallel.
template <typename F>
void for_each_tile(const Shape& s, F f) {
  const int64_t tiles = s.tiles();
  at::parallel_for(0, s.B * tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t p0 = i % tiles * kTile;
      f(Tile{s.C, s.P, i / tiles, p0, std::min(kTile, s.P - p0)}, i);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cpu(const at::Tensor& x, const at::Tensor& g, double eps) {
  const Shape s = checked_shape(x, g);
  at::Tensor y = at::empty_like(x), mean = at::empty({s.B, s.P}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty_like(mean);
  dispatch_activations(x.scalar_type(), "channel_layer_norm", [&](auto zero) {
    using scalar_t = decltype(zero);
    const scalar_t* px = x.data_ptr<scalar_t>();
    scalar_t* py = y.data_ptr<scalar_t>();
    for_each_tile(s, [&](const Tile& t, int64_t) {
      forward_tile(t, px, g.data_ptr<float>(), eps, py, mean.data_ptr<float>(), rstd.data_ptr<float>());
    });
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor> backward_cpu(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& g,
                                                const at::Tensor& mean, const at::Tensor& rstd) {
  const Shape s = checked_shape(x, g);
  const int64_t C = s.C;
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type() && grad.is_contiguous(),
              "channel_layer_norm (cpu): grad must be contiguous like x, of its dtype");
  TORCH_CHECK(mean.numel() == s.B * s.P && rstd.numel() == s.B * s.P && mean.is_contiguous() && rstd.is_contiguous() &&
                  mean.scalar_type() == at::kFloat && rstd.scalar_type() == at::kFloat,
              "channel_layer_norm (cpu): mean and rstd must be the forward's float32 [B, pixels]");
  at::Tensor dx = at::empty_like(x);
  std::vector<float> parts(s.B * s.tiles() * C);
  dispatch_activations(x.scalar_type(), "channel_layer_norm_backward", [&](auto zero) {
    using scalar_t = decltype(zero);
    const scalar_t *pdy = grad.data_ptr<scalar_t>(), *px = x.data_ptr<scalar_t>();
    scalar_t* pdx = dx.data_ptr<scalar_t>();
    for_each_tile(s, [&](const Tile& t, int64_t i) {
      backward_tile(t, pdy, px, g.data_ptr<float>(), mean.data_ptr<float>(), rstd.data_ptr<float>(), pdx,
                    parts.data() + i * C);
    });
  });
  std::vector<double> sums(C, 0.0);
  for (int64_t i = 0; i < s.B * s.tiles(); ++i)
    for (int64_t c = 0; c < C; ++c) sums[c] += parts[i * C + c];
  at::Tensor dg = at::empty({C}, g.options());
  for (int64_t c = 0; c < C; ++c) dg.data_ptr<float>()[c] = static_cast<float>(sums[c]);
  return {dx, dg};
}

}  // namespace

TORCH_LIBRARY_IMPL(ddps, CPU, m) {
  m.impl("channel_layer_norm", &forward_cpu);
  m.impl("channel_layer_norm_backward", &backward_cpu);
}

}  // namespace ddps
