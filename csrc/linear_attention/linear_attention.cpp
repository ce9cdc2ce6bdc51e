// ddps::linear_attention on the CPU: q, k, v [B, heads, D, N] (float32, bfloat16 or float16; float32
// inside, the output rounded once to theirs, the saved context and statistics float32) given as
// token-major views (the D values of a token contiguous, tokens strided: a channels-last qkv
// convolution's output, as in the fused UNet), D a multiple of 16 up to 64. The composite in
// ddps/ops/linear_attention.py softmaxes k over strided tokens and copies every operand for its
// matmuls; here each pass walks the tokens once, in memory order, with the D x D matrices in L1.
// Forward: a max pass over k, a context pass, an output pass. Backward: a d(context) pass and a
// pass for dq, dk, dv. Sums over tokens are taken over fixed token ranges and combined in a fixed
// order, so the results do not depend on the thread count.
// On a CPU with AVX512-BF16 (cpu_bf16_dot), the forward of bfloat16 inputs takes bfloat16 products
// (see outer_sums_bf16); the backward keeps float32 products.
// Fused multiply-adds, as in group_norm_film_silu.cpp: nothing here must match another backend
// bit for bit.
#pragma GCC optimize("fp-contract=fast")

#include <torch/library.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <iterator>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/heads.h"
#include "common/vec.h"

namespace ddps {
namespace {

constexpr int64_t kSplit = 1024;  // tokens per partial sum over tokens

struct Shape {
  int64_t batch, heads, d, n;
  int64_t pairs() const { return batch * heads; }
  int64_t splits() const { return (n + kSplit - 1) / kSplit; }
};

template <int V>
DDPS_INLINE inline FloatV lane_sum(const FloatV (&x)[V]) {
  FloatV s = x[0];
  for (int j = 1; j < V; ++j) s += x[j];
  return lanes_sum(s);
}

// softmax over a token's D values; NaN and +inf give NaN rows, as torch's softmax does.
template <int V, typename scalar_t>
DDPS_INLINE inline void softmax_row(const scalar_t* row, FloatV (&out)[V]) {
  FloatV m = load_lanes(row);
  for (int j = 1; j < V; ++j) {
    const FloatV x = load_lanes(row + j * kLanes);
    m = x > m ? x : m;
  }
  m = lanes_max(m);
  for (int j = 0; j < V; ++j) out[j] = exp_lanes(load_lanes(row + j * kLanes) - m);
  const FloatV inv = 1.0f / lane_sum<V>(out);
  for (int j = 0; j < V; ++j) out[j] *= inv;
}

// out[d][:] += sum over tokens n in [n0, n1) of coef_n[d] * rows(n)[:], and sums[d] += coef_n[d],
// where coef(n, FloatV (&)[V]) gives a token's D coefficients. Four tokens per update of out: one
// load and store of out per four multiply-adds.
template <int V, typename Coef, typename scalar_t>
DDPS_CLONES void outer_sums(Coef& coef, Rows<scalar_t> vals, int64_t n0, int64_t n1, float* out, float* sums) {
  constexpr int D = V * kLanes, kBlock = 4;
  alignas(64) float c[kBlock][D];
  FloatV total[V] = {};
  for (int64_t n = n0; n < n1; n += kBlock) {
    const int count = static_cast<int>(std::min<int64_t>(kBlock, n1 - n));
    FloatV val[kBlock][V];
    for (int t = 0; t < kBlock; ++t) {
      FloatV cv[V] = {};
      if (t < count) {
        coef(n + t, cv);
        for (int j = 0; j < V; ++j) val[t][j] = load_lanes(vals(n + t) + j * kLanes);
      } else {
        for (int j = 0; j < V; ++j) val[t][j] = FloatV{};
      }
      for (int j = 0; j < V; ++j) {
        store_lanes(c[t] + j * kLanes, cv[j]);
        total[j] += cv[j];
      }
    }
    for (int d = 0; d < D; ++d)
      for (int j = 0; j < V; ++j) {
        float* o = out + d * D + j * kLanes;
        store_lanes(o, load_lanes(o) + c[0][d] * val[0][j] + c[1][d] * val[1][j] + c[2][d] * val[2][j] +
                           c[3][d] * val[3][j]);
      }
  }
  for (int j = 0; j < V; ++j) store_lanes(sums + j * kLanes, load_lanes(sums + j * kLanes) + total[j]);
}

// acc = sum_d coef[d] * mat[d][:] (mat D x D, row-major).
template <int V>
DDPS_INLINE inline void mat_vec(const float* coef, const float* mat, FloatV (&acc)[V]) {
  constexpr int D = V * kLanes;
  for (int j = 0; j < V; ++j) acc[j] = FloatV{};
  for (int d = 0; d < D; ++d)
    for (int j = 0; j < V; ++j) acc[j] += coef[d] * load_lanes(mat + d * D + j * kLanes);
}

// Per (sample, head) sums over all tokens, from per-split partials summed in split order:
// partial(pair, n0, n1, out, sums) adds tokens [n0, n1) into out (D x D) and sums (D), as
// outer_sums does; mats [pairs, D, D], sums [pairs, D].
template <int V, typename Partial>
void token_sums(const Shape& s, Partial partial_sums, float* mats, float* sums) {
  constexpr int D = V * kLanes;
  const int64_t splits = s.splits();
  std::vector<float> partial(s.pairs() * splits * (D * D + D), 0.0f);
  at::parallel_for(0, s.pairs() * splits, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t pair = item / splits, n0 = item % splits * kSplit;
      float* p = partial.data() + item * (D * D + D);
      partial_sums(pair, n0, std::min(n0 + kSplit, s.n), p, p + D * D);
    }
  });
  for (int64_t pair = 0; pair < s.pairs(); ++pair) {
    float *mat = mats + pair * D * D, *sum = sums + pair * D;
    std::fill(mat, mat + D * D, 0.0f);
    std::fill(sum, sum + D, 0.0f);
    for (int64_t split = 0; split < splits; ++split) {
      const float* p = partial.data() + (pair * splits + split) * (D * D + D);
      for (int i = 0; i < D * D; ++i) mat[i] += p[i];
      for (int i = 0; i < D; ++i) sum[i] += p[D * D + i];
    }
  }
}

