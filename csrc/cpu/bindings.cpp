// Python bindings of the C++ CPU kernels: module lift_engine._C_cpu.
// Shape/dtype checks and allocation live here; the kernels take raw pointers (fp32, or
// fp32/bf16 for the fused elementwise ops).
// Autograd is wired in lift_engine/ops/cpu_backend.py.
#include <torch/csrc/utils/pybind.h>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>

#include <string>
#include <tuple>
#include <vector>

#include "common.h"

namespace py = pybind11;
using at::Tensor;

namespace {

Tensor f32(const Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dim, name, " must have ", dim, " dims, got shape ", t.sizes());
  return t.detach().contiguous();
}

struct PlanT {
  Tensor order, blocks;
  lift_cpu::Plan view() const {
    return {order.data_ptr<int64_t>(), blocks.data_ptr<int64_t>(), blocks.size(0)};
  }
};
PlanT plan_of(const Tensor& order, const Tensor& blocks) {
  TORCH_CHECK(order.scalar_type() == at::kLong && blocks.scalar_type() == at::kLong &&
                  blocks.dim() == 2 && blocks.size(1) == 3,
              "bad plan tensors");
  return {order.contiguous(), blocks.contiguous()};
}
int threads() { return at::get_num_threads(); }
at::TensorOptions fopts() { return at::TensorOptions().dtype(at::kFloat); }
float* ptr_or_null(Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

// plan(adapter_idx [T] int64, n_adapters, block) -> (order [n_valid], blocks [n_blocks, 3])
std::tuple<Tensor, Tensor> plan(const Tensor& idx_in, int64_t n_adapters, int64_t block) {
  TORCH_CHECK(idx_in.device().is_cpu() && idx_in.dim() == 1, "adapter_idx must be a 1-d CPU tensor");
  TORCH_CHECK(block > 0, "block must be positive");
  const Tensor idx = idx_in.to(at::kLong).contiguous();
  const int64_t T = idx.size(0);
  Tensor order = at::empty({T}, at::kLong), blocks = at::empty({std::max<int64_t>(T, 1), 3}, at::kLong);
  int64_t n_blocks = 0, bad = 0;
  const int64_t n_valid = lift_cpu::build_plan(idx.data_ptr<int64_t>(), T, n_adapters, block,
                                               order.data_ptr<int64_t>(), blocks.data_ptr<int64_t>(),
                                               &n_blocks, &bad);
  if (n_valid < 0)
    throw py::index_error("adapter index " + std::to_string(bad) + " out of range for a bank of " +
                          std::to_string(n_adapters));
  return {order.narrow(0, 0, n_valid), blocks.narrow(0, 0, n_blocks)};
}

Tensor new_out(int64_t rows, int64_t cols, bool zero) {
  return zero ? at::zeros({rows, cols}, fopts()) : at::empty({rows, cols}, fopts());
}
bool has_none(const Tensor& order, int64_t T) { return order.size(0) < T; }

Tensor shrink_fwd(const Tensor& x_, const Tensor& A_, const Tensor& order, const Tensor& blocks) {
  const Tensor x = f32(x_, "x", 2), A = f32(A_, "lora_a", 3);
  TORCH_CHECK(A.size(2) == x.size(1), "lora_a [N, r, in] does not match x [T, in]");
  const auto P = plan_of(order, blocks);
  Tensor h = new_out(x.size(0), A.size(1), has_none(order, x.size(0)));
  lift_cpu::lora_shrink_fwd(x.data_ptr<float>(), x.size(1), A.data_ptr<float>(), A.size(1),
                            P.view(), h.data_ptr<float>(), threads());
  return h;
}

std::tuple<Tensor, Tensor> shrink_bwd(const Tensor& dh_, const Tensor& x_, const Tensor& A_,
                                      const Tensor& order, const Tensor& blocks, bool need_dx,
                                      bool need_dA) {
  const Tensor dh = f32(dh_, "grad", 2), x = f32(x_, "x", 2), A = f32(A_, "lora_a", 3);
  const auto P = plan_of(order, blocks);
  Tensor dx, dA;
  if (need_dx) dx = new_out(x.size(0), x.size(1), has_none(order, x.size(0)));
  if (need_dA) dA = at::empty(A.sizes(), fopts());
  lift_cpu::lora_shrink_bwd(dh.data_ptr<float>(), x.data_ptr<float>(), x.size(1),
                            A.data_ptr<float>(), A.size(1), A.size(0), P.view(), ptr_or_null(dx),
                            ptr_or_null(dA), threads());
  return {dx, dA};
}

Tensor expand_fwd(const Tensor& h_, const Tensor& B_, const Tensor& s_, const Tensor& order,
                  const Tensor& blocks) {
  const Tensor h = f32(h_, "h", 2), B = f32(B_, "lora_b", 3), s = f32(s_, "scaling", 1);
  TORCH_CHECK(B.size(2) == h.size(1), "lora_b [N, out, r] does not match h [T, r]");
  TORCH_CHECK(s.size(0) == B.size(0), "scaling must be [N]");
  const auto P = plan_of(order, blocks);
  Tensor y = new_out(h.size(0), B.size(1), has_none(order, h.size(0)));
  lift_cpu::lora_expand_fwd(h.data_ptr<float>(), h.size(1), B.data_ptr<float>(), B.size(1),
                            s.data_ptr<float>(), P.view(), y.data_ptr<float>(), threads());
  return y;
}

// Returns (dh, dB_raw) with dB_raw[a] = Σ dy[t]ᵀ h[t] (unscaled).
std::tuple<Tensor, Tensor> expand_bwd(const Tensor& dy_, const Tensor& h_, const Tensor& B_,
                                      const Tensor& s_, const Tensor& order, const Tensor& blocks,
                                      bool need_dh, bool need_dB) {
  const Tensor dy = f32(dy_, "grad", 2), h = f32(h_, "h", 2), B = f32(B_, "lora_b", 3),
               s = f32(s_, "scaling", 1);
  const auto P = plan_of(order, blocks);
  Tensor dh, dB;
  if (need_dh) dh = new_out(h.size(0), h.size(1), has_none(order, h.size(0)));
  if (need_dB) dB = at::empty(B.sizes(), fopts());
  lift_cpu::lora_expand_bwd(dy.data_ptr<float>(), h.data_ptr<float>(), h.size(1),
                            B.data_ptr<float>(), B.size(1), s.data_ptr<float>(), B.size(0),
                            P.view(), ptr_or_null(dh), ptr_or_null(dB), threads());
  return {dh, dB};
}

// Returns (y, h).
std::tuple<Tensor, Tensor> delta_fwd(const Tensor& x_, const Tensor& A_, const Tensor& B_,
                                     const Tensor& s_, const Tensor& order, const Tensor& blocks) {
  const Tensor x = f32(x_, "x", 2), A = f32(A_, "lora_a", 3), B = f32(B_, "lora_b", 3),
               s = f32(s_, "scaling", 1);
  TORCH_CHECK(A.size(2) == x.size(1) && B.size(2) == A.size(1) && B.size(0) == A.size(0) &&
                  s.size(0) == A.size(0),
              "lora_a [N, r, in], lora_b [N, out, r], scaling [N] do not match x [T, in]");
  const auto P = plan_of(order, blocks);
  const bool zero = has_none(order, x.size(0));
  Tensor h = new_out(x.size(0), A.size(1), zero), y = new_out(x.size(0), B.size(1), zero);
  lift_cpu::lora_delta_fwd(x.data_ptr<float>(), x.size(1), A.data_ptr<float>(), A.size(1),
                           B.data_ptr<float>(), B.size(1), s.data_ptr<float>(), P.view(),
                           h.data_ptr<float>(), y.data_ptr<float>(), threads());
  return {y, h};
}

// Returns (dx, dA, dB_raw).
std::tuple<Tensor, Tensor, Tensor> delta_bwd(const Tensor& dy_, const Tensor& x_,
                                             const Tensor& h_, const Tensor& A_, const Tensor& B_,
                                             const Tensor& s_, const Tensor& order,
                                             const Tensor& blocks, bool need_dx, bool need_dA,
                                             bool need_dB) {
  const Tensor dy = f32(dy_, "grad", 2), x = f32(x_, "x", 2), h = f32(h_, "h", 2),
               A = f32(A_, "lora_a", 3), B = f32(B_, "lora_b", 3), s = f32(s_, "scaling", 1);
  const auto P = plan_of(order, blocks);
  Tensor dx, dA, dB;
  if (need_dx) dx = new_out(x.size(0), x.size(1), has_none(order, x.size(0)));
  if (need_dA) dA = at::empty(A.sizes(), fopts());
  if (need_dB) dB = at::empty(B.sizes(), fopts());
  lift_cpu::lora_delta_bwd(dy.data_ptr<float>(), x.data_ptr<float>(), h.data_ptr<float>(),
                           x.size(1), A.data_ptr<float>(), A.size(1), B.data_ptr<float>(),
                           B.size(1), s.data_ptr<float>(), A.size(0), P.view(), ptr_or_null(dx),
                           ptr_or_null(dA), ptr_or_null(dB), threads());
  return {dx, dA, dB};
}

lift_cpu::GMShape gm_shape(const Tensor& q, const Tensor& w1, const Tensor& w2, const Tensor& w3,
                           const Tensor& w4) {
  const int64_t N = w1.size(0), H = q.size(1), d = q.size(2), s = w3.size(2);
  TORCH_CHECK(w1.sizes() == at::IntArrayRef({N, H, 2 * d, d}), "w1 must be [N, H, 2d, d]");
  TORCH_CHECK(w2.sizes() == at::IntArrayRef({N, H, d, 2 * d}), "w2 must be [N, H, d, 2d]");
  TORCH_CHECK(w3.sizes() == at::IntArrayRef({N, H, s, d}), "w3 must be [N, H, s, d]");
  TORCH_CHECK(w4.sizes() == at::IntArrayRef({N, H, 1, s}), "w4 must be [N, H, 1, s]");
  return {H, d, s};
}

// Returns (out, pre1, mem, p3, gate); the last four are undefined unless `save`.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> gm_fwd(
    const Tensor& attn_, const Tensor& q_, const Tensor& w1_, const Tensor& w2_,
    const Tensor& w3_, const Tensor& w4_, const Tensor& order, const Tensor& blocks, bool save) {
  const Tensor attn = f32(attn_, "attn_out", 3), q = f32(q_, "q", 3), w1 = f32(w1_, "w1", 4),
               w2 = f32(w2_, "w2", 4), w3 = f32(w3_, "w3", 4), w4 = f32(w4_, "w4", 4);
  TORCH_CHECK(attn.sizes() == q.sizes(), "attn_out and q must both be [T, H, d]");
  const auto S = gm_shape(q, w1, w2, w3, w4);
  const auto P = plan_of(order, blocks);
  const int64_t T = q.size(0);
  Tensor out = has_none(order, T) ? attn.clone() : at::empty(attn.sizes(), fopts());
  Tensor pre1, mem, p3, gate;
  if (save) {  // block layout, see gated_memory_cpu.cpp
    const int64_t n = lift_cpu::gm_saved_tokens(P.view());
    pre1 = at::empty({S.heads, n, 2 * S.dim}, fopts());
    mem = at::empty({S.heads, n, S.dim}, fopts());
    p3 = at::empty({S.heads, n, S.gate_dim}, fopts());
    gate = at::empty({S.heads, n}, fopts());
  }
  lift_cpu::gated_memory_fwd(attn.data_ptr<float>(), q.data_ptr<float>(), w1.data_ptr<float>(),
                             w2.data_ptr<float>(), w3.data_ptr<float>(), w4.data_ptr<float>(), S,
                             P.view(), out.data_ptr<float>(), ptr_or_null(pre1),
                             ptr_or_null(mem), ptr_or_null(p3), ptr_or_null(gate), threads());
  return {out, pre1, mem, p3, gate};
}

