// ddps::group_norm_film_silu on the CPU: activations in channels-last memory, the layout of the
// fused UNet (float32, bfloat16 or float16: loaded as float, every sum and the output in float,
// rounded once on store; parameters float32). Forward: one statistics pass, one output pass (the reference makes seven).
// Backward: one pass for the per-channel sums, one for dx. Every sum is over fixed chunks of
// pixels combined in a fixed order, so the results do not depend on the thread count.
// This file alone is compiled with fused multiply-adds: nothing here must match another backend
// bit for bit (the sampling kernels must, hence -ffp-contract=off for the rest of the extension),
// and the exp polynomial is most of the work (1.7x faster with FMAs on the reference CPU).
#pragma GCC optimize("fp-contract=fast")

#include <torch/library.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "common/vec.h"

namespace ddps {
namespace {

constexpr int64_t kChunk = 256;  // pixels per partial sum

// The per-(sample, channel) map of the forward: z = (x - mean) * a + b, GroupNorm, its affine
// and FiLM folded together (x - mean first: exact where x is close to the mean), y = silu(z).
struct Affine {
  std::vector<float> mean, a, b;  // [B, C]
};

struct Shape {
  int64_t batch, channels, pixels, groups;
  int64_t chunks() const { return (pixels + kChunk - 1) / kChunk; }
  int64_t group_size() const { return channels / groups; }
};

// The loops below run as clones (DDPS_CLONES), with the functors inlined into each clone.

// Sums over pixels p0 .. p1 - 1 of sample b of the two quantities f gives per channel vector, into
// out[0 .. 2C). Blocks of kBlock channel vectors are summed in registers down the chunk's pixels
// (the chunk, a few hundred KB, stays in L2 for the next block); the channels left over are summed
// pixel by pixel, each a contiguous row, into out itself (2C floats, in L1): walking one channel
// vector down all the pixels instead strides by C floats, which for C = 256 puts every line into
// a few L1 sets, and prefetched lines are evicted before use. Either way each channel's sum runs
// over the pixels in order.
template <typename F>
DDPS_CLONES void chunk_sums(const Shape& s, F& f, int64_t b, int64_t p0, int64_t p1, float* out) {
  constexpr int kBlock = 8;  // 16 accumulators, the block's loop-invariant vectors and temporaries fit the 32 registers
  const int64_t C = s.channels;
  int64_t c0 = 0;
  for (; c0 + kBlock * kLanes <= C; c0 += kBlock * kLanes) {
    FloatV s0[kBlock] = {}, s1[kBlock] = {};
    for (int64_t p = p0; p < p1; ++p)
      for (int j = 0; j < kBlock; ++j) {
        FloatV v0, v1;
        f(b, p, c0 + j * kLanes, kLanes, v0, v1);
        s0[j] += v0;
        s1[j] += v1;
      }
    for (int j = 0; j < kBlock; ++j) {
      store_lanes(out + c0 + j * kLanes, s0[j]);
      store_lanes(out + C + c0 + j * kLanes, s1[j]);
    }
  }
  std::fill(out + c0, out + C, 0.0f);
  std::fill(out + C + c0, out + 2 * C, 0.0f);
  auto add = [&](int64_t p, int64_t c, int count) DDPS_INLINE {
    FloatV v0, v1;
    f(b, p, c, count, v0, v1);
    store_lanes(out + c, load_lanes(out + c, count) + v0, count);
    store_lanes(out + C + c, load_lanes(out + C + c, count) + v1, count);
  };
  for (int64_t p = p0; p < p1 && c0 < C; ++p) {
    int64_t c = c0;
    for (; c + 2 * kLanes <= C; c += 2 * kLanes) {  // two independent chains per step, as in vectors_range
      add(p, c, kLanes);
      add(p, c + kLanes, kLanes);
    }
    for (; c < C; c += kLanes) add(p, c, static_cast<int>(std::min<int64_t>(kLanes, C - c)));
  }
}

// Per (sample, channel) sums of the two quantities f(b, p, c, count, v0, v1) gives, in double:
// sums[(b * C + c) * 2 + j]. Chunks of kChunk pixels are summed in float, then in a fixed order.
template <typename F>
std::vector<double> channel_sums(const Shape& s, F f) {
  const int64_t C = s.channels, chunks = s.chunks();
  std::vector<float> partial(s.batch * chunks * C * 2);
  at::parallel_for(0, s.batch * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / chunks, p0 = item % chunks * kChunk;
      chunk_sums(s, f, b, p0, std::min(p0 + kChunk, s.pixels), partial.data() + item * C * 2);
    }
  });
  std::vector<double> sums(s.batch * C * 2, 0.0);
  for (int64_t item = 0; item < s.batch * chunks; ++item) {
    const int64_t b = item / chunks;
    for (int64_t c = 0; c < C; ++c)
      for (int j = 0; j < 2; ++j) sums[(b * C + c) * 2 + j] += partial[item * C * 2 + j * C + c];
  }
  return sums;
}

