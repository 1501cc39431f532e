// Fused training ops on activations, forward and backward: RMSNorm with an optional swish gate,
// SwiGLU, the causal depthwise convolution with silu, and the rotary position embedding. Inputs
// and outputs in the activation dtype (input_t: fp32, bf16 or fp16); row statistics and all math
// in fp32. Launchers: crates/ops/src/fused/ (norm.rs, swiglu.rs, conv.rs, projected.rs,
// rotary.rs).
//
//   rms_norm  y = x * rstd * w [* silu(g)],   rstd = 1 / sqrt(mean(x^2) + eps) per row
//             x, g, y, dy, dx, dg: [rows, n] input dtype   w, dw: [n] fp32   rstd: [rows] fp32
//   swiglu    y = silu(a) * b                 a, b, y, dy, da, db: any shape, input dtype
//   causal_conv  y_t = silu(pre_t),  pre_t = bias + sum_{j<K} w_j x_{t-K+1+j} over taps with
//             t-K+1+j >= max(0, s(t)), s(t) the row's latest restart (document start) <= t
//             x: [B, T, D] rows (channels contiguous, any batch and step strides), y, dy, dx:
//             [B, T, D] contiguous, input dtype   w: [D, K] fp32 (K <= CONV_MAX_K)   bias: [D]
//             fp32   reset: [B, T] bool (restarts; null: none)
//   rotary    (y_i, y_{i+h}) = (x_i c - x_{i+h} s, x_{i+h} c + x_i s) for i < h = D / 2, with
//             c, s the cos and sin of the token's angle i;   x, y: [B, T, H, D] contiguous, input
//             dtype   cos, sin: [T, h] or [B, T, h] fp32
//
//   silu(g) = g * sigmoid(g),   silu'(g) = sigmoid(g) * (1 + g * (1 - sigmoid(g)))
//
// Backward of rms_norm, with xh = x * rstd, dyh = dy [* silu(g)] and dxh = dyh * w:
//   dx = rstd * (dxh - xh * mean(dxh * xh)),   dw = sum over rows of dyh * xh,
//   dg = dy * xh * w * silu'(g);
// of swiglu: da = dy * b * silu'(a), db = dy * silu(a). The forward keeps nothing but rstd (the
// op keeps its inputs); the backward computes the gate's silu again. The backwards of rms_norm
// and swiglu also write the forward's y again, bit for bit, when given a y buffer: an op whose
// output feeds a matrix product recomputes it there for the weight gradient instead of keeping
// it (fused/projected.rs). Of causal_conv, with dpre_t = dy_t silu'(pre_t) (pre computed
// again): dx_s = sum over the valid taps (t, j) reading s of w_j dpre_t, dw_j = sum_{b,t} dpre_t
// x_{t-K+1+j} (valid taps), dbias = sum_{b,t} dpre_t. Of rotary: the rotation by the negative
// angle (its transpose).
//
// Entry points, in KERNEL_INDEX order (grid x, block):
//   rms_norm_fwd  (ceil(rows / 8), 256 threads): one warp per row; y and rstd.
//   rms_norm_bwd  (ceil(rows / (warps * warp_rows)), 32 * warps threads): the block's
//                 warps * warp_rows consecutive rows, every warps-th to each warp; dx, dg, and
//                 the block's partial sum of dw ([blocks, n] fp32). Each warp sums its rows' dw
//                 terms in order in its own n floats (padded to 32 W) of dynamic shared memory,
//                 each lane the columns of its chunks, then the block adds the warps' sums in
//                 warp order.
//   column_sums   (ceil(n / 8), 256 threads): the sums over slots of [slots, n] fp32 partials
//                 (rms_norm's dw, causal_conv's dw and dbias), 32 strided sums per column and
//                 then those 32 in order. No atomics.
//   swiglu_fwd / swiglu_bwd   (any, 256 threads): grid-stride over 16-byte chunks, then the
//                 elements of the tail.
//   causal_conv_fwd / causal_conv_bwd   (ceil(D / (32 W)), ceil(T / (CONV_RUNS CONV_STEPS)), B),
//                 32 CONV_RUNS threads: lane = W adjacent channels (a 16-byte chunk when `vec`),
//                 warp = a run of CONV_STEPS steps walked in order with the last K inputs in
//                 registers, so each x is read about once. The backward computes dpre for its run
//                 and the K - 1 steps after it, writes dx for its run, and its block's partial dw
//                 and dbias over its runs' steps (each step in exactly one run), summed in warp
//                 order into [slots, D (K + 1)] (slot = the block's (b, run group)); column_sums
//                 adds the slots.
//   rotary        (any, 256 threads): grid-stride over chunks of W pairs of one head (W = VEC
//                 where half is a multiple of VEC and every tensor 16-byte aligned, else 1); the
//                 backward is the same kernel with sign = -1.
//
// Rows: lane l of a row's warp takes the row's chunks l, l + 32, l + 64, ... of W elements:
// W = VEC (16 bytes) where the launcher found every row 16-byte aligned (`vec`), else 1. Both
// kernels pass over a row twice (a sum over it, then the outputs); the forward keeps its first
// CACHED 16-byte chunks per lane (32 elements: whole rows of up to 1024) in registers between the
// passes, the backward reads the row again (mostly from L1: registers for three tensors' chunks
// would cost occupancy). Every sum over a row is each lane's in chunk order, then warp_sum's
// butterfly (the same bits in every lane).
//
// Invariants:
//   - NVRTC's Quick and Full tiers (crates/cuda/src/compile.rs) must give bit-identical results
//     (crates/ops/tests/cuda_tiers.rs): every multiply-add that has a choice of products is an
//     explicit fmaf.
//   - dw's grouping into partial sums depends only on the launch geometry, which the launchers
//     derive from the shapes alone (not from the tier or the GPU): dw is the same bit for bit
//     on every GPU and tier.
//   - rms_norm_bwd is given at least warps * padded_columns(n, W) * 4 bytes of dynamic shared
//     memory (it traps otherwise).

