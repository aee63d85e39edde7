// kernel_table_json(): every kernel instantiation the dispatch can launch, as JSON, for the static
// report (which joins it with the registers and spills cuobjdump reads from the built library).
#include <string>

#include "../kernels/dispatch.h"
#include "runners.h"

namespace pk {
namespace {

template <class K>
void row(std::string& s, const char* pass, const char* dtype, int head_dim, bool causal, int bm, int bn) {
  if (!s.empty()) s += ",\n";
  s += std::string("{\"pass\": \"") + pass + "\", \"dtype\": \"" + dtype + "\", \"head_dim\": " +
       std::to_string(head_dim) + ", \"causal\": " + (causal ? "true" : "false") + ", \"block_m\": " +
       std::to_string(bm) + ", \"block_n\": " + std::to_string(bn) + ", \"threads\": " + std::to_string(K::kThreads) +
       ", \"smem\": " + std::to_string(K::kSmemBytes) + "}";
}

template <class E, int kD>
void rows_for(std::string& s) {
  for (bool causal : {false, true}) {
    PK_BOOL_SWITCH(causal, kCausal, [&] {
      row<FwdKernel<E, kD, kCausal>>(s, "fwd", E::name, kD, kCausal, FwdConfig<kD>::kBlockM, FwdConfig<kD>::kBlockN);
      row<DkdvKernel<E, kD, kCausal, false>>(s, "bwd_dkdv", E::name, kD, kCausal, DkdvConfig<kD>::kBlockM,
                                             DkdvConfig<kD>::kBlockN);
      row<DqKernel<E, kD, kCausal>>(s, "bwd_dq", E::name, kD, kCausal, DqConfig<kD>::kBlockM, DqConfig<kD>::kBlockN);
    });
  }
  row<DkdvKernel<E, kD, false, true>>(s, "bwd_prefix_dkdv", E::name, kD, false, DkdvConfig<kD>::kBlockM,
                                      DkdvConfig<kD>::kBlockN);
}

template <class E>
void rows_dtype(std::string& s) {
  for (int hd : {32, 64, 96, 128}) {
    PK_HEADDIM_SWITCH(hd, kD, [&] { rows_for<E, kD>(s); });
  }
  row<PreprocessKernel<E>>(s, "bwd_preprocess", E::name, 0, false, 0, 0);
  row<PrefixReduceKernel<E>>(s, "bwd_prefix_reduce", E::name, 0, false, 0, 0);
}

}  // namespace

const char* kernel_table_json() {
  static const std::string table = [] {
    std::string s;
    rows_dtype<Fp16>(s);
    rows_dtype<Bf16>(s);
    return "[\n" + s + "\n]";
  }();
  return table.c_str();
}

}  // namespace pk
