// The key walk of the forward and dQ passes: the key tiles one query block visits, those of the prefix
// and then those of the input, as one double-buffered sequence.
//
// A source is the K and V rows of one kv head (prefix_k/v[g], or k/v[b, g]) with its Mask and the
// columns it walks, [first, first + n_tiles * kBlockN):
//   prefix: from column 0; every query sees every prefix column, only P bounds it;
//   input:  from the first kept key of the padding row (the source's position base) to the last kept
//           one, capped, when causal, at the last key the block's last row sees.
// Tile t is an edge tile when it may hold a hidden pair: it reaches past its mask's key_end (P, or the
// last kept key + 1), its padding has holes (mask.kpm set), or, causal, its last column lies beyond the
// diagonal of the block's first row. Only edge tiles pay the mask (hide); interior tiles skip it.
#pragma once

#include "mask.cuh"
#include "params.h"
#include "tile.cuh"

namespace pk {

// The query block of the forward and dQ grids (cdiv(Lq, kBlockM), Hq, B): its first row m0, query head h,
// batch row b, kv head g, and this thread's warp and lane.
struct QueryBlock {
  int warp, lane, m0, h, b, g;
  int64_t bh;  // b * Hq + h: the row of lse and delta
};
template <int kBlockM>
PK_DEVICE QueryBlock query_block(const AttnShape& s) {
  const int tid = thread_idx(), h = block_idx_y(), b = block_idx_z();
  return {tid / kWarpSize, tid % kWarpSize, block_idx_x() * kBlockM, h, b, h / s.G, static_cast<int64_t>(b) * s.Hq + h};
}

// One key source as the walk sees it: K and V rows, how many exist, the first column walked (the
// position base), its tiles, and its mask.
struct KeySource {
  const uint16_t* k;
  const uint16_t* v;
  int64_t k_rs, v_rs;  // row strides (elements)
  int n_rows;          // rows of k and v; loads zero-fill past them
  int first;
  int n_tiles;
  Mask mask;
};

// The walk keeps only what the prologue computed (a few ints); pointers and strides are read from the
// kernel parameters when a source is asked for, so they cost no registers across the loop.
template <int kBlockN, bool kCausal, class Params>
struct KeyWalk {
  const Params& p;
  int b, g;
  int m0;       // the block's first query row
  int n_pre;    // prefix tiles
  int first;    // input: first kept key
  int n_in;     // input tiles
  int key_end;  // input: last kept key + 1
  bool holes;   // input: the padding row keeps keys that are not one range

  PK_DEVICE int n_tiles() const { return n_pre + n_in; }
  PK_DEVICE bool in_prefix(int t) const { return t < n_pre; }
  PK_DEVICE int col0(int t) const { return in_prefix(t) ? t * kBlockN : first + (t - n_pre) * kBlockN; }

  // The sources, with their masks. The prefix has no causal side: its diagonal lies past every key.
  static constexpr int kNoDiag = 1 << 30;  // query + kNoDiag > any key (every size is < 2^30)
  PK_DEVICE KeySource prefix() const {
    const AttnShape& s = p.s;
    return {p.pk.ptr + g * p.pk.head_stride, p.pv.ptr + g * p.pv.head_stride, p.pk.row_stride, p.pv.row_stride,
            s.P, 0, n_pre, Mask{s.P, nullptr, kNoDiag}};
  }
  PK_DEVICE KeySource input() const {
    const AttnShape& s = p.s;
    const uint8_t* kpm = holes ? s.kpm + static_cast<int64_t>(b) * s.Lk : nullptr;
    return {p.k.ptr + b * p.k.batch_stride + g * p.k.head_stride, p.v.ptr + b * p.v.batch_stride + g * p.v.head_stride,
            p.k.row_stride, p.v.row_stride, s.Lk, first, n_in, Mask{key_end, kpm, s.Lk - s.Lq}};
  }
  PK_DEVICE KeySource source(int t) const { return in_prefix(t) ? prefix() : input(); }

  // Whether tile t may hold a hidden pair: it reaches past its source's key_end, its source's padding has
  // holes, or (causal) its last column lies beyond the diagonal of the block's first row.
  PK_DEVICE bool edge(int t) const {
    const Mask m = source(t).mask;
    const int c1 = col0(t) + kBlockN;  // one past the tile's last column
    return c1 > m.key_end || m.kpm != nullptr || (kCausal && c1 - 1 > m0 + m.diag);
  }

