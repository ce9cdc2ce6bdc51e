// ddps::attention on the CPU: softmax attention over q, k, v [B, heads, D, N] (float32, bfloat16 or
// float16; float32 inside, the output rounded once to theirs) given as token-major views (a
// token's D values contiguous, tokens strided: a channels-last qkv convolution's output, as in the
// fused UNet), D a multiple of 16 up to 64. torch's CPU SDPA
// spends its time in sgemm, which on this package's reference (AMD) CPU runs at a third of the
// rate of the register-blocked products here (as in conv3x3.cpp). Forward: a block of query rows
// takes its scores against every key, their softmax and the weighted sum of the values, with the
// rows of scores in cache. Backward, one (sample, head) at a time: per block of keys, the
// probabilities recomputed from the saved log-sum-exp (the transposed products), dk, dv and the
// block's rows of dS^T, kept for the whole head; then per block of query rows, dq from dS^T's
// columns. Every output row has one writer (no atomics, no partial sums), and each row's
// arithmetic does not depend on the block or thread it falls in, so neither do the results.
// Fused multiply-adds, as in group_norm_film_silu.cpp: nothing here must match another backend
// bit for bit.
#pragma GCC optimize("fp-contract=fast")

#include <torch/library.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <utility>
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
  // Row length of the score and transposed-operand buffers: whole blocks of kKeys, plus one vector
  // so that the rows of a block do not all fall into one L1 set (4 KiB apart) when N is a power of 2.
  int64_t padded() const { return (n + kKeys - 1) / kKeys * kKeys + kLanes; }
};

// t[pair][d][n] = x[pair][d][n] (zero past N): a head's tokens contiguous per channel, the layout
// in which a block of scores reads its other operand.
template <typename scalar_t>
std::vector<float> transposed(const Shape& s, const Heads<scalar_t>& x) {
  const int64_t np = s.padded();
  std::vector<float> t(s.pairs() * s.d * np, 0.0f);
  at::parallel_for(0, s.pairs(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t pair = begin; pair < end; ++pair) {
      float* out = t.data() + pair * s.d * np;
      const Rows<scalar_t> rows = x(pair);
      for (int64_t n = 0; n < s.n; ++n) {
        const scalar_t* row = rows(n);
        for (int64_t d = 0; d < s.d; ++d) out[d * np + n] = static_cast<float>(row[d]);
      }
    }
  });
  return t;
}

// R rows of D values of one head (rows n0 .. n0 + R - 1, the last repeated past N), times f.
template <int V, int R, typename scalar_t>
DDPS_INLINE inline void load_rows(Rows<scalar_t> rows, int64_t n0, int64_t n, float f, float (&out)[R][V * kLanes]) {
  for (int r = 0; r < R; ++r) {
    const scalar_t* row = rows(std::min(n0 + r, n - 1));
    for (int j = 0; j < V; ++j) store_lanes(out[r] + j * kLanes, load_lanes(row + j * kLanes) * f);
  }
}

// out[r][m] = sum_d a[r][d] * bt[d][m] for m < n (whole blocks of kKeys): R x 2 registers per block,
// each block's also passed to block(r, m, lanes of m, lanes of m + 16) while in registers.
template <int V, int R, typename Block>
DDPS_INLINE inline void products(const float (&a)[R][V * kLanes], const float* bt, int64_t np, int64_t n, float* out,
                                 Block block) {
  for (int64_t m = 0; m < n; m += kKeys) {
    FloatV acc[R][2] = {};
    for (int d = 0; d < V * kLanes; ++d) {
      const FloatV b0 = load_lanes(bt + d * np + m), b1 = load_lanes(bt + d * np + m + kLanes);
      for (int r = 0; r < R; ++r) {
        acc[r][0] += a[r][d] * b0;
        acc[r][1] += a[r][d] * b1;
      }
    }
    for (int r = 0; r < R; ++r) {
      store_lanes(out + r * np + m, acc[r][0]);
      store_lanes(out + r * np + m + kLanes, acc[r][1]);
      block(r, m, acc[r][0], acc[r][1]);
    }
  }
}

