// A CPU emulator of the few CUDA features the kernels of csrc/kernels use, so that their index math
// runs (slowly) without a GPU. Each CUDA thread of a block is a fiber (ucontext); fibers switch only at
// block barriers and warp-collective operations, and the scheduler resumes them in a seeded random
// order, either interleaving all threads or running one warp at a time as far as it can go. What is
// emulated, after the PTX ISA:
//   mma.m16n8k16 (fp16/bf16 in, fp32 accumulate), ldmatrix .x4 (and .trans), shfl.xor, __syncthreads,
//   __syncthreads_or, cp.async with commit/wait groups (copied either at issue or, to expose missing
//   waits and barriers, at the wait that retires them), ex2.approx (exact exp2 here).
// It checks what the hardware would silently get wrong: a warp collective reached by only part of a
// warp or mixed with another collective, barriers reached by only part of a block (deadlock), and
// misaligned 16-byte accesses.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <math.h>
#include <memory>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#define PK_DEVICE inline
#define PK_UNROLL

struct uint4 {
  uint32_t x, y, z, w;
};

namespace pk_emu {

struct Copy {
  void* dst;
  const void* src;
  bool pred;
};

struct Fiber {
  ucontext_t ctx;
  bool waiting = false, done = false;
  int tid = 0;
  int any_calls = 0;
  std::vector<Copy> open;                  // issued, not yet committed
  std::vector<std::vector<Copy>> groups;   // committed, oldest first
};

struct Warp {
  int arrived = 0;
  int kind[32];
  const void* in[32];
  void* out[32];
};

struct Options {
  bool eager_copies = false;  // copy at issue (true) or at the retiring wait (false)
  // Run one warp as far as it goes (to a block barrier) before the next, in a random order of warps,
  // instead of interleaving all threads: maximal skew between warps, which exposes a buffer refilled
  // while another warp still reads it (with eager copies) or read before it was filled.
  bool greedy_warps = false;
  uint64_t seed = 0;
};

struct Block {
  int bx = 0, by = 0, bz = 0, nthreads = 0;
  char* smem = nullptr;
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  int cur = 0;
  int bar_arrived = 0;
  int any_acc[2] = {0, 0};
  ucontext_t sched;
  std::function<void()> body;
  std::string error;
  Options opt;
};

inline Block*& current() {
  static thread_local Block* b = nullptr;
  return b;
}

[[noreturn]] inline void fail(const std::string& what) {
  Block* b = current();
  throw std::runtime_error("emulated block (" + std::to_string(b->bx) + ", " + std::to_string(b->by) + ", " +
                           std::to_string(b->bz) + ") thread " + std::to_string(b->cur) + ": " + what);
}

inline Fiber& self() { return current()->fibers[current()->cur]; }

inline void park() {
  Fiber& f = self();
  f.waiting = true;
  swapcontext(&f.ctx, &current()->sched);
}

inline void trampoline() {
  Block* b = current();
  try {
    b->body();
  } catch (const std::exception& e) {
    if (b->error.empty()) b->error = e.what();
  }
  b->fibers[b->cur].done = true;
}

inline void do_copy(const Copy& c) {
  if (c.pred) {
    std::memcpy(c.dst, c.src, 16);
  } else {
    std::memset(c.dst, 0, 16);
  }
}

// Run one block to completion.
inline void run_block(Block& b, std::vector<std::vector<char>>& stacks) {
  current() = &b;
  b.fibers.assign(b.nthreads, Fiber());
  b.warps.assign(b.nthreads / 32, Warp());
  for (int t = 0; t < b.nthreads; ++t) {
    Fiber& f = b.fibers[t];
    f.tid = t;
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = stacks[t].data();
    f.ctx.uc_stack.ss_size = stacks[t].size();
    f.ctx.uc_link = &b.sched;
    makecontext(&f.ctx, trampoline, 0);
  }
  std::mt19937_64 rng(b.opt.seed ^ (uint64_t(b.bx) * 1000003u + uint64_t(b.by) * 10007u + uint64_t(b.bz)));
  std::vector<int> order(b.nthreads), warps(b.nthreads / 32), lanes(32);
  std::iota(order.begin(), order.end(), 0);
  std::iota(warps.begin(), warps.end(), 0);
  std::iota(lanes.begin(), lanes.end(), 0);
  // Resume thread t if it can run; false if it is done or parked.
  auto step = [&](int t) {
    Fiber& f = b.fibers[t];
    if (f.done || f.waiting) return false;
    b.cur = t;
    swapcontext(&b.sched, &f.ctx);
    return true;
  };
  while (true) {
    bool ran = false;
    if (b.opt.greedy_warps) {
      std::shuffle(warps.begin(), warps.end(), rng);
      for (int w : warps) {
        for (bool again = true; again && b.error.empty();) {  // until every lane of w is parked or done
          again = false;
          std::shuffle(lanes.begin(), lanes.end(), rng);
          for (int l : lanes) {
            if (step(32 * w + l)) again = ran = true;
            if (!b.error.empty()) break;
          }
        }
      }
    } else {
      std::shuffle(order.begin(), order.end(), rng);
      for (int t : order) {
        if (step(t)) ran = true;
        if (!b.error.empty()) break;
      }
    }
    if (!b.error.empty()) throw std::runtime_error(b.error);
    const bool all_done = std::all_of(b.fibers.begin(), b.fibers.end(), [](const Fiber& f) { return f.done; });
    if (all_done) break;
    if (!ran) {
      throw std::runtime_error("emulated block (" + std::to_string(b.bx) + ", " + std::to_string(b.by) + ", " +
                               std::to_string(b.bz) +
                               "): deadlock: threads wait at a barrier or warp collective that others never reach");
    }
  }
  current() = nullptr;
}

// Launch body() on a grid of blocks of nthreads threads with smem_bytes of shared memory.
inline void launch(int gx, int gy, int gz, int nthreads, int smem_bytes, const std::function<void()>& body,
                   const Options& opt) {
  if (nthreads % 32 != 0) throw std::runtime_error("emulator: block size must be a multiple of 32");
  std::vector<std::vector<char>> stacks(nthreads, std::vector<char>(256 * 1024));
  std::vector<char> smem(static_cast<size_t>(smem_bytes) + 16);
  char* aligned = smem.data() + (16 - reinterpret_cast<uintptr_t>(smem.data()) % 16) % 16;
  for (int z = 0; z < gz; ++z)
    for (int y = 0; y < gy; ++y)
      for (int x = 0; x < gx; ++x) {
        // Shared memory starts as garbage (0xFF bytes: NaN in fp16, bf16 and fp32), as on a GPU.
        std::memset(aligned, 0xFF, smem_bytes);
        Block b;
        b.bx = x, b.by = y, b.bz = z, b.nthreads = nthreads, b.smem = aligned, b.body = body, b.opt = opt;
        run_block(b, stacks);
      }
}

inline void block_barrier() {
  Block& b = *current();
  if (++b.bar_arrived == b.nthreads) {
    b.bar_arrived = 0;
    for (Fiber& f : b.fibers) f.waiting = false;  // only barrier waiters can be parked now
    return;
  }
  park();
}

// A warp-wide operation: every lane parks its input; the last lane to arrive computes every lane's
// output, then all go on. kind tells operations apart (mixing them in one warp is an error).
template <class In, class Out, class F>
void warp_collective(int kind, const In& in, Out& out, F compute) {
  Block& b = *current();
  Fiber& f = self();
  Warp& w = b.warps[f.tid / 32];
  const int lane = f.tid % 32;
  w.kind[lane] = kind;
  w.in[lane] = &in;
  w.out[lane] = &out;
  if (++w.arrived < 32) {
    park();
    return;
  }
  for (int l = 0; l < 32; ++l) {
    if (w.kind[l] != kind) fail("warp collective mixed with another (divergent warp)");
  }
  const In* ins[32];
  Out* outs[32];
  for (int l = 0; l < 32; ++l) {
    ins[l] = static_cast<const In*>(w.in[l]);
    outs[l] = static_cast<Out*>(w.out[l]);
  }
  compute(ins, outs);
  w.arrived = 0;
  const int base = (f.tid / 32) * 32;
  for (int l = 0; l < 32; ++l) {
    if (base + l != f.tid) {
      Fiber& o = b.fibers[base + l];
      if (!o.waiting) fail("warp collective: a lane of this warp is not parked here");
      o.waiting = false;
    }
  }
}

enum Kind { kMma = 1, kLdm, kLdmT, kShfl, kShflInt };

}  // namespace pk_emu

