// Device primitives used by the kernels, in one place.
//
// Compiled by nvcc these are the real instructions (cp.async, ldmatrix, mma.sync, shuffles). Compiled
// with PK_EMULATE defined, the same names come from the CPU emulator in tests/emulator, which runs the
// kernel bodies with one fiber per CUDA thread: that is how the index math is tested without a GPU.
#pragma once

#include <cstdint>

#if defined(PK_EMULATE)

#include "emu_runtime.h"  // defines PK_DEVICE, PK_UNROLL and namespace pk's primitives on the CPU

#else

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#define PK_DEVICE __device__ __forceinline__
#define PK_UNROLL _Pragma("unroll")

namespace pk {

PK_DEVICE int thread_idx() { return static_cast<int>(threadIdx.x); }
PK_DEVICE int block_idx_x() { return static_cast<int>(blockIdx.x); }
PK_DEVICE int block_idx_y() { return static_cast<int>(blockIdx.y); }
PK_DEVICE int block_idx_z() { return static_cast<int>(blockIdx.z); }
PK_DEVICE void block_sync() { __syncthreads(); }
// 1 if pred is non-zero in any thread of the block (also a barrier).
PK_DEVICE int block_any(int pred) { return __syncthreads_or(pred); }

PK_DEVICE float shfl_xor(float v, int mask) { return __shfl_xor_sync(0xffffffffu, v, mask); }
PK_DEVICE int shfl_xor_int(int v, int mask) { return __shfl_xor_sync(0xffffffffu, v, mask); }

// 2^x with the hardware approximation (2 ulp); 2^-inf = +0.
PK_DEVICE float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Shared-memory addresses for ldmatrix are 32-bit offsets in the shared window.
using saddr_t = uint32_t;
PK_DEVICE saddr_t saddr(const void* p) { return static_cast<saddr_t>(__cvta_generic_to_shared(p)); }

// 16-byte asynchronous copy global -> shared; when !pred the 16 bytes are zero-filled and nothing is read.
PK_DEVICE void cp_async_16(void* smem, const void* gmem, bool pred) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(saddr(smem)), "l"(gmem),
               "r"(pred ? 16 : 0));
}
PK_DEVICE void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Wait until at most N of this thread's committed groups are still in flight.
template <int N>
PK_DEVICE void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i, register i receives it.
PK_DEVICE void ldmatrix_x4(uint32_t (&r)[4], saddr_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
PK_DEVICE void ldmatrix_x4_trans(uint32_t (&r)[4], saddr_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// 16-byte vector moves (shared or global; the address must be 16-byte aligned).
PK_DEVICE uint4 ld128(const void* p) { return *reinterpret_cast<const uint4*>(p); }
PK_DEVICE void st128(void* p, uint4 v) { *reinterpret_cast<uint4*>(p) = v; }
PK_DEVICE void st32(void* p, uint32_t v) { *reinterpret_cast<uint32_t*>(p) = v; }

}  // namespace pk

#endif