// outer_sums over a range of tokens, for token_sums: coef_of(pair) gives the range's coefficients,
// vals_of(pair) its rows.
template <int V, typename CoefOf, typename ValsOf>
auto outer_sums_of(CoefOf coef_of, ValsOf vals_of) {
  return [coef_of, vals_of](int64_t pair, int64_t n0, int64_t n1, float* out, float* sums) {
    auto coef = coef_of(pair);
    outer_sums<V>(coef, vals_of(pair), n0, n1, out, sums);
  };
}

template <typename F>
DDPS_CLONES void token_range(F& f, int64_t pair, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) f(pair, n);
}

// Runs f(pair, n0, n1) over every (sample, head)'s tokens in ranges, in parallel.
template <typename F>
void for_each_range(const Shape& s, F f) {
  const int64_t splits = s.splits();
  at::parallel_for(0, s.pairs() * splits, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n0 = item % splits * kSplit;
      f(item / splits, n0, std::min(n0 + kSplit, s.n));
    }
  });
}

// Runs f(pair, n) for every token of every (sample, head), in parallel over token ranges.
template <typename F>
void for_each_token(const Shape& s, F f) {
  for_each_range(s, [&](int64_t pair, int64_t n0, int64_t n1) { token_range(f, pair, n0, n1); });
}

Shape check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  check_heads("linear_attention", q, k, v);
  return {q.size(0), q.size(1), q.size(2), q.size(3)};
}

// The max over tokens of each of the D channels (the shift of k's softmax over tokens).
template <int V, typename scalar_t>
DDPS_CLONES void channel_max(Rows<scalar_t> kr, int64_t n, float* out) {
  FloatV m[V];
  for (int j = 0; j < V; ++j) m[j] = FloatV{} - std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i)
    for (int j = 0; j < V; ++j) {
      const FloatV x = load_lanes(kr(i) + j * kLanes);
      m[j] = x > m[j] ? x : m[j];
    }
  for (int j = 0; j < V; ++j) store_lanes(out + j * kLanes, m[j]);
}

