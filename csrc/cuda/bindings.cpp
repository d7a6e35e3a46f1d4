// Python bindings of the CUDA kernels: module lift_engine._C_cuda. The only file here that
// sees torch. Each entry point checks its tensors and calls a launcher (lift_cuda.h) on the
// stream the caller passes (torch.cuda.current_stream().cuda_stream). Shapes, the tile plan
// and autograd live in lift_engine/ops/cuda_backend.py.
#include <torch/csrc/utils/pybind.h>

#include <ATen/core/Tensor.h>

#include <optional>

#include "lift_cuda.h"

namespace py = pybind11;
using at::Tensor;

namespace {

lift_cuda::DType dtype_of(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return lift_cuda::kF32;
    case at::kHalf: return lift_cuda::kF16;
    case at::kBFloat16: return lift_cuda::kBF16;
    default: TORCH_CHECK(false, "lift CUDA kernels take float32/float16/bfloat16, got ", t.scalar_type());
  }
}

void check_cuda(const Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
}
void check_rows(const Tensor& t, const char* name) {  // [T, C] with unit column stride
  check_cuda(t, name);
  TORCH_CHECK(t.dim() == 2 && t.stride(1) == 1, name, " must be [T, C] with contiguous rows");
}
void check_same(const Tensor& a, const Tensor& b, const char* what) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), what, ": dtypes differ (", a.scalar_type(), " vs ",
              b.scalar_type(), ")");
  TORCH_CHECK(a.device() == b.device(), what, ": tensors on different devices");
}

lift_cuda::TilePlan plan_of(const Tensor& order, const Tensor& bin_off, const Tensor& tile_off) {
  for (const Tensor* t : {&order, &bin_off, &tile_off}) {
    check_cuda(*t, "plan");
    TORCH_CHECK(t->scalar_type() == at::kInt && t->is_contiguous(), "plan tensors must be contiguous int32");
  }
  TORCH_CHECK(bin_off.numel() == tile_off.numel() && bin_off.numel() >= 2, "bad plan");
  return {order.data_ptr<int32_t>(), bin_off.data_ptr<int32_t>(), tile_off.data_ptr<int32_t>(),
          static_cast<int32_t>(bin_off.numel() - 1)};
}

const float* alpha_of(const std::optional<Tensor>& alpha) {
  if (!alpha) return nullptr;
  check_cuda(*alpha, "alpha");
  TORCH_CHECK(alpha->scalar_type() == at::kFloat && alpha->is_contiguous(), "alpha must be contiguous float32");
  return alpha->data_ptr<float>();
}

cudaStream_t stream_of(int64_t s) { return reinterpret_cast<cudaStream_t>(s); }

void ok(cudaError_t e, const char* what) {
  TORCH_CHECK(e == cudaSuccess, "lift CUDA kernel ", what, " failed: ", cudaGetErrorString(e));
}

// Y [T, n_out] = alpha · X [T, K] · W[a]ᵀ with W[a, j, k] at W + a·sa + j·sj + k·sk.
void reduce_k(const Tensor& X, const Tensor& W, int64_t sa, int64_t sj, int64_t sk,
              const std::optional<Tensor>& alpha, Tensor& Y, const Tensor& order,
              const Tensor& bin_off, const Tensor& tile_off, int64_t max_tiles, int64_t stream) {
  check_rows(X, "X");
  check_rows(Y, "Y");
  check_cuda(W, "W");
  check_same(X, W, "reduce_k");
  check_same(X, Y, "reduce_k");
  TORCH_CHECK(W.is_contiguous(), "W must be contiguous");
  ok(lift_cuda::lora_reduce_k(dtype_of(X), X.data_ptr(), X.stride(0), W.data_ptr(), sa, sj, sk,
                              alpha_of(alpha), Y.data_ptr(), Y.stride(0), Y.size(1), X.size(1),
                              plan_of(order, bin_off, tile_off), max_tiles, stream_of(stream)),
     "reduce_k");
}

