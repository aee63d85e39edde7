// The op logic shared by the CUDA registration (api/register.cpp) and the CPU emulator of the tests:
// argument checks that name the bad argument, output allocation with the caller's layouts, and the
// translation of tensors into kernel parameters. Needs ATen only (no CUDA headers), and is generic over
// a Runner that launches the kernels:
//   Runner::fwd(const FwdParams&, at::ScalarType, int head_dim, bool causal)
//   Runner::bwd(const BwdParams&, at::ScalarType, int head_dim, bool causal)
//   Runner::sm_count(const at::Tensor&)       (sizes the prefix-gradient partials)
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "../kernels/params.h"
#include "../kernels/plan.h"

namespace pk::api {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

constexpr const char* kFwdOp = "prefix_kernels::cuda_fwd";
constexpr const char* kBwdOp = "prefix_kernels::cuda_bwd";

struct Sizes {
  int64_t B, Hq, Hkv, Lq, Lk, P, D;
};

inline bool given(const OptTensor& t) { return t.has_value() && t->defined(); }

// Shapes and dtypes of q, k, v, prefix_k, prefix_v, key_padding_mask (device-independent: the Meta
// kernels run the same checks).
inline Sizes check_args(const char* op, const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& pk,
                        const OptTensor& pv, const OptTensor& kpm) {
  for (auto [name, t] : {std::pair<const char*, const Tensor*>{"q", &q}, {"k", &k}, {"v", &v}}) {
    TORCH_CHECK(t->dim() == 4, op, ": ", name, " must be 4-D [batch, heads, seq, head_dim], got shape ", t->sizes());
  }
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kHalf || dt == at::kBFloat16, op,
              ": q must be float16 or bfloat16 (the CUDA kernels run fp16/bf16 tensor-core products), got ", dt);
  TORCH_CHECK(k.scalar_type() == dt, op, ": k.dtype ", k.scalar_type(), " differs from q.dtype ", dt);
  TORCH_CHECK(v.scalar_type() == dt, op, ": v.dtype ", v.scalar_type(), " differs from q.dtype ", dt);
  Sizes s{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), 0, q.size(3)};
  TORCH_CHECK(k.size(0) == s.B, op, ": batch size mismatch: q has ", s.B, " rows, k has ", k.size(0));
  TORCH_CHECK(k.size(3) == s.D, op, ": head_dim mismatch: q has ", s.D, ", k has ", k.size(3));
  TORCH_CHECK(v.sizes() == k.sizes(), op, ": v must have the shape of k ", k.sizes(), ", got ", v.sizes());
  TORCH_CHECK(s.B >= 1 && s.Hq >= 1 && s.Lq >= 1 && s.Hkv >= 1 && s.Lk >= 1, op,
              ": empty input: q ", q.sizes(), ", k ", k.sizes());
  TORCH_CHECK(s.Hq % s.Hkv == 0, op, ": q has ", s.Hq, " heads, not a multiple of the ", s.Hkv, " kv heads of k");
  TORCH_CHECK(s.D % 8 == 0 && s.D <= kMaxHeadDim, op, ": head dim ", s.D,
              " is not supported: the CUDA kernels need a multiple of 8 (16-byte rows) no larger than ", kMaxHeadDim);
  TORCH_CHECK(given(pk) == given(pv), op, ": prefix_k and prefix_v must be given together");
  if (given(pk)) {
    for (auto [name, t] : {std::pair<const char*, const Tensor*>{"prefix_k", &*pk}, {"prefix_v", &*pv}}) {
      TORCH_CHECK(t->dim() == 3 && t->size(0) == s.Hkv && t->size(2) == s.D, op, ": ", name,
                  " must be [kv_heads=", s.Hkv, ", P, head_dim=", s.D, "], got shape ", t->sizes());
      TORCH_CHECK(t->scalar_type() == dt, op, ": ", name, ".dtype ", t->scalar_type(), " differs from q.dtype ", dt);
    }
    TORCH_CHECK(pv->sizes() == pk->sizes(), op, ": prefix_v must have the shape of prefix_k ", pk->sizes(),
                ", got ", pv->sizes());
    s.P = pk->size(1);
  }
  if (given(kpm)) {
    TORCH_CHECK(kpm->scalar_type() == at::kBool, op, ": key_padding_mask must be bool (True = attend), got ",
                kpm->scalar_type());
    TORCH_CHECK(kpm->dim() == 2 && kpm->size(0) == s.B && kpm->size(1) == s.Lk, op,
                ": key_padding_mask must have shape (batch=", s.B, ", Lk=", s.Lk, "), got ", kpm->sizes());
  }
  constexpr int64_t kInt = INT32_MAX, kGrid = 65535;
  TORCH_CHECK(s.Lq <= kInt && s.Lk <= kInt && s.P <= kInt, op, ": sequence lengths must fit in 32 bits");
  TORCH_CHECK(s.Hq <= kGrid && s.B <= kGrid, op, ": at most ", kGrid, " heads and batch rows (a grid dimension each)");
  return s;
}

