// Backward, query side: dQ. Grid (cdiv(Lq, kBlockM), Hq, B); walks the same key tiles as the forward
// (keys.cuh: the prefix, then the visible input range), recomputing P from the saved LSE:
//   S = Q K^T,  P = exp2(S * scale_log2 - lse2),  dP = dO V^T,  dS = P (dP - delta),  dQ += dS K.
// Edge tiles hide their pairs with -inf before the exp2 (mask.cuh). Q and dO stay in registers; K/V
// tiles are double-buffered with cp.async. No atomics: each block owns its rows of dQ, so the result is
// deterministic.
#pragma once

#include "keys.cuh"
#include "params.h"
#include "tile.cuh"

namespace pk {

template <int kHeadDim>
struct DqConfig {
  static constexpr int kBlockM = 64;                        // query rows per block, 16 per warp
  static constexpr int kBlockN = kHeadDim <= 64 ? 64 : 32;  // keys per step (register budget)
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * kWarpSize;
  static constexpr int kStride = TileDims<kHeadDim>::kStride;
  // sQ, sdO [kBlockM] rows; sK, sV [2][kBlockN] rows; 3 * kWarps ints of scratch.
  static constexpr int kSmemBytes = (2 * kBlockM + 4 * kBlockN) * kStride * 2 + 3 * kWarps * 4;
};

template <class E, int kHeadDim, bool kCausal>
PK_DEVICE void bwd_dq_block(const BwdParams& p, char* smem) {
  using C = DqConfig<kHeadDim>;
  constexpr int BM = C::kBlockM, BN = C::kBlockN, S = C::kStride, kThreads = C::kThreads;
  constexpr float kInf = __builtin_huge_valf();
  const AttnShape& s = p.s;
  const QueryBlock qb = query_block<BM>(s);
  const int warp = qb.warp, lane = qb.lane, m0 = qb.m0, h = qb.h, b = qb.b, g = qb.g;
  const int64_t bh = qb.bh;

  uint16_t* sQ = reinterpret_cast<uint16_t*>(smem);
  uint16_t* sdO = sQ + BM * S;
  uint16_t* sK = sdO + BM * S;     // two buffers of BN rows
  uint16_t* sV = sK + 2 * BN * S;  // two buffers of BN rows
  int* scratch = reinterpret_cast<int*>(sV + 2 * BN * S);

  const auto walk = make_key_walk<BN, BM, C::kWarps, kCausal>(p, b, g, m0, scratch);
  load_tile_async<BM, kHeadDim, kThreads>(sQ, p.q.ptr + b * p.q.batch_stride + h * p.q.head_stride, p.q.row_stride,
                                          m0, s.Lq, s.D);
  load_tile_async<BM, kHeadDim, kThreads>(sdO, p.dout.ptr + b * p.dout.batch_stride + h * p.dout.head_stride,
                                          p.dout.row_stride, m0, s.Lq, s.D);

  const int row_w = warp * 16 + lane / 4;
  float lse2[2], delta[2];
  PK_UNROLL
  for (int i = 0; i < 2; ++i) {
    const int row = m0 + row_w + 8 * i;
    const int64_t idx = bh * s.Lq + row;
    float l = row < s.Lq ? p.lse[idx] : kInf;
    if (l == -kInf) l = kInf;  // a row that saw no key has P = 0 everywhere
    lse2[i] = l * kLog2e;
    delta[i] = row < s.Lq ? p.delta[idx] : 0.f;
  }

  float dq[kHeadDim / 8][4];
  zero(dq);
  uint32_t qf[kHeadDim / 16][4], dof[kHeadDim / 16][4];
  // One body that branches around the mask: fewer registers here than two compiled bodies.
  walk_key_tiles<kHeadDim, kThreads, false>(walk, sK, sV, [&](int t, saddr_t kt, saddr_t vt, bool edge) {
    if (t == 0) {
      PK_UNROLL
      for (int ks = 0; ks < kHeadDim / 16; ++ks) {
        load_a<kHeadDim>(qf[ks], saddr(sQ), warp * 16, ks * 16, lane);
        load_a<kHeadDim>(dof[ks], saddr(sdO), warp * 16, ks * 16, lane);
      }
    }
    float pr[BN / 8][4];  // S, then S * scale_log2 - lse2, then P
    zero(pr);
    gemm_a_reg_b_nk<E, kHeadDim, BN, kHeadDim>(pr, qf, kt, lane);
    PK_UNROLL
    for (int j = 0; j < BN / 8; ++j) {
      PK_UNROLL
      for (int e = 0; e < 4; ++e) pr[j][e] = pr[j][e] * s.scale_log2 - lse2[e / 2];
    }
    if (edge) walk.hide(t, pr, m0 + row_w, lane, -kInf);
    PK_UNROLL
    for (int j = 0; j < BN / 8; ++j) {
      PK_UNROLL
      for (int e = 0; e < 4; ++e) pr[j][e] = fast_exp2(pr[j][e]);
    }
    float ds[BN / 8][4];  // dP, then dS
    zero(ds);
    gemm_a_reg_b_nk<E, kHeadDim, BN, kHeadDim>(ds, dof, vt, lane);
    PK_UNROLL
    for (int j = 0; j < BN / 8; ++j) {
      PK_UNROLL
      for (int e = 0; e < 4; ++e) ds[j][e] = pr[j][e] * (ds[j][e] - delta[e / 2]);
    }
    gemm_p_b_kn<E, BN, kHeadDim, kHeadDim>(dq, ds, kt, lane);
  });

  PK_UNROLL
  for (int d = 0; d < kHeadDim / 8; ++d) {
    PK_UNROLL
    for (int e = 0; e < 4; ++e) dq[d][e] *= s.scale;
  }
  acc_to_smem<E, kHeadDim>(sQ, warp * 16, dq, lane);
  block_sync();
  store_tile<BM, kHeadDim, kThreads>(p.dq.ptr + b * p.dq.batch_stride + h * p.dq.head_stride, p.dq.row_stride, m0,
                                     s.Lq, s.D, sQ);
}

}  // namespace pk