template <int V, int R>
DDPS_INLINE inline void products(const float (&a)[R][V * kLanes], const float* bt, int64_t np, int64_t n, float* out) {
  products<V, R>(a, bt, np, n, out, [](int, int64_t, FloatV, FloatV) DDPS_INLINE {});
}

// acc[r] = sum over m < n of coef[r * rs + m * cs] * rows(m): R x V registers, one row of D values
// at a time.
template <int V, int R, typename scalar_t>
DDPS_INLINE inline void weighted_rows(const float* coef, int64_t rs, int64_t cs, Rows<scalar_t> rows, int64_t n,
                                      FloatV (&acc)[R][V]) {
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < V; ++j) acc[r][j] = FloatV{};
  for (int64_t m = 0; m < n; ++m) {
    const scalar_t* row = rows(m);
    FloatV x[V];
    for (int j = 0; j < V; ++j) x[j] = load_lanes(row + j * kLanes);
    for (int r = 0; r < R; ++r) {
      const float c = coef[r * rs + m * cs];
      for (int j = 0; j < V; ++j) acc[r][j] += c * x[j];
    }
  }
}

// row[m] = f(m, row[m]) for m < n, f taking and giving 16 lanes at m (whole vectors) or one value
// (the last n % 16): the padding past n takes no part.
template <typename F>
DDPS_INLINE inline void map_row(float* row, int64_t n, F f) {
  const int64_t whole = n / kLanes * kLanes;
  for (int64_t m = 0; m < whole; m += kLanes) store_lanes(row + m, f(m, load_lanes(row + m)));
  for (int64_t m = whole; m < n; ++m) row[m] = f(m, row[m]);
}

// Rows n0 .. n0 + R - 1 (those below N) of a [B, N, heads, D] output whose tokens are token_stride
// elements apart, times f (rounded once to the output's dtype).
template <int V, int R, typename scalar_t>
DDPS_INLINE inline void write_rows(const Shape& s, int64_t token_stride, int64_t pair, int64_t n0,
                                   const FloatV (&acc)[R][V], float f, scalar_t* out) {
  constexpr int D = V * kLanes;
  const int64_t b = pair / s.heads, h = pair % s.heads;
  for (int r = 0; r < R && n0 + r < s.n; ++r)
    for (int j = 0; j < V; ++j)
      store_lanes(out + (b * s.n + n0 + r) * token_stride + h * D + j * kLanes, acc[r][j] * f);
}

// Rows of scores (rows of np, N keys) to their softmax's numerators in place, given each row's
// maximum over the whole blocks of keys (highest, in lanes): top and total are each row's maximum
// and the sum of its numerators.
template <int R>
DDPS_INLINE inline void exp_rows(float* scores, int64_t np, int64_t N, const FloatV (&highest)[R], float (&top)[R],
                                 float (&total)[R]) {
  const int64_t whole = N / kKeys * kKeys;
  for (int r = 0; r < R; ++r) {
    float* row = scores + r * np;
    top[r] = lanes_max(highest[r])[0];
    for (int64_t key = whole; key < N; ++key) top[r] = std::max(top[r], row[key]);
    FloatV sum{};
    float tail = 0.0f;
    map_row(row, N, [&](int64_t, auto x) DDPS_INLINE {
      if constexpr (std::is_same_v<decltype(x), float>) {
        const float e = std::exp(x - top[r]);
        tail += e;
        return e;
      } else {
        const FloatV e = exp_lanes(x - top[r]);
        sum += e;
        return e;
      }
    });
    total[r] = tail + lanes_sum(sum)[0];
  }
}

