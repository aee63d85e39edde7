// Backward kernels for bf16: delta, dK/dV, dQ, prefix dK/dV and its reduction, every compiled head dim.
#include "launch_cuda.cuh"
#include "runners.h"

namespace pk {
void run_bwd_bf16(const BwdParams& p, int head_dim, bool causal) { dispatch_bwd<CudaLauncher, Bf16>(p, head_dim, causal); }
}  // namespace pk
