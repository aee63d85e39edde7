// Forward kernels for bf16: every compiled head dim, causal or not.
#include "launch_cuda.cuh"
#include "runners.h"

namespace pk {
void run_fwd_bf16(const FwdParams& p, int head_dim, bool causal) { dispatch_fwd<CudaLauncher, Bf16>(p, head_dim, causal); }
}  // namespace pk