// q, k, v, prefix and mask on one CUDA device (the CUDA kernels' own check; the emulator runs on CPU).
inline void check_same_device(const char* op, const Tensor& q, std::initializer_list<std::pair<const char*, const Tensor*>> others) {
  for (auto [name, t] : others) {
    if (t && t->defined()) {
      TORCH_CHECK(t->device() == q.device(), op, ": ", name, " is on ", t->device(), " but q is on ", q.device());
    }
  }
}

// The kernels read rows with 16-byte vector copies: unit stride on the last dim, other strides multiples
// of 8 elements, a 16-byte aligned base.
inline bool kernel_friendly(const Tensor& t) {
  if (t.stride(-1) != 1) return false;
  for (int64_t i = 0; i + 1 < t.dim(); ++i) {
    if (t.size(i) > 1 && t.stride(i) % 8 != 0) return false;
  }
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

// Any layout in, a layout the kernels read: the tensor itself, or a contiguous copy.
inline Tensor readable(const Tensor& t) { return kernel_friendly(t) ? t : t.clone(at::MemoryFormat::Contiguous); }

// The caller gets `like`'s layout (empty_like, as the fake implementations promise); the kernels write
// into it directly, or into a contiguous stand-in copied over afterwards.
struct Output {
  Tensor result, target;
  explicit Output(const Tensor& like) : result(at::empty_like(like)) {
    target = kernel_friendly(result) ? result : at::empty(like.sizes(), like.options());
  }
  void finish() {
    if (!target.is_same(result)) result.copy_(target);
  }
};

inline const uint16_t* ptr16(const Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr()); }
inline uint16_t* mut16(const Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr()); }
inline Operand operand4(const Tensor& t) { return {ptr16(t), t.stride(0), t.stride(1), t.stride(2)}; }
inline Operand operand3(const Tensor& t) { return {ptr16(t), 0, t.stride(0), t.stride(1)}; }
inline OutOperand out4(const Tensor& t) { return {mut16(t), t.stride(0), t.stride(1), t.stride(2)}; }
inline OutOperand out3(const Tensor& t) { return {mut16(t), 0, t.stride(0), t.stride(1)}; }

inline AttnShape shape_of(const Sizes& z, double scale, const Tensor& kpm_u8) {
  AttnShape s;
  s.B = static_cast<int>(z.B), s.Hq = static_cast<int>(z.Hq), s.Hkv = static_cast<int>(z.Hkv);
  s.G = static_cast<int>(z.Hq / z.Hkv);
  s.Lq = static_cast<int>(z.Lq), s.Lk = static_cast<int>(z.Lk), s.P = static_cast<int>(z.P), s.D = static_cast<int>(z.D);
  s.scale = static_cast<float>(scale);
  s.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  s.kpm = kpm_u8.defined() ? reinterpret_cast<const uint8_t*>(kpm_u8.data_ptr()) : nullptr;
  return s;
}

