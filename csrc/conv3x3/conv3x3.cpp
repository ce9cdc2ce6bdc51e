// ddps::conv3x3 on the CPU: a 3x3 convolution (stride 1, padding 1) of channels-last activations
// (float32, bfloat16 or float16; float inside) by Winograd's F(2x2, 3x3). Each 2x2 block of outputs is computed from the 4x4 input
// tile around it as A^T [U * (B^T d B)] A, U = G w G^T: per tile, 16 products of a Cin-vector with
// a Cin x Cout matrix instead of 36, 2.25x fewer multiply-adds than the direct convolution. B^T and
// A^T hold only 0 and +-1, so the two transforms are additions; U comes from Python
// (ddps/ops/conv3x3.py), computed once per weight. Every tile's arithmetic is the same whatever
// chunk or thread it falls in, so the result does not depend on the thread count.
// The weight's gradient comes from the same transforms run backwards: dU[k] = sum over tiles of
// (B^T d B)[k]^T (A g A^T)[k], g the output gradient's 2x2 block, and Python takes G^T dU G.
// Fused multiply-adds in the products: nothing here must match another backend bit for bit.
// With bfloat16 activations and a bfloat16 transformed weight (on a CPU with AVX512-BF16, which
// ddps/ops/conv3x3.py asks cpu_bf16_dot about), the products take bfloat16 operands: V is
// transformed in float and rounded once to bfloat16, and vdpbf16ps sums pairs of input channels
// into float accumulators, 32 multiply-adds per instruction where an FMA does 16.
// The weight gradient of bfloat16 activations there likewise: V and the output gradient's
// transform rounded once to bfloat16, vdpbf16ps summing pairs of tiles.
//
// Tiles (i, j), th x tw = ceil(H/2) x ceil(W/2) per sample, are numbered (b * th + i) * tw + j.
// A chunk's V and M hold a row of C values per (position k, tile).

#pragma GCC optimize("fp-contract=fast")
// The loops are vectorised by hand (explicit vectors); GCC's loop vectoriser otherwise turns the
// AVX2 register blocks into shuffles and horizontal sums across Cin.
#pragma GCC optimize("no-tree-loop-vectorize")

#include <torch/library.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <vector>

#include "common/vec.h"

