// Which kernel runs, with which grid, block and shared memory: shared by the CUDA launcher
// (launch/launch_cuda.cuh) and the CPU emulator of the tests, so both run exactly the same plan.
//
// Each pass is a kernel tag: a struct with kThreads, kSmemBytes and a static body(params, smem). The
// launcher wraps body in one __global__ template; `Launcher::run<Tag>(grid, params)` launches it.
#pragma once

#include "bwd_dkdv.cuh"
#include "bwd_dq.cuh"
#include "bwd_misc.cuh"
#include "fwd.cuh"
#include "params.h"
#include "plan.h"
#include "static_switch.h"

namespace pk {

struct Grid {
  int x = 1, y = 1, z = 1;
};

template <class E, int kD, bool kCausal>
struct FwdKernel {
  using Params = FwdParams;
  static constexpr int kThreads = FwdConfig<kD>::kThreads;
  static constexpr int kSmemBytes = FwdConfig<kD>::kSmemBytes;
  static PK_DEVICE void body(const Params& p, char* smem) { fwd_block<E, kD, kCausal>(p, smem); }
};

template <class E, int kD, bool kCausal, bool kPrefix>
struct DkdvKernel {
  using Params = BwdParams;
  static constexpr int kThreads = DkdvConfig<kD>::kThreads;
  static constexpr int kSmemBytes = DkdvConfig<kD>::kSmemBytes;
  static PK_DEVICE void body(const Params& p, char* smem) { bwd_dkdv_block<E, kD, kCausal, kPrefix>(p, smem); }
};

template <class E, int kD, bool kCausal>
struct DqKernel {
  using Params = BwdParams;
  static constexpr int kThreads = DqConfig<kD>::kThreads;
  static constexpr int kSmemBytes = DqConfig<kD>::kSmemBytes;
  static PK_DEVICE void body(const Params& p, char* smem) { bwd_dq_block<E, kD, kCausal>(p, smem); }
};

template <class E>
struct PreprocessKernel {
  using Params = BwdParams;
  static constexpr int kThreads = kMiscThreads;
  static constexpr int kSmemBytes = 0;
  static PK_DEVICE void body(const Params& p, char*) { bwd_preprocess_thread<E>(p); }
};

template <class E>
struct PrefixReduceKernel {
  using Params = BwdParams;
  static constexpr int kThreads = kMiscThreads;
  static constexpr int kSmemBytes = 0;
  static PK_DEVICE void body(const Params& p, char*) { bwd_prefix_reduce_thread<E>(p); }
};

static_assert(DkdvConfig<32>::kBlockN == kPrefixBlockN && DkdvConfig<128>::kBlockN == kPrefixBlockN,
              "the api sizes the prefix partials with kPrefixBlockN");

template <class Launcher, class E>
void dispatch_fwd(const FwdParams& p, int head_dim, bool causal) {
  PK_HEADDIM_SWITCH(head_dim, kD, [&] {
    PK_BOOL_SWITCH(causal, kCausal, [&] {
      const Grid grid{cdiv(p.s.Lq, FwdConfig<kD>::kBlockM), p.s.Hq, p.s.B};
      Launcher::template run<FwdKernel<E, kD, kCausal>>(grid, p);
    });
  });
}

// The backward passes in order: delta; dK/dV of the input keys; dQ; with a prefix, its partials and
// their reduction. p.delta, p.dpk_part/dpv_part (splits x Hkv x P x D fp32) must be allocated.
template <class Launcher, class E>
void dispatch_bwd(const BwdParams& p, int head_dim, bool causal) {
  const AttnShape& s = p.s;
  Launcher::template run<PreprocessKernel<E>>(Grid{cdiv(static_cast<int64_t>(s.B) * s.Hq * s.Lq, kMiscThreads)}, p);
  PK_HEADDIM_SWITCH(head_dim, kD, [&] {
    PK_BOOL_SWITCH(causal, kCausal, [&] {
      Launcher::template run<DkdvKernel<E, kD, kCausal, false>>(
          Grid{cdiv(s.Lk, DkdvConfig<kD>::kBlockN), s.Hkv, s.B}, p);
      Launcher::template run<DqKernel<E, kD, kCausal>>(Grid{cdiv(s.Lq, DqConfig<kD>::kBlockM), s.Hq, s.B}, p);
    });
    if (s.P > 0) {
      Launcher::template run<DkdvKernel<E, kD, false, true>>(Grid{cdiv(s.P, kPrefixBlockN), s.Hkv, p.splits}, p);
    }
  });
  if (s.P > 0) {
    Launcher::template run<PrefixReduceKernel<E>>(Grid{cdiv(static_cast<int64_t>(s.Hkv) * s.P * s.D, kMiscThreads)},
                                                  p);
  }
}

}  // namespace pk
