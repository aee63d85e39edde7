// Backward, key side: dK and dV of the input keys, and the batch-reduced gradient of the shared prefix.
//
// One templated body serves both, by kPrefix:
//   input  (kPrefix = false): grid (cdiv(Lk, kBlockN), Hkv, B). The block owns keys [n0, n0 + kBlockN) of
//          k/v[b, g] and walks the query tiles of the G query heads of its group (GQA without atomics),
//          skipping the query tiles before the first one that can see n0 when causal, and everything
//          when no key of its tile is kept by the padding mask. Writes dK, dV in the input dtype.
//   prefix (kPrefix = true): grid (cdiv(P, kBlockN), Hkv, splits). The block owns prefix rows
//          [n0, n0 + kBlockN) of kv head g and walks every query tile of the (batch row, query head)
//          units [z * units_per_split, ...) of the B * G units of g (every query sees every prefix
//          column), summing into fp32 registers; it writes one fp32 partial per split. The partials are
//          then added in a fixed order (bwd_misc.cuh), so the result is deterministic, and the scratch is
//          splits (not B) copies of the prefix.
// Warp w owns keys [n0 + 16 w, n0 + 16 w + 16) and computes, per query tile of kBlockM rows (transposed,
// so that dK and dV accumulate as A * B products with A in registers):
//   S^T = K Q^T,  P^T = exp2(S^T * scale_log2 - lse2),  dV += P^T dO,  dP^T = V dO^T,
//   dS^T = P^T (dP^T - delta),  dK += dS^T Q        (dK is scaled by the softmax scale at the end).
// The mask (mask.cuh) is fused into P^T: its key side is fixed for the block and hoisted out of the
// query loop; its causal side is tested only on the steps that reach past the diagonal.
#pragma once

#include "mask.cuh"
#include "params.h"
#include "tile.cuh"

