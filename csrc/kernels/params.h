// Kernel parameters: plain structs of pointers, element strides and sizes (no torch, no CUDA types).
//
// Shapes: q, o, do, dq [B, Hq, Lq, D]; k, v, dk, dv [B, Hkv, Lk, D]; prefix_k/v [Hkv, P, D];
// key_padding_mask [B, Lk] uint8 contiguous (1 = attend); lse, delta, dlse [B, Hq, Lq] fp32
// contiguous. Every 4-D/3-D tensor has a unit stride on D; the other strides are in elements, multiples
// of 8 and with 16-byte aligned bases (the api copies whatever is not). Elements are 16-bit words.
#pragma once

#include <cstdint>

namespace pk {

// A [.., rows, D] operand: base pointer and element strides of batch, head and row.
struct Operand {
  const uint16_t* ptr = nullptr;
  int64_t batch_stride = 0;  // 0 for the prefix (shared by the batch)
  int64_t head_stride = 0;
  int64_t row_stride = 0;
};

struct OutOperand {
  uint16_t* ptr = nullptr;
  int64_t batch_stride = 0;
  int64_t head_stride = 0;
  int64_t row_stride = 0;
};

struct AttnShape {
  int B = 0, Hq = 0, Hkv = 0, G = 1;  // G = Hq / Hkv query heads per kv head
  int Lq = 0, Lk = 0, P = 0, D = 0;   // D: the real head dim (<= the kernel's padded kHeadDim)
  float scale = 0.f;                  // softmax scale
  float scale_log2 = 0.f;             // scale * log2(e): scores are kept in base 2
  const uint8_t* kpm = nullptr;       // key padding mask or nullptr
};

struct FwdParams {
  AttnShape s;
  Operand q, k, v, pk, pv;
  OutOperand o;
  float* lse = nullptr;  // nullptr when the caller does not want it
};

struct BwdParams {
  AttnShape s;
  Operand q, k, v, pk, pv, o, dout;
  OutOperand dq, dk, dv, dpk, dpv;
  const float* lse = nullptr;
  const float* dlse = nullptr;  // or nullptr
  float* delta = nullptr;       // rowsum(O * dO) - dLSE, written by the preprocess kernel
  // Prefix gradient partials [splits, Hkv, P, D] fp32 contiguous: split z sums the (batch row, query
  // head) units [z * units_per_split, (z + 1) * units_per_split) of the B * G units of each kv head.
  float* dpk_part = nullptr;
  float* dpv_part = nullptr;
  int splits = 0;
  int units_per_split = 0;
};

}  // namespace pk
