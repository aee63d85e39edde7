// Host-side facts of the kernels that the api needs without including device code: the largest head
// dim compiled, and how the prefix gradient is split into partial sums.
#pragma once

#include <cstdint>

namespace pk {

// Largest head dim with a compiled kernel; a head dim must also be a multiple of 8 (16-byte rows).
constexpr int kMaxHeadDim = 128;

// Keys per block of the prefix dK/dV pass (the same for every head dim; dispatch.h asserts it).
constexpr int kPrefixBlockN = 64;

inline int cdiv(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

// How many fp32 partials the prefix gradient uses: enough blocks to fill the GPU twice over, never
// more than the B * G (batch row, query head) units to sum. The split depends only on the shape and
// the SM count, so a given GPU always adds the same terms in the same order (bitwise deterministic).
inline void prefix_splits(int B, int G, int Hkv, int P, int sm_count, int& splits, int& units_per_split) {
  const int units = B * G;
  const int blocks_per_split = cdiv(P, kPrefixBlockN) * Hkv;
  int want = cdiv(2 * static_cast<int64_t>(sm_count), blocks_per_split);
  want = want < 1 ? 1 : (want > units ? units : want);
  units_per_split = cdiv(units, want);
  splits = cdiv(units, units_per_split);
}

}  // namespace pk