namespace pk {

using saddr_t = uintptr_t;
inline saddr_t saddr(const void* p) { return reinterpret_cast<saddr_t>(p); }

inline int thread_idx() { return pk_emu::self().tid; }
inline int block_idx_x() { return pk_emu::current()->bx; }
inline int block_idx_y() { return pk_emu::current()->by; }
inline int block_idx_z() { return pk_emu::current()->bz; }
inline void block_sync() { pk_emu::block_barrier(); }

inline int block_any(int pred) {
  pk_emu::Block& b = *pk_emu::current();
  pk_emu::Fiber& f = pk_emu::self();
  const int slot = f.any_calls++ & 1;
  if (pred) b.any_acc[slot] = 1;
  pk_emu::block_barrier();
  const int r = b.any_acc[slot];
  pk_emu::block_barrier();
  if (f.tid == 0) b.any_acc[slot] = 0;
  return r;
}

inline float shfl_xor(float v, int mask) {
  float out;
  pk_emu::warp_collective(pk_emu::kShfl + 16 * mask, v, out, [mask](const float** in, float** o) {
    for (int l = 0; l < 32; ++l) *o[l] = *in[l ^ mask];
  });
  return out;
}
inline int shfl_xor_int(int v, int mask) {
  int out;
  pk_emu::warp_collective(pk_emu::kShflInt + 16 * mask, v, out, [mask](const int** in, int** o) {
    for (int l = 0; l < 32; ++l) *o[l] = *in[l ^ mask];
  });
  return out;
}

inline float fast_exp2(float x) { return std::exp2(x); }

inline void check_align(const void* p, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) pk_emu::fail(std::string(what) + ": address not 16-byte aligned");
}

