// The CUDA kernels of csrc/, run on the CPU by the emulator (emu_runtime.h), behind the very op logic
// of the extension (csrc/api/ops.h): the tests call fwd/bwd with CPU tensors and compare them with
// the reference. Built on demand by tests/emulator/__init__.py.
#define PK_EMULATE 1
#include <torch/extension.h>

#include "../../csrc/api/ops.h"
#include "../../csrc/kernels/dispatch.h"

namespace {

pk_emu::Options g_options;

struct EmuLauncher {
  template <class K>
  static void run(const pk::Grid& grid, const typename K::Params& p) {
    if (grid.x <= 0 || grid.y <= 0 || grid.z <= 0) return;
    pk_emu::launch(
        grid.x, grid.y, grid.z, K::kThreads, K::kSmemBytes, [&p] { K::body(p, pk_emu::current()->smem); },
        g_options);
  }
};

struct EmuRunner {
  static void fwd(const pk::FwdParams& p, at::ScalarType dt, int head_dim, bool causal) {
    if (dt == at::kHalf) {
      pk::dispatch_fwd<EmuLauncher, pk::Fp16>(p, head_dim, causal);
    } else {
      pk::dispatch_fwd<EmuLauncher, pk::Bf16>(p, head_dim, causal);
    }
  }
  static void bwd(const pk::BwdParams& p, at::ScalarType dt, int head_dim, bool causal) {
    if (dt == at::kHalf) {
      pk::dispatch_bwd<EmuLauncher, pk::Fp16>(p, head_dim, causal);
    } else {
      pk::dispatch_bwd<EmuLauncher, pk::Bf16>(p, head_dim, causal);
    }
  }
  static int sm_count(const at::Tensor&) { return 2; }  // a tiny "GPU": several partials at small shapes
};

std::tuple<at::Tensor, at::Tensor> fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       const std::optional<at::Tensor>& pk, const std::optional<at::Tensor>& pv,
                                       const std::optional<at::Tensor>& kpm, bool causal, double scale, bool need_lse) {
  return pk::api::forward<EmuRunner>(q, k, v, pk, pv, kpm, causal, scale, need_lse);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd(
    const at::Tensor& dout, const std::optional<at::Tensor>& dlse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const std::optional<at::Tensor>& pk, const std::optional<at::Tensor>& pv,
    const std::optional<at::Tensor>& kpm, const at::Tensor& out, const at::Tensor& lse, bool causal, double scale) {
  return pk::api::backward<EmuRunner>(dout, dlse, q, k, v, pk, pv, kpm, out, lse, causal, scale);
}

void set_options(bool eager_copies, bool greedy_warps, uint64_t seed) {
  g_options.eager_copies = eager_copies;
  g_options.greedy_warps = greedy_warps;
  g_options.seed = seed;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fwd", &fwd, "the CUDA forward, emulated on the CPU");
  m.def("bwd", &bwd, "the CUDA backward, emulated on the CPU");
  m.def("set_options", &set_options, "cp.async at issue (eager) or at the wait; one warp at a time (greedy) or interleaved; seed");
}
