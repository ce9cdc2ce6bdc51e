// Float vectors for the CPU kernels of the denoiser ops (attention, conv3x3, group_norm_film_silu, linear_attention):
// 16 lanes, one AVX-512 register, and the loops that use them are compiled as clones for AVX-512,
// AVX2 and baseline x86-64 (DDPS_CLONES), with these helpers inlined into each clone.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <immintrin.h>

// The vector helpers are inlined into each clone: no vector crosses a call boundary, so GCC's
// note that such calls would have another ABI without AVX-512 does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

// Forced inline: GCC does not otherwise inline these (default-target) functions into the
// target_clones loops, and an out-of-line call per vector spills it through memory.
#define DDPS_INLINE __attribute__((always_inline))
#define DDPS_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))

namespace ddps {

constexpr int kLanes = 16;
typedef float FloatV __attribute__((vector_size(4 * kLanes)));
typedef int32_t IntV __attribute__((vector_size(4 * kLanes)));
typedef uint32_t UIntV __attribute__((vector_size(4 * kLanes)));
// The same vector at any float's alignment: full-vector loads and stores are float-typed (a memcpy
// store may alias anything, which makes GCC reload every captured pointer and size after it).
typedef float FloatVU __attribute__((vector_size(4 * kLanes), aligned(4)));

// mask ? a : b lane by lane, for masks as comparisons give them (each lane all ones or all zeros),
// in bit operations, the same lanes as `?:` bit for bit. For exp_lanes' clamp: GCC lowered that
// `?:` to a scalar compare and blend per lane in the AVX2 clones (perf annotate of
// group_norm_film_silu's output pass on an AVX2 EPYC). The other `?:` in the kernels stay: the
// argmax's (renoise) ran 2.6 ms as `?:` against 3.2 ms as select there.
DDPS_INLINE inline FloatV select(IntV mask, FloatV a, FloatV b) {
  IntV ai, bi;
  std::memcpy(&ai, &a, sizeof ai);
  std::memcpy(&bi, &b, sizeof bi);
  const IntV bits = (ai & mask) | (bi & ~mask);
  FloatV out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}

// exp for a vector: 2^n * p(r), x = n ln2 + r, |r| <= ln2 / 2, degree-6 Taylor polynomial
// (relative error < 3e-7), on x clamped to [-88, 88.5]: there n runs from -127, whose 2^n the
// bits below make +0, to 128, which they make inf. So exp(-inf) = 0 and exp(inf) = inf exactly
// (a zero weight times an infinite value then gives NaN, as in the torch ops the kernels
// reproduce), at the price of underflow from -87.7 and overflow from 88.4 instead of -87.3 and
// 88.7. NaN stays NaN (the comparisons are false for it). libm's expf does not vectorise without
// -ffast-math, which the rest of the extension must not have.
DDPS_INLINE inline FloatV exp_lanes(FloatV x) {
  const FloatV lo = FloatV{} - 88.0f, hi = FloatV{} + 88.5f;
  x = select(x < lo, lo, x);
  x = select(x > hi, hi, x);
  // Adding 1.5 * 2^23 rounds to an integer n and leaves it in the low mantissa bits of the sum, as
  // 0x4B400000 + n, whose shift by 23 is n << 23 (the constant's part shifts out).
  const FloatV magic = FloatV{} + 12582912.0f;
  const FloatV shifted = x * 1.44269504f + magic, n = shifted - magic;
  const FloatV r = (x - n * 0.693145752f) - n * 1.42860677e-6f;  // ln2 in two parts
  FloatV p = FloatV{} + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  UIntV bits;
  std::memcpy(&bits, &shifted, sizeof bits);
  bits = (bits << 23) + (127u << 23);
  FloatV scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// The sum (max) of x's lanes in every lane: four swap-and-add steps, pairing lanes i and i ^ w.
// Both lanes of a pair compute a + b and b + a, which IEEE makes equal, so all lanes end equal. A
// scalar loop over the lanes is one dependent add per lane, which per-token code waits on.
template <typename Op>
DDPS_INLINE inline FloatV butterfly(FloatV x, Op op) {
  x = op(x, __builtin_shuffle(x, IntV{8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7}));
  x = op(x, __builtin_shuffle(x, IntV{4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11}));
  x = op(x, __builtin_shuffle(x, IntV{2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13}));
  return op(x, __builtin_shuffle(x, IntV{1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14}));
}

DDPS_INLINE inline FloatV lanes_sum(FloatV x) {
  return butterfly(x, [](FloatV a, FloatV b) DDPS_INLINE { return a + b; });
}

// A NaN lane may be dropped, and the lanes may then differ: the callers shift by the max, and the
// NaN element itself makes their result NaN either way.
DDPS_INLINE inline FloatV lanes_max(FloatV x) {
  return butterfly(x, [](FloatV a, FloatV b) DDPS_INLINE { return b > a ? b : a; });
}

typedef uint16_t HalfBitsV __attribute__((vector_size(2 * kLanes)));

// bfloat16's 16 bits as the float they are the high half of: exact.
DDPS_INLINE inline FloatV widen_bf16(HalfBitsV bits) {
  const UIntV wide = __builtin_convertvector(bits, UIntV) << 16;
  FloatV v;
  std::memcpy(&v, &wide, sizeof v);
  return v;
}

// float -> bfloat16 bits, rounded to nearest even, NaN -> 0x7FC0 (as c10::BFloat16 rounds).
DDPS_INLINE inline HalfBitsV narrow_bf16(FloatV v) {
  UIntV bits;
  std::memcpy(&bits, &v, sizeof bits);
  const UIntV rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  return __builtin_convertvector(v != v ? UIntV{} + 0x7FC0u : rounded, HalfBitsV);
}

// The target of the functions that take bfloat16 products (vdpbf16ps), called only where
// cpu_bf16_dot().
#define DDPS_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512bf16")))

// Two rows of 16 bfloat16 (the low halves of a and b) side by side, a[0] b[0] a[1] b[1] ...: the
// pairs vdpbf16ps multiplies (lane i of its product adds a[i] x[2i] + b[i] x[2i + 1]).
alignas(64) inline constexpr int16_t kPairIndex[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                                       8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
DDPS_BF16_TARGET inline __m512i side_by_side(__m512i a, __m512i b) {
  return _mm512_permutex2var_epi16(a, _mm512_load_si512(kPairIndex), b);
}

// The two bfloat16 at p in every lane: the other operand of a row of pairs in vdpbf16ps.
DDPS_BF16_TARGET inline __m512bh broadcast_pair(const c10::BFloat16* p) {
  int32_t word;
  std::memcpy(&word, p, sizeof word);
  return (__m512bh)_mm512_set1_epi32(word);
}

// Whether this CPU has AVX512-BF16's dot products (cpuid) and DDPS_BF16_DOT is not 0: the condition
// of the bfloat16 products (conv3x3, attention, linear_attention), read by Python
// (ddps/ops/conv3x3.py) and by the kernels that take them.
inline bool cpu_bf16_dot() {
  static const bool enabled = [] {
    const char* env = std::getenv("DDPS_BF16_DOT");
    return __builtin_cpu_supports("avx512bf16") && !(env != nullptr && std::strcmp(env, "0") == 0);
  }();
  return enabled;
}

// count values (count < kLanes only at the end of a row) of float, bfloat16 or half as float
// lanes, and back (rounded to nearest even): the half-precision kernels keep float inside. The
// full float case is one vector load/store; bfloat16 is widened and narrowed in vectors; half, rare
// on CPUs, value by value.
template <typename scalar_t>
DDPS_INLINE inline FloatV load_lanes(const scalar_t* p, int count = kLanes) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (count == kLanes) return *reinterpret_cast<const FloatVU*>(p);
    FloatV v{};
    std::memcpy(&v, p, sizeof(float) * count);
    return v;
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    HalfBitsV bits{};
    std::memcpy(&bits, p, 2 * count);
    return widen_bf16(bits);
  } else {
    FloatV v{};
    for (int l = 0; l < count; ++l) v[l] = static_cast<float>(p[l]);
    return v;
  }
}

template <typename scalar_t>
DDPS_INLINE inline void store_lanes(scalar_t* p, FloatV v, int count = kLanes) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (count == kLanes)
      *reinterpret_cast<FloatVU*>(p) = v;
    else
      std::memcpy(p, &v, sizeof(float) * count);
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    const HalfBitsV bits = narrow_bf16(v);
    std::memcpy(p, &bits, 2 * count);
  } else {
    for (int l = 0; l < count; ++l) p[l] = static_cast<scalar_t>(v[l]);
  }
}