inline void cp_async_16(void* smem, const void* gmem, bool pred) {
  check_align(smem, "cp.async destination");
  if (pred) check_align(gmem, "cp.async source");
  pk_emu::Copy c{smem, gmem, pred};
  if (pk_emu::current()->opt.eager_copies) {
    pk_emu::do_copy(c);
  } else {
    pk_emu::self().open.push_back(c);
  }
}
inline void cp_async_commit() {
  pk_emu::Fiber& f = pk_emu::self();
  f.groups.push_back(std::move(f.open));
  f.open.clear();
}
template <int N>
inline void cp_async_wait() {
  pk_emu::Fiber& f = pk_emu::self();
  while (static_cast<int>(f.groups.size()) > N) {
    for (const pk_emu::Copy& c : f.groups.front()) pk_emu::do_copy(c);
    f.groups.erase(f.groups.begin());
  }
}

// ldmatrix .x4: lanes 8i..8i+7 address the 8 rows (16 bytes each) of matrix i; lane l receives, in
// register i, row l / 4, columns 2 (l % 4) and 2 (l % 4) + 1 (transposed: rows 2 (l % 4) + {0, 1},
// column l / 4), the lower-index element in the low half.
inline void ldmatrix_impl(uint32_t (&r)[4], saddr_t addr, bool trans) {
  struct Out4 {
    uint32_t v[4];
  } out;
  const void* a = reinterpret_cast<const void*>(addr);
  check_align(a, "ldmatrix row");
  pk_emu::warp_collective(trans ? pk_emu::kLdmT : pk_emu::kLdm, addr, out,
                          [trans](const saddr_t** in, Out4** o) {
                            auto elem = [&](int mat, int row, int col) {
                              uint16_t x;
                              std::memcpy(&x, reinterpret_cast<const char*>(*in[8 * mat + row]) + 2 * col, 2);
                              return static_cast<uint32_t>(x);
                            };
                            for (int l = 0; l < 32; ++l) {
                              for (int i = 0; i < 4; ++i) {
                                uint32_t lo, hi;
                                if (!trans) {
                                  lo = elem(i, l / 4, 2 * (l % 4));
                                  hi = elem(i, l / 4, 2 * (l % 4) + 1);
                                } else {
                                  lo = elem(i, 2 * (l % 4), l / 4);
                                  hi = elem(i, 2 * (l % 4) + 1, l / 4);
                                }
                                o[l]->v[i] = lo | (hi << 16);
                              }
                            }
                          });
  for (int i = 0; i < 4; ++i) r[i] = out.v[i];
}
inline void ldmatrix_x4(uint32_t (&r)[4], saddr_t addr) { ldmatrix_impl(r, addr, false); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], saddr_t addr) { ldmatrix_impl(r, addr, true); }