// Returns (d attn_out, dq, dw1, dw2, dw3, dw4); dq / weight grads undefined unless asked.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> gm_bwd(
    const Tensor& dout_, const Tensor& attn_, const Tensor& q_, const Tensor& w1_,
    const Tensor& w2_, const Tensor& w3_, const Tensor& w4_, const Tensor& pre1_,
    const Tensor& mem_, const Tensor& p3_, const Tensor& gate_, const Tensor& order,
    const Tensor& blocks, bool need_dq, bool need_w) {
  const Tensor dout = f32(dout_, "grad", 3), attn = f32(attn_, "attn_out", 3), q = f32(q_, "q", 3),
               w1 = f32(w1_, "w1", 4), w2 = f32(w2_, "w2", 4), w3 = f32(w3_, "w3", 4),
               w4 = f32(w4_, "w4", 4), pre1 = f32(pre1_, "pre1", 3), mem = f32(mem_, "mem", 3),
               p3 = f32(p3_, "p3", 3), gate = f32(gate_, "gate", 2);
  const auto S = gm_shape(q, w1, w2, w3, w4);
  const auto P = plan_of(order, blocks);
  const int64_t T = q.size(0);
  const bool none = has_none(order, T);
  Tensor dattn = none ? dout.clone() : at::empty(dout.sizes(), fopts());
  Tensor dq, dw1, dw2, dw3, dw4;
  if (need_dq) dq = none ? at::zeros(q.sizes(), fopts()) : at::empty(q.sizes(), fopts());
  if (need_w) {
    dw1 = at::empty(w1.sizes(), fopts());
    dw2 = at::empty(w2.sizes(), fopts());
    dw3 = at::empty(w3.sizes(), fopts());
    dw4 = at::empty(w4.sizes(), fopts());
  }
  lift_cpu::gated_memory_bwd(
      dout.data_ptr<float>(), attn.data_ptr<float>(), q.data_ptr<float>(), w1.data_ptr<float>(),
      w2.data_ptr<float>(), w3.data_ptr<float>(), w4.data_ptr<float>(), pre1.data_ptr<float>(),
      mem.data_ptr<float>(), p3.data_ptr<float>(), gate.data_ptr<float>(), S, w1.size(0),
      P.view(), dattn.data_ptr<float>(), ptr_or_null(dq), ptr_or_null(dw1), ptr_or_null(dw2),
      ptr_or_null(dw3), ptr_or_null(dw4), threads());
  return {dattn, dq, dw1, dw2, dw3, dw4};
}

