// The two small passes of the backward: delta before the main passes, the prefix reduction after.
#pragma once

#include "params.h"
#include "tile.cuh"

namespace pk {

constexpr int kMiscThreads = 128;

// delta[b, h, i] = sum_d O[b, h, i, d] * dO[b, h, i, d] - dLSE[b, h, i], fp32 (the LSE gradient folds in
// here). One thread per row, 16-byte loads. Grid cdiv(B * Hq * Lq, kMiscThreads).
template <class E>
PK_DEVICE void bwd_preprocess_thread(const BwdParams& p) {
  const AttnShape& s = p.s;
  const int64_t r = static_cast<int64_t>(block_idx_x()) * kMiscThreads + thread_idx();
  if (r >= static_cast<int64_t>(s.B) * s.Hq * s.Lq) return;
  const int i = static_cast<int>(r % s.Lq);
  const int64_t bh = r / s.Lq;
  const int64_t b = bh / s.Hq, h = bh % s.Hq;
  const uint16_t* o = p.o.ptr + b * p.o.batch_stride + h * p.o.head_stride + i * p.o.row_stride;
  const uint16_t* d = p.dout.ptr + b * p.dout.batch_stride + h * p.dout.head_stride + i * p.dout.row_stride;
  float acc = 0.f;
  for (int c = 0; c < s.D; c += 8) {
    const uint4 a = ld128(o + c), g = ld128(d + c);
    const uint32_t aw[4] = {a.x, a.y, a.z, a.w}, gw[4] = {g.x, g.y, g.z, g.w};
    PK_UNROLL
    for (int w = 0; w < 4; ++w) {
      acc += to_float<E>(static_cast<uint16_t>(aw[w] & 0xffffu)) * to_float<E>(static_cast<uint16_t>(gw[w] & 0xffffu));
      acc += to_float<E>(static_cast<uint16_t>(aw[w] >> 16)) * to_float<E>(static_cast<uint16_t>(gw[w] >> 16));
    }
  }
  if (p.dlse) acc -= p.dlse[r];
  p.delta[r] = acc;
}

// dprefix[g, j, d] = sum over splits z, in order, of the fp32 partials; rounded once to E.
// Grid cdiv(Hkv * P * D, kMiscThreads).
template <class E>
PK_DEVICE void bwd_prefix_reduce_thread(const BwdParams& p) {
  const AttnShape& s = p.s;
  const int64_t n = static_cast<int64_t>(s.Hkv) * s.P * s.D;
  const int64_t i = static_cast<int64_t>(block_idx_x()) * kMiscThreads + thread_idx();
  if (i >= n) return;
  const int64_t d = i % s.D, row = i / s.D;
  const int64_t j = row % s.P, g = row / s.P;
  float a = 0.f, c = 0.f;
  for (int z = 0; z < p.splits; ++z) {
    a += p.dpk_part[z * n + i];
    c += p.dpv_part[z * n + i];
  }
  p.dpk.ptr[g * p.dpk.head_stride + j * p.dpk.row_stride + d] = from_float<E>(a);
  p.dpv.ptr[g * p.dpv.head_stride + j * p.dpv.row_stride + d] = from_float<E>(c);
}

}  // namespace pk