#include "common.cuh"

#define VEC ((int)(16 / sizeof(input_t)))  // elements of a 16-byte access
#define CACHED (32 / VEC)  // chunks per lane the forward keeps: 32 elements, rows of 1024

// W consecutive elements as loaded (16-byte aligned when W = VEC).
template <int W>
struct alignas(W == 1 ? alignof(input_t) : 16) Chunk {
  input_t e[W];
};

template <int W>
__device__ __forceinline__ Chunk<W> load_chunk(const input_t* p) {
  Chunk<W> c;
  if constexpr (W == 1) {
    c.e[0] = p[0];
  } else {
    *reinterpret_cast<uint4*>(c.e) = *reinterpret_cast<const uint4*>(p);
  }
  return c;
}

template <int W>
__device__ __forceinline__ void store_chunk(input_t* p, const float* v) {
  Chunk<W> c;
#pragma unroll
  for (int k = 0; k < W; ++k) c.e[k] = from_f32<input_t>(v[k]);
  if constexpr (W == 1) {
    p[0] = c.e[0];
  } else {
    *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(c.e);
  }
}

// W fp32 weights from p (16-byte aligned when W = VEC).
template <int W>
__device__ __forceinline__ void load_weights(const float* p, float* v) {
  if constexpr (W == 1) {
    v[0] = p[0];
  } else {
#pragma unroll
    for (int k = 0; k < W; k += 4) {
      const float4 q = *reinterpret_cast<const float4*>(p + k);
      v[k] = q.x, v[k + 1] = q.y, v[k + 2] = q.z, v[k + 3] = q.w;
    }
  }
}

// 1 / (1 + e^-x) from two MUFU instructions (ex2, rcp), 0 where e^-x overflows.
__device__ __forceinline__ float sigmoid(float x) {
  return __fdividef(1.f, 1.f + exp2_approx(-x * LOG2E));
}

// silu(x) and silu'(x).
struct Silu {
  float value, slope;
};

__device__ __forceinline__ Silu silu(float x) {
  const float s = sigmoid(x);
  return {x * s, s * fmaf(x, 1.f - s, 1.f)};
}

// ---------------------------------------------------------------------------------------------
// RMSNorm
// ---------------------------------------------------------------------------------------------

