// Counter-based random numbers shared by the CPU loops and the CUDA kernels.
//
// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11) with the
// counter/key layout of Triton's tl.randint4x: counter = (index_lo, index_hi, 0, 0) and
// key = (seed_lo, seed_hi). Every backend that draws element `index` under `seed` therefore gets
// the same four words, whatever the thread count, block size or device.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define DDPS_HD __host__ __device__ __forceinline__
#else
#define DDPS_HD inline
#endif

namespace ddps {

struct Philox4 {
  uint32_t w0, w1, w2, w3;
};

DDPS_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
}

struct MulHi32 {
  DDPS_HD uint32_t operator()(uint32_t a, uint32_t b) const { return mulhi32(a, b); }
};

// The ten rounds on counter words of type U: uint32_t, or on the CPU a vector of uint32 lanes
// (common/philox_cpu.h) with `mulhi` its lane-wise high product. One definition for every backend.
template <typename U, typename MulHi>
DDPS_HD void philox_rounds(U& c0, U& c1, U& c2, U& c3, uint32_t k0, uint32_t k1, const MulHi& mulhi) {
  for (int round = 0; round < 10; ++round) {
    const U n0 = mulhi(0xCD9E8D57u, c2) ^ c1 ^ k0;
    const U n2 = mulhi(0xD2511F53u, c0) ^ c3 ^ k1;
    c1 = 0xCD9E8D57u * c2;
    c3 = 0xD2511F53u * c0;
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
}

DDPS_HD Philox4 philox4x32_10(uint64_t index, uint64_t seed) {
  uint32_t c0 = static_cast<uint32_t>(index), c1 = static_cast<uint32_t>(index >> 32);
  uint32_t c2 = 0u, c3 = 0u;
  philox_rounds(c0, c1, c2, c3, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32), MulHi32{});
  return Philox4{c0, c1, c2, c3};
}

// The label ops need two words per element: one Philox call serves the pair (2j, 2j + 1), words
// (w0, w1) for the even element and (w2, w3) for the odd one. Counter = index / 2.
struct Words2 {
  uint32_t first, second;
};

DDPS_HD Words2 pair_words(const Philox4& r, bool odd) {
  return odd ? Words2{r.w2, r.w3} : Words2{r.w0, r.w1};
}

DDPS_HD Words2 element_words(uint64_t index, uint64_t seed) {
  return pair_words(philox4x32_10(index >> 1, seed), (index & 1) != 0);
}

// Uniform integer in [0, n) from one 32-bit word (multiply-shift; bias <= n / 2^32).
DDPS_HD uint32_t uniform_below(uint32_t word, uint32_t n) { return mulhi32(word, n); }

}  // namespace ddps