// ---- fused elementwise ops: float32 or bfloat16 storage, float32 math ----

// f(T{}) with T = float or lift_cpu::Bf16 after t's dtype; anything else is an error.
template <class F>
auto by_dtype(const Tensor& t, const char* name, F&& f) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
  if (t.scalar_type() == at::kFloat) return f(float{});
  TORCH_CHECK(t.scalar_type() == at::kBFloat16, name, " must be float32 or bfloat16, got ",
              t.scalar_type());
  return f(lift_cpu::Bf16{});
}
template <class T>
T* data(const Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}
// t detached and contiguous, after checking it has x's dtype and the given shape.
Tensor like(const Tensor& t, const Tensor& x, const char* name, at::IntArrayRef shape) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == x.scalar_type(), name, " must be a CPU ",
              x.scalar_type(), " tensor, got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
  return t.detach().contiguous();
}

// rms_norm_fwd(x [R, H], w [H], eps) -> (y [R, H], rstd [R] float32)
std::tuple<Tensor, Tensor> rms_norm_fwd(const Tensor& x_, const Tensor& w_, double eps) {
  TORCH_CHECK(x_.dim() == 2, "x must be [rows, H], got ", x_.sizes());
  const Tensor x = x_.detach().contiguous();
  const Tensor w = like(w_, x, "weight", {x.size(1)});
  Tensor y = at::empty_like(x), rstd = at::empty({x.size(0)}, fopts());
  by_dtype(x, "x", [&](auto tag) {
    using T = decltype(tag);
    lift_cpu::rms_norm_fwd(data<T>(x), data<T>(w), x.size(0), x.size(1), static_cast<float>(eps),
                           data<T>(y), rstd.data_ptr<float>(), threads());
  });
  return {y, rstd};
}