// One row's forward, by the 32 lanes of a warp.
template <int W, int NC>
__device__ __forceinline__ void norm_fwd_row(const input_t* x, const float* w, const input_t* g,
                                             input_t* y, float* rstd, long long row, int n,
                                             float eps, int lane) {
  const long long base = row * n;
  const int step = 32 * W;
  Chunk<W> xc[NC > 0 ? NC : 1];
  float ss = 0.f;
  int c = lane * W;
#pragma unroll
  for (int j = 0; j < NC; ++j, c += step) {
    if (c < n) {
      xc[j] = load_chunk<W>(x + base + c);
#pragma unroll
      for (int k = 0; k < W; ++k) ss = fmaf(to_f32(xc[j].e[k]), to_f32(xc[j].e[k]), ss);
    }
  }
  for (; c < n; c += step) {
    const Chunk<W> xr = load_chunk<W>(x + base + c);
#pragma unroll
    for (int k = 0; k < W; ++k) ss = fmaf(to_f32(xr.e[k]), to_f32(xr.e[k]), ss);
  }
  const float r = rsqrtf(fmaf(warp_sum(ss), 1.f / (float)n, eps));
  if (lane == 0) rstd[row] = r;

  const auto write = [&](const Chunk<W>& xr, int col) {
    float wv[W], out[W];
    load_weights<W>(w + col, wv);
#pragma unroll
    for (int k = 0; k < W; ++k) out[k] = to_f32(xr.e[k]) * r * wv[k];
    if (g != nullptr) {
      const Chunk<W> gr = load_chunk<W>(g + base + col);
#pragma unroll
      for (int k = 0; k < W; ++k) out[k] *= silu(to_f32(gr.e[k])).value;
    }
    store_chunk<W>(y + base + col, out);
  };
  c = lane * W;
#pragma unroll
  for (int j = 0; j < NC; ++j, c += step) {
    if (c < n) write(xc[j], c);
  }
  for (; c < n; c += step) write(load_chunk<W>(x + base + c), c);
}

// The backward of one element: dx and dg, its term of dw added to `dw`, and the forward's
// output y again (the forward's operations in its order, so the same bits).
__device__ __forceinline__ void norm_bwd_elem(float xv, float gv, float dyv, float wv, float r,
                                              float mean, bool gated, float& dx, float& dg,
                                              float& dw, float& y) {
  const float xh = xv * r;
  float dyh = dyv;
  y = xh * wv;
  if (gated) {
    const Silu s = silu(gv);
    dyh = dyv * s.value;
    dg = dyv * y * s.slope;
    y *= s.value;
  }
  dx = fmaf(-xh, mean, dyh * wv) * r;
  dw = fmaf(dyh, xh, dw);
}

// Where a lane keeps the dw sum of element k of its j-th chunk in its warp's shared memory:
// lane-interleaved, so that the 32 lanes of a warp touch 32 consecutive floats (no bank
// conflicts). A warp's sums take padded_columns(n, W) floats.
__device__ __forceinline__ int acc_index(int j, int k, int lane, int W) {
  return (j * W + k) * 32 + lane;
}
__device__ __forceinline__ int padded_columns(int n, int W) {
  return (n + 32 * W - 1) / (32 * W) * (32 * W);
}

// One row's backward, by the 32 lanes of a warp; adds the row's dw terms to acc (the warp's
// sums, at acc_index) and writes y again where y is not null. Both passes read the row from memory (the second mostly from L1): keeping
// it in registers would cost occupancy.
template <int W>
__device__ __forceinline__ void norm_bwd_row(const input_t* x, const float* w, const input_t* g,
                                             const float* rstd, const input_t* dy, input_t* dx,
                                             input_t* dg, input_t* y, float* acc, long long row,
                                             int n, int lane) {
  const long long base = row * n;
  const bool gated = g != nullptr;
  const float r = rstd[row];
  float dot = 0.f;  // sum of dxh * xh
  for (int c = lane * W; c < n; c += 32 * W) {
    const Chunk<W> xr = load_chunk<W>(x + base + c), dr = load_chunk<W>(dy + base + c);
    const Chunk<W> gr = gated ? load_chunk<W>(g + base + c) : xr;
    float wv[W];
    load_weights<W>(w + c, wv);
#pragma unroll
    for (int k = 0; k < W; ++k) {
      const float d = to_f32(dr.e[k]);
      const float dyh = gated ? d * silu(to_f32(gr.e[k])).value : d;
      dot = fmaf(dyh * wv[k], to_f32(xr.e[k]) * r, dot);
    }
  }
  const float mean = warp_sum(dot) * (1.f / (float)n);
  for (int j = 0, c = lane * W; c < n; ++j, c += 32 * W) {
    const Chunk<W> xr = load_chunk<W>(x + base + c), dr = load_chunk<W>(dy + base + c);
    const Chunk<W> gr = gated ? load_chunk<W>(g + base + c) : xr;
    float wv[W], dxv[W], dgv[W], yv[W];
    load_weights<W>(w + c, wv);
#pragma unroll
    for (int k = 0; k < W; ++k) {
      norm_bwd_elem(to_f32(xr.e[k]), to_f32(gr.e[k]), to_f32(dr.e[k]), wv[k], r, mean, gated,
                    dxv[k], dgv[k], acc[acc_index(j, k, lane, W)], yv[k]);
    }
    store_chunk<W>(dx + base + c, dxv);
    if (gated) store_chunk<W>(dg + base + c, dgv);
    if (y != nullptr) store_chunk<W>(y + base + c, yv);
  }
}

