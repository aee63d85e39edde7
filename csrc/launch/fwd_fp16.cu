// Forward kernels for fp16: every compiled head dim, causal or not.
#include "launch_cuda.cuh"
#include "runners.h"

namespace pk {
void run_fwd_fp16(const FwdParams& p, int head_dim, bool causal) { dispatch_fwd<CudaLauncher, Fp16>(p, head_dim, causal); }
}  // namespace pk