// rms_norm_bwd(dy, x [R, H], w [H], rstd [R], need_dw) -> (dx [R, H], dw [H] float32 or None)
std::tuple<Tensor, Tensor> rms_norm_bwd(const Tensor& dy_, const Tensor& x_, const Tensor& w_,
                                        const Tensor& rstd_, bool need_dw) {
  TORCH_CHECK(x_.dim() == 2, "x must be [rows, H], got ", x_.sizes());
  const Tensor x = x_.detach().contiguous();
  const Tensor dy = like(dy_, x, "grad", x.sizes()), w = like(w_, x, "weight", {x.size(1)});
  const Tensor rstd = f32(rstd_, "rstd", 1);
  TORCH_CHECK(rstd.size(0) == x.size(0), "rstd must be [rows]");
  Tensor dx = at::empty_like(x), dw;
  if (need_dw) dw = at::empty({x.size(1)}, fopts());
  by_dtype(x, "x", [&](auto tag) {
    using T = decltype(tag);
    lift_cpu::rms_norm_bwd(data<T>(dy), data<T>(x), data<T>(w), rstd.data_ptr<float>(), x.size(0),
                           x.size(1), data<T>(dx), ptr_or_null(dw), threads());
  });
  return {dx, dw};
}

// swiglu_fwd(g, u) -> silu(g) * u, any shape (g and u alike)
Tensor swiglu_fwd(const Tensor& g_, const Tensor& u_) {
  const Tensor g = g_.detach().contiguous(), u = like(u_, g, "up", g.sizes());
  Tensor y = at::empty_like(g);
  by_dtype(g, "gate", [&](auto tag) {
    using T = decltype(tag);
    lift_cpu::swiglu_fwd(data<T>(g), data<T>(u), g.numel(), data<T>(y), threads());
  });
  return y;
}