#if WANT_KERNEL(0)
extern "C" __global__ void __launch_bounds__(256)
    ENTRY(rms_norm_fwd)(const input_t* __restrict__ x, const float* __restrict__ w,
                        const input_t* __restrict__ g, input_t* __restrict__ y,
                        float* __restrict__ rstd, int rows, int n, int vec, float eps) {
  const int lane = threadIdx.x & 31;
  const long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row >= rows) return;
  if (vec) {
    norm_fwd_row<VEC, CACHED>(x, w, g, y, rstd, row, n, eps, lane);
  } else {
    norm_fwd_row<1, 0>(x, w, g, y, rstd, row, n, eps, lane);
  }
}
#endif

#if WANT_KERNEL(1)
extern "C" __global__ void __launch_bounds__(256)
    ENTRY(rms_norm_bwd)(const input_t* __restrict__ x, const float* __restrict__ w,
                        const input_t* __restrict__ g, const float* __restrict__ rstd,
                        const input_t* __restrict__ dy, input_t* __restrict__ dx,
                        input_t* __restrict__ dg, input_t* __restrict__ y,
                        float* __restrict__ dw_part, int rows, int n, int warp_rows, int vec) {
  extern __shared__ float4 dw_smem[];
  const int warps = blockDim.x >> 5, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int W = vec ? VEC : 1, padded = padded_columns(n, W);
  require_smem(warps * padded * (unsigned)sizeof(float));
  float* acc = reinterpret_cast<float*>(dw_smem) + (long long)warp * padded;
  // Each lane zeroes and accumulates only the sums of its own chunks.
  for (int j = 0, c = lane * W; c < n; ++j, c += 32 * W) {
    for (int k = 0; k < W; ++k) acc[acc_index(j, k, lane, W)] = 0.f;
  }
  // The block's warps * warp_rows consecutive rows, every warps-th one to each warp.
  const long long first = (long long)blockIdx.x * warps * warp_rows;
  const long long end = first + (long long)warps * warp_rows < rows
                            ? first + (long long)warps * warp_rows
                            : (long long)rows;
  for (long long row = first + warp; row < end; row += warps) {
    if (vec) {
      norm_bwd_row<VEC>(x, w, g, rstd, dy, dx, dg, y, acc, row, n, lane);
    } else {
      norm_bwd_row<1>(x, w, g, rstd, dy, dx, dg, y, acc, row, n, lane);
    }
  }
  __syncthreads();
  const float* sums = reinterpret_cast<const float*>(dw_smem);
  for (int c = threadIdx.x; c < n; c += blockDim.x) {
    const int j = c / (32 * W), r = c - j * 32 * W;
    const int at = acc_index(j, r % W, r / W, W);
    float s = 0.f;
    for (int i = 0; i < warps; ++i) s += sums[(long long)i * padded + at];
    dw_part[(long long)blockIdx.x * n + c] = s;
  }
}
#endif

#if WANT_KERNEL(2)
#define DW_COLS 8   // columns per block
#define DW_SUMS 32  // strided partial sums per column
extern "C" __global__ void __launch_bounds__(DW_COLS * DW_SUMS)
    ENTRY(column_sums)(const float* __restrict__ dw_part, float* __restrict__ dw, int slots,
                       int n) {
  __shared__ float sums[DW_SUMS][DW_COLS];
  const int col = blockIdx.x * DW_COLS + threadIdx.x % DW_COLS;
  const int part = threadIdx.x / DW_COLS;
  float s = 0.f;
  if (col < n) {
    for (int slot = part; slot < slots; slot += DW_SUMS) s += dw_part[(long long)slot * n + col];
  }
  sums[part][threadIdx.x % DW_COLS] = s;
  __syncthreads();
  if (part == 0 && col < n) {
    float total = 0.f;
    for (int i = 0; i < DW_SUMS; ++i) total += sums[i][threadIdx.x];
    dw[col] = total;
  }
}
#endif

// ---------------------------------------------------------------------------------------------
// SwiGLU
// ---------------------------------------------------------------------------------------------

// Calls f(offset, W) for every chunk of an n-element tensor: 16-byte chunks (W = VEC) grid-
// stride when `vec`, then the remaining elements one by one (W = 1).
template <typename F>
__device__ __forceinline__ void for_each_chunk(long long n, int vec, F f) {
  const long long stride = (long long)gridDim.x * blockDim.x;
  const long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  const long long chunks = vec ? n / VEC : 0;
  for (long long i = tid; i < chunks; i += stride) f.template operator()<VEC>(i * VEC);
  for (long long i = chunks * VEC + tid; i < n; i += stride) f.template operator()<1>(i);
}