// Y [T, n_out] = alpha · X [T, K] · W[a]ᵀ with W[a, o, j] at W + a·sa + o·so + j·sj.
void wide_out(const Tensor& X, const Tensor& W, int64_t sa, int64_t so, int64_t sj,
              const std::optional<Tensor>& alpha, Tensor& Y, const Tensor& order,
              const Tensor& bin_off, const Tensor& tile_off, int64_t max_tiles, int64_t stream) {
  check_rows(X, "X");
  check_rows(Y, "Y");
  check_cuda(W, "W");
  check_same(X, W, "wide_out");
  check_same(X, Y, "wide_out");
  TORCH_CHECK(W.is_contiguous(), "W must be contiguous");
  ok(lift_cuda::lora_wide_out(dtype_of(X), X.data_ptr(), X.stride(0), W.data_ptr(), sa, so, sj,
                              alpha_of(alpha), Y.data_ptr(), Y.stride(0), Y.size(1), X.size(1),
                              plan_of(order, bin_off, tile_off), max_tiles, stream_of(stream)),
     "wide_out");
}

// dW [N, P, Q] (float32, zeroed by the caller) += Σ_t U[t, :P]ᵀ V[t, :Q] per adapter.
void outer(const Tensor& U, const Tensor& V, Tensor& dW, const Tensor& order,
           const Tensor& bin_off, const Tensor& tile_off, int64_t max_tiles, int64_t stream) {
  check_rows(U, "U");
  check_rows(V, "V");
  check_same(U, V, "outer");
  check_cuda(dW, "dW");
  TORCH_CHECK(dW.scalar_type() == at::kFloat && dW.is_contiguous() && dW.dim() == 3 &&
                  dW.size(1) == U.size(1) && dW.size(2) == V.size(1),
              "dW must be a contiguous float32 [N, P, Q]");
  ok(lift_cuda::lora_outer(dtype_of(U), U.data_ptr(), U.stride(0), V.data_ptr(), V.stride(0),
                           dW.data_ptr<float>(), U.size(1), V.size(1),
                           plan_of(order, bin_off, tile_off), max_tiles, stream_of(stream)),
     "outer");
}

void gated_memory_fwd(const Tensor& attn, const Tensor& q, const Tensor& w1, const Tensor& w2,
                      const Tensor& w3, const Tensor& w4, Tensor& out, const Tensor& order,
                      const Tensor& bin_off, const Tensor& tile_off, int64_t max_tiles,
                      int64_t stream) {
  const Tensor& o = out;
  for (const Tensor* t : {&attn, &q, &w1, &w2, &w3, &w4, &o}) {
    check_cuda(*t, "gated_memory_fwd");
    check_same(*t, q, "gated_memory_fwd");
    TORCH_CHECK(t->is_contiguous(), "gated_memory_fwd takes contiguous tensors");
  }
  TORCH_CHECK(q.dim() == 3 && attn.sizes() == q.sizes() && out.sizes() == q.sizes(),
              "attn_out, q and out must be [T, H, d]");
  const int64_t N = w1.size(0), H = q.size(1), d = q.size(2), s = w3.size(2);
  TORCH_CHECK(w1.sizes() == at::IntArrayRef({N, H, 2 * d, d}) && w2.sizes() == at::IntArrayRef({N, H, d, 2 * d}) &&
                  w3.sizes() == at::IntArrayRef({N, H, s, d}) && w4.sizes() == at::IntArrayRef({N, H, 1, s}),
              "weights must be w1 [N,H,2d,d], w2 [N,H,d,2d], w3 [N,H,s,d], w4 [N,H,1,s]");
  ok(lift_cuda::gated_memory_fwd(dtype_of(q), attn.data_ptr(), q.data_ptr(), w1.data_ptr(),
                                 w2.data_ptr(), w3.data_ptr(), w4.data_ptr(), out.data_ptr(), H, d,
                                 s, plan_of(order, bin_off, tile_off), max_tiles, stream_of(stream)),
     "gated_memory_fwd");
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "lift_engine CUDA kernels: multi-adapter LoRA (SGMV-style) and the Gated-Memory epilogue";
  m.attr("tile") = lift_cuda::kTile;
  m.def("reduce_k", &reduce_k);
  m.def("wide_out", &wide_out);
  m.def("outer", &outer);
  m.def("gated_memory_fwd", &gated_memory_fwd);
}