// The coefficients of the context: exp(k - kmax) per token.
template <typename scalar_t>
auto k_exp(const Shape& s, Heads<scalar_t> k, const float* kmax) {
  return [&s, k, kmax](int64_t pair) {
    const Rows<scalar_t> kr = k(pair);
    const float* m = kmax + pair * s.d;
    return [kr, m](int64_t n, auto& out) DDPS_INLINE {
      for (size_t j = 0; j < std::size(out); ++j)
        out[j] = exp_lanes(load_lanes(kr(n) + j * kLanes) - load_lanes(m + j * kLanes));
    };
  };
}

// The coefficients of d(context): q's softmax over D per token.
template <typename scalar_t>
auto q_softmax(Heads<scalar_t> q) {
  return [q](int64_t pair) {
    const Rows<scalar_t> qr = q(pair);
    return [qr](int64_t n, auto& out) DDPS_INLINE { softmax_row(qr(n), out); };
  };
}

using BF16 = c10::BFloat16;

// The bfloat16 products (AVX512-BF16, cpu_bf16_dot) of bfloat16 q, k, v. vdpbf16ps sums pairs of
// bfloat16 products into float lanes: lane i of dot(acc, a, b) adds a[2i] b[2i] + a[2i+1] b[2i+1].
// The context takes pairs of tokens: each token's coefficients exp(k - kmax) rounded once to
// bfloat16 (their sums, ksum, unrounded), times v's rows, which are exact. The output takes pairs
// of the context's rows: the scaled context rounded once to bfloat16 (packed by pack_context),
// times q's softmax over D rounded once. These are where the reference under autocast rounds too
// (its matmuls' bfloat16 operands).
// The 16 bfloat16 of a (a row of token t) and b (token t + 1) side by side (side_by_side), zero
// for a null row (past the range's end).
DDPS_BF16_TARGET inline __m512bh interleave(const BF16* a, const BF16* b) {
  const auto row = [](const BF16* r) DDPS_BF16_TARGET {
    return _mm512_castsi256_si512(r ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r)) : _mm256_setzero_si256());
  };
  return (__m512bh)side_by_side(row(a), row(b));
}

// outer_sums with bfloat16 products: each token's coefficients rounded once to bfloat16 (their
// sums unrounded), four tokens (two pairs) per update of out.
template <int V, typename Coef>
DDPS_BF16_TARGET void outer_sums_bf16(Coef& coef, Rows<BF16> vr, int64_t n0, int64_t n1, float* out, float* sums) {
  constexpr int D = V * kLanes, kBlock = 4;
  FloatV total[V] = {};
  for (int64_t n = n0; n < n1; n += kBlock) {
    alignas(64) BF16 c[kBlock][D];
    __m512bh vals[kBlock / 2][V];
    for (int t = 0; t < kBlock; ++t) {
      FloatV cv[V] = {};
      if (n + t < n1) coef(n + t, cv);
      for (int j = 0; j < V; ++j) {
        store_lanes(c[t] + j * kLanes, cv[j]);
        total[j] += cv[j];
      }
    }
    for (int p = 0; p < kBlock / 2; ++p)
      for (int j = 0; j < V; ++j) {
        const int64_t a = n + 2 * p, b = a + 1;
        vals[p][j] = interleave(a < n1 ? vr(a) + j * kLanes : nullptr, b < n1 ? vr(b) + j * kLanes : nullptr);
      }
    for (int d = 0; d < D; ++d) {
      __m512bh coef[kBlock / 2];
      for (int p = 0; p < kBlock / 2; ++p) {
        uint16_t pair[2];
        std::memcpy(&pair[0], &c[2 * p][d], 2);
        std::memcpy(&pair[1], &c[2 * p + 1][d], 2);
        int32_t word;
        std::memcpy(&word, pair, 4);
        coef[p] = (__m512bh)_mm512_set1_epi32(word);
      }
      for (int j = 0; j < V; ++j) {
        float* o = out + d * D + j * kLanes;
        __m512 acc = _mm512_loadu_ps(o);
        for (int p = 0; p < kBlock / 2; ++p) acc = _mm512_dpbf16_ps(acc, coef[p], vals[p][j]);
        _mm512_storeu_ps(o, acc);
      }
    }
  }
  for (int j = 0; j < V; ++j) store_lanes(sums + j * kLanes, load_lanes(sums + j * kLanes) + total[j]);
}