// The rows' weighted sums of the values (acc) over their totals into out, and their lse.
template <int V, int R, typename scalar_t>
DDPS_INLINE inline void finish_rows(const Shape& s, int64_t pair, int64_t n0, FloatV (&acc)[R][V], const float (&top)[R],
                                    const float (&total)[R], scalar_t* out, float* lse) {
  for (int r = 0; r < R; ++r) {
    const float inv = 1.0f / total[r];
    for (int j = 0; j < V; ++j) acc[r][j] *= inv;
  }
  write_rows<V, R>(s, s.heads * V * kLanes, pair, n0, acc, 1.0f, out);
  for (int r = 0; r < R && n0 + r < s.n; ++r) lse[pair * s.n + n0 + r] = top[r] + std::log(total[r]);
}

// The running maximum of a row's scores over the whole blocks of keys (a pass over the row saved).
DDPS_INLINE inline void running_max(FloatV& highest, int64_t m, int64_t whole, FloatV x0, FloatV x1) {
  if (m < whole) {
    highest = x0 > highest ? x0 : highest;
    highest = x1 > highest ? x1 : highest;
  }
}

// A block of R query rows: scores against every key, softmax in place, out = softmax . v; out and
// lse of each row.
template <int V, typename scalar_t>
DDPS_CLONES void forward_block(const Shape& s, const Heads<scalar_t>& q, const Heads<scalar_t>& v, const float* kt,
                               float scale, int64_t pair, int64_t n0, float* scores, scalar_t* out, float* lse) {
  constexpr int D = V * kLanes, R = rows_for(V);
  const int64_t np = s.padded(), N = s.n, whole = N / kKeys * kKeys;
  alignas(64) float qs[R][D];
  load_rows<V, R>(q(pair), n0, N, scale, qs);
  FloatV highest[R];
  for (int r = 0; r < R; ++r) highest[r] = FloatV{} - std::numeric_limits<float>::infinity();
  products<V, R>(qs, kt + pair * D * np, np, N, scores, [&](int r, int64_t m, FloatV x0, FloatV x1) DDPS_INLINE {
    running_max(highest[r], m, whole, x0, x1);
  });
  float top[R], total[R];
  exp_rows<R>(scores, np, N, highest, top, total);
  FloatV acc[R][V];
  weighted_rows<V, R>(scores, np, 1, v(pair), N, acc);
  finish_rows<V, R>(s, pair, n0, acc, top, total, out, lse);
}