inline uint4 ld128(const void* p) {
  check_align(p, "16-byte load");
  uint4 v;
  std::memcpy(&v, p, 16);
  return v;
}
inline void st128(void* p, uint4 v) {
  check_align(p, "16-byte store");
  std::memcpy(p, &v, 16);
}
inline void st32(void* p, uint32_t v) {
  if (reinterpret_cast<uintptr_t>(p) % 4 != 0) pk_emu::fail("32-bit store: address not 4-byte aligned");
  std::memcpy(p, &v, 4);
}

struct Fp16;
struct Bf16;

template <class E>
inline uint16_t from_float(float x);
template <>
inline uint16_t from_float<Fp16>(float x) {
  return c10::Half(x).x;
}
template <>
inline uint16_t from_float<Bf16>(float x) {
  return c10::BFloat16(x).x;
}
template <class E>
inline float to_float(uint16_t x);
template <>
inline float to_float<Fp16>(uint16_t x) {
  return static_cast<float>(c10::Half(x, c10::Half::from_bits()));
}
template <>
inline float to_float<Bf16>(uint16_t x) {
  return static_cast<float>(c10::BFloat16(x, c10::BFloat16::from_bits()));
}
template <class E>
inline uint32_t pack2(float lo, float hi) {
  return static_cast<uint32_t>(from_float<E>(lo)) | (static_cast<uint32_t>(from_float<E>(hi)) << 16);
}

// mma.m16n8k16, fragments as in the PTX ISA (lane = 4 * group + t):
//   A: a0 = (group, 2t..2t+1), a1 = (group + 8, 2t..), a2 = (group, 2t + 8..), a3 = (group + 8, 2t + 8..)
//   B: b0 = (2t..2t+1, group), b1 = (2t + 8..2t + 9, group)
//   C/D: c0, c1 = (group, 2t..2t+1), c2, c3 = (group + 8, 2t..2t+1)
template <class E>
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  struct In {
    uint32_t a[4], b[2];
    float c[4];
  } in;
  struct Out {
    float d[4];
  } out;
  for (int i = 0; i < 4; ++i) in.a[i] = a[i], in.c[i] = d[i];
  in.b[0] = b0, in.b[1] = b1;
  pk_emu::warp_collective(pk_emu::kMma, in, out, [](const In** ins, Out** outs) {
    float A[16][16], B[16][8], C[16][8];
    auto lo = [](uint32_t w) { return to_float<E>(static_cast<uint16_t>(w & 0xffffu)); };
    auto hi = [](uint32_t w) { return to_float<E>(static_cast<uint16_t>(w >> 16)); };
    for (int l = 0; l < 32; ++l) {
      const int g = l / 4, t = l % 4;
      const In& x = *ins[l];
      A[g][2 * t] = lo(x.a[0]), A[g][2 * t + 1] = hi(x.a[0]);
      A[g + 8][2 * t] = lo(x.a[1]), A[g + 8][2 * t + 1] = hi(x.a[1]);
      A[g][2 * t + 8] = lo(x.a[2]), A[g][2 * t + 9] = hi(x.a[2]);
      A[g + 8][2 * t + 8] = lo(x.a[3]), A[g + 8][2 * t + 9] = hi(x.a[3]);
      B[2 * t][g] = lo(x.b[0]), B[2 * t + 1][g] = hi(x.b[0]);
      B[2 * t + 8][g] = lo(x.b[1]), B[2 * t + 9][g] = hi(x.b[1]);
      C[g][2 * t] = x.c[0], C[g][2 * t + 1] = x.c[1];
      C[g + 8][2 * t] = x.c[2], C[g + 8][2 * t + 1] = x.c[3];
    }
    float D[16][8];
    for (int m = 0; m < 16; ++m)
      for (int n = 0; n < 8; ++n) {
        float acc = C[m][n];
        for (int k = 0; k < 16; ++k) acc += A[m][k] * B[k][n];
        D[m][n] = acc;
      }
    for (int l = 0; l < 32; ++l) {
      const int g = l / 4, t = l % 4;
      outs[l]->d[0] = D[g][2 * t], outs[l]->d[1] = D[g][2 * t + 1];
      outs[l]->d[2] = D[g + 8][2 * t], outs[l]->d[3] = D[g + 8][2 * t + 1];
    }
  });
  for (int i = 0; i < 4; ++i) d[i] = out.d[i];
}

}  // namespace pk