namespace ddps {
namespace {

constexpr int kPositions = 16;  // the 4 x 4 tile
constexpr int kRows = 12;            // tiles per register block of products
constexpr int64_t kChunk = 4 * kRows;  // tiles per chunk (48 measured best of 48, 96, 192)
constexpr int64_t kWeightChunk = 16 * kRows;  // weight-gradient tiles per chunk (as fast as 96; 384: 1.3x slower)

struct Tile {
  int64_t b, i, j;
};

struct Dims {
  int64_t batch, height, width, tiles_h, tiles_w;
  int64_t tiles() const { return batch * tiles_h * tiles_w; }
  Tile tile(int64_t index) const {
    const int64_t row = index / tiles_w;
    return {row / tiles_h, row % tiles_h, index % tiles_w};
  }
};

// B^T z for the four values of one tile column or row.
DDPS_INLINE inline void input_1d(const FloatV (&z)[4], FloatV (&out)[4]) {
  out[0] = z[0] - z[2];
  out[1] = z[1] + z[2];
  out[2] = z[2] - z[1];
  out[3] = z[1] - z[3];
}

// A^T z for the four values of one tile column or row.
DDPS_INLINE inline void output_1d(const FloatV (&z)[4], FloatV (&out)[2]) {
  out[0] = z[0] + z[1] + z[2];
  out[1] = z[1] - z[2] - z[3];
}

// A z, the adjoint of output_1d: what a gradient at the two outputs is at the four values.
DDPS_INLINE inline void output_1d_adjoint(const FloatV (&z)[2], FloatV (&out)[4]) {
  out[0] = z[0];
  out[1] = z[0] + z[1];
  out[2] = z[0] - z[1];
  out[3] = FloatV{} - z[1];
}

// v[(k * stride + t) * ld + c] = (B^T d B)[k] (float, or rounded once to bfloat16) for the n tiles first .. first + n - 1 (tile index
// (b * tiles_h + i) * tiles_w + j), c < C: d is the 4 x 4 patch of x at rows 2i-1 .. 2i+2 and
// columns 2j-1 .. 2j+2, zero outside the image (the padding).
template <typename scalar_t, typename v_t>
DDPS_CLONES void input_tiles(const scalar_t* x, v_t* v, const Dims& d, int64_t C, int64_t ld, int64_t first, int64_t n,
                             int64_t stride) {
  for (int64_t t = 0; t < n; ++t) {
    const auto [b, i, j] = d.tile(first + t);
    const scalar_t* sample = x + b * d.height * d.width * C;
    for (int64_t c = 0; c < C; c += kLanes) {
      const int count = static_cast<int>(std::min<int64_t>(kLanes, C - c));
      FloatV rows[4][4];  // B^T applied along each patch row
      for (int u = 0; u < 4; ++u) {
        const int64_t y = 2 * i + u - 1;
        FloatV z[4];
        for (int w = 0; w < 4; ++w) {
          const int64_t xc = 2 * j + w - 1;
          const bool inside = y >= 0 && y < d.height && xc >= 0 && xc < d.width;
          z[w] = inside ? load_lanes(sample + (y * d.width + xc) * C + c, count) : FloatV{};
        }
        input_1d(z, rows[u]);
      }
      for (int s = 0; s < 4; ++s) {
        FloatV z[4] = {rows[0][s], rows[1][s], rows[2][s], rows[3][s]}, out[4];
        input_1d(z, out);
        for (int r = 0; r < 4; ++r) store_lanes(v + ((4 * r + s) * stride + t) * ld + c, out[r], count);
      }
    }
  }
}

// The register blocks of products and weight_products: kBlock x 32 floats of accumulators in
// vectors of kWidth floats. AVX-512 (32 registers) takes 12 x 32 in 16-float vectors; AVX2 (16
// registers) 2 x 32 in 8-float ones: GCC lowers a 16-float vector on AVX2 through the stack, and
// 12 x 32 does not fit its registers either (27x slower than oneDNN on an AVX2 EPYC before).
// (Specialisations, not an alias template: GCC drops vector_size from a dependent alias.)
template <int kWidth>
struct LanesOf;
template <>
struct LanesOf<8> {
  typedef float type __attribute__((vector_size(32), aligned(4)));
};
template <>
struct LanesOf<16> {
  typedef float type __attribute__((vector_size(64), aligned(4)));
};
template <int kWidth>
using Lanes = typename LanesOf<kWidth>::type;
static_assert(sizeof(Lanes<8>) == 32 && sizeof(Lanes<16>) == 64);

// out[r][0 .. 32) = sum over i < n of a[r * a_row + i * a_step] * b[i * 32 .. i * 32 + 32), r < kBlock.
template <int kBlock, int kWidth>
DDPS_INLINE inline void block_products(const float* a, int64_t a_row, int64_t a_step, const float* b, int64_t n,
                                       Lanes<kWidth> (&acc)[kBlock][32 / kWidth]) {
  constexpr int kVectors = 32 / kWidth;
  for (int64_t i = 0; i < n; ++i) {
    Lanes<kWidth> bv[kVectors];
    for (int j = 0; j < kVectors; ++j) bv[j] = *reinterpret_cast<const Lanes<kWidth>*>(b + i * 32 + j * kWidth);
    for (int r = 0; r < kBlock; ++r) {
      const float x = a[r * a_row + i * a_step];
      for (int j = 0; j < kVectors; ++j) acc[r][j] += x * bv[j];
    }
  }
}

// One block of M[k] = V[k] U[k]: rows vr .. (kBlock rows of cin values), one 32-column panel.
template <int kBlock, int kWidth>
DDPS_INLINE inline void product_block(const float* vr, const float* panel, float* out, int64_t cin, int64_t cout_pad) {
  Lanes<kWidth> acc[kBlock][32 / kWidth] = {};
  block_products<kBlock, kWidth>(vr, cin, 1, panel, cin, acc);
  for (int r = 0; r < kBlock; ++r)
    for (int j = 0; j < 32 / kWidth; ++j) *reinterpret_cast<Lanes<kWidth>*>(out + r * cout_pad + j * kWidth) = acc[r][j];
}

// M[k] = V[k] U[k] for the rows 0 .. rows - 1 of a chunk (rows a multiple of kRows): v as
// input_tiles writes it, u [16, Cout_pad / 32, Cin, 32] (each 32-column panel of U[k] contiguous),
// m[(k * stride + t) * Cout_pad + co], one register block (above) per pass over Cin.
// oneDNN's 1x1 convolution does these products fast only on whole images with all threads (on
// one thread it takes a path 4x slower), which would stream the 4x-sized V through memory.
DDPS_CLONES void products(const float* v, const float* u, float* m, int64_t cin, int64_t cout_pad, int64_t rows,
                          int64_t stride) {
  const int64_t panels = cout_pad / 32;
  const bool wide = __builtin_cpu_supports("avx512f");
  for (int k = 0; k < kPositions; ++k) {
    const float* vk = v + k * stride * cin;
    float* mk = m + k * stride * cout_pad;
    for (int64_t p = 0; p < panels; ++p) {
      const float* panel = u + (k * panels + p) * cin * 32;
      float* out = mk + p * 32;
      if (wide) {
        for (int64_t t = 0; t < rows; t += kRows) product_block<kRows, 16>(vk + t * cin, panel, out + t * cout_pad, cin, cout_pad);
      } else {
        for (int64_t t = 0; t < rows; t += 2) product_block<2, 8>(vk + t * cin, panel, out + t * cout_pad, cin, cout_pad);
      }
    }
  }
}

// products with bfloat16 operands: v as input_tiles writes it in bfloat16, rows of ld = 2 * pairs
// values (zero beyond Cin); u [16, Cout_pad / 32, pairs, 64], each row of a panel the 32 columns'
// (channel 2i, channel 2i + 1) pairs side by side, as vdpbf16ps multiplies them: lane j of an
// accumulator gains v[2i] u[2i][j] + v[2i + 1] u[2i + 1][j] per instruction. A register block of
// kRows x 32 float accumulators per pass over the pairs, as products' AVX-512 one.
DDPS_BF16_TARGET void products_bf16(const c10::BFloat16* v, const c10::BFloat16* u, float* m, int64_t pairs,
                                   int64_t cout_pad, int64_t rows, int64_t stride) {
  const int64_t panels = cout_pad / 32, ld = 2 * pairs;
  for (int k = 0; k < kPositions; ++k) {
    const c10::BFloat16* vk = v + k * stride * ld;
    float* mk = m + k * stride * cout_pad;
    for (int64_t p = 0; p < panels; ++p) {
      const c10::BFloat16* panel = u + (k * panels + p) * pairs * 64;
      for (int64_t t = 0; t < rows; t += kRows) {
        __m512 acc[kRows][2];
        for (int r = 0; r < kRows; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
        for (int64_t i = 0; i < pairs; ++i) {
          const __m512bh b0 = (__m512bh)_mm512_loadu_si512(panel + i * 64);
          const __m512bh b1 = (__m512bh)_mm512_loadu_si512(panel + i * 64 + 32);
          for (int r = 0; r < kRows; ++r) {
            const __m512bh a = broadcast_pair(vk + (t + r) * ld + 2 * i);
            acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, b0);
            acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, b1);
          }
        }
        for (int r = 0; r < kRows; ++r) {
          _mm512_storeu_ps(mk + (t + r) * cout_pad + p * 32, acc[r][0]);
          _mm512_storeu_ps(mk + (t + r) * cout_pad + p * 32 + 16, acc[r][1]);
        }
      }
    }
  }
}

// out[b, :, 2i + a, 2j + e] = (A^T M A)[a][e] + bias for the n tiles first .. first + n - 1,
// where it falls inside the image; M[k] of tile t at m[(k * stride + t) * Cout_pad].
template <typename scalar_t>
DDPS_CLONES void output_tiles(const float* m, const float* bias, scalar_t* out, const Dims& d, int64_t C, int64_t cout_pad,
                              int64_t first, int64_t n, int64_t stride) {
  for (int64_t t = 0; t < n; ++t) {
    const auto [b, i, j] = d.tile(first + t);
    scalar_t* sample = out + b * d.height * d.width * C;
    for (int64_t c = 0; c < C; c += kLanes) {
      const int count = static_cast<int>(std::min<int64_t>(kLanes, C - c));
      FloatV rows[4][2];  // A^T applied along each tile row
      for (int r = 0; r < 4; ++r) {
        FloatV z[4];
        for (int s = 0; s < 4; ++s) z[s] = load_lanes(m + ((4 * r + s) * stride + t) * cout_pad + c, count);
        output_1d(z, rows[r]);
      }
      const FloatV shift = bias != nullptr ? load_lanes(bias + c, count) : FloatV{};
      for (int e = 0; e < 2; ++e) {
        FloatV z[4] = {rows[0][e], rows[1][e], rows[2][e], rows[3][e]}, y[2];
        output_1d(z, y);
        for (int a = 0; a < 2; ++a) {
          const int64_t yy = 2 * i + a, xx = 2 * j + e;
          if (yy < d.height && xx < d.width) store_lanes(sample + (yy * d.width + xx) * C + c, y[a] + shift, count);
        }
      }
    }
  }
}

// The adjoint of output_tiles (bias aside): (A g A^T)[k], g the 2 x 2 block of grad [B, C, H, W]
// (channels-last) at rows 2i, 2i+1 and columns 2j, 2j+1, zero outside the image: the gradient of
// the tile's M, for the n tiles first .. first + n - 1. In 32-channel panels, each position's
// panel holding its stride tiles contiguously: channel c of tile t at
// m[((k * panels + c / 32) * stride + t) * 32 + c % 32], as weight_products reads them.
template <typename scalar_t>
DDPS_CLONES void grad_tiles(const scalar_t* grad, float* m, const Dims& d, int64_t C, int64_t panels, int64_t first,
                            int64_t n, int64_t stride) {
  for (int64_t t = 0; t < n; ++t) {
    const auto [b, i, j] = d.tile(first + t);
    const scalar_t* sample = grad + b * d.height * d.width * C;
    for (int64_t c = 0; c < C; c += kLanes) {
      const int count = static_cast<int>(std::min<int64_t>(kLanes, C - c));
      FloatV cols[2][4];  // A applied down each of the block's two columns
      for (int e = 0; e < 2; ++e) {
        FloatV z[2];
        for (int a = 0; a < 2; ++a) {
          const int64_t yy = 2 * i + a, xx = 2 * j + e;
          z[a] = yy < d.height && xx < d.width ? load_lanes(sample + (yy * d.width + xx) * C + c, count) : FloatV{};
        }
        output_1d_adjoint(z, cols[e]);
      }
      for (int r = 0; r < 4; ++r) {
        FloatV z[2] = {cols[0][r], cols[1][r]}, out[4];
        output_1d_adjoint(z, out);
        for (int q = 0; q < 4; ++q)
          store_lanes(m + (((4 * r + q) * panels + c / 32) * stride + t) * 32 + c % 32, out[q], count);
      }
    }
  }
}

// du[k][ci][co-panel p] += sum over the chunk's rows t of v[k][t][ci] * m[k][p][t], for
// item = k * panels + p: a register block of du per pass over the rows (as in products, with the
// reduction over tiles instead of channels). v rows hold cin_pad values (a
// multiple of kRows, zero beyond Cin); m as grad_tiles writes it (zero beyond Cout), each panel
// contiguous, so that it stays in L1 while every block of 12 input channels passes over it.
template <int kBlock, int kWidth>
DDPS_INLINE inline void weight_block(const float* vk, const float* mk, float* dk, int64_t cin_pad, int64_t cout_pad,
                                     int64_t rows) {
  // The chunk's sum, then added to du: sums of a chunk's length, not of every tile's, round.
  Lanes<kWidth> acc[kBlock][32 / kWidth] = {};
  block_products<kBlock, kWidth>(vk, 1, cin_pad, mk, rows, acc);
  for (int r = 0; r < kBlock; ++r)
    for (int j = 0; j < 32 / kWidth; ++j) {
      auto* row = reinterpret_cast<Lanes<kWidth>*>(dk + r * cout_pad + j * kWidth);
      *row = *row + acc[r][j];
    }
}

DDPS_CLONES void weight_products(const float* v, const float* m, float* du, int64_t cin_pad, int64_t cout_pad,
                                 int64_t rows, int64_t stride, int64_t item) {
  const int64_t panels = cout_pad / 32, k = item / panels, p = item % panels;
  const float* vk = v + k * stride * cin_pad;
  const float* mk = m + item * stride * 32;
  float* dk = du + k * cin_pad * cout_pad + p * 32;
  if (__builtin_cpu_supports("avx512f")) {
    for (int64_t ci = 0; ci < cin_pad; ci += kRows) weight_block<kRows, 16>(vk + ci, mk, dk + ci * cout_pad, cin_pad, cout_pad, rows);
  } else {
    for (int64_t ci = 0; ci < cin_pad; ci += 2) weight_block<2, 8>(vk + ci, mk, dk + ci * cout_pad, cin_pad, cout_pad, rows);
  }
}

// The weight gradient's products with bfloat16 operands sum over pairs of tiles: rows t and t + 1
// (n values each, of the count rows at in) rounded once to bfloat16 and side by side,
// out[((t / 2) * n + c) * 2 + t % 2], the partner of an odd count's last row zero.
DDPS_BF16_TARGET void tile_pairs(const float* in, c10::BFloat16* out, int64_t n, int64_t count) {
  const auto rounded = [](__m512 x) DDPS_BF16_TARGET { return _mm512_castsi256_si512((__m256i)_mm512_cvtneps_pbh(x)); };
  for (int64_t t = 0; t < count; t += 2) {
    const float *a = in + t * n, *b = in + (t + 1) * n;
    for (int64_t c = 0; c < n; c += kLanes) {
      const int lanes = static_cast<int>(std::min<int64_t>(kLanes, n - c));
      const __mmask16 mask = static_cast<__mmask16>((1u << lanes) - 1);
      const __m512 first = _mm512_maskz_loadu_ps(mask, a + c);
      const __m512 second = t + 1 < count ? _mm512_maskz_loadu_ps(mask, b + c) : _mm512_setzero_ps();
      const __mmask32 pairs = lanes == kLanes ? ~0u : static_cast<__mmask32>((1ull << (2 * lanes)) - 1);
      _mm512_mask_storeu_epi16(out + (t / 2 * n + c) * 2, pairs, side_by_side(rounded(first), rounded(second)));
    }
  }
}

// weight_products with bfloat16 operands, v and m in tile pairs (tile_pairs; pstride tile pairs per
// position or panel): a kRows x 32 register block of du per pass over the chunk's pairs of tiles,
// lane j gaining v[t][ci] m[t][j] + v[t + 1][ci] m[t + 1][j] per instruction.
DDPS_BF16_TARGET void weight_products_bf16(const c10::BFloat16* v, const c10::BFloat16* m, float* du, int64_t cin_pad,
                                           int64_t cout_pad, int64_t pairs, int64_t pstride, int64_t item) {
  const int64_t panels = cout_pad / 32, k = item / panels, p = item % panels;
  const c10::BFloat16* vk = v + k * pstride * cin_pad * 2;
  const c10::BFloat16* mk = m + item * pstride * 64;
  float* dk = du + k * cin_pad * cout_pad + p * 32;
  for (int64_t ci = 0; ci < cin_pad; ci += kRows) {
    __m512 acc[kRows][2];
    for (int r = 0; r < kRows; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int64_t t = 0; t < pairs; ++t) {
      const __m512bh b0 = (__m512bh)_mm512_loadu_si512(mk + t * 64), b1 = (__m512bh)_mm512_loadu_si512(mk + t * 64 + 32);
      for (int r = 0; r < kRows; ++r) {
        const __m512bh a = broadcast_pair(vk + (t * cin_pad + ci + r) * 2);
        acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, b0);
        acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, b1);
      }
    }
    for (int r = 0; r < kRows; ++r) {
      float* row = dk + (ci + r) * cout_pad;
      _mm512_storeu_ps(row, _mm512_add_ps(_mm512_loadu_ps(row), acc[r][0]));
      _mm512_storeu_ps(row + 16, _mm512_add_ps(_mm512_loadu_ps(row + 16), acc[r][1]));
    }
  }
}