inline Tensor mask_bytes(const OptTensor& kpm) {
  return given(kpm) ? kpm->contiguous().view(at::kByte) : Tensor();
}

// Forward. Returns (out [B, Hq, Lq, D] laid out like q, lse [B, Hq, Lq] fp32 or [B, Hq, 0]).
template <class Runner>
std::tuple<Tensor, Tensor> forward(const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& pk,
                                   const OptTensor& pv, const OptTensor& kpm, bool causal, double scale,
                                   bool need_lse) {
  const Sizes z = check_args(kFwdOp, q, k, v, pk, pv, kpm);
  Output out(q);
  Tensor lse = at::empty({z.B, z.Hq, need_lse ? z.Lq : 0}, q.options().dtype(at::kFloat));
  const Tensor q_ = readable(q), k_ = readable(k), v_ = readable(v);
  const Tensor pk_ = given(pk) ? readable(*pk) : Tensor(), pv_ = given(pv) ? readable(*pv) : Tensor();
  const Tensor kpm_u8 = mask_bytes(kpm);
  FwdParams p;
  p.s = shape_of(z, scale, kpm_u8);
  p.q = operand4(q_), p.k = operand4(k_), p.v = operand4(v_);
  p.pk = pk_.defined() ? operand3(pk_) : Operand{ptr16(k_), 0, 0, 0};  // P = 0: never read
  p.pv = pv_.defined() ? operand3(pv_) : Operand{ptr16(v_), 0, 0, 0};
  p.o = out4(out.target);
  p.lse = need_lse ? lse.data_ptr<float>() : nullptr;
  Runner::fwd(p, q.scalar_type(), static_cast<int>(z.D), causal);
  out.finish();
  return {out.result, lse};
}