template <typename G>
DDPS_CLONES void vectors_range(const Shape& s, G& g, int64_t begin, int64_t end) {
  const int64_t C = s.channels, P = s.pixels;
  for (int64_t i = begin; i < end; ++i) {
    const int64_t b = i / P, p = i % P;
    int64_t c = 0;
    // Two vectors per step: each is one long dependency chain (exp, division), and two
    // independent ones overlap in the pipeline.
    for (; c + 2 * kLanes <= C; c += 2 * kLanes) {
      g(b, p, c, kLanes);
      g(b, p, c + kLanes, kLanes);
    }
    for (; c < C; c += kLanes) g(b, p, c, static_cast<int>(std::min<int64_t>(kLanes, C - c)));
  }
}

// Applies g(b, p, c, count) to every vector of channels of every pixel, in parallel.
template <typename G>
void for_each_vector(const Shape& s, G g) {
  at::parallel_for(0, s.batch * s.pixels, kChunk,
                   [&](int64_t begin, int64_t end) { vectors_range(s, g, begin, end); });
}

struct Inputs {
  Shape shape;
  const float *weight, *bias, *scale, *shift;  // scale, shift: [B, C] or null
  float film(int64_t b, int64_t c) const { return scale ? scale[b * shape.channels + c] + 1.0f : 1.0f; }
};

Inputs inputs(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
              const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift, int64_t groups) {
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "group_norm_film_silu (cpu): x must be a channels-last [B, C, H, W] tensor");
  const int64_t C = x.size(1);
  TORCH_CHECK(groups > 0 && C % groups == 0, "group_norm_film_silu: groups must divide C");
  for (const at::Tensor* t : {&weight, &bias})
    TORCH_CHECK(t->numel() == C && t->is_contiguous() && t->scalar_type() == at::kFloat,
                "group_norm_film_silu (cpu): weight and bias must be contiguous float32 [C]");
  TORCH_CHECK(scale.has_value() == shift.has_value(), "group_norm_film_silu: scale and shift go together");
  if (scale)
    for (const at::Tensor* t : {&*scale, &*shift})
      TORCH_CHECK(t->numel() == x.size(0) * C && t->is_contiguous() && t->scalar_type() == at::kFloat,
                  "group_norm_film_silu (cpu): scale and shift must be contiguous float32 [B, C]");
  return Inputs{{x.size(0), C, x.size(2) * x.size(3), groups}, weight.data_ptr<float>(),
                bias.data_ptr<float>(), scale ? scale->data_ptr<float>() : nullptr,
                shift ? shift->data_ptr<float>() : nullptr};
}

