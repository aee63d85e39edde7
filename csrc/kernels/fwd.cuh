// Forward of prefix attention: one online softmax over the prefix tiles, then the input tiles.
//
// Grid (cdiv(Lq, kBlockM), Hq, B), kWarps warps; warp w owns query rows [16 w, 16 w + 16) of the
// block's tile. For batch row b, query head h and kv head g = h / G the block walks the key tiles of
// keys.cuh (the prefix's columns [0, P) of prefix_k/v[g], then the kept, causally visible range of
// k/v[b, g]) as one sequence, double-buffered with cp.async; only edge tiles pay the mask (mask.cuh).
// Scores are kept in base 2 (scale_log2). Q stays in registers (kHeadDim / 16 A fragments); S and O are
// fp32 mma.sync accumulators.
// out [B, Hq, Lq, D] in q's dtype; lse [B, Hq, Lq] fp32 natural log, -inf (and out = 0) for rows that see
// no key at all.
#pragma once

#include "keys.cuh"
#include "params.h"
#include "tile.cuh"

namespace pk {

template <int kHeadDim>
struct FwdConfig {
  static constexpr int kBlockM = 64;
  static constexpr int kBlockN = 64;
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * kWarpSize;
  static constexpr int kStride = TileDims<kHeadDim>::kStride;
  // sQ [kBlockM], sK [2][kBlockN], sV [2][kBlockN] rows, then 3 * kWarps ints of scratch.
  static constexpr int kSmemBytes = (kBlockM + 4 * kBlockN) * kStride * 2 + 3 * kWarps * 4;
};

template <class E, int kHeadDim, bool kCausal>
PK_DEVICE void fwd_block(const FwdParams& p, char* smem) {
  using C = FwdConfig<kHeadDim>;
  constexpr int BM = C::kBlockM, BN = C::kBlockN, S = C::kStride, kThreads = C::kThreads;
  constexpr float kNegInf = -__builtin_huge_valf();
  const AttnShape& s = p.s;
  const QueryBlock qb = query_block<BM>(s);
  const int warp = qb.warp, lane = qb.lane, m0 = qb.m0, h = qb.h, b = qb.b, g = qb.g;
  const int64_t bh = qb.bh;

  uint16_t* sQ = reinterpret_cast<uint16_t*>(smem);
  uint16_t* sK = sQ + BM * S;      // two buffers of BN rows
  uint16_t* sV = sK + 2 * BN * S;  // two buffers of BN rows
  int* scratch = reinterpret_cast<int*>(sV + 2 * BN * S);

  const auto walk = make_key_walk<BN, BM, C::kWarps, kCausal>(p, b, g, m0, scratch);
  const uint16_t* q_base = p.q.ptr + b * p.q.batch_stride + h * p.q.head_stride;
  load_tile_async<BM, kHeadDim, kThreads>(sQ, q_base, p.q.row_stride, m0, s.Lq, s.D);

  float acc[kHeadDim / 8][4];
  zero(acc);
  float m_run[2] = {kNegInf, kNegInf};  // running max (base 2) of rows lane/4 and lane/4 + 8
  float l_run[2] = {0.f, 0.f};          // this thread's share of the running sums
  uint32_t qf[kHeadDim / 16][4];
  const int row_w = warp * 16 + lane / 4;  // local row of entries e < 2 (e >= 2: + 8)

  // Two compiled bodies (edge, interior): fewer registers here than one body with a branch.
  walk_key_tiles<kHeadDim, kThreads, true>(walk, sK, sV, [&](int t, saddr_t kt, saddr_t vt, auto edge) {
    if (t == 0) {
      PK_UNROLL
      for (int ks = 0; ks < kHeadDim / 16; ++ks) load_a<kHeadDim>(qf[ks], saddr(sQ), warp * 16, ks * 16, lane);
    }
    float sc[BN / 8][4];
    zero(sc);
    gemm_a_reg_b_nk<E, kHeadDim, BN, kHeadDim>(sc, qf, kt, lane);
    PK_UNROLL
    for (int j = 0; j < BN / 8; ++j) {
      PK_UNROLL
      for (int e = 0; e < 4; ++e) sc[j][e] *= s.scale_log2;
    }
    if (edge) walk.hide(t, sc, m0 + row_w, lane, kNegInf);

    // Online softmax: rows i = 0, 1 of this thread; the four threads of a row group share a row.
    PK_UNROLL
    for (int i = 0; i < 2; ++i) {
      float mx = kNegInf;
      PK_UNROLL
      for (int j = 0; j < BN / 8; ++j) mx = fmaxf(mx, fmaxf(sc[j][2 * i], sc[j][2 * i + 1]));
      mx = fmaxf(mx, shfl_xor(mx, 1));
      mx = fmaxf(mx, shfl_xor(mx, 2));
      const float m_new = fmaxf(m_run[i], mx);
      // A row that has seen no visible key keeps a zero shift, so exp2 never meets (-inf) - (-inf).
      const float m_use = m_new == kNegInf ? 0.f : m_new;
      const float alpha = fast_exp2(m_run[i] - m_use);
      m_run[i] = m_new;
      float sum = 0.f;
      PK_UNROLL
      for (int j = 0; j < BN / 8; ++j) {
        sc[j][2 * i] = fast_exp2(sc[j][2 * i] - m_use);
        sc[j][2 * i + 1] = fast_exp2(sc[j][2 * i + 1] - m_use);
        sum += sc[j][2 * i] + sc[j][2 * i + 1];
      }
      l_run[i] = l_run[i] * alpha + sum;
      PK_UNROLL
      for (int d = 0; d < kHeadDim / 8; ++d) {
        acc[d][2 * i] *= alpha;
        acc[d][2 * i + 1] *= alpha;
      }
    }
    gemm_p_b_kn<E, BN, kHeadDim, kHeadDim>(acc, sc, vt, lane);
  });
  // Every copy landed (Q's, when there was no tile) and sQ is no longer read.

  float lse[2];
  PK_UNROLL
  for (int i = 0; i < 2; ++i) {
    float l = l_run[i];
    l += shfl_xor(l, 1);
    l += shfl_xor(l, 2);
    const float inv = l > 0.f ? 1.f / l : 0.f;
    lse[i] = l > 0.f ? (m_run[i] + log2f(l)) * kLn2 : kNegInf;
    PK_UNROLL
    for (int d = 0; d < kHeadDim / 8; ++d) {
      acc[d][2 * i] *= inv;
      acc[d][2 * i + 1] *= inv;
    }
  }
  acc_to_smem<E, kHeadDim>(sQ, warp * 16, acc, lane);
  block_sync();
  uint16_t* o_base = p.o.ptr + b * p.o.batch_stride + h * p.o.head_stride;
  store_tile<BM, kHeadDim, kThreads>(o_base, p.o.row_stride, m0, s.Lq, s.D, sQ);
  if (p.lse && lane % 4 == 0) {
    PK_UNROLL
    for (int i = 0; i < 2; ++i) {
      const int row = m0 + row_w + 8 * i;
      if (row < s.Lq) p.lse[bh * s.Lq + row] = lse[i];
    }
  }
}

}  // namespace pk