// One class (row) of a running argmax in lanes, without NaN: v wins where strictly greater, which
// is all of the exact rule (argmax_step) then. probe sums every v: a NaN among them stays in it
// (any_nan), and the caller redoes those pixels by the exact rule.
DDPS_INLINE inline void argmax_lanes(FloatV v, IntV index, FloatV& best, IntV& best_index, FloatV& probe) {
  const IntV take = v > best;
  best = take ? v : best;
  best_index = take ? index : best_index;
  probe += v;
}

// Whether a lane of probe[0 .. count) is NaN (a vector `v != v` GCC tests lane by lane anyway).
DDPS_INLINE inline bool any_nan(const FloatV* probe, int count) {
  for (int j = 0; j < count; ++j)
    for (int l = 0; l < kLanes; ++l)
      if (probe[j][l] != probe[j][l]) return true;
  return false;
}

// f(scalar_t{}) for activations of dtype t: float32, bfloat16 or float16 (kernels that load and
// store them through load_lanes/store_lanes above and compute in float).
template <typename F>
void dispatch_activations(c10::ScalarType t, const char* op, F f) {
  switch (t) {
    case c10::ScalarType::Float:
      return f(float{});
    case c10::ScalarType::BFloat16:
      return f(c10::BFloat16{});
    case c10::ScalarType::Half:
      return f(c10::Half{});
    default:
      TORCH_CHECK(false, op, ": activations must be float32, bfloat16 or float16, got ", t);
  }
}

}  // namespace ddps
