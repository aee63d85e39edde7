// The CUDA launcher of the kernel tags in kernels/dispatch.h: one __global__ template wraps every
// pass's body; launches go to the current PyTorch stream. The bound of one block per SM lets ptxas use
// up to 255 registers (without it, it caps some instantiations lower and spills); shared memory, not
// registers, is what limits residency at these tile sizes anyway.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include "../kernels/dispatch.h"

namespace pk {

template <class K>
__global__ void __launch_bounds__(K::kThreads, 1) attention_kernel(const typename K::Params p) {
  extern __shared__ __align__(16) char smem[];
  K::body(p, smem);
}

struct CudaLauncher {
  template <class K>
  static void run(const Grid& grid, const typename K::Params& p) {
    if (grid.x <= 0 || grid.y <= 0 || grid.z <= 0) return;
    auto kernel = attention_kernel<K>;
    if (K::kSmemBytes > 48 * 1024) {
      // Above 48 KiB a block must opt in to its dynamic shared memory.
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, K::kSmemBytes));
    }
    kernel<<<dim3(grid.x, grid.y, grid.z), K::kThreads, K::kSmemBytes, c10::cuda::getCurrentCUDAStream()>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace pk
