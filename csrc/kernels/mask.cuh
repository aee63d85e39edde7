// The one mask of every pass: which (query, key) pairs of a key source are hidden.
//
// A key j of a source is kept when j < key_end and, if kpm is set, kpm[j] != 0 (the padding mask;
// the key walk leaves kpm null when the kept keys form one range, which key_end and the walk's first
// column already describe, so most tiles never load the padding row). A query i sees a kept key j unless
// causal and j > i + diag (diag = Lk - Lq: bottom-right alignment). The prefix is a source with
// key_end = P and no causal side.
//
// visible<kRows, kKeyMask, kCausalMask> tests one accumulator entry, apply<...> a whole 16 x (8 kNT)
// accumulator (writing -inf into hidden logits, or 0 into hidden probabilities); the template arguments
// say which masks are live, so an edge tile pays only the tests it needs and an interior tile none (the
// edge tests sit beside the loops: keys.cuh for the forward and dQ, bwd_dkdv.cuh for dK/dV).
#pragma once

#include "tile.cuh"

namespace pk {

// Whether a tile is an edge one, as a type: a loop body that takes it is compiled twice, so an interior
// tile runs code with no mask in it at all (IsEvenMN-style). It converts to bool, so that one body can be
// written for it and for a runtime flag.
template <bool kValue>
struct Edge {
  constexpr operator bool() const { return kValue; }
};

// What indexes the rows of a score accumulator: queries (S = Q K^T: forward, dQ) or keys (S^T = K Q^T: dK/dV).
enum class Rows { kQueries, kKeys };

struct Mask {
  int key_end = 0;
  const uint8_t* kpm = nullptr;
  int diag = 0;
  // Rows::kKeys: the key side of this lane's two rows, computed once (hoist_row_keys) for every query tile.
  bool row_kept[2] = {true, true};

  PK_DEVICE bool key_kept(int key) const { return key < key_end && (kpm == nullptr || kpm[key] != 0); }

  PK_DEVICE void hoist_row_keys(int row0) {
    PK_UNROLL
    for (int i = 0; i < 2; ++i) row_kept[i] = key_kept(row0 + 8 * i);
  }

  // Whether entry [j][e] of this lane is visible. It sits at row row0 + 8 (e / 2) and column
  // col0 + 8 j + 2 (lane % 4) + (e % 2): row0 is the lane's first row (tile row + lane / 4), col0 the
  // tile's first column.
  template <Rows kRows, bool kKeyMask, bool kCausalMask>
  PK_DEVICE bool visible(int j, int e, int row0, int col0, int lane) const {
    const int dr = 8 * (e / 2), dc = 8 * j + 2 * (lane % 4) + (e & 1);  // the entry's offsets from row0, col0
    bool ok = true;
    if (kKeyMask) ok = kRows == Rows::kKeys ? row_kept[e / 2] : key_kept(col0 + dc);
    if (kCausalMask) ok = ok && (kRows == Rows::kQueries ? col0 + dc <= row0 + dr + diag : row0 + dr <= col0 + dc + diag);
    return ok;
  }

  // Writes `hidden` into the hidden entries of a warp's accumulator: -inf into logits (the forward, before
  // its running max), 0 into probabilities (the backward, after P = exp2(S - lse2)).
  template <Rows kRows, bool kKeyMask, bool kCausalMask, int kNT>
  PK_DEVICE void apply(float (&s)[kNT][4], int row0, int col0, int lane, float hidden) const {
    PK_UNROLL
    for (int j = 0; j < kNT; ++j) {
      PK_UNROLL
      for (int e = 0; e < 4; ++e) {
        if (!visible<kRows, kKeyMask, kCausalMask>(j, e, row0, col0, lane)) s[j][e] = hidden;
      }
    }
  }
};

}  // namespace pk