// The bfloat16 products (AVX512-BF16, cpu_bf16_dot): kp [pairs][D / 2][np][2] holds k's channels in
// pairs, vp [pairs][np / 2][D][2] v's tokens in pairs, zero past N, as vdpbf16ps multiplies them.
// The scores q . k sum pairs of channels per instruction (bfloat16 inputs' products are exact, so
// only the order of the float sums differs from forward_block) and are scaled after; the softmax's
// numerators are rounded once to bfloat16 (probs, rows of np) for their products with v, pairs of
// keys per instruction; the totals and lse are the unrounded numerators'.
template <int V>
DDPS_BF16_TARGET void forward_block_bf16(
    const Shape& s, const Heads<c10::BFloat16>& q, const c10::BFloat16* kp, const c10::BFloat16* vp, float scale,
    int64_t pair, int64_t n0, float* scores, c10::BFloat16* probs, c10::BFloat16* out, float* lse) {
  constexpr int D = V * kLanes, R = rows_for(V);
  const int64_t np = s.padded(), N = s.n, whole = N / kKeys * kKeys;
  kp += pair * D * np;
  vp += pair * D * np;
  int32_t qpairs[R][D / 2];
  for (int r = 0; r < R; ++r) std::memcpy(qpairs[r], q(pair)(std::min(n0 + r, N - 1)), sizeof qpairs[r]);
  FloatV highest[R];
  for (int r = 0; r < R; ++r) highest[r] = FloatV{} - std::numeric_limits<float>::infinity();
  for (int64_t m = 0; m < N; m += kKeys) {
    __m512 acc[R][2];
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int i = 0; i < D / 2; ++i) {
      const __m512bh b0 = (__m512bh)_mm512_loadu_si512(kp + (i * np + m) * 2);
      const __m512bh b1 = (__m512bh)_mm512_loadu_si512(kp + (i * np + m + kLanes) * 2);
      for (int r = 0; r < R; ++r) {
        const __m512bh a = (__m512bh)_mm512_set1_epi32(qpairs[r][i]);
        acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, b0);
        acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, b1);
      }
    }
    for (int r = 0; r < R; ++r) {
      const FloatV x0 = (FloatV)acc[r][0] * scale, x1 = (FloatV)acc[r][1] * scale;
      store_lanes(scores + r * np + m, x0);
      store_lanes(scores + r * np + m + kLanes, x1);
      running_max(highest[r], m, whole, x0, x1);
    }
  }
  float top[R], total[R];
  exp_rows<R>(scores, np, N, highest, top, total);
  for (int r = 0; r < R; ++r) {
    for (int64_t m = 0; m < N; m += kLanes)
      store_lanes(probs + r * np + m, load_lanes(scores + r * np + m), static_cast<int>(std::min<int64_t>(kLanes, N - m)));
    probs[r * np + N] = c10::BFloat16(0.0f);  // an odd N's last pair
  }
  __m512 acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < V; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t m = 0; m < N; m += 2) {
    __m512bh b[V];
    for (int j = 0; j < V; ++j) b[j] = (__m512bh)_mm512_loadu_si512(vp + (m * D + 2 * j * kLanes));
    for (int r = 0; r < R; ++r) {
      const __m512bh a = broadcast_pair(probs + r * np + m);
      for (int j = 0; j < V; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], a, b[j]);
    }
  }
  FloatV sums[R][V];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < V; ++j) sums[r][j] = (FloatV)acc[r][j];
  finish_rows<V, R>(s, pair, n0, sums, top, total, out, lse);
}

// kp and vp of forward_block_bf16 for every (sample, head).
std::pair<std::vector<c10::BFloat16>, std::vector<c10::BFloat16>> bf16_pairs(const Shape& s,
                                                                              const Heads<c10::BFloat16>& k,
                                                                              const Heads<c10::BFloat16>& v) {
  const int64_t np = s.padded(), D = s.d;
  std::vector<c10::BFloat16> kp(s.pairs() * D * np, c10::BFloat16(0.0f)), vp(kp.size(), c10::BFloat16(0.0f));
  at::parallel_for(0, s.pairs(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t pair = begin; pair < end; ++pair) {
      c10::BFloat16 *kq = kp.data() + pair * D * np, *vq = vp.data() + pair * D * np;
      const Rows<c10::BFloat16> kr = k(pair), vr = v(pair);
      for (int64_t n = 0; n < s.n; ++n) {
        for (int64_t d = 0; d < D; ++d) kq[(d / 2 * np + n) * 2 + d % 2] = kr(n)[d];
        for (int64_t d = 0; d < D; ++d) vq[(n / 2 * D + d) * 2 + n % 2] = vr(n)[d];
      }
    }
  });
  return {std::move(kp), std::move(vp)};
}

