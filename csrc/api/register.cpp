// Registration of the CUDA ops under torch.ops.prefix_kernels, and the Python module prefix_kernels._C.
//
//   cuda_fwd(q, k, v, prefix_k?, prefix_v?, key_padding_mask?, causal, softmax_scale, need_lse)
//       -> (out [B, Hq, Lq, D] like q, lse [B, Hq, Lq] fp32, or [B, Hq, 0] without need_lse)
//   cuda_bwd(dout, dlse?, q, k, v, prefix_k?, prefix_v?, key_padding_mask?, out, lse, causal, softmax_scale)
//       -> (dq like q, dk like k, dv like v, dprefix_k like prefix_k, dprefix_v like prefix_v; [0] without prefix)
//
// Each has a CUDA kernel and a Meta kernel (shapes only, for fake tensors and torch.compile). The Python
// custom ops prefix_kernels::attention_fwd/attention_bwd (ops/attention/function.py) register their own
// names in the same namespace as library fragments; this TORCH_LIBRARY block is the namespace's one
// defining block, and the two coexist (tests/build/test_extension.py checks both import orders).
#include <Python.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include "../launch/runners.h"
#include "ops.h"

namespace pk::api {
namespace {

struct CudaRunner {
  static void fwd(const FwdParams& p, at::ScalarType dt, int head_dim, bool causal) {
    if (dt == at::kHalf) {
      run_fwd_fp16(p, head_dim, causal);
    } else {
      run_fwd_bf16(p, head_dim, causal);
    }
  }
  static void bwd(const BwdParams& p, at::ScalarType dt, int head_dim, bool causal) {
    if (dt == at::kHalf) {
      run_bwd_fp16(p, head_dim, causal);
    } else {
      run_bwd_bf16(p, head_dim, causal);
    }
  }
  static int sm_count(const Tensor& t) { return attribute(cudaDevAttrMultiProcessorCount, t.device().index()); }
  static int attribute(cudaDeviceAttr what, int device) {
    int value = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, what, device));
    return value;
  }
};

using Named = std::pair<const char*, const Tensor*>;

const Tensor* opt(const OptTensor& t) { return given(t) ? &*t : nullptr; }

void check_cuda(const char* op, const Tensor& q, std::initializer_list<Named> others) {
  TORCH_CHECK(q.is_cuda(), op, ": q must be a CUDA tensor, got one on ", q.device());
  check_same_device(op, q, others);
  const int major = CudaRunner::attribute(cudaDevAttrComputeCapabilityMajor, q.device().index());
  const int minor = CudaRunner::attribute(cudaDevAttrComputeCapabilityMinor, q.device().index());
  TORCH_CHECK(major >= 8, op, ": needs a GPU of compute capability sm_80 or newer (cp.async, bf16 mma.sync), got sm_",
              major, minor);
}

std::tuple<Tensor, Tensor> fwd_cuda(const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& pk,
                                    const OptTensor& pv, const OptTensor& kpm, bool causal, double scale,
                                    bool need_lse) {
  check_cuda(kFwdOp, q, {{"k", &k}, {"v", &v}, {"prefix_k", opt(pk)}, {"prefix_v", opt(pv)},
                         {"key_padding_mask", opt(kpm)}});
  const c10::cuda::CUDAGuard guard(q.device());
  return forward<CudaRunner>(q, k, v, pk, pv, kpm, causal, scale, need_lse);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> bwd_cuda(const Tensor& dout, const OptTensor& dlse, const Tensor& q,
                                                            const Tensor& k, const Tensor& v, const OptTensor& pk,
                                                            const OptTensor& pv, const OptTensor& kpm,
                                                            const Tensor& out, const Tensor& lse, bool causal,
                                                            double scale) {
  check_cuda(kBwdOp, q, {{"dout", &dout}, {"dlse", opt(dlse)}, {"k", &k}, {"v", &v}, {"prefix_k", opt(pk)},
                         {"prefix_v", opt(pv)}, {"key_padding_mask", opt(kpm)}, {"out", &out}, {"lse", &lse}});
  const c10::cuda::CUDAGuard guard(q.device());
  return backward<CudaRunner>(dout, dlse, q, k, v, pk, pv, kpm, out, lse, causal, scale);
}

}  // namespace
}  // namespace pk::api

TORCH_LIBRARY(prefix_kernels, m) {
  m.def(
      "cuda_fwd(Tensor q, Tensor k, Tensor v, Tensor? prefix_k, Tensor? prefix_v, Tensor? key_padding_mask, "
      "bool causal, float softmax_scale, bool need_lse) -> (Tensor, Tensor)");
  m.def(
      "cuda_bwd(Tensor dout, Tensor? dlse, Tensor q, Tensor k, Tensor v, Tensor? prefix_k, Tensor? prefix_v, "
      "Tensor? key_padding_mask, Tensor out, Tensor lse, bool causal, float softmax_scale) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(prefix_kernels, CUDA, m) {
  m.impl("cuda_fwd", &pk::api::fwd_cuda);
  m.impl("cuda_bwd", &pk::api::bwd_cuda);
}

TORCH_LIBRARY_IMPL(prefix_kernels, Meta, m) {
  m.impl("cuda_fwd", &pk::api::forward_meta);
  m.impl("cuda_bwd", &pk::api::backward_meta);
}

// The Python module: importing it runs the registrations above. kernel_table() lists the compiled
// kernel instantiations (JSON) for the static report.
static PyObject* kernel_table(PyObject*, PyObject*) { return PyUnicode_FromString(pk::kernel_table_json()); }

static PyMethodDef kMethods[] = {
    {"kernel_table", kernel_table, METH_NOARGS, "JSON list of the compiled kernels: pass, dtype, head dim, tiles, smem"},
    {nullptr, nullptr, 0, nullptr}};

static PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_C", "prefix_kernels CUDA kernels (ops in torch.ops.prefix_kernels)",
                              -1, kMethods};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&kModule); }