// swiglu_bwd(dy, g, u) -> (dg, du)
std::tuple<Tensor, Tensor> swiglu_bwd(const Tensor& dy_, const Tensor& g_, const Tensor& u_) {
  const Tensor g = g_.detach().contiguous(), u = like(u_, g, "up", g.sizes()),
               dy = like(dy_, g, "grad", g.sizes());
  Tensor dg = at::empty_like(g), du = at::empty_like(g);
  by_dtype(g, "gate", [&](auto tag) {
    using T = decltype(tag);
    lift_cpu::swiglu_bwd(data<T>(dy), data<T>(g), data<T>(u), g.numel(), data<T>(dg), data<T>(du),
                         threads());
  });
  return {dg, du};
}

// cross_entropy_with_grad_(z [R, V], targets [R] int64) -> loss [R] float32; z is overwritten
// in place with softmax(z) - onehot(targets), the loss's gradient. z needs unit column stride.
Tensor cross_entropy_with_grad_(Tensor& z, const Tensor& targets_) {
  TORCH_CHECK(z.dim() == 2 && z.stride(1) == 1 && z.size(1) > 0,
              "logits must be [rows, V] with V > 0 and unit column stride, got ", z.sizes());
  TORCH_CHECK(targets_.device().is_cpu() && targets_.scalar_type() == at::kLong &&
                  targets_.dim() == 1 && targets_.size(0) == z.size(0),
              "targets must be an int64 CPU tensor [rows]");
  const Tensor targets = targets_.contiguous();
  const int64_t R = z.size(0), V = z.size(1);
  const int64_t* t = targets.data_ptr<int64_t>();
  for (int64_t r = 0; r < R; ++r)
    if (t[r] < 0 || t[r] >= V)
      throw py::index_error("target " + std::to_string(t[r]) + " out of range for " +
                            std::to_string(V) + " classes");
  Tensor loss = at::empty({R}, fopts());
  by_dtype(z, "logits", [&](auto tag) {
    using T = decltype(tag);
    lift_cpu::cross_entropy_with_grad(data<T>(z), z.stride(0), R, V, t, loss.data_ptr<float>(),
                                      threads());
  });
  return loss;
}