  // cp.async tile t's K and V rows into sk, sv (kBlockN rows each).
  template <int kHeadDim, int kThreads>
  PK_DEVICE void load(int t, uint16_t* sk, uint16_t* sv) const {
    const KeySource src = source(t);
    const int c0 = col0(t);
    load_tile_async<kBlockN, kHeadDim, kThreads>(sk, src.k, src.k_rs, c0, src.n_rows, p.s.D);
    load_tile_async<kBlockN, kHeadDim, kThreads>(sv, src.v, src.v_rs, c0, src.n_rows, p.s.D);
  }

  // Writes `hidden` into the hidden entries of tile t in a warp's 16 x kBlockN accumulator (rows: queries;
  // row0: this lane's first query row): -inf into logits, 0 into probabilities. Only for edge tiles:
  // interior ones hold no hidden pair.
  template <int kNT>
  PK_DEVICE void hide(int t, float (&s)[kNT][4], int row0, int lane, float hidden) const {
    static_assert(kNT * 8 == kBlockN, "one accumulator column per key of the tile");
    source(t).mask.template apply<Rows::kQueries, true, kCausal>(s, row0, col0(t), lane, hidden);
  }
};

// The walk of query block [m0, m0 + kBlockM) of batch row b, kv head g. Every thread of the block must
// call it (the padding row is reduced over the block; scratch: 3 * kWarps ints).
template <int kBlockN, int kBlockM, int kWarps, bool kCausal, class Params>
PK_DEVICE KeyWalk<kBlockN, kCausal, Params> make_key_walk(const Params& p, int b, int g, int m0, int* scratch) {
  const AttnShape& s = p.s;
  int lo = 0, hi = s.Lk;
  bool dense = true;
  if (s.kpm) kept_key_range<kWarps>(s.kpm + static_cast<int64_t>(b) * s.Lk, s.Lk, scratch, lo, hi, dense);
  // The last row of the block sees keys j <= m0 + kBlockM - 1 + Lk - Lq.
  const int end = kCausal ? imin(hi, m0 + kBlockM + s.Lk - s.Lq) : hi;
  const int n_in = end > lo ? (end - lo + kBlockN - 1) / kBlockN : 0;
  return {p, b, g, m0, (s.P + kBlockN - 1) / kBlockN, lo, n_in, hi, !dense};
}

// Runs body(t, kt, vt, edge) for every tile t of the walk, kt and vt its K and V tiles in shared memory.
// With kSplitEdges, edge is an Edge<true> or Edge<false> and the body is compiled twice, so an interior
// tile runs code with no mask in it at all; without, edge is a bool and one body branches around the mask
// (which of the two needs fewer registers depends on the pass: see fwd.cuh and bwd_dq.cuh). sK and sV
// hold two buffers of kBlockN rows each: tile t + 1 is copied while body works on tile t. Copies the
// caller issued before (its Q and dO tiles) land with tile 0; every copy has landed when it returns.
template <int kHeadDim, int kThreads, bool kSplitEdges, int kBlockN, bool kCausal, class Params, class Body>
PK_DEVICE void walk_key_tiles(const KeyWalk<kBlockN, kCausal, Params>& w, uint16_t* sK, uint16_t* sV, Body&& body) {
  constexpr int kTile = kBlockN * TileDims<kHeadDim>::kStride;
  const int n = w.n_tiles();
  if (n > 0) w.template load<kHeadDim, kThreads>(0, sK, sV);
  cp_async_commit();
  for (int t = 0; t < n; ++t) {
    const int nb = (t + 1) & 1;
    if (t + 1 < n) w.template load<kHeadDim, kThreads>(t + 1, sK + nb * kTile, sV + nb * kTile);
    cp_async_commit();
    cp_async_wait<1>();  // everything but tile t + 1 has landed
    block_sync();
    const saddr_t kt = saddr(sK + (t & 1) * kTile), vt = saddr(sV + (t & 1) * kTile);
    if constexpr (kSplitEdges) {
      if (w.edge(t)) {
        body(t, kt, vt, Edge<true>{});
      } else {
        body(t, kt, vt, Edge<false>{});
      }
    } else {
      body(t, kt, vt, w.edge(t));
    }
    block_sync();  // tile t's buffers are free for tile t + 2
  }
  cp_async_wait<0>();
  block_sync();
}

}  // namespace pk
