// The two element types (fp16, bf16): conversions and the tensor-core instruction of each.
//
// Elements are held as raw 16-bit words (uint16_t) everywhere; only these functions interpret them.
// A packed pair (uint32_t) keeps the lower-index element in the low half, as mma.sync expects.
#pragma once

#include "arch.cuh"

namespace pk {

struct Fp16 {
  static constexpr const char* name = "fp16";
};
struct Bf16 {
  static constexpr const char* name = "bf16";
};

#if !defined(PK_EMULATE)

template <class E>
PK_DEVICE uint32_t pack2(float lo, float hi);
template <>
PK_DEVICE uint32_t pack2<Fp16>(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}
template <>
PK_DEVICE uint32_t pack2<Bf16>(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

template <class E>
PK_DEVICE float to_float(uint16_t x);
template <>
PK_DEVICE float to_float<Fp16>(uint16_t x) {
  return __half2float(__ushort_as_half(x));
}
template <>
PK_DEVICE float to_float<Bf16>(uint16_t x) {
  return __bfloat162float(__ushort_as_bfloat16(x));
}

template <class E>
PK_DEVICE uint16_t from_float(float x);
template <>
PK_DEVICE uint16_t from_float<Fp16>(float x) {
  return __half_as_ushort(__float2half_rn(x));
}
template <>
PK_DEVICE uint16_t from_float<Bf16>(float x) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(x));
}

// d += a (16x16, row) * b (16x8, col), fp32 accumulation. Fragments as in the PTX ISA for m16n8k16:
// lane = 4 * group + t; a0 = A[group][2t..2t+1], a1 = A[group+8][..], a2 = A[group][2t+8..], a3 = A[group+8][2t+8..];
// b0 = B[2t..2t+1][group], b1 = B[2t+8..2t+9][group]; d0,d1 = D[group][2t..2t+1], d2,d3 = D[group+8][..].
template <class E>
PK_DEVICE void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
PK_DEVICE void mma_16816<Fp16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
PK_DEVICE void mma_16816<Bf16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

#endif  // !PK_EMULATE (the emulator defines the same four functions)

}  // namespace pk