// ---- tensors of heads [B, H, L, D], any (b, h, l) strides: the kernels need D contiguous ----
Tensor heads_view(const Tensor& t) { return t.stride(3) == 1 ? t.detach() : t.detach().contiguous(); }
lift_cpu::HeadStrides strides_of(const Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

// rotary(x [B, H, L, D], cos, sin [B or 1, L, D], backward) -> [B, H, L, D] contiguous: RoPE of
// x (backward: the gradient of x, given the output's gradient as x).
Tensor rotary(const Tensor& x_, const Tensor& cos_, const Tensor& sin_, bool backward) {
  TORCH_CHECK(x_.dim() == 4, "x must be [B, H, L, D], got ", x_.sizes());
  const Tensor x = heads_view(x_);
  const int64_t B = x.size(0), H = x.size(1), L = x.size(2), D = x.size(3);
  TORCH_CHECK(D % 2 == 0, "head dim must be even, got ", D);
  TORCH_CHECK(cos_.dim() == 3 && (cos_.size(0) == 1 || cos_.size(0) == B), "cos must be [B or 1, L, D], got ",
              cos_.sizes());
  const Tensor cos = like(cos_, x, "cos", {cos_.size(0), L, D}), sin = like(sin_, x, "sin", cos.sizes());
  const lift_cpu::RotaryArgs a{B, H, L, D, strides_of(x), cos.size(0)};
  Tensor y = at::empty({B, H, L, D}, x.options());
  by_dtype(x, "x", [&](auto tag) {
    using T = decltype(tag);
    lift_cpu::rotary(data<T>(x), a, data<T>(cos), data<T>(sin), data<T>(y), backward, threads());
  });
  return y;
}

// ---- attention (bf16, AMX) ----
Tensor bf16_heads(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kBFloat16 && t.dim() == 4, name,
              " must be a bfloat16 CPU tensor [B, H, L, D], got ", t.scalar_type(), " ", t.sizes());
  return heads_view(t);
}

// Checks q, k, v (and the mask) and fills the kernel's arguments; `keep` holds the views.
lift_cpu::AttentionArgs attention_args(const Tensor& q_, const Tensor& k_, const Tensor& v_,
                                       const c10::optional<Tensor>& mask_, bool causal, double scale,
                                       std::vector<Tensor>& keep) {
  keep = {bf16_heads(q_, "q"), bf16_heads(k_, "k"), bf16_heads(v_, "v")};
  const Tensor &q = keep[0], &k = keep[1], &v = keep[2];
  const int64_t B = q.size(0), Hq = q.size(1), Lq = q.size(2), D = q.size(3), Hkv = k.size(1), Lk = k.size(2);
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == B && k.size(3) == D && Hkv > 0 && Hq % Hkv == 0,
              "k and v must be [B, Hkv, Lk, D] with Hq a multiple of Hkv: q ", q.sizes(), ", k ", k.sizes(),
              ", v ", v.sizes());
  TORCH_CHECK(D > 0 && D % 16 == 0, "head dim must be a multiple of 16, got ", D);
  TORCH_CHECK(Lq > 0 && Lk > 0, "empty attention: Lq ", Lq, ", Lk ", Lk);
  lift_cpu::AttentionArgs a{{B, Hq, Hkv, Lq, Lk, D}, nullptr, nullptr, nullptr, strides_of(q), strides_of(k),
                            strides_of(v), nullptr, 0, 0, causal, static_cast<float>(scale)};
  a.q = data<lift_cpu::Bf16>(q);
  a.k = data<lift_cpu::Bf16>(k);
  a.v = data<lift_cpu::Bf16>(v);
  if (mask_.has_value()) {
    Tensor mask = mask_->detach();
    TORCH_CHECK(mask.device().is_cpu() && mask.scalar_type() == at::kBool && mask.dim() == 3 &&
                    (mask.size(0) == B || mask.size(0) == 1) && mask.size(1) == Lq && mask.size(2) == Lk,
                "mask must be a bool CPU tensor [B or 1, Lq, Lk] = [", B, ", ", Lq, ", ", Lk, "], got ",
                mask.scalar_type(), " ", mask.sizes());
    if (mask.stride(2) != 1) mask = mask.contiguous();
    keep.push_back(mask);
    a.mask = reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>());
    a.mask_sb = mask.size(0) == 1 ? 0 : mask.stride(0);
    a.mask_sq = mask.stride(1);
  }
  return a;
}