// The scaled context [pairs][D][D] rounded to bfloat16, rows in pairs: [pairs][D / 2][D][2].
std::vector<BF16> pack_context(const Shape& s, const float* context) {
  const int64_t D = s.d;
  std::vector<BF16> packed(s.pairs() * D * D);
  for (int64_t pair = 0; pair < s.pairs(); ++pair)
    for (int64_t d = 0; d < D; ++d)
      for (int64_t e = 0; e < D; ++e)
        packed[(pair * D + d / 2 * 2) * D + 2 * e + d % 2] = BF16(context[(pair * D + d) * D + e]);
  return packed;
}

// Output rows of tokens [n0, n1) of one (sample, head): q's softmax rounded to bfloat16 times the
// packed context, a pair of its rows per instruction.
template <int V>
DDPS_BF16_TARGET void output_bf16(const Shape& s, Rows<BF16> qr, const BF16* packed, int64_t pair, int64_t n0,
                                  int64_t n1, BF16* out) {
  constexpr int D = V * kLanes;
  const int64_t b = pair / s.heads, h = pair % s.heads;
  packed += pair * D * D;
  for (int64_t n = n0; n < n1; ++n) {
    FloatV sq[V];
    softmax_row(qr(n), sq);
    alignas(64) BF16 rounded[D];
    for (int j = 0; j < V; ++j) store_lanes(rounded + j * kLanes, sq[j]);
    __m512 acc[V];
    for (int j = 0; j < V; ++j) acc[j] = _mm512_setzero_ps();
    for (int i = 0; i < D / 2; ++i) {
      const __m512bh a = broadcast_pair(rounded + 2 * i);
      for (int j = 0; j < V; ++j)
        acc[j] = _mm512_dpbf16_ps(acc[j], a, (__m512bh)_mm512_loadu_si512(packed + (i * D + j * kLanes) * 2));
    }
    for (int j = 0; j < V; ++j) store_lanes(out + (b * s.n + n) * s.heads * D + h * D + j * kLanes, (FloatV)acc[j]);
  }
}

