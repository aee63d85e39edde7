// Backward kernels for fp16: delta, dK/dV, dQ, prefix dK/dV and its reduction, every compiled head dim.
#include "launch_cuda.cuh"
#include "runners.h"

namespace pk {
void run_bwd_fp16(const BwdParams& p, int head_dim, bool causal) { dispatch_bwd<CudaLauncher, Fp16>(p, head_dim, causal); }
}  // namespace pk