at::Tensor forward_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& u,
                       const std::optional<at::Tensor>& bias) {
  const auto cl = at::MemoryFormat::ChannelsLast;
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous(cl), "conv3x3: x must be [B, C, H, W] in channels-last memory");
  const int64_t cin = x.size(1), cout = weight.size(0), cout_pad = (cout + 31) / 32 * 32, pairs = (cin + 1) / 2;
  const bool dot = u.scalar_type() == at::kBFloat16;
  if (dot) {
    TORCH_CHECK(cpu_bf16_dot(), "conv3x3: a bfloat16 transformed weight needs a CPU with AVX512-BF16 (and "
                "DDPS_BF16_DOT other than 0); winograd_weight gives float32 otherwise");
    TORCH_CHECK(x.scalar_type() == at::kBFloat16, "conv3x3: a bfloat16 transformed weight takes bfloat16 x, got ",
                x.scalar_type());
    TORCH_CHECK(u.dim() == 4 && u.size(0) == kPositions && u.size(1) == cout_pad / 32 && u.size(2) == pairs &&
                    u.size(3) == 64 && u.is_contiguous(),
                "conv3x3: the bfloat16 transformed weight must be [16, ceil(Cout / 32), ceil(Cin / 2), 64], contiguous");
  } else {
    TORCH_CHECK(u.dim() == 4 && u.size(0) == kPositions && u.size(1) == cout_pad / 32 && u.size(2) == cin &&
                    u.size(3) == 32 && u.scalar_type() == at::kFloat && u.is_contiguous(),
                "conv3x3: the transformed weight must be float32 [16, ceil(Cout / 32), Cin, 32], contiguous");
  }
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == cout && weight.size(1) == cin && weight.size(2) == 3 &&
                  weight.size(3) == 3,
              "conv3x3: weight must be [Cout, Cin, 3, 3] matching the transformed weight");
  TORCH_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == cout && bias->scalar_type() == at::kFloat),
              "conv3x3: bias must be float32 [Cout]");
  const Dims d{x.size(0), x.size(2), x.size(3), (x.size(2) + 1) / 2, (x.size(3) + 1) / 2};
  auto out = at::empty({d.batch, cout, d.height, d.width}, x.options().memory_format(cl));
  if (out.numel() == 0) return out;
  if (cin == 0) return bias.has_value() ? out.copy_(bias->view({1, cout, 1, 1})) : out.zero_();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  const int64_t chunks = (d.tiles() + kChunk - 1) / kChunk;

  // Each thread takes chunks of kChunk tiles and runs the three stages on one chunk before the
  // next: the chunk's V and M (16 rows per tile) stay in its cache. Transforming the whole image
  // first would stream 4x the activations through memory twice and evict what the rest of the
  // UNet keeps in cache. Half-precision activations are widened on load and rounded once on
  // store: the products sum in float.
  // One thread's chunks: V (v_t, rows of ld values, zero-filled once: an odd Cin's last bfloat16
  // pair ends in a zero that input_tiles never writes) and M, then the three stages per chunk.
  auto stages = [&](const auto* xp, auto* op, auto v_zero, int64_t ld, auto products_of) {
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      std::vector<decltype(v_zero)> v(kPositions * kChunk * ld, v_zero);
      std::vector<float> m(kPositions * kChunk * cout_pad);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t first = item * kChunk, n = std::min(kChunk, d.tiles() - first);
        input_tiles(xp, v.data(), d, cin, ld, first, n, kChunk);
        products_of(v.data(), m.data(), (n + kRows - 1) / kRows * kRows);
        output_tiles(m.data(), bp, op, d, cout, cout_pad, first, n, kChunk);
      }
    });
  };
  if (dot) {
    const auto* up = u.data_ptr<c10::BFloat16>();
    stages(x.data_ptr<c10::BFloat16>(), out.data_ptr<c10::BFloat16>(), c10::BFloat16(0.0f), 2 * pairs,
           [&](const c10::BFloat16* v, float* m, int64_t rows) { products_bf16(v, up, m, pairs, cout_pad, rows, kChunk); });
    return out;
  }
  const float* up = u.data_ptr<float>();
  dispatch_activations(x.scalar_type(), "conv3x3", [&](auto zero) {
    using scalar_t = decltype(zero);
    stages(x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), 0.0f, cin,
           [&](const float* v, float* m, int64_t rows) { products(v, up, m, cin, cout_pad, rows, kChunk); });
  });
  return out;
}