template <int V, typename scalar_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward(const Shape& s, const at::Tensor& q,
                                                                   const at::Tensor& k, const at::Tensor& v,
                                                                   double scale) {
  constexpr int D = V * kLanes;
  constexpr bool bf16 = std::is_same_v<scalar_t, BF16>;
  const bool products_bf16 = bf16 && cpu_bf16_dot();
  auto opts = q.options().dtype(at::kFloat);
  at::Tensor kmax = at::empty({s.batch, s.heads, D}, opts), ksum = at::empty({s.batch, s.heads, D}, opts);
  at::Tensor context = at::empty({s.batch, s.heads, D, D}, opts);
  float *pm = kmax.data_ptr<float>(), *ps = ksum.data_ptr<float>(), *pc = context.data_ptr<float>();
  const Heads<scalar_t> qh(q), kh(k), vh(v);
  at::parallel_for(0, s.pairs(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t pair = begin; pair < end; ++pair) channel_max<V>(kh(pair), s.n, pm + pair * D);
  });
  if constexpr (bf16) {
    if (products_bf16)
      token_sums<V>(s, [&](int64_t pair, int64_t n0, int64_t n1, float* out, float* sums) {
        auto coef = k_exp(s, kh, pm)(pair);
        outer_sums_bf16<V>(coef, vh(pair), n0, n1, out, sums);
      }, pc, ps);
  }
  if (!products_bf16) token_sums<V>(s, outer_sums_of<V>(k_exp(s, kh, pm), vh), pc, ps);
  // context[d][e] = sum_n softmax_n(k)[d] v[e] / N * scale: the reference's v / N, q * scale.
  for (int64_t pair = 0; pair < s.pairs(); ++pair)
    for (int d = 0; d < D; ++d) {
      const float f = static_cast<float>(scale / s.n) / ps[pair * D + d];
      for (int e = 0; e < D; ++e) pc[(pair * D + d) * D + e] *= f;
    }
  // out [B, N, heads * D] in memory, returned as [B, heads * D, N] (what the output conv reads).
  at::Tensor out = at::empty({s.batch, s.n, s.heads * D}, q.options());
  scalar_t* po = out.data_ptr<scalar_t>();
  if constexpr (bf16) {
    if (products_bf16) {
      const std::vector<BF16> packed = pack_context(s, pc);
      for_each_range(s, [&](int64_t pair, int64_t n0, int64_t n1) {
        output_bf16<V>(s, qh(pair), packed.data(), pair, n0, n1, po);
      });
      return {out.transpose(1, 2), context, kmax, ksum};
    }
  }
  for_each_token(s, [&](int64_t pair, int64_t n) DDPS_INLINE {
    const int64_t b = pair / s.heads, h = pair % s.heads;
    FloatV sq[V], acc[V];
    softmax_row(qh(pair)(n), sq);
    alignas(64) float coef[D];
    for (int j = 0; j < V; ++j) store_lanes(coef + j * kLanes, sq[j]);
    mat_vec<V>(coef, pc + pair * D * D, acc);
    for (int j = 0; j < V; ++j) store_lanes(po + (b * s.n + n) * s.heads * D + h * D + j * kLanes, acc[j]);
  });
  return {out.transpose(1, 2), context, kmax, ksum};
}

