// ddps::attention on the CPU: softmax attention over float32 q, k, v [B, heads, D, N] given as
// token-major views (a token's D values contiguous, tokens strided: a channels-last qkv
// convolution's output, as in the fused UNet), D a multiple of 16 up to 64. torch's CPU SDPA
// spends its time in sgemm, which on this package's reference (AMD) CPU runs at a third of the
// rate of the register-blocked products here (as in conv3x3.cpp): a block of query rows takes its
// scores against every key, their softmax and the weighted sum of the values, with the rows of
// scores in cache. The backward is torch's flash-attention backward (ddps/ops/attention.py), from
// this forward's output and log-sum-exp. Each query row's arithmetic does not depend on the block
// or thread it falls in, so neither do the results.
// Fused multiply-adds, as in group_norm_film_silu.cpp: nothing here must match another backend
// bit for bit.
#pragma GCC optimize("fp-contract=fast")

#include <torch/library.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common/heads.h"
#include "common/vec.h"

namespace ddps {
namespace {

constexpr int kKeys = 2 * kLanes;  // keys per register block of scores

// Query rows per block for D = 16 V: 24 accumulators in the weighted sum of the values.
constexpr int rows_for(int V) { return V <= 2 ? 12 : 6; }

struct Shape {
  int64_t batch, heads, d, n;
  int64_t pairs() const { return batch * heads; }
  // Row length of the score and key buffers: whole key blocks, plus one vector so that the rows of
  // a block do not all fall into the same L1 set (a multiple of 4 KiB apart) when N is a power of 2.
  int64_t padded() const { return (n + kKeys - 1) / kKeys * kKeys + kLanes; }
};

// kt[pair][d][n] = k[pair][d][n] (zero past N): the keys of each head with tokens contiguous, the
// layout in which a block of scores reads them.
void transpose_keys(const Shape& s, const Heads& k, float* kt) {
  const int64_t np = s.padded();
  at::parallel_for(0, s.pairs(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t pair = begin; pair < end; ++pair) {
      float* out = kt + pair * s.d * np;
      std::fill(out, out + s.d * np, 0.0f);
      const Rows rows = k(pair);
      for (int64_t n = 0; n < s.n; ++n) {
        const float* row = rows(n);
        for (int64_t d = 0; d < s.d; ++d) out[d * np + n] = row[d];
      }
    }
  });
}

// Rows n0 .. n0 + R - 1 of one head (repeating the last row past N): out and lse of each.
template <int V>
DDPS_CLONES void query_block(const Shape& s, const Heads& q, const Heads& v, const float* kt, float scale,
                             int64_t pair, int64_t n0, float* scores, float* out, float* lse) {
  constexpr int D = V * kLanes, R = rows_for(V);
  const int64_t np = s.padded(), N = s.n;
  alignas(64) float qs[R][D];  // scale * q
  const Rows qrows = q(pair);
  for (int r = 0; r < R; ++r) {
    const float* row = qrows(std::min(n0 + r, N - 1));
    for (int j = 0; j < V; ++j) store(qs[r] + j * kLanes, load(row + j * kLanes) * scale);
  }
  // Scores of R rows against every key, kKeys at a time in R x 2 registers.
  const float* ktp = kt + pair * D * np;
  for (int64_t key = 0; key < N; key += kKeys) {
    FloatV acc[R][2] = {};
    for (int d = 0; d < D; ++d) {
      const FloatV k0 = load(ktp + d * np + key), k1 = load(ktp + d * np + key + kLanes);
      for (int r = 0; r < R; ++r) {
        acc[r][0] += qs[r][d] * k0;
        acc[r][1] += qs[r][d] * k1;
      }
    }
    for (int r = 0; r < R; ++r) {
      store(scores + r * np + key, acc[r][0]);
      store(scores + r * np + key + kLanes, acc[r][1]);
    }
  }
  // Softmax numerators in place, each row's max and sum: whole vectors, then the last N % 16 keys
  // one by one (the padding past N takes no part).
  const int64_t whole = N / kLanes * kLanes;
  float top[R], total[R];
  for (int r = 0; r < R; ++r) {
    float* row = scores + r * np;
    FloatV m = FloatV{} - std::numeric_limits<float>::infinity();
    for (int64_t key = 0; key < whole; key += kLanes) {
      const FloatV x = load(row + key);
      m = x > m ? x : m;
    }
    top[r] = m[0];
    for (int i = 1; i < kLanes; ++i) top[r] = std::max(top[r], m[i]);
    for (int64_t key = whole; key < N; ++key) top[r] = std::max(top[r], row[key]);
    FloatV sum{};
    for (int64_t key = 0; key < whole; key += kLanes) {
      const FloatV e = exp_lanes(load(row + key) - top[r]);
      store(row + key, e);
      sum += e;
    }
    total[r] = 0.0f;
    for (int i = 0; i < kLanes; ++i) total[r] += sum[i];
    for (int64_t key = whole; key < N; ++key) {
      row[key] = std::exp(row[key] - top[r]);
      total[r] += row[key];
    }
  }
  // out = numerators . v / sum: R x V registers, one key at a time.
  FloatV acc[R][V] = {};
  const Rows vrows = v(pair);
  for (int64_t key = 0; key < N; ++key) {
    const float* vr = vrows(key);
    FloatV vv[V];
    for (int j = 0; j < V; ++j) vv[j] = load(vr + j * kLanes);
    for (int r = 0; r < R; ++r) {
      const float p = scores[r * np + key];
      for (int j = 0; j < V; ++j) acc[r][j] += p * vv[j];
    }
  }
  const int64_t b = pair / s.heads, h = pair % s.heads;
  for (int r = 0; r < R && n0 + r < N; ++r) {
    const float inv = 1.0f / total[r];
    float* o = out + ((b * N + n0 + r) * s.heads + h) * D;
    for (int j = 0; j < V; ++j) store(o + j * kLanes, acc[r][j] * inv);
    lse[pair * N + n0 + r] = top[r] + std::log(total[r]);
  }
}

template <int V>
std::tuple<at::Tensor, at::Tensor> forward(const Shape& s, const at::Tensor& q, const at::Tensor& k,
                                           const at::Tensor& v, double scale) {
  constexpr int R = rows_for(V);
  const int64_t np = s.padded(), blocks = (s.n + R - 1) / R;
  std::vector<float> kt(s.pairs() * s.d * np);
  transpose_keys(s, Heads(k), kt.data());
  at::Tensor out = at::empty({s.batch, s.n, s.heads * s.d}, q.options());
  at::Tensor lse = at::empty({s.batch, s.heads, s.n}, q.options());
  const Heads qh(q), vh(v);
  float *po = out.data_ptr<float>(), *pl = lse.data_ptr<float>();
  at::parallel_for(0, s.pairs() * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(R * np);
    for (int64_t item = begin; item < end; ++item)
      query_block<V>(s, qh, vh, kt.data(), static_cast<float>(scale), item / blocks, item % blocks * R,
                     scores.data(), po, pl);
  });
  return {out.transpose(1, 2), lse};  // out [B, heads * D, N], token-major
}

std::tuple<at::Tensor, at::Tensor> forward_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                               double scale) {
  check_heads("attention", q, k, v);
  const Shape s{q.size(0), q.size(1), q.size(2), q.size(3)};
  return by_width(s.d, [&](auto w) { return forward<decltype(w)::value>(s, q, k, v, scale); });
}

}  // namespace

TORCH_LIBRARY_IMPL(ddps, CPU, m) { m.impl("attention", &forward_cpu); }

}  // namespace ddps