// d(loss)/dU for the gradient grad of conv3x3's output (both channels-last, of one dtype, grad
// [B, Cout, H, W]): float32 [16, Cin, Cout], the sum over all tiles of every sample of V[k]^T M[k]; the
// weight's gradient is G^T dU G (ddps/ops/conv3x3.py). Per chunk of kWeightChunk tiles the
// threads first transform x and grad, then share out the (position, 32-column panel) blocks of
// dU: each block is summed by one thread over the tiles in order, whatever the thread count.
at::Tensor weight_grad_cpu(const at::Tensor& grad, const at::Tensor& x) {
  const auto cl = at::MemoryFormat::ChannelsLast;
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous(cl) && grad.dim() == 4 && grad.scalar_type() == x.scalar_type() &&
                  grad.is_contiguous(cl) && grad.size(0) == x.size(0) && grad.size(2) == x.size(2) &&
                  grad.size(3) == x.size(3),
              "conv3x3_weight_grad: grad and x must be [B, C, H, W] channels-last tensors of one dtype, batch and size");
  const int64_t cin = x.size(1), cout = grad.size(1);
  const int64_t cin_pad = (cin + kRows - 1) / kRows * kRows, cout_pad = (cout + 31) / 32 * 32;
  const Dims d{x.size(0), x.size(2), x.size(3), (x.size(2) + 1) / 2, (x.size(3) + 1) / 2};
  at::Tensor du = at::zeros({kPositions, cin_pad, cout_pad}, x.options().dtype(at::kFloat));
  if (cin > 0 && cout > 0) {
    // bfloat16 activations on a CPU with AVX512-BF16: V and M rounded once to bfloat16 (as the
    // forward's V and U), in pairs of tiles, products summed in float.
    const bool dot = x.scalar_type() == at::kBFloat16 && cpu_bf16_dot();
    const int64_t panels = cout_pad / 32, pstride = kWeightChunk / 2;
    dispatch_activations(x.scalar_type(), "conv3x3_weight_grad", [&](auto zero) {
      using scalar_t = decltype(zero);
      const scalar_t *xp = x.data_ptr<scalar_t>(), *gp = grad.data_ptr<scalar_t>();
      float* dp = du.data_ptr<float>();
      // Zero-filled once: the padding columns are never written.
      std::vector<float> v(kPositions * kWeightChunk * cin_pad, 0.0f), m(kPositions * kWeightChunk * cout_pad, 0.0f);
      std::vector<c10::BFloat16> vb(dot ? v.size() : 0), mb(dot ? m.size() : 0);
      for (int64_t first = 0; first < d.tiles(); first += kWeightChunk) {
        const int64_t n = std::min(kWeightChunk, d.tiles() - first);
        at::parallel_for(0, (n + kRows - 1) / kRows, 1, [&](int64_t begin, int64_t end) {
          const int64_t t0 = begin * kRows, count = std::min(end * kRows, n) - t0;  // t0 even
          input_tiles(xp, v.data() + t0 * cin_pad, d, cin, cin_pad, first + t0, count, kWeightChunk);
          grad_tiles(gp, m.data() + t0 * 32, d, cout, panels, first + t0, count, kWeightChunk);
          if (!dot) return;
          for (int k = 0; k < kPositions; ++k)
            tile_pairs(v.data() + (k * kWeightChunk + t0) * cin_pad, vb.data() + (k * pstride + t0 / 2) * cin_pad * 2,
                       cin_pad, count);
          for (int64_t item = 0; item < kPositions * panels; ++item)
            tile_pairs(m.data() + (item * kWeightChunk + t0) * 32, mb.data() + (item * pstride + t0 / 2) * 64, 32, count);
        });
        at::parallel_for(0, kPositions * panels, 1, [&](int64_t begin, int64_t end) {
          for (int64_t item = begin; item < end; ++item) {
            if (dot)
              weight_products_bf16(vb.data(), mb.data(), dp, cin_pad, cout_pad, (n + 1) / 2, pstride, item);
            else
              weight_products(v.data(), m.data(), dp, cin_pad, cout_pad, n, kWeightChunk, item);
          }
        });
      }
    });
  }
  return du.narrow(1, 0, cin).narrow(2, 0, cout).contiguous();
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ddps, m) { m.def("cpu_bf16_dot() -> bool", &cpu_bf16_dot); }

TORCH_LIBRARY_IMPL(ddps, CPU, m) {
  m.impl("conv3x3", &forward_cpu);
  m.impl("conv3x3_weight_grad", &weight_grad_cpu);
}

}  // namespace ddps
