// Entry points of the compiled kernels, one per pass and dtype (each defined in its own .cu file so
// that ninja compiles them in parallel). head_dim is the real head dim (a multiple of 8, <= 128).
#pragma once

#include "../kernels/params.h"

namespace pk {

void run_fwd_fp16(const FwdParams& p, int head_dim, bool causal);
void run_fwd_bf16(const FwdParams& p, int head_dim, bool causal);
void run_bwd_fp16(const BwdParams& p, int head_dim, bool causal);
void run_bwd_bf16(const BwdParams& p, int head_dim, bool causal);

// JSON list of every compiled kernel instantiation: pass, dtype, head dim, flags, tile, threads and
// dynamic shared memory (the static report joins it with cuobjdump's registers and spills).
const char* kernel_table_json();

}  // namespace pk