struct SwigluFwd {
  const input_t* a;
  const input_t* b;
  input_t* y;
  template <int W>
  __device__ __forceinline__ void operator()(long long i) const {
    const Chunk<W> ac = load_chunk<W>(a + i), bc = load_chunk<W>(b + i);
    float out[W];
#pragma unroll
    for (int k = 0; k < W; ++k) out[k] = silu(to_f32(ac.e[k])).value * to_f32(bc.e[k]);
    store_chunk<W>(y + i, out);
  }
};

struct SwigluBwd {
  const input_t* a;
  const input_t* b;
  const input_t* dy;
  input_t* da;
  input_t* db;
  input_t* y;  // the forward's output again, bit for bit (null: not wanted)
  template <int W>
  __device__ __forceinline__ void operator()(long long i) const {
    const Chunk<W> ac = load_chunk<W>(a + i), bc = load_chunk<W>(b + i);
    const Chunk<W> dc = load_chunk<W>(dy + i);
    float dav[W], dbv[W], yv[W];
#pragma unroll
    for (int k = 0; k < W; ++k) {
      const Silu s = silu(to_f32(ac.e[k]));
      const float d = to_f32(dc.e[k]);
      dav[k] = d * to_f32(bc.e[k]) * s.slope;
      dbv[k] = d * s.value;
      yv[k] = s.value * to_f32(bc.e[k]);
    }
    store_chunk<W>(da + i, dav);
    store_chunk<W>(db + i, dbv);
    if (y != nullptr) store_chunk<W>(y + i, yv);
  }
};

#if WANT_KERNEL(3)
extern "C" __global__ void __launch_bounds__(256)
    ENTRY(swiglu_fwd)(const input_t* __restrict__ a, const input_t* __restrict__ b,
                      input_t* __restrict__ y, long long n, int vec) {
  for_each_chunk(n, vec, SwigluFwd{a, b, y});
}
#endif

#if WANT_KERNEL(4)
extern "C" __global__ void __launch_bounds__(256)
    ENTRY(swiglu_bwd)(const input_t* __restrict__ a, const input_t* __restrict__ b,
                      const input_t* __restrict__ dy, input_t* __restrict__ da,
                      input_t* __restrict__ db, input_t* __restrict__ y, long long n,
                      int vec) {
  for_each_chunk(n, vec, SwigluBwd{a, b, dy, da, db, y});
}
#endif

// ---------------------------------------------------------------------------------------------
// Causal depthwise convolution + silu
// ---------------------------------------------------------------------------------------------
// Windows are aligned at their end: slot CONV_MAX_K - 1 holds step t, slot CONV_MAX_K - 1 - m
// step t - m; the weights likewise (wa[CONV_MAX_K - K + j] = w_j, zero below), so every loop
// runs over CONV_MAX_K slots, unrolled, and a narrower kernel only has zero weights in front.

#define CONV_MAX_K 4   // the widest kernel (Mamba's and flash-linear-attention's default width)
#define CONV_STEPS 16  // steps per warp
#define CONV_RUNS 4    // warps per block

struct ConvArgs {
  const input_t* x;
  long long sb, st;  // x's batch and step strides
  const float* w;    // [D, K]
  const float* bias;  // [D] or null
  const bool* reset;  // [B, T] or null
  int T, D, K;
};

// The lane's W channels from d: weights end-aligned in wa, the bias in b.
template <int W>
__device__ __forceinline__ void conv_weights(const ConvArgs& a, int d, float wa[CONV_MAX_K][W],
                                             float b[W]) {
#pragma unroll
  for (int k = 0; k < W; ++k) {
    const bool ok = d + k < a.D;
    b[k] = ok && a.bias != nullptr ? a.bias[d + k] : 0.f;
#pragma unroll
    for (int i = 0; i < CONV_MAX_K; ++i) {
      const int j = i - (CONV_MAX_K - a.K);
      wa[i][k] = ok && j >= 0 ? a.w[(long long)(d + k) * a.K + j] : 0.f;
    }
  }
}

// x at (b, t) for the lane's W channels from d, as fp32; zero outside the tensor.
template <int W>
__device__ __forceinline__ void conv_load(const ConvArgs& a, int b, int t, int d, float v[W]) {
  if (t < 0 || t >= a.T || d >= a.D) {
#pragma unroll
    for (int k = 0; k < W; ++k) v[k] = 0.f;
    return;
  }
  const input_t* p = a.x + (long long)b * a.sb + (long long)t * a.st + d;
  if constexpr (W == 1) {
    v[0] = to_f32(p[0]);
  } else {
    const Chunk<W> c = load_chunk<W>(p);
#pragma unroll
    for (int k = 0; k < W; ++k) v[k] = to_f32(c.e[k]);
  }
}

