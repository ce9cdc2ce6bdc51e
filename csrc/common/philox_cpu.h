// The label ops' Philox words on the CPU, sixteen counters at a time.
#pragma once

#include <cstdint>

#include "common/philox.h"

namespace ddps {

// Words2 of elements first .. first + count - 1 into out[0 .. count): one Philox call per pair of
// elements (philox.h), pairs evaluated as vectors of 16 lanes in the widest unit the CPU has.
void element_words_range(uint64_t first, int64_t count, uint64_t seed, Words2* out);

}  // namespace ddps