// out in the inputs' dtype, lse in float32.
template <int V, typename scalar_t>
std::tuple<at::Tensor, at::Tensor> forward(const Shape& s, const at::Tensor& q, const at::Tensor& k,
                                           const at::Tensor& v, double scale) {
  constexpr int R = rows_for(V);
  const int64_t np = s.padded(), blocks = (s.n + R - 1) / R;
  at::Tensor out = at::empty({s.batch, s.n, s.heads * s.d}, q.options());
  at::Tensor lse = at::empty({s.batch, s.heads, s.n}, q.options().dtype(at::kFloat));
  const Heads<scalar_t> qh(q), kh(k), vh(v);
  scalar_t* po = out.data_ptr<scalar_t>();
  float* pl = lse.data_ptr<float>();
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    if (cpu_bf16_dot()) {
      const auto operands = bf16_pairs(s, kh, vh);
      const c10::BFloat16 *kp = operands.first.data(), *vp = operands.second.data();
      at::parallel_for(0, s.pairs() * blocks, 1, [&](int64_t begin, int64_t end) {
        std::vector<float> scores(R * np);
        std::vector<c10::BFloat16> probs(R * np);
        for (int64_t item = begin; item < end; ++item)
          forward_block_bf16<V>(s, qh, kp, vp, static_cast<float>(scale), item / blocks,
                                item % blocks * R, scores.data(), probs.data(), po, pl);
      });
      return {out.transpose(1, 2), lse};
    }
  }
  const std::vector<float> kt = transposed(s, kh);
  at::parallel_for(0, s.pairs() * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(R * np);
    for (int64_t item = begin; item < end; ++item)
      forward_block<V>(s, qh, vh, kt.data(), static_cast<float>(scale), item / blocks, item % blocks * R,
                       scores.data(), po, pl);
  });
  return {out.transpose(1, 2), lse};  // out [B, heads * D, N], token-major
}

// What the backward passes read: the inputs, dO, the saved lse, delta = rowsum(dO * O) per query,
// and the transposed operands of the keys' score products; and the token stride of dq, dk, dv.
template <typename scalar_t>
struct Saved {
  Heads<scalar_t> q, k, v, dout;
  const float *lse, *delta, *qt, *dot;
  float scale;
  int64_t grad_stride;
};

// With S the scaled scores and P = exp(S - lse): dS = P (dO v^T - delta). A block of R keys takes
// its rows of P^T and dS^T (in p and dst, rows of np) from the transposed products, then
// dv = P^T dO and dk = scale * dS^T q.
template <int V, typename scalar_t>
DDPS_CLONES void key_block(const Shape& s, const Saved<scalar_t>& w, int64_t pair, int64_t n0, float* p, float* dst,
                           scalar_t* dk, scalar_t* dv) {
  constexpr int D = V * kLanes, R = rows_for(V);
  const int64_t np = s.padded(), N = s.n, o = pair * D * np;
  const float *lse = w.lse + pair * N, *delta = w.delta + pair * N;
  alignas(64) float a[R][D], g[R][D];
  load_rows<V, R>(w.k(pair), n0, N, w.scale, a);
  load_rows<V, R>(w.v(pair), n0, N, 1.0f, g);
  products<V, R>(a, w.qt + o, np, N, p);
  products<V, R>(g, w.dot + o, np, N, dst);
  for (int r = 0; r < R; ++r) {
    float *pr = p + r * np, *dr = dst + r * np;
    map_row(pr, N, [&](int64_t m, auto x) DDPS_INLINE {
      if constexpr (std::is_same_v<decltype(x), float>) {
        return std::exp(x - lse[m]);
      } else {
        return exp_lanes(x - load_lanes(lse + m));
      }
    });
    map_row(dr, N, [&](int64_t m, auto x) DDPS_INLINE {
      if constexpr (std::is_same_v<decltype(x), float>) {
        return pr[m] * (x - delta[m]);
      } else {
        return load_lanes(pr + m) * (x - load_lanes(delta + m));
      }
    });
  }
  FloatV acc[R][V];
  weighted_rows<V, R>(p, np, 1, w.dout(pair), N, acc);
  write_rows<V, R>(s, w.grad_stride, pair, n0, acc, 1.0f, dv);
  weighted_rows<V, R>(dst, np, 1, w.q(pair), N, acc);
  write_rows<V, R>(s, w.grad_stride, pair, n0, acc, w.scale, dk);
}