__device__ __forceinline__ bool conv_restarts(const ConvArgs& a, int b, int t) {
  return a.reset != nullptr && t >= 0 && t < a.T && a.reset[(long long)b * a.T + t];
}

// The latest restart in [t - K + 1, t] of row b (or INT_MIN: none reaches back to t).
__device__ __forceinline__ int conv_start_before(const ConvArgs& a, int b, int t) {
  int start = -2147483647 - 1;
  for (int m = a.K - 1; m >= 0; --m)
    if (conv_restarts(a, b, t - m)) start = t - m;
  return start;
}

// Slides the window by one step: slot i takes slot i + 1, the last slot takes v.
template <int W>
__device__ __forceinline__ void conv_shift(float win[CONV_MAX_K][W], const float v[W]) {
#pragma unroll
  for (int i = 0; i + 1 < CONV_MAX_K; ++i)
#pragma unroll
    for (int k = 0; k < W; ++k) win[i][k] = win[i + 1][k];
#pragma unroll
  for (int k = 0; k < W; ++k) win[CONV_MAX_K - 1][k] = v[k];
}

// pre_t from the window ending at t, over the taps at or after max(start, 0).
template <int W>
__device__ __forceinline__ void conv_pre(const float wa[CONV_MAX_K][W], const float bias[W],
                                         const float win[CONV_MAX_K][W], int t, int start,
                                         float pre[W]) {
  const int first = max(start, 0);
#pragma unroll
  for (int k = 0; k < W; ++k) pre[k] = bias[k];
#pragma unroll
  for (int i = 0; i < CONV_MAX_K; ++i) {
    if (t - (CONV_MAX_K - 1 - i) < first) continue;
#pragma unroll
    for (int k = 0; k < W; ++k) pre[k] = fmaf(wa[i][k], win[i][k], pre[k]);
  }
}

template <int W>
__device__ __forceinline__ void conv_fwd_body(const ConvArgs& a, input_t* y) {
  const int lane = threadIdx.x & 31, run = threadIdx.x >> 5;
  const int d = (blockIdx.x * 32 + lane) * W, b = blockIdx.z;
  const int t0 = (blockIdx.y * CONV_RUNS + run) * CONV_STEPS;
  if (d >= a.D || t0 >= a.T) return;
  float wa[CONV_MAX_K][W], bias[W], win[CONV_MAX_K][W], v[W], pre[W];
  conv_weights<W>(a, d, wa, bias);
  int start = conv_start_before(a, b, t0 - 1);
  // win[i] = x_{t0 - CONV_MAX_K + i}: the steps before the run.
#pragma unroll
  for (int i = 0; i < CONV_MAX_K; ++i) conv_load<W>(a, b, t0 - CONV_MAX_K + i, d, win[i]);
  for (int t = t0; t < min(t0 + CONV_STEPS, a.T); ++t) {
    if (conv_restarts(a, b, t)) start = t;
    conv_load<W>(a, b, t, d, v);
    conv_shift<W>(win, v);
    conv_pre<W>(wa, bias, win, t, start, pre);
    float out[W];
#pragma unroll
    for (int k = 0; k < W; ++k) out[k] = silu(pre[k]).value;
    store_chunk<W>(y + ((long long)b * a.T + t) * a.D + d, out);
  }
}

// The block's dw and dbias partial: each warp's sums over its run, added in warp order.
// sums: CONV_RUNS * 32 * W * (CONV_MAX_K + 1) floats of shared memory.
template <int W>
__device__ __forceinline__ void conv_block_sums(const ConvArgs& a, int d,
                                                const float dw[CONV_MAX_K][W], const float db[W],
                                                float* sums, float* part) {
  constexpr int VALUES = W * (CONV_MAX_K + 1);
  const int lane = threadIdx.x & 31, run = threadIdx.x >> 5;
  float* mine = sums + (run * 32 + lane) * VALUES;
#pragma unroll
  for (int k = 0; k < W; ++k) {
#pragma unroll
    for (int i = 0; i < CONV_MAX_K; ++i) mine[k * (CONV_MAX_K + 1) + i] = dw[i][k];
    mine[k * (CONV_MAX_K + 1) + CONV_MAX_K] = db[k];
  }
  __syncthreads();
  if (run != 0 || d >= a.D) return;
  const long long slot = (long long)blockIdx.z * gridDim.y + blockIdx.y;
  const long long width = (long long)a.D * (a.K + 1);
  for (int e = 0; e < VALUES; ++e) {
    float total = 0.f;
    for (int r = 0; r < CONV_RUNS; ++r) total += sums[(r * 32 + lane) * VALUES + e];
    const int k = e / (CONV_MAX_K + 1), i = e % (CONV_MAX_K + 1);
    const int j = i - (CONV_MAX_K - a.K);
    if (d + k >= a.D) continue;
    if (i == CONV_MAX_K)
      part[slot * width + (long long)a.D * a.K + d + k] = total;
    else if (j >= 0)
      part[slot * width + (long long)(d + k) * a.K + j] = total;
  }
}