template <int V, typename scalar_t>
std::vector<at::Tensor> backward(const Shape& s, const at::Tensor& grad, const at::Tensor& q,
                                                        const at::Tensor& k, const at::Tensor& v,
                                                        const at::Tensor& context, const at::Tensor& kmax,
                                                        const at::Tensor& ksum, double scale, bool packed) {
  constexpr int D = V * kLanes;
  // grad [B, heads * D, N] with heads * D contiguous: per (sample, head) rows like q's.
  const Heads<scalar_t> gh(grad.data_ptr<scalar_t>(), grad.stride(0), D, grad.stride(2), s.heads), qh(q), kh(k),
      vh(v);
  std::vector<float> dctx(s.pairs() * D * D), unused(s.pairs() * D);
  token_sums<V>(s, outer_sums_of<V>(q_softmax(qh), gh), dctx.data(), unused.data());
  // With C the saved context: dv = sk G, dsk = G v, dk = sk (dsk - r), r = rowsum(dC * C), where
  // G = dC * scale / N and sk = softmax_n(k); dq = sq (dsq - <sq, dsq>), dsq = C grad.
  const float* pc = context.data_ptr<float>();
  std::vector<float> ct(s.pairs() * D * D), g(s.pairs() * D * D), gt(s.pairs() * D * D), r(s.pairs() * D, 0.0f),
      kinv(s.pairs() * D);
  const float g_scale = static_cast<float>(scale / s.n), *psum = ksum.data_ptr<float>();
  for (int64_t pair = 0; pair < s.pairs(); ++pair) {
    const int64_t o = pair * D * D;
    for (int d = 0; d < D; ++d) {
      for (int e = 0; e < D; ++e) {
        const float dc = dctx[o + d * D + e];
        ct[o + e * D + d] = pc[o + d * D + e];
        g[o + d * D + e] = gt[o + e * D + d] = dc * g_scale;
        r[pair * D + d] += dc * pc[o + d * D + e];
      }
      kinv[pair * D + d] = 1.0f / psum[pair * D + d];
    }
  }
  const QkvGrads<scalar_t> grads(q, packed);
  scalar_t *pq = grads.dq, *pk = grads.dk, *pv = grads.dv;
  const int64_t token_stride = grads.token_stride;
  const float *pm = kmax.data_ptr<float>(), *pkinv = kinv.data(), *pr = r.data(), *pct = ct.data(),
              *pg = g.data(), *pgt = gt.data();
  for_each_token(s, [&](int64_t pair, int64_t n) DDPS_INLINE {
    const int64_t b = pair / s.heads, h = pair % s.heads, o = pair * D * D, out = (b * s.n + n) * token_stride + h * D;
    // grad's and v's rows are copied to the stack before mat_vec reads them element by element:
    // reading them in place measured 2x slower for the whole pass (likely the dq, dk, dv stores
    // below sharing their addresses' low bits, which the load unit treats as a possible conflict).
    alignas(64) float gn[D], skn[D], vn[D];
    FloatV sq[V], dsq[V], sk[V], dvv[V], dsk[V];
    softmax_row(qh(pair)(n), sq);
    const scalar_t *kr = kh(pair)(n), *gr = gh(pair)(n), *vr = vh(pair)(n);
    for (int j = 0; j < V; ++j) {
      sk[j] = exp_lanes(load_lanes(kr + j * kLanes) - load_lanes(pm + pair * D + j * kLanes)) *
              load_lanes(pkinv + pair * D + j * kLanes);
      store_lanes(skn + j * kLanes, sk[j]);
      store_lanes(gn + j * kLanes, load_lanes(gr + j * kLanes));
      store_lanes(vn + j * kLanes, load_lanes(vr + j * kLanes));
    }
    mat_vec<V>(gn, pct + o, dsq);
    FloatV prod[V];
    for (int j = 0; j < V; ++j) prod[j] = sq[j] * dsq[j];
    const FloatV dot = lane_sum<V>(prod);
    mat_vec<V>(skn, pg + o, dvv);
    mat_vec<V>(vn, pgt + o, dsk);
    for (int j = 0; j < V; ++j) {
      store_lanes(pq + out + j * kLanes, sq[j] * (dsq[j] - dot));
      store_lanes(pk + out + j * kLanes, sk[j] * (dsk[j] - load_lanes(pr + pair * D + j * kLanes)));
      store_lanes(pv + out + j * kLanes, dvv[j]);
    }
  });
  return grads.results(q);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_cpu(const at::Tensor& q, const at::Tensor& k,
                                                                       const at::Tensor& v, double scale) {
  const Shape s = check_inputs(q, k, v);
  return by_width(q, "linear_attention", [&](auto w, auto zero) {
    return forward<decltype(w)::value, decltype(zero)>(s, q, k, v, scale);
  });
}

std::vector<at::Tensor> backward_cpu(const at::Tensor& grad, const at::Tensor& q,
                                                            const at::Tensor& k, const at::Tensor& v,
                                                            const at::Tensor& context, const at::Tensor& kmax,
                                                            const at::Tensor& ksum, double scale, bool packed) {
  const Shape s = check_inputs(q, k, v);
  TORCH_CHECK(grad.dim() == 3 && grad.scalar_type() == q.scalar_type() && grad.size(0) == s.batch &&
                  grad.size(1) == s.heads * s.d && grad.size(2) == s.n && grad.stride(1) == 1,
              "linear_attention (cpu): grad must be [B, heads * D, N] in q's dtype with heads * D contiguous");
  for (const at::Tensor* t : {&context, &kmax, &ksum})
    TORCH_CHECK(t->is_contiguous() && t->scalar_type() == at::kFloat, "linear_attention (cpu): bad saved tensor");
  return by_width(q, "linear_attention", [&](auto w, auto zero) {
    return backward<decltype(w)::value, decltype(zero)>(s, grad, q, k, v, context, kmax, ksum, scale, packed);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(ddps, CPU, m) {
  m.impl("linear_attention", &forward_cpu);
  m.impl("linear_attention_backward", &backward_cpu);
}

}  // namespace ddps