// dq = scale * dS k for a block of R query rows: the columns n0 .. n0 + R of the pair's dS^T.
template <int V, typename scalar_t>
DDPS_CLONES void query_block(const Shape& s, const Saved<scalar_t>& w, int64_t pair, int64_t n0, const float* dst,
                             scalar_t* dq) {
  constexpr int R = rows_for(V);
  FloatV acc[R][V];
  weighted_rows<V, R>(dst + n0, 1, s.padded(), w.k(pair), s.n, acc);
  write_rows<V, R>(s, w.grad_stride, pair, n0, acc, w.scale, dq);
}

template <int V, typename scalar_t>
std::vector<at::Tensor> backward(const Shape& s, const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k,
                                 const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, double scale,
                                 bool packed) {
  constexpr int R = rows_for(V);
  const int64_t np = s.padded(), blocks = (s.n + R - 1) / R;
  const Heads<scalar_t> qh(q), kh(k), vh(v), gh(grad), oh(out);
  std::vector<float> delta(s.pairs() * s.n);
  at::parallel_for(0, s.pairs(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t pair = begin; pair < end; ++pair) {
      const Rows<scalar_t> gr = gh(pair), orows = oh(pair);
      for (int64_t n = 0; n < s.n; ++n) {
        FloatV sum{};
        for (int j = 0; j < V; ++j) sum += load_lanes(gr(n) + j * kLanes) * load_lanes(orows(n) + j * kLanes);
        delta[pair * s.n + n] = lanes_sum(sum)[0];
      }
    }
  });
  const std::vector<float> qt = transposed(s, qh), dot = transposed(s, gh);
  const QkvGrads<scalar_t> grads(q, packed);
  const Saved<scalar_t> w{qh, kh, vh, gh, lse.data_ptr<float>(), delta.data(),
                          qt.data(), dot.data(), static_cast<float>(scale), grads.token_stride};
  scalar_t *pq = grads.dq, *pk = grads.dk, *pv = grads.dv;
  // dS^T of one (sample, head) at a time, R rows per block of keys: the key blocks write it, the
  // query blocks read their columns of it. Computing dS once instead of per query block and per
  // key block saves two of the seven products, for N x np floats that stay in cache.
  std::vector<float> dst(blocks * R * np);
  for (int64_t pair = 0; pair < s.pairs(); ++pair) {
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> p(R * np);
      for (int64_t block = begin; block < end; ++block)
        key_block<V>(s, w, pair, block * R, p.data(), dst.data() + block * R * np, pk, pv);
    });
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t block = begin; block < end; ++block) query_block<V>(s, w, pair, block * R, dst.data(), pq);
    });
  }
  return grads.results(q);
}

std::tuple<at::Tensor, at::Tensor> forward_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                               double scale) {
  check_heads("attention", q, k, v);
  const Shape s{q.size(0), q.size(1), q.size(2), q.size(3)};
  return by_width(q, "attention", [&](auto w, auto zero) {
    return forward<decltype(w)::value, decltype(zero)>(s, q, k, v, scale);
  });
}

std::vector<at::Tensor> backward_cpu(const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k,
                                     const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, double scale,
                                     bool packed) {
  check_heads("attention", q, k, v);
  check_heads("attention", grad, out, q);
  TORCH_CHECK(lse.is_contiguous() && lse.scalar_type() == at::kFloat && lse.numel() == q.size(0) * q.size(1) * q.size(3),
              "attention (cpu): lse must be the forward's contiguous float32 [B, heads, N]");
  const Shape s{q.size(0), q.size(1), q.size(2), q.size(3)};
  return by_width(q, "attention", [&](auto w, auto zero) {
    return backward<decltype(w)::value, decltype(zero)>(s, grad, q, k, v, out, lse, scale, packed);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(ddps, CPU, m) {
  m.impl("attention", &forward_cpu);
  m.impl("attention_backward", &backward_cpu);
}

}  // namespace ddps