// The forward on x (channels-last, scalar_t) into out; mean and rstd [B, groups].
template <typename scalar_t>
void forward_kernel(const Inputs& in, const scalar_t* px, scalar_t* out, float* mean, float* rstd, double eps) {
  const Shape& s = in.shape;
  const int64_t C = s.channels, P = s.pixels, Cg = s.group_size();
  // Sums of x - x[pixel 0] per channel: shifted by a sample of the data, the variance does not
  // cancel catastrophically when the mean is large against the spread.
  std::vector<float> origin(s.batch * C);
  for (int64_t b = 0; b < s.batch; ++b)
    for (int64_t c = 0; c < C; ++c) origin[b * C + c] = static_cast<float>(px[b * P * C + c]);
  // The lambdas index raw pointers: std::vector::operator[] is not inlined into the clones.
  const float* o = origin.data();
  const auto sums = channel_sums(s, [&](int64_t b, int64_t p, int64_t c, int count, FloatV& v0, FloatV& v1) DDPS_INLINE {
    const FloatV d = load_lanes(px + (b * P + p) * C + c, count) - load_lanes(o + b * C + c, count);
    v0 = d;
    v1 = d * d;
  });
  Affine f{std::vector<float>(s.batch * C), std::vector<float>(s.batch * C), std::vector<float>(s.batch * C)};
  for (int64_t b = 0; b < s.batch; ++b)
    for (int64_t g = 0; g < s.groups; ++g) {
      double sum = 0, sumsq = 0;
      for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
        const double o = origin[b * C + c], s1 = sums[(b * C + c) * 2], s2 = sums[(b * C + c) * 2 + 1];
        sum += s1 + P * o;
        sumsq += s2 + 2 * o * s1 + P * o * o;
      }
      const double n = static_cast<double>(P * Cg), m = sum / n;
      const double r = 1.0 / std::sqrt(std::max(sumsq / n - m * m, 0.0) + eps);
      mean[b * s.groups + g] = static_cast<float>(m);
      rstd[b * s.groups + g] = static_cast<float>(r);
      for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
        const double k = in.film(b, c);
        f.mean[b * C + c] = static_cast<float>(m);
        f.a[b * C + c] = static_cast<float>(in.weight[c] * r * k);
        f.b[b * C + c] = static_cast<float>(in.bias[c] * k + (in.shift ? in.shift[b * C + c] : 0.0f));
      }
    }
  const float *fm = f.mean.data(), *fa = f.a.data(), *fb = f.b.data();
  for_each_vector(s, [&](int64_t b, int64_t p, int64_t c, int count) DDPS_INLINE {
    const int64_t j = b * C + c;
    const FloatV z =
        (load_lanes(px + (b * P + p) * C + c, count) - load_lanes(fm + j, count)) * load_lanes(fa + j, count) +
        load_lanes(fb + j, count);
    store_lanes(out + (b * P + p) * C + c, z / (1.0f + exp_lanes(-z)), count);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                           const at::Tensor& bias,
                                                           const std::optional<at::Tensor>& scale,
                                                           const std::optional<at::Tensor>& shift, int64_t groups,
                                                           double eps) {
  const Inputs in = inputs(x, weight, bias, scale, shift, groups);
  at::Tensor mean = at::empty({in.shape.batch, in.shape.groups}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty_like(mean), y = at::empty_like(x);
  dispatch_activations(x.scalar_type(), "group_norm_film_silu", [&](auto zero) {
    using scalar_t = decltype(zero);
    forward_kernel(in, x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), mean.data_ptr<float>(), rstd.data_ptr<float>(),
                   eps);
  });
  return {y, mean, rstd};
}

// The backward on grad and x (channels-last, scalar_t): dx (scalar_t), and dz, a float32 buffer
// for the first pass (dx itself where scalar_t is float); the rest float32.
template <typename scalar_t>
void backward_kernel(const Inputs& in, const scalar_t* dy, const scalar_t* px, scalar_t* out, float* dzp,
                     const float* mean, const float* rstd, float* dweight, float* dbias, float* dscale,
                     float* dshift) {
  const Shape& s = in.shape;
  const int64_t C = s.channels, P = s.pixels, Cg = s.group_size(), G = s.groups;
  // Per (b, c): n = (x - nm) * nr, z = n * za + zb.
  std::vector<float> nm(s.batch * C), nr(s.batch * C), za(s.batch * C), zb(s.batch * C);
  for (int64_t b = 0; b < s.batch; ++b)
    for (int64_t c = 0; c < C; ++c) {
      const float r = rstd[b * G + c / Cg], m = mean[b * G + c / Cg];
      const float k = in.film(b, c);
      nm[b * C + c] = m;
      nr[b * C + c] = r;
      za[b * C + c] = in.weight[c] * k;
      zb[b * C + c] = in.bias[c] * k + (in.shift ? in.shift[b * C + c] : 0.0f);
    }
  // n of one vector of channels at one pixel (raw pointers, as in the forward).
  const float *pm = nm.data(), *pr = nr.data(), *pa = za.data(), *pb = zb.data();
  auto normalized = [&](int64_t i, int64_t j, int count) DDPS_INLINE {
    return (load_lanes(px + i, count) - load_lanes(pm + j, count)) * load_lanes(pr + j, count);
  };
  // The first pass keeps dz (in float): the second pass then reads it back instead of evaluating
  // the exp again (the exp is most of the work; one more read is not).
  const auto sums = channel_sums(s, [&](int64_t b, int64_t p, int64_t c, int count, FloatV& v0, FloatV& v1) DDPS_INLINE {
    const int64_t i = (b * P + p) * C + c, j = b * C + c;
    const FloatV n = normalized(i, j, count);
    const FloatV z = n * load_lanes(pa + j, count) + load_lanes(pb + j, count);
    const FloatV sig = 1.0f / (1.0f + exp_lanes(-z));
    const FloatV dz = load_lanes(dy + i, count) * (sig * (1.0f + z * (1.0f - sig)));
    store_lanes(dzp + i, dz, count);
    v0 = dz;
    v1 = dz * n;
  });
  std::vector<double> dw(C, 0.0), db(C, 0.0);
  std::vector<float> m1(s.batch * G), m2(s.batch * G);
  for (int64_t b = 0; b < s.batch; ++b)
    for (int64_t g = 0; g < G; ++g) {
      double t1 = 0, t2 = 0;
      for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
        const double s1 = sums[(b * C + c) * 2], s2 = sums[(b * C + c) * 2 + 1], k = in.film(b, c);
        if (in.scale) {
          dshift[b * C + c] = static_cast<float>(s1);
          dscale[b * C + c] = static_cast<float>(s2 * in.weight[c] + s1 * in.bias[c]);
        }
        dw[c] += k * s2;
        db[c] += k * s1;
        t1 += in.weight[c] * k * s1;
        t2 += in.weight[c] * k * s2;
      }
      m1[b * G + g] = static_cast<float>(t1 / (P * Cg));
      m2[b * G + g] = static_cast<float>(t2 / (P * Cg));
    }
  for (int64_t c = 0; c < C; ++c) {
    dweight[c] = static_cast<float>(dw[c]);
    dbias[c] = static_cast<float>(db[c]);
  }
  // Per (b, c): dx = dz * xa + n * xb + xc.
  std::vector<float> xa(s.batch * C), xb(s.batch * C), xc(s.batch * C);
  for (int64_t b = 0; b < s.batch; ++b)
    for (int64_t c = 0; c < C; ++c) {
      const int64_t g = b * G + c / Cg;
      const float r = rstd[g];
      xa[b * C + c] = r * za[b * C + c];
      xb[b * C + c] = -r * m2[g];
      xc[b * C + c] = -r * m1[g];
    }
  const float *qa = xa.data(), *qb = xb.data(), *qc = xc.data();
  for_each_vector(s, [&](int64_t b, int64_t p, int64_t c, int count) DDPS_INLINE {
    const int64_t i = (b * P + p) * C + c, j = b * C + c;
    store_lanes(out + i,
                load_lanes(dzp + i, count) * load_lanes(qa + j, count) +
                    normalized(i, j, count) * load_lanes(qb + j, count) + load_lanes(qc + j, count),
                count);
  });
}