// Backward of one run: dpre over [t0, t0 + CONV_STEPS + K - 1), dx over the run, and the dw and
// dbias terms of the run's steps. Threads past D or T still reach the block's sums (zeros).
template <int W>
__device__ __forceinline__ void conv_bwd_body(const ConvArgs& a, const input_t* dy, input_t* dx,
                                              float* sums, float* part) {
  const int lane = threadIdx.x & 31, run = threadIdx.x >> 5;
  const int d = (blockIdx.x * 32 + lane) * W, b = blockIdx.z;
  const int t0 = (blockIdx.y * CONV_RUNS + run) * CONV_STEPS;
  float dw[CONV_MAX_K][W], db[W];
#pragma unroll
  for (int k = 0; k < W; ++k) {
    db[k] = 0.f;
#pragma unroll
    for (int i = 0; i < CONV_MAX_K; ++i) dw[i][k] = 0.f;
  }
  if (d < a.D && t0 < a.T) {
    float wa[CONV_MAX_K][W], bias[W], win[CONV_MAX_K][W], dwin[CONV_MAX_K][W], v[W], pre[W];
    bool rwin[CONV_MAX_K];  // restart at the window's steps
    conv_weights<W>(a, d, wa, bias);
    int start = conv_start_before(a, b, t0 - 1);
#pragma unroll
    for (int i = 0; i < CONV_MAX_K; ++i) {
      conv_load<W>(a, b, t0 - CONV_MAX_K + i, d, win[i]);
      rwin[i] = false;
#pragma unroll
      for (int k = 0; k < W; ++k) dwin[i][k] = 0.f;
    }
    const int end = min(t0 + CONV_STEPS, a.T);
    for (int t = t0; t < end + a.K - 1; ++t) {
      const bool restart = conv_restarts(a, b, t);
      if (restart) start = t;
      conv_load<W>(a, b, t, d, v);
      conv_shift<W>(win, v);
      float g[W];
      if (t < a.T) {
        conv_pre<W>(wa, bias, win, t, start, pre);
        const input_t* p = dy + ((long long)b * a.T + t) * a.D + d;
        const Chunk<W> c = load_chunk<W>(p);
#pragma unroll
        for (int k = 0; k < W; ++k) g[k] = to_f32(c.e[k]) * silu(pre[k]).slope;
      } else {
#pragma unroll
        for (int k = 0; k < W; ++k) g[k] = 0.f;
      }
      conv_shift<W>(dwin, g);
#pragma unroll
      for (int i = 0; i + 1 < CONV_MAX_K; ++i) rwin[i] = rwin[i + 1];
      rwin[CONV_MAX_K - 1] = restart;
      if (t < end) {
        // dw and dbias: the taps of step t.
        const int first = max(start, 0);
#pragma unroll
        for (int i = 0; i < CONV_MAX_K; ++i) {
          if (t - (CONV_MAX_K - 1 - i) < first) continue;
#pragma unroll
          for (int k = 0; k < W; ++k) dw[i][k] = fmaf(g[k], win[i][k], dw[i][k]);
        }
#pragma unroll
        for (int k = 0; k < W; ++k) db[k] += g[k];
      }
      // dx at s = t - K + 1: the steps t' = s + m of its document that read it (no restart in
      // (s, t']), each through weight w_{K-1-m}, in slot CONV_MAX_K - K + m.
      const int s = t - (a.K - 1);
      if (s >= t0 && s < end) {
        float acc[W];
#pragma unroll
        for (int k = 0; k < W; ++k) acc[k] = 0.f;
        bool reached = true;
#pragma unroll
        for (int m = 0; m < CONV_MAX_K; ++m) {
          if (m >= a.K) continue;
          const int slot = CONV_MAX_K - a.K + m;
          if (m > 0 && rwin[slot]) reached = false;
          if (!reached) continue;
#pragma unroll
          for (int k = 0; k < W; ++k) acc[k] = fmaf(wa[CONV_MAX_K - 1 - m][k], dwin[slot][k], acc[k]);
        }
        store_chunk<W>(dx + ((long long)b * a.T + s) * a.D + d, acc);
      }
    }
  }
  conv_block_sums<W>(a, d, dw, db, sums, part);
}

