// Shared-memory tiles and tensor-core fragments common to every pass.
//
// A shared tile of R rows holds R x kHeadDim elements, row-major with a row stride of kHeadDim + 8
// elements: the 16-byte pad puts the 8 rows an ldmatrix reads on 8 different bank groups (the row
// stride in 16-byte units, kHeadDim / 8 + 1, is odd), so loads are conflict-free without a swizzle.
//
// Fragments follow mma.m16n8k16 (see elem.cuh). A warp computes a 16-row slice of a product; an
// accumulator of 16 x N is `float acc[N / 8][4]`, entry [j][e] at row group + 8 * (e / 2) and column
// 8 * j + 2 * t + (e % 2), where lane = 4 * group + t.
#pragma once

#include "arch.cuh"
#include "elem.cuh"

namespace pk {

constexpr int kWarpSize = 32;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

PK_DEVICE int imin(int a, int b) { return a < b ? a : b; }
PK_DEVICE int imax(int a, int b) { return a > b ? a : b; }

template <int kHeadDim>
struct TileDims {
  static_assert(kHeadDim % 16 == 0, "head dim tiles are multiples of 16");
  static constexpr int kStride = kHeadDim + 8;  // elements per shared row
  static constexpr int kChunks = kHeadDim / 8;  // 16-byte chunks per row
};

// cp.async rows [row0, row0 + kRows) of a [n_rows, D] matrix (row stride `rs` elements, unit column
// stride) into a shared tile; rows >= n_rows and columns >= D are zero-filled (D is a multiple of 8).
// Thread tid copies chunk column tid % kLoadChunks of rows tid / kLoadChunks + i * kRowsPerIt, so its
// global address only advances by a fixed stride (kLoadChunks: kChunks rounded up to a power of two;
// threads past kChunks idle).
template <int kRows, int kHeadDim, int kThreads>
PK_DEVICE void load_tile_async(uint16_t* tile, const uint16_t* base, int64_t rs, int row0, int n_rows, int D) {
  using T = TileDims<kHeadDim>;
  constexpr int kLoadChunks = T::kChunks <= 4 ? 4 : (T::kChunks <= 8 ? 8 : (T::kChunks <= 16 ? 16 : 32));
  constexpr int kRowsPerIt = kThreads / kLoadChunks;
  static_assert(kThreads % kLoadChunks == 0 && kRows % kRowsPerIt == 0, "tile rows must divide among the threads");
  const int tid = thread_idx();
  const int c = tid % kLoadChunks, r0 = tid / kLoadChunks;
  const bool col_ok = c < T::kChunks && c * 8 < D;
  const uint16_t* src = base + (row0 + r0) * rs + c * 8;
  uint16_t* dst = tile + r0 * T::kStride + c * 8;
  PK_UNROLL
  for (int it = 0; it < kRows / kRowsPerIt; ++it) {
    const bool ok = col_ok && row0 + r0 + it * kRowsPerIt < n_rows;
    if (c < T::kChunks) cp_async_16(dst + it * kRowsPerIt * T::kStride, ok ? src : base, ok);
    src += kRowsPerIt * rs;
  }
}

// Copy a shared tile's rows [0, kRows) to global rows [row0, row0 + kRows) of a strided [n_rows, D]
// matrix, skipping rows >= n_rows and columns >= D. Needs a barrier between the tile's writes and this.
template <int kRows, int kHeadDim, int kThreads>
PK_DEVICE void store_tile(uint16_t* base, int64_t rs, int row0, int n_rows, int D, const uint16_t* tile) {
  using T = TileDims<kHeadDim>;
  const int tid = thread_idx();
  for (int i = tid; i < kRows * T::kChunks; i += kThreads) {
    const int r = i / T::kChunks, c = i % T::kChunks;
    if (row0 + r < n_rows && c * 8 < D) st128(base + (row0 + r) * rs + c * 8, ld128(tile + r * T::kStride + c * 8));
  }
}

// Byte offsets of this lane's ldmatrix row address within a tile of width kWidth (see the loaders).
template <int kWidth>
PK_DEVICE int lane_off_a(int lane) {
  return ((lane % 8 + ((lane / 8) % 2) * 8) * (kWidth + 8) + (lane / 16) * 8) * 2;
}
template <int kWidth>
PK_DEVICE int lane_off_b_nk(int lane) {
  return ((lane % 8 + (lane / 16) * 8) * (kWidth + 8) + ((lane / 8) % 2) * 8) * 2;
}
template <int kWidth>
PK_DEVICE int lane_off_b_kn(int lane) {
  return lane_off_a<kWidth>(lane);  // same rows/columns pattern; the .trans load transposes each 8x8
}

// A fragment (16 x 16, row-major) of rows [row0, row0 + 16), columns [k0, k0 + 16) of a shared tile:
// lanes 0-7 address rows 0-7 / columns 0-7 (a0), 8-15 rows 8-15 (a1), 16-23 columns 8-15 (a2), 24-31 (a3).
template <int kWidth>
PK_DEVICE void load_a(uint32_t (&a)[4], saddr_t tile, int row0, int k0, int lane) {
  ldmatrix_x4(a, tile + lane_off_a<kWidth>(lane) + (row0 * (kWidth + 8) + k0) * 2);
}

// B fragments of two adjacent n-tiles from a tile that stores B transposed (rows = n, columns = k), as
// K is stored for S = Q K^T: b[0], b[1] for n in [n0, n0 + 8) and b[2], b[3] for [n0 + 8, n0 + 16),
// k in [k0, k0 + 16).
template <int kWidth>
PK_DEVICE void load_b_nk(uint32_t (&b)[4], saddr_t tile, int n0, int k0, int lane) {
  ldmatrix_x4(b, tile + lane_off_b_nk<kWidth>(lane) + (n0 * (kWidth + 8) + k0) * 2);
}

// B fragments of two adjacent n-tiles from a tile that stores B as is (rows = k, columns = n), as V is
// stored for O = P V: b[0], b[1] for n in [n0, n0 + 8), b[2], b[3] for [n0 + 8, n0 + 16); k in [k0, k0 + 16).
template <int kWidth>
PK_DEVICE void load_b_kn(uint32_t (&b)[4], saddr_t tile, int k0, int n0, int lane) {
  ldmatrix_x4_trans(b, tile + lane_off_b_kn<kWidth>(lane) + (k0 * (kWidth + 8) + n0) * 2);
}

// The A fragment of columns [16 s, 16 s + 16) of a 16 x N fp32 accumulator, rounded to E: how the
// probabilities of one product feed the next without leaving registers.
template <class E, int kNTiles>
PK_DEVICE void acc_to_a(uint32_t (&a)[4], const float (&acc)[kNTiles][4], int s) {
  a[0] = pack2<E>(acc[2 * s][0], acc[2 * s][1]);
  a[1] = pack2<E>(acc[2 * s][2], acc[2 * s][3]);
  a[2] = pack2<E>(acc[2 * s + 1][0], acc[2 * s + 1][1]);
  a[3] = pack2<E>(acc[2 * s + 1][2], acc[2 * s + 1][3]);
}

template <int kNTiles>
PK_DEVICE void zero(float (&acc)[kNTiles][4]) {
  PK_UNROLL
  for (int j = 0; j < kNTiles; ++j) {
    PK_UNROLL
    for (int e = 0; e < 4; ++e) acc[j][e] = 0.f;
  }
}

// acc (16 x kN) += A (16 x kK, rows a_row0.. of a shared tile of width kAWidth) * B where B^T is stored
// n-major: acc[j] covers n in [8 j, 8 j + 8). Used for S = Q K^T and its transposed variants.
template <class E, int kK, int kN, int kAWidth, int kBWidth>
PK_DEVICE void gemm_a_smem_b_nk(float (&acc)[kN / 8][4], saddr_t a_tile, int a_row0, saddr_t b_tile,
                                int lane) {
  PK_UNROLL
  for (int ks = 0; ks < kK / 16; ++ks) {
    uint32_t a[4];
    load_a<kAWidth>(a, a_tile, a_row0, ks * 16, lane);
    PK_UNROLL
    for (int np = 0; np < kN / 16; ++np) {
      uint32_t b[4];
      load_b_nk<kBWidth>(b, b_tile, np * 16, ks * 16, lane);
      mma_16816<E>(acc[2 * np], a, b[0], b[1]);
      mma_16816<E>(acc[2 * np + 1], a, b[2], b[3]);
    }
  }
}

// Same with A already in registers (kK / 16 fragments).
template <class E, int kK, int kN, int kBWidth>
PK_DEVICE void gemm_a_reg_b_nk(float (&acc)[kN / 8][4], const uint32_t (&a)[kK / 16][4], saddr_t b_tile,
                               int lane) {
  PK_UNROLL
  for (int ks = 0; ks < kK / 16; ++ks) {
    PK_UNROLL
    for (int np = 0; np < kN / 16; ++np) {
      uint32_t b[4];
      load_b_nk<kBWidth>(b, b_tile, np * 16, ks * 16, lane);
      mma_16816<E>(acc[2 * np], a[ks], b[0], b[1]);
      mma_16816<E>(acc[2 * np + 1], a[ks], b[2], b[3]);
    }
  }
}

// acc (16 x kN) += P (16 x kK fp32 accumulator, rounded to E) * B with B stored k-major (rows = k):
// O += P V, dV += P^T dO, dK += dS^T Q, dQ += dS K.
template <class E, int kK, int kN, int kBWidth>
PK_DEVICE void gemm_p_b_kn(float (&acc)[kN / 8][4], const float (&p)[kK / 8][4], saddr_t b_tile, int lane) {
  PK_UNROLL
  for (int ks = 0; ks < kK / 16; ++ks) {
    uint32_t a[4];
    acc_to_a<E>(a, p, ks);
    PK_UNROLL
    for (int np = 0; np < kN / 16; ++np) {
      uint32_t b[4];
      load_b_kn<kBWidth>(b, b_tile, ks * 16, np * 16, lane);
      mma_16816<E>(acc[2 * np], a, b[0], b[1]);
      mma_16816<E>(acc[2 * np + 1], a, b[2], b[3]);
    }
  }
}

// Write a 16 x kN fp32 accumulator (rows row0.. of a shared tile of width kN) rounded to E.
template <class E, int kN>
PK_DEVICE void acc_to_smem(uint16_t* tile, int row0, const float (&acc)[kN / 8][4], int lane) {
  constexpr int kStride = kN + 8;
  const int r = row0 + lane / 4, c = (lane % 4) * 2;
  PK_UNROLL
  for (int j = 0; j < kN / 8; ++j) {
    st32(tile + r * kStride + 8 * j + c, pack2<E>(acc[j][0], acc[j][1]));
    st32(tile + (r + 8) * kStride + 8 * j + c, pack2<E>(acc[j][2], acc[j][3]));
  }
}

// Min, max and sum over the block of three ints (scratch: 3 * kWarps ints of shared memory no one else uses).
template <int kWarps>
PK_DEVICE void block_min_max_sum(int& lo, int& hi, int& n, int* scratch) {
  PK_UNROLL
  for (int m = 1; m < kWarpSize; m *= 2) {
    const int olo = shfl_xor_int(lo, m), ohi = shfl_xor_int(hi, m), on = shfl_xor_int(n, m);
    lo = imin(lo, olo);
    hi = imax(hi, ohi);
    n += on;
  }
  const int warp = thread_idx() / kWarpSize, lane = thread_idx() % kWarpSize;
  if (lane == 0) {
    scratch[warp] = lo;
    scratch[kWarps + warp] = hi;
    scratch[2 * kWarps + warp] = n;
  }
  block_sync();
  lo = scratch[0];
  hi = scratch[kWarps];
  n = scratch[2 * kWarps];
  PK_UNROLL
  for (int w = 1; w < kWarps; ++w) {
    lo = imin(lo, scratch[w]);
    hi = imax(hi, scratch[kWarps + w]);
    n += scratch[2 * kWarps + w];
  }
}

// The kept keys of one key-padding-mask row: [lo, hi) from the first kept key to the last + 1 (lo = Lk,
// hi = 0 when none is kept), and whether every key in between is kept too (dense: the mask is that range).
template <int kWarps>
PK_DEVICE void kept_key_range(const uint8_t* mask_row, int Lk, int* scratch, int& lo, int& hi, bool& dense) {
  lo = Lk;
  hi = 0;
  int n = 0;
  for (int j = thread_idx(); j < Lk; j += kWarps * kWarpSize) {
    if (mask_row[j]) {
      lo = imin(lo, j);
      hi = j + 1;  // j increases within a thread
      ++n;
    }
  }
  block_min_max_sum<kWarps>(lo, hi, n, scratch);
  dense = n == hi - lo;
}

}  // namespace pk