namespace pk {

template <int kHeadDim>
struct DkdvConfig {
  static constexpr int kBlockN = 64;                       // keys per block, 16 per warp
  static constexpr int kBlockM = kHeadDim <= 64 ? 64 : 32;  // query rows per step (register budget)
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * kWarpSize;
  static constexpr int kStride = TileDims<kHeadDim>::kStride;
  // sK, sV [kBlockN] rows; sQ, sdO [2][kBlockM] rows; lse2, delta [2][kBlockM] floats.
  static constexpr int kSmemBytes = (2 * kBlockN + 4 * kBlockM) * kStride * 2 + 4 * kBlockM * 4;
};

template <class E, int kHeadDim, bool kCausal, bool kPrefix>
PK_DEVICE void bwd_dkdv_block(const BwdParams& p, char* smem) {
  static_assert(!(kPrefix && kCausal), "the prefix is visible to every query: no causal variant");
  using C = DkdvConfig<kHeadDim>;
  constexpr int BM = C::kBlockM, BN = C::kBlockN, S = C::kStride, kThreads = C::kThreads;
  constexpr float kInf = __builtin_huge_valf();
  const AttnShape& s = p.s;
  const int tid = thread_idx(), warp = tid / kWarpSize, lane = tid % kWarpSize;
  const int n0 = block_idx_x() * BN;
  const int g = block_idx_y();
  const int b_in = kPrefix ? 0 : block_idx_z();  // the batch row (input keys only)
  const int split = kPrefix ? block_idx_z() : 0;
  const int n_rows = kPrefix ? s.P : s.Lk;

  uint16_t* sK = reinterpret_cast<uint16_t*>(smem);
  uint16_t* sV = sK + BN * S;
  uint16_t* sQ = sV + BN * S;       // two buffers of BM rows
  uint16_t* sdO = sQ + 2 * BM * S;  // two buffers of BM rows
  float* s_lse2 = reinterpret_cast<float*>(sdO + 2 * BM * S);  // [2][BM]
  float* s_delta = s_lse2 + 2 * BM;                             // [2][BM]

  // Work units: (batch row, query head) pairs, each walking query tiles [m_first, m_tiles).
  const int u_lo = kPrefix ? split * p.units_per_split : 0;
  const int u_hi = kPrefix ? imin(u_lo + p.units_per_split, s.B * s.G) : s.G;
  const int m_tiles = (s.Lq + BM - 1) / BM;
  // Causal: query i sees key j iff j <= i + Lk - Lq; the first query that sees n0 is n0 - (Lk - Lq).
  const int m_first = kCausal ? imax(0, n0 - (s.Lk - s.Lq)) / BM : 0;
  const int n_m = imax(0, m_tiles - m_first);
  const uint8_t* kpm_row = (!kPrefix && s.kpm) ? s.kpm + static_cast<int64_t>(b_in) * s.Lk : nullptr;
  bool any_kept = true;
  if (kpm_row) any_kept = block_any(tid < BN && n0 + tid < s.Lk && kpm_row[n0 + tid] != 0) != 0;
  const int n_steps = any_kept ? imax(0, u_hi - u_lo) * n_m : 0;

  const Operand& ko = kPrefix ? p.pk : p.k;
  const Operand& vo = kPrefix ? p.pv : p.v;
  load_tile_async<BN, kHeadDim, kThreads>(sK, ko.ptr + b_in * ko.batch_stride + g * ko.head_stride, ko.row_stride,
                                          n0, n_rows, s.D);
  load_tile_async<BN, kHeadDim, kThreads>(sV, vo.ptr + b_in * vo.batch_stride + g * vo.head_stride, vo.row_stride,
                                          n0, n_rows, s.D);

  auto step_m0 = [&](int st) { return (m_first + st % n_m) * BM; };
  auto load_step = [&](int st, int buf) {
    const int u = u_lo + st / n_m;
    const int b = kPrefix ? u / s.G : b_in;
    const int h = g * s.G + (kPrefix ? u % s.G : u);
    const int m0 = step_m0(st);
    load_tile_async<BM, kHeadDim, kThreads>(sQ + buf * BM * S, p.q.ptr + b * p.q.batch_stride + h * p.q.head_stride,
                                            p.q.row_stride, m0, s.Lq, s.D);
    load_tile_async<BM, kHeadDim, kThreads>(sdO + buf * BM * S,
                                            p.dout.ptr + b * p.dout.batch_stride + h * p.dout.head_stride,
                                            p.dout.row_stride, m0, s.Lq, s.D);
    if (tid < BM) {
      const int row = m0 + tid;
      const int64_t idx = (static_cast<int64_t>(b) * s.Hq + h) * s.Lq + row;
      float l = row < s.Lq ? p.lse[idx] : kInf;
      // Rows past Lq, and rows that saw no key (lse = -inf), get lse = +inf: P = exp2(S - inf) = 0.
      if (l == -kInf) l = kInf;
      s_lse2[buf * BM + tid] = l * kLog2e;
      s_delta[buf * BM + tid] = row < s.Lq ? p.delta[idx] : 0.f;
    }
  };
  if (n_steps > 0) load_step(0, 0);
  cp_async_commit();

  float dk[kHeadDim / 8][4], dv[kHeadDim / 8][4];
  zero(dk);
  zero(dv);
  // The key side of the mask is fixed for the block: hoisted out of the query loop (two bools per lane).
  Mask mask{n_rows, kpm_row, s.Lk - s.Lq};
  const int key_w = n0 + warp * 16 + lane / 4;  // the two keys of this lane (rows of S^T): key_w, key_w + 8
  mask.hoist_row_keys(key_w);

  for (int st = 0; st < n_steps; ++st) {
    if (st + 1 < n_steps) load_step(st + 1, (st + 1) & 1);
    cp_async_commit();
    cp_async_wait<1>();
    block_sync();
    const int buf = st & 1;
    const saddr_t qt = saddr(sQ + buf * BM * S);
    const saddr_t dot = saddr(sdO + buf * BM * S);
    const float* lse2 = s_lse2 + buf * BM;
    const float* delta = s_delta + buf * BM;
    const int m0 = step_m0(st);
    // The key side (hoisted: all true unless a key row of the tile is hidden) is one select per entry; the
    // causal side is tested only on an edge step, where the block's last key lies beyond the diagonal of
    // the step's first query.
    const bool causal_edge = kCausal && n0 + BN - 1 > m0 + mask.diag;

    float pt[BM / 8][4];  // S^T, then P^T: [16 keys of this warp] x [BM queries]
    zero(pt);
    gemm_a_smem_b_nk<E, kHeadDim, BM, kHeadDim, kHeadDim>(pt, saddr(sK), warp * 16, qt, lane);
    PK_UNROLL
    for (int j = 0; j < BM / 8; ++j) {
      PK_UNROLL
      for (int e = 0; e < 4; ++e) {
        const bool ok = mask.visible<Rows::kKeys, true, false>(j, e, key_w, m0, lane) &&
                        (!causal_edge || mask.visible<Rows::kKeys, false, kCausal>(j, e, key_w, m0, lane));
        pt[j][e] = ok ? fast_exp2(pt[j][e] * s.scale_log2 - lse2[8 * j + 2 * (lane % 4) + (e & 1)]) : 0.f;
      }
    }
    gemm_p_b_kn<E, BM, kHeadDim, kHeadDim>(dv, pt, dot, lane);

    float dst[BM / 8][4];  // dP^T, then dS^T
    zero(dst);
    gemm_a_smem_b_nk<E, kHeadDim, BM, kHeadDim, kHeadDim>(dst, saddr(sV), warp * 16, dot, lane);
    PK_UNROLL
    for (int j = 0; j < BM / 8; ++j) {
      PK_UNROLL
      for (int e = 0; e < 4; ++e) {
        const int q_local = 8 * j + 2 * (lane % 4) + (e & 1);
        dst[j][e] = pt[j][e] * (dst[j][e] - delta[q_local]);
      }
    }
    gemm_p_b_kn<E, BM, kHeadDim, kHeadDim>(dk, dst, qt, lane);
    block_sync();  // this step's buffers are free for step st + 2
  }
  cp_async_wait<0>();
  block_sync();

  PK_UNROLL
  for (int d = 0; d < kHeadDim / 8; ++d) {
    PK_UNROLL
    for (int e = 0; e < 4; ++e) dk[d][e] *= s.scale;
  }
  if (kPrefix) {
    const int64_t part = (static_cast<int64_t>(split) * s.Hkv + g) * s.P * s.D;
    PK_UNROLL
    for (int i = 0; i < 2; ++i) {
      const int key = key_w + 8 * i;
      if (key >= s.P) continue;
      PK_UNROLL
      for (int d = 0; d < kHeadDim / 8; ++d) {
        const int col = 8 * d + 2 * (lane % 4);
        if (col >= s.D) continue;
        const int64_t off = part + static_cast<int64_t>(key) * s.D + col;
        p.dpk_part[off] = dk[d][2 * i];
        p.dpk_part[off + 1] = dk[d][2 * i + 1];
        p.dpv_part[off] = dv[d][2 * i];
        p.dpv_part[off + 1] = dv[d][2 * i + 1];
      }
    }
  } else {
    acc_to_smem<E, kHeadDim>(sK, warp * 16, dk, lane);
    acc_to_smem<E, kHeadDim>(sV, warp * 16, dv, lane);
    block_sync();
    store_tile<BN, kHeadDim, kThreads>(p.dk.ptr + b_in * p.dk.batch_stride + g * p.dk.head_stride, p.dk.row_stride,
                                       n0, s.Lk, s.D, sK);
    store_tile<BN, kHeadDim, kThreads>(p.dv.ptr + b_in * p.dv.batch_stride + g * p.dv.head_stride, p.dv.row_stride,
                                       n0, s.Lk, s.D, sV);
  }
}

}  // namespace pk