#if WANT_KERNEL(5)
extern "C" __global__ void __launch_bounds__(32 * CONV_RUNS)
    ENTRY(causal_conv_fwd)(const input_t* __restrict__ x, long long sb, long long st,
                           const float* __restrict__ w, const float* __restrict__ bias,
                           const bool* __restrict__ reset, input_t* __restrict__ y, int T, int D,
                           int K, int vec) {
  const ConvArgs a{x, sb, st, w, bias, reset, T, D, K};
  if (vec)
    conv_fwd_body<VEC>(a, y);
  else
    conv_fwd_body<1>(a, y);
}
#endif

#if WANT_KERNEL(6)
extern "C" __global__ void __launch_bounds__(32 * CONV_RUNS)
    ENTRY(causal_conv_bwd)(const input_t* __restrict__ x, long long sb, long long st,
                           const float* __restrict__ w, const float* __restrict__ bias,
                           const bool* __restrict__ reset, const input_t* __restrict__ dy,
                           input_t* __restrict__ dx, float* __restrict__ part, int T, int D, int K,
                           int vec) {
  __shared__ float sums[CONV_RUNS * 32 * VEC * (CONV_MAX_K + 1)];
  const ConvArgs a{x, sb, st, w, bias, reset, T, D, K};
  if (vec)
    conv_bwd_body<VEC>(a, dy, dx, sums, part);
  else
    conv_bwd_body<1>(a, dy, dx, sums, part);
}
#endif

// ---------------------------------------------------------------------------------------------
// Rotary position embedding
// ---------------------------------------------------------------------------------------------
// x, y: [tokens, H, D] contiguous (tokens = B T, rows of D = 2 half), rotated pair by pair:
// (x_i, x_{i+half}) for i < half, by angle theta_{row, i} with cos and sin from fp32 tables
// [rows, half]; a token's row is its step t, or b T + t with per-row tables (positions that
// restart at each document). sign = +1 rotates by the angle (the forward), -1 by its negative
// (the backward: a rotation's gradient is its transpose).

struct RotaryArgs {
  const input_t* x;
  const float* cos;
  const float* sin;
  input_t* y;
  long long tokens;
  int T, H, half, per_row;
  float sign;
};

template <int W>
__device__ __forceinline__ void rotary_body(const RotaryArgs& a) {
  const int per_head = a.half / W;  // chunks of W pairs per head
  const long long chunks = a.tokens * a.H * per_head;
  const long long stride = (long long)gridDim.x * blockDim.x;
  for (long long c = (long long)blockIdx.x * blockDim.x + threadIdx.x; c < chunks; c += stride) {
    const long long head = c / per_head;  // token * H + h
    const int i = (int)(c - head * per_head) * W;
    const long long token = head / a.H;
    const long long row = a.per_row ? token : token % a.T;
    const long long base = head * 2 * a.half + i;
    const Chunk<W> x1 = load_chunk<W>(a.x + base), x2 = load_chunk<W>(a.x + base + a.half);
    float cv[W], sv[W], y1[W], y2[W];
    load_weights<W>(a.cos + row * a.half + i, cv);
    load_weights<W>(a.sin + row * a.half + i, sv);
#pragma unroll
    for (int k = 0; k < W; ++k) {
      const float u = to_f32(x1.e[k]), v = to_f32(x2.e[k]), s = a.sign * sv[k];
      y1[k] = fmaf(u, cv[k], -(s * v));
      y2[k] = fmaf(v, cv[k], s * u);
    }
    store_chunk<W>(a.y + base, y1);
    store_chunk<W>(a.y + base + a.half, y2);
  }
}

#if WANT_KERNEL(7)
extern "C" __global__ void __launch_bounds__(256)
    ENTRY(rotary)(const input_t* __restrict__ x, const float* __restrict__ cos_table,
                  const float* __restrict__ sin_table, input_t* __restrict__ y, long long tokens,
                  int T, int H, int half, int per_row, float sign, int vec) {
  const RotaryArgs a{x, cos_table, sin_table, y, tokens, T, H, half, per_row, sign};
  if (vec)
    rotary_body<VEC>(a);
  else
    rotary_body<1>(a);
}
#endif
