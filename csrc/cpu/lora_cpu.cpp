// Multi-adapter LoRA on CPU, grouped by adapter (SGMV-style), fp32.
//
// Every op walks the plan's blocks (≤ block tokens of one adapter). A block whose tokens
// are consecutive rows is read and written in place (strided GEMM, no copy); otherwise its
// rows are gathered into a per-thread buffer that stays in cache. Forward blocks are
// independent tasks. Weight gradients are summed per range of blocks into a private slot
// and the slots reduced per adapter afterwards, so threads never race.
//
//   shrink:  h[t] = x[t] · A[a]ᵀ                      a = idx[t]; rows with a < 0 untouched
//   expand:  y[t] = s[a] · h[t] · B[a]ᵀ
//   shrink backward:  dx[t] = dh[t] · A[a];       dA[a] = Σ_t dh[t]ᵀ x[t]
//   expand backward:  dh[t] = s[a] · dy[t] · B[a]; dB_raw[a] = Σ_t dy[t]ᵀ h[t]
#include "common.h"

namespace lift_cpu {

namespace {
struct Block {
  int64_t adapter, len;
  const int64_t* rows;
  bool contig;
};
inline Block block_at(const Plan& p, int64_t b) {
  const int64_t* rows = p.order + p.blocks[3 * b + 1];
  const int64_t len = p.blocks[3 * b + 2];
  return {p.blocks[3 * b], len, rows, consecutive(rows, len)};
}
// Pointer to the block's rows of a [T, cols] matrix: in place when consecutive, else
// gathered into scratch `slot`.
inline const float* rows_of(const float* m, int64_t cols, const Block& k, int slot) {
  if (k.contig) return m + k.rows[0] * cols;
  float* buf = scratch(slot, static_cast<size_t>(k.len * cols));
  gather_rows(m, cols, 0, k.rows, k.len, cols, buf);
  return buf;
}
// Destination for the block's rows of a [T, cols] output (scratch when not consecutive;
// call store() after writing).
inline float* out_rows(float* m, int64_t cols, const Block& k, int slot) {
  return k.contig ? m + k.rows[0] * cols : scratch(slot, static_cast<size_t>(k.len * cols));
}
inline void store(const float* buf, float* m, int64_t cols, const Block& k) {
  if (!k.contig) scatter_rows(buf, cols, k.rows, k.len, m, cols, 0);
}
}  // namespace

void lora_shrink_fwd(const float* x, int64_t in, const float* A, int64_t r, const Plan& p,
                     float* h, int nthreads) {
  run_tasks(p.n_blocks, nthreads, [&](int64_t b, int) {
    const Block k = block_at(p, b);
    const float* xb = rows_of(x, in, k, 0);
    float* hb = out_rows(h, r, k, 1);
    gemm(false, true, k.len, r, in, 1.f, xb, in, A + k.adapter * r * in, in, 0.f, hb, r);
    store(hb, h, r, k);
  });
}

void lora_shrink_bwd(const float* dh, const float* x, int64_t in, const float* A, int64_t r,
                     int64_t n_adapters, const Plan& p, float* dx, float* dA, int nthreads) {
  const auto ranges = make_ranges(p, blocks_per_range(p.n_blocks, 1, nthreads));
  const int64_t width = r * in;
  std::vector<float> slots(dA ? ranges.size() * width : 0);
  run_tasks(static_cast<int64_t>(ranges.size()), nthreads, [&](int64_t i, int) {
    const Range& R = ranges[i];
    const float* Aa = A + R.adapter * width;
    for (int64_t j = 0; j < R.n_blocks; ++j) {
      const Block k = block_at(p, R.first_block + j);
      const float* dhb = rows_of(dh, r, k, 0);
      if (dx) {
        float* dxb = out_rows(dx, in, k, 1);
        gemm(false, false, k.len, in, r, 1.f, dhb, r, Aa, in, 0.f, dxb, in);
        store(dxb, dx, in, k);
      }
      if (dA) {
        const float* xb = rows_of(x, in, k, 2);
        gemm(true, false, r, in, k.len, 1.f, dhb, r, xb, in, j ? 1.f : 0.f,
             slots.data() + i * width, in);
      }
    }
  });
  if (dA) reduce_slots(ranges, slots.data(), width, n_adapters, dA, nthreads);
}

void lora_expand_fwd(const float* h, int64_t r, const float* B, int64_t out,
                     const float* scaling, const Plan& p, float* y, int nthreads) {
  run_tasks(p.n_blocks, nthreads, [&](int64_t b, int) {
    const Block k = block_at(p, b);
    const float* hb = rows_of(h, r, k, 0);
    float* yb = out_rows(y, out, k, 1);
    gemm(false, true, k.len, out, r, scaling[k.adapter], hb, r, B + k.adapter * out * r, r, 0.f,
         yb, out);
    store(yb, y, out, k);
  });
}

void lora_expand_bwd(const float* dy, const float* h, int64_t r, const float* B, int64_t out,
                     const float* scaling, int64_t n_adapters, const Plan& p, float* dh,
                     float* dB_raw, int nthreads) {
  const auto ranges = make_ranges(p, blocks_per_range(p.n_blocks, 1, nthreads));
  const int64_t width = out * r;
  std::vector<float> slots(dB_raw ? ranges.size() * width : 0);
  run_tasks(static_cast<int64_t>(ranges.size()), nthreads, [&](int64_t i, int) {
    const Range& R = ranges[i];
    const float* Ba = B + R.adapter * width;
    for (int64_t j = 0; j < R.n_blocks; ++j) {
      const Block k = block_at(p, R.first_block + j);
      const float* dyb = rows_of(dy, out, k, 0);
      if (dh) {
        float* dhb = out_rows(dh, r, k, 1);
        gemm(false, false, k.len, r, out, scaling[R.adapter], dyb, out, Ba, r, 0.f, dhb, r);
        store(dhb, dh, r, k);
      }
      if (dB_raw) {
        const float* hb = rows_of(h, r, k, 2);
        gemm(true, false, out, r, k.len, 1.f, dyb, out, hb, r, j ? 1.f : 0.f,
             slots.data() + i * width, r);
      }
    }
  });
  if (dB_raw) reduce_slots(ranges, slots.data(), width, n_adapters, dB_raw, nthreads);
}

void lora_delta_fwd(const float* x, int64_t in, const float* A, int64_t r, const float* B,
                    int64_t out, const float* scaling, const Plan& p, float* h, float* y,
                    int nthreads) {
  run_tasks(p.n_blocks, nthreads, [&](int64_t b, int) {
    const Block k = block_at(p, b);
    const float* xb = rows_of(x, in, k, 0);
    float* hb = out_rows(h, r, k, 1);
    gemm(false, true, k.len, r, in, 1.f, xb, in, A + k.adapter * r * in, in, 0.f, hb, r);
    store(hb, h, r, k);
    float* yb = out_rows(y, out, k, 2);
    gemm(false, true, k.len, out, r, scaling[k.adapter], hb, r, B + k.adapter * out * r, r, 0.f,
         yb, out);
    store(yb, y, out, k);
  });
}

void lora_delta_bwd(const float* dy, const float* x, const float* h, int64_t in,
                    const float* A, int64_t r, const float* B, int64_t out,
                    const float* scaling, int64_t n_adapters, const Plan& p, float* dx,
                    float* dA, float* dB_raw, int nthreads) {
  const auto ranges = make_ranges(p, blocks_per_range(p.n_blocks, 1, nthreads));
  const int64_t wa = r * in, wb = out * r;
  std::vector<float> slots_a(dA ? ranges.size() * wa : 0);
  std::vector<float> slots_b(dB_raw ? ranges.size() * wb : 0);
  const bool need_dh = dx || dA;
  run_tasks(static_cast<int64_t>(ranges.size()), nthreads, [&](int64_t i, int) {
    const Range& R = ranges[i];
    const float* Aa = A + R.adapter * wa;
    const float* Ba = B + R.adapter * wb;
    for (int64_t j = 0; j < R.n_blocks; ++j) {
      const Block k = block_at(p, R.first_block + j);
      const float* dyb = rows_of(dy, out, k, 0);
      if (dB_raw) {
        const float* hb = rows_of(h, r, k, 1);
        gemm(true, false, out, r, k.len, 1.f, dyb, out, hb, r, j ? 1.f : 0.f,
             slots_b.data() + i * wb, r);
      }
      if (!need_dh) continue;
      float* dhb = scratch(2, static_cast<size_t>(k.len * r));
      gemm(false, false, k.len, r, out, scaling[R.adapter], dyb, out, Ba, r, 0.f, dhb, r);
      if (dA) {
        const float* xb = rows_of(x, in, k, 3);
        gemm(true, false, r, in, k.len, 1.f, dhb, r, xb, in, j ? 1.f : 0.f,
             slots_a.data() + i * wa, in);
      }
      if (dx) {
        float* dxb = out_rows(dx, in, k, 4);
        gemm(false, false, k.len, in, r, 1.f, dhb, r, Aa, in, 0.f, dxb, in);
        store(dxb, dx, in, k);
      }
    }
  });
  if (dA) reduce_slots(ranges, slots_a.data(), wa, n_adapters, dA, nthreads);
  if (dB_raw) reduce_slots(ranges, slots_b.data(), wb, n_adapters, dB_raw, nthreads);
}

}  // namespace lift_cpu