// Backward. Returns (dq like q, dk like k, dv like v, dprefix_k like prefix_k, dprefix_v like prefix_v);
// the prefix gradients are empty [0] tensors when no prefix is given.
template <class Runner>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> backward(const Tensor& dout, const OptTensor& dlse, const Tensor& q,
                                                            const Tensor& k, const Tensor& v, const OptTensor& pk,
                                                            const OptTensor& pv, const OptTensor& kpm,
                                                            const Tensor& out, const Tensor& lse, bool causal,
                                                            double scale) {
  const Sizes z = check_args(kBwdOp, q, k, v, pk, pv, kpm);
  TORCH_CHECK(dout.sizes() == q.sizes() && dout.scalar_type() == q.scalar_type(), kBwdOp,
              ": dout must match q (shape ", q.sizes(), ", dtype ", q.scalar_type(), "), got ", dout.sizes(), " ",
              dout.scalar_type());
  TORCH_CHECK(out.sizes() == q.sizes() && out.scalar_type() == q.scalar_type(), kBwdOp,
              ": out must match q (shape ", q.sizes(), ", dtype ", q.scalar_type(), "), got ", out.sizes(), " ",
              out.scalar_type());
  const std::vector<int64_t> rows{z.B, z.Hq, z.Lq};
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.sizes() == at::IntArrayRef(rows), kBwdOp,
              ": lse must be float32 of shape ", at::IntArrayRef(rows), " (the forward's, with need_lse), got ",
              lse.scalar_type(), " ", lse.sizes());
  const bool has_dlse = given(dlse) && dlse->numel() > 0;
  if (has_dlse) {
    TORCH_CHECK(dlse->scalar_type() == at::kFloat && dlse->sizes() == at::IntArrayRef(rows), kBwdOp,
                ": dlse must be float32 of shape ", at::IntArrayRef(rows), ", got ", dlse->scalar_type(), " ",
                dlse->sizes());
  }
  Output dq(q), dk(k), dv(v);
  const Tensor q_ = readable(q), k_ = readable(k), v_ = readable(v), do_ = readable(dout), o_ = readable(out);
  const Tensor pk_ = given(pk) ? readable(*pk) : Tensor(), pv_ = given(pv) ? readable(*pv) : Tensor();
  const Tensor kpm_u8 = mask_bytes(kpm);
  const Tensor lse_c = lse.contiguous();
  const Tensor dlse_c = has_dlse ? dlse->contiguous() : Tensor();
  const Tensor delta = at::empty({z.B, z.Hq, z.Lq}, q.options().dtype(at::kFloat));

  BwdParams p;
  p.s = shape_of(z, scale, kpm_u8);
  p.q = operand4(q_), p.k = operand4(k_), p.v = operand4(v_), p.o = operand4(o_), p.dout = operand4(do_);
  p.pk = pk_.defined() ? operand3(pk_) : Operand{ptr16(k_), 0, 0, 0};
  p.pv = pv_.defined() ? operand3(pv_) : Operand{ptr16(v_), 0, 0, 0};
  p.dq = out4(dq.target), p.dk = out4(dk.target), p.dv = out4(dv.target);
  p.lse = lse_c.data_ptr<float>();
  p.dlse = has_dlse ? dlse_c.data_ptr<float>() : nullptr;
  p.delta = delta.data_ptr<float>();

  Tensor dpk_part, dpv_part;
  std::optional<Output> dpk, dpv;
  if (pk_.defined()) {
    dpk.emplace(*pk);
    dpv.emplace(*pv);
    p.dpk = out3(dpk->target), p.dpv = out3(dpv->target);
  }
  if (z.P > 0) {
    prefix_splits(static_cast<int>(z.B), static_cast<int>(z.Hq / z.Hkv), static_cast<int>(z.Hkv),
                  static_cast<int>(z.P), Runner::sm_count(q), p.splits, p.units_per_split);
    dpk_part = at::empty({p.splits, z.Hkv, z.P, z.D}, q.options().dtype(at::kFloat));
    dpv_part = at::empty_like(dpk_part);
    p.dpk_part = dpk_part.data_ptr<float>();
    p.dpv_part = dpv_part.data_ptr<float>();
  }
  Runner::bwd(p, q.scalar_type(), static_cast<int>(z.D), causal);
  dq.finish(), dk.finish(), dv.finish();
  if (!dpk) return {dq.result, dk.result, dv.result, q.new_empty({0}), q.new_empty({0})};
  dpk->finish(), dpv->finish();
  return {dq.result, dk.result, dv.result, dpk->result, dpv->result};
}

// The Meta (fake) kernels: the same checks, outputs of the right shapes, dtypes and layouts.
inline std::tuple<Tensor, Tensor> forward_meta(const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& pk,
                                               const OptTensor& pv, const OptTensor& kpm, bool causal, double scale,
                                               bool need_lse) {
  const Sizes z = check_args(kFwdOp, q, k, v, pk, pv, kpm);
  return {at::empty_like(q), at::empty({z.B, z.Hq, need_lse ? z.Lq : 0}, q.options().dtype(at::kFloat))};
}

inline std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> backward_meta(
    const Tensor& dout, const OptTensor& dlse, const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& pk,
    const OptTensor& pv, const OptTensor& kpm, const Tensor& out, const Tensor& lse, bool causal, double scale) {
  check_args(kBwdOp, q, k, v, pk, pv, kpm);
  TORCH_CHECK(dout.sizes() == q.sizes(), kBwdOp, ": dout must have the shape of q ", q.sizes(), ", got ", dout.sizes());
  if (!given(pk)) return {at::empty_like(q), at::empty_like(k), at::empty_like(v), q.new_empty({0}), q.new_empty({0})};
  return {at::empty_like(q), at::empty_like(k), at::empty_like(v), at::empty_like(*pk), at::empty_like(*pv)};
}

}  // namespace pk::api