// attention_fwd(q, k, v, mask or None, causal, scale) -> (out [B, Hq, Lq, D] bf16, lse [B, Hq, Lq] f32)
std::tuple<Tensor, Tensor> attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v,
                                         const c10::optional<Tensor>& mask, bool causal, double scale) {
  std::vector<Tensor> keep;
  const auto a = attention_args(q, k, v, mask, causal, scale, keep);
  const auto& s = a.shape;
  Tensor out = at::empty({s.B, s.Hq, s.Lq, s.D}, q.options().dtype(at::kBFloat16));
  Tensor lse = at::empty({s.B, s.Hq, s.Lq}, fopts());
  lift_cpu::attention_fwd(a, data<lift_cpu::Bf16>(out), lse.data_ptr<float>(), threads());
  return {out, lse};
}

// attention_bwd(dout, q, k, v, out, lse, mask or None, causal, scale) -> (dq, dk, dv)
std::tuple<Tensor, Tensor, Tensor> attention_bwd(const Tensor& dout_, const Tensor& q, const Tensor& k,
                                                 const Tensor& v, const Tensor& out_, const Tensor& lse_,
                                                 const c10::optional<Tensor>& mask, bool causal, double scale) {
  std::vector<Tensor> keep;
  const auto a = attention_args(q, k, v, mask, causal, scale, keep);
  const auto& s = a.shape;
  const Tensor out = like(out_, keep[0], "out", {s.B, s.Hq, s.Lq, s.D});
  const Tensor dout = like(dout_, keep[0], "grad", {s.B, s.Hq, s.Lq, s.D});
  const Tensor lse = f32(lse_, "lse", 3);
  TORCH_CHECK(lse.sizes() == at::IntArrayRef({s.B, s.Hq, s.Lq}), "lse must be [B, Hq, Lq]");
  const auto bopts = q.options().dtype(at::kBFloat16);
  Tensor dq = at::empty({s.B, s.Hq, s.Lq, s.D}, bopts), dk = at::empty({s.B, s.Hkv, s.Lk, s.D}, bopts),
         dv = at::empty({s.B, s.Hkv, s.Lk, s.D}, bopts);
  lift_cpu::attention_bwd(a, data<lift_cpu::Bf16>(out), data<lift_cpu::Bf16>(dout), lse.data_ptr<float>(),
                          data<lift_cpu::Bf16>(dq), data<lift_cpu::Bf16>(dk), data<lift_cpu::Bf16>(dv),
                          threads());
  return {dq, dk, dv};
}

}  // namespace

PYBIND11_MODULE(_C_cpu, m) {
  m.doc() = "lift_engine C++ CPU kernels: multi-adapter LoRA and the Gated-Memory epilogue (fp32), "
            "fused RMSNorm, SwiGLU, RoPE and cross entropy (fp32 or bf16), bf16 attention on AMX";
  m.attr("gemm_backend") = lift_cpu::gemm_backend();
  m.def("plan", &plan, py::arg("adapter_idx"), py::arg("n_adapters"), py::arg("block"));
  m.def("shrink_fwd", &shrink_fwd);
  m.def("shrink_bwd", &shrink_bwd);
  m.def("expand_fwd", &expand_fwd);
  m.def("expand_bwd", &expand_bwd);
  m.def("delta_fwd", &delta_fwd);
  m.def("delta_bwd", &delta_bwd);
  m.def("gm_fwd", &gm_fwd);
  m.def("gm_bwd", &gm_bwd);
  m.def("rms_norm_fwd", &rms_norm_fwd);
  m.def("rms_norm_bwd", &rms_norm_bwd);
  m.def("swiglu_fwd", &swiglu_fwd);
  m.def("swiglu_bwd", &swiglu_bwd);
  m.def("cross_entropy_with_grad_", &cross_entropy_with_grad_);
  m.def("rotary", &rotary);
  m.def("attention_available", &lift_cpu::attention_amx_available);
  m.def("attention_fwd", &attention_fwd);
  m.def("attention_bwd", &attention_bwd);
}
