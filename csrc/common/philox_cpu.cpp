// Lane-parallel Philox for the CPU loops. GCC vector extensions give one AVX-512 register, two AVX2
// or four SSE2 ones per vector, and target_clones picks the clone the CPU supports at load time;
// the rounds are philox.h's, so the words equal the scalar (and CUDA, and Triton) ones.
#include "common/philox_cpu.h"

namespace ddps {
namespace {

constexpr int kLanes = 16;
typedef uint32_t U32V __attribute__((vector_size(4 * kLanes)));
typedef uint64_t U64V __attribute__((vector_size(8 * kLanes)));

struct MulHi32V {
  U32V operator()(uint32_t a, U32V b) const {
    return __builtin_convertvector((__builtin_convertvector(b, U64V) * uint64_t{a}) >> 32, U32V);
  }
};

// Pairs first_pair .. first_pair + kLanes - 1, their four words lane by lane.
__attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
void philox_lanes(uint64_t first_pair, uint64_t seed, U32V words[4]) {
  U32V c0, c1, c2 = {}, c3 = {};
  for (int l = 0; l < kLanes; ++l) {
    c0[l] = static_cast<uint32_t>(first_pair + l);
    c1[l] = static_cast<uint32_t>((first_pair + l) >> 32);
  }
  philox_rounds(c0, c1, c2, c3, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32), MulHi32V{});
  words[0] = c0;
  words[1] = c1;
  words[2] = c2;
  words[3] = c3;
}

}  // namespace

void element_words_range(uint64_t first, int64_t count, uint64_t seed, Words2* out) {
  if (count <= 0) return;
  const uint64_t last = first + static_cast<uint64_t>(count);  // one past the end
  for (uint64_t pair = first >> 1; 2 * pair < last; pair += kLanes) {
    U32V words[4];
    philox_lanes(pair, seed, words);
    for (int l = 0; l < kLanes; ++l) {
      const uint64_t even = 2 * (pair + l);
      if (even >= first && even < last) out[even - first] = Words2{words[0][l], words[1][l]};
      if (even + 1 >= first && even + 1 < last) out[even + 1 - first] = Words2{words[2][l], words[3][l]};
    }
  }
}

}  // namespace ddps