// dy -> dx, dweight, dbias, dscale, dshift (the last two undefined without FiLM). With
// n = (x - mean) * rstd, u = n * w + bias, z = u * k + shift (k = scale + 1), y = silu(z):
// dz = dy * silu'(z); dshift = sum dz, dscale = sum dz * u; du = dz * k gives dweight, dbias;
// dx = rstd * (du * w - mean_g(du * w) - n * mean_g(du * w * n)).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
    const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift, const at::Tensor& mean,
    const at::Tensor& rstd, int64_t groups) {
  const Inputs in = inputs(x, weight, bias, scale, shift, groups);
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type() &&
                  grad.is_contiguous(at::MemoryFormat::ChannelsLast),
              "group_norm_film_silu (cpu): grad must be channels-last like x, of its dtype");
  const int64_t C = in.shape.channels;
  const auto f32 = weight.options();
  at::Tensor dx = at::empty_like(x);
  at::Tensor dz = x.scalar_type() == at::kFloat ? dx : at::empty_like(x, x.options().dtype(at::kFloat));
  at::Tensor dweight = at::empty({C}, f32), dbias = at::empty({C}, f32), dscale, dshift;
  if (in.scale) {
    dscale = at::empty({in.shape.batch, C}, f32);
    dshift = at::empty({in.shape.batch, C}, f32);
  }
  dispatch_activations(x.scalar_type(), "group_norm_film_silu_backward", [&](auto zero) {
    using scalar_t = decltype(zero);
    backward_kernel(in, grad.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(),
                    dz.data_ptr<float>(), mean.data_ptr<float>(), rstd.data_ptr<float>(), dweight.data_ptr<float>(),
                    dbias.data_ptr<float>(), in.scale ? dscale.data_ptr<float>() : nullptr,
                    in.scale ? dshift.data_ptr<float>() : nullptr);
  });
  return {dx, dweight, dbias, dscale, dshift};
}

}  // namespace

TORCH_LIBRARY_IMPL(ddps, CPU, m) {
  m.impl("group_norm_film_silu", &forward_cpu);
  m.impl("group_norm_film_silu_backward", &backward_cpu);
}

}  // namespace ddps
