// Gated linear attention (GLA) kernels, forward and backward, in three schedules: every mode for
// fp32 inputs, and `fused_chunk` / `fused_recurrent` for every dtype (bf16/fp16 `chunk` runs the
// tensor-core kernels of kernels/gla_tc.cu). History and measurements: docs/kernels.md.
//
//   S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t,   o_t = scale * q_t S_t
//   q, k, g: [B, T, H, K]   v, o: [B, T, H, V]   S: [B, H, K, V] fp32   g: fp32 log gates (<= 0)
//
// Prelude and compilation: `#include "common.cuh"` gives the element types (`input_t`: f32, bf16
// or f16), the conversions (`ld`: element i as fp32), fast math, `require_smem` and the entry-point
// selection. The runtime (crates/cuda) compiles each entry point as its own NVRTC program per
// dtype, with no CUDA headers; entry point i is guarded by `#if WANT_KERNEL(i)` and named
// `ENTRY(name)` (`name_f32`, `name_bf16`, `name_f16`), i its index in GLA's kernel list in
// crates/ops/src/gla/kernels.rs, where the launchers are. Accumulation and states are fp32.
// Results over K- or V-tiles are fp32 partial sums `[NK or NV, ...]` that the launcher adds up,
// so any head dims work (tiles are zero-padded; nothing asserts on a shape).
//
// Schedules and entry points:
//   fused_recurrent  gla_recurrent_fwd / _bwd: token by token, the state in registers. Block: 8
//                    warps over a 32 x 32 state tile (lane = state row, 4 columns per warp);
//                    grid (B*H, ceil(V/32), ceil(K/32)). Forward: o partial over K-tiles
//                    [NK, B, T, H, V], final state. Backward: a forward pass (dq, partial over
//                    V-tiles), then a reverse pass with the adjoint (dk partial over V-tiles, dv
//                    over K-tiles, dh0).
//   fused_chunk      gla_chunk_fwd / _bwd walking the whole sequence: one block of 256 threads
//                    per (b, h, 64 x 64 state tile), grid (B*H, ceil(V/64), ceil(K/64)), tokens
//                    in sub-chunks of 16, the state in shared memory. Per sub-chunk: the gates'
//                    cumulative sum b and A (or dA) by scalar loops; on tensor cores o = qg S + A v
//                    (backward: dq forward, then dk and dv in reverse; their state products) and
//                    the state update; dq's and dk's intra-sub-chunk sums by scalar loops. The
//                    next sub-chunk's global loads are in flight while this one computes.
//   chunk            gla_chunk_states walks 64-token chunks with a 64 x 64 state tile in
//                    registers as tensor-core accumulators, grid (B*H, ceil(V/64), ceil(K/64)).
//                    It stores the state at every chunk start, hs [B, H, chunks, K, V] fp32
//                    (backward: also the adjoint at every chunk end, dhs, from q and scale * do).
//                    gla_chunk_fwd / _bwd with the PARALLEL flag then run one block per chunk,
//                    grid (B*H*chunks, ...), each walking its chunk's four sub-chunks from hs
//                    (and dhs).
//   gate gradient    gla_dg, after either backward: dg from the summed fp32 dq and dk (below).
// Shared memory: the chunk kernels' tiles are dynamic (Tiles 45824 B forward, TilesBwd 51200 B
// backward: 64 x 64 fp32 state, 16-token q, k, v, do, b, qg, kd tiles with 68-float rows, A, dA);
// chunk_states and the recurrent backward use static shared memory.
//
// Numerics. Inside a 16-token sub-chunk every exponent is a difference b_t - b_s with s <= t of
// the in-sub-chunk cumulative gate, so it is <= 0; the inter-chunk terms use exp(b_t) and
// exp(b_last - b_s), also <= 0. Nothing is ever formed as exp(b_t) * exp(-b_s). The tensor-core
// products take fp32 operands split into three tf32 products (3xTF32, see mma_tile), so they
// keep fp32 accuracy; everything accumulates in fp32.
//
// Gate gradient: with b the cumulative sum of g over the sequence, L depends on b only through
// q_t exp(b_t), k_s exp(-b_s) and the final state S_T = exp(b_T) (...). Hence
//   dL/db_t = q_t * dq_t - k_t * dk_t  (+ sum_v S_T * dS_T at t = T),
// and dg_t = sum_{s >= t} dL/db_s: a reverse cumulative sum plus the final-state term on every t
// (gla_dg below). The initial state needs no extra term: its effect goes through q_t exp(b_t).
// Checked against autograd of the f64 reference (crates/ops/tests/cuda_gla.rs).
//
// Invariants:
//   - NVRTC's Quick and Full compile tiers (crates/cuda/src/compile.rs) must give bit-identical
//     results (crates/ops/tests/cuda_tiers.rs): write any multiply-add that has a choice of
//     products as an explicit fmaf (as the recurrent kernels' state update does).
//   - The shared-memory sizes the launcher passes (CHUNK_FWD_SMEM / CHUNK_BWD_SMEM in
//     crates/ops/src/gla/kernels.rs) must match the static_asserts below; a kernel given less
//     traps.
//
// Measured (H100 80GB HBM3, bf16, bench/results/gla-h100-2026-11-26-v26-tiered.json, fwd /
// fwd+bwd ms): fused_chunk at 8 x 2048 x 16 x D 0.67 / 2.98 (D = 32), 0.70 / 3.13 (64),
// 2.01 / 8.61 (128); at D = 128 4 x 4096 1.99 / 8.74, 2 x 8192 2.84 / 12.55, 1 x 16384
// 5.39 / 23.92. fused_recurrent at 8 x 2048 x 16 x D 1.75 / 5.92 (D = 32), 1.97 / 10.37 (64).
// fused_chunk's fwd+bwd is 7x to 21x the tensor-core `chunk` kernels' in the same file; fp32
// inputs are not benchmarked.

#include "common.cuh"

// ---------------------------------------------------------------------------------------------
// fused_recurrent
// ---------------------------------------------------------------------------------------------
// Block: 8 warps; lane = state row (32 rows of a K-tile), warp w owns 4 state columns, so the
// block covers a 32 x 32 tile of S. Grid: (B*H, ceil(V/32), ceil(K/32)).

#define R_ROWS 32
#define R_COLS_PER_WARP 4
#define R_WARPS 8
#define R_COLS (R_COLS_PER_WARP * R_WARPS)
#define R_TOK 8  // tokens buffered per cross-warp reduction

template <typename T>
__device__ void recurrent_fwd(const T* q, const T* k, const T* v, const float* g,
                              const float* h0, float* o_part, float* ht, int B, int Tn, int H,
                              int K, int V, float scale) {
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  const int iv = blockIdx.y, ik = blockIdx.z, bh = blockIdx.x;
  const int b = bh / H, h = bh % H;
  const int i = ik * R_ROWS + lane;
  const bool iok = i < K;
  int j[R_COLS_PER_WARP];
  float S[R_COLS_PER_WARP];
#pragma unroll
  for (int c = 0; c < R_COLS_PER_WARP; ++c) {
    j[c] = iv * R_COLS + w * R_COLS_PER_WARP + c;
    S[c] = (h0 != nullptr && iok && j[c] < V) ? h0[((long long)bh * K + i) * V + j[c]] : 0.f;
  }
  for (int t = 0; t < Tn; ++t) {
    const long long qk = (((long long)b * Tn + t) * H + h) * K;
    const long long vo = (((long long)b * Tn + t) * H + h) * V;
    const float qi = iok ? ld(q, qk + i) * scale : 0.f;
    const float ki = iok ? ld(k, qk + i) : 0.f;
    const float di = iok ? __expf(g[qk + i]) : 1.f;
#pragma unroll
    for (int c = 0; c < R_COLS_PER_WARP; ++c) {
      const float vj = j[c] < V ? ld(v, vo + j[c]) : 0.f;
      // The fused product named: written a * b + c * d, the optimiser picks which product to
      // fuse, and NVRTC's quick and full optimisation levels pick differently (the tiers of
      // crates/cuda/src/compile.rs must give the same bits).
      S[c] = fmaf(di, S[c], ki * vj);
      const float oj = warp_sum(qi * S[c]);
      if (lane == 0 && j[c] < V) o_part[(long long)ik * B * Tn * H * V + vo + j[c]] = oj;
    }
  }
  if (ht != nullptr && iok) {
#pragma unroll
    for (int c = 0; c < R_COLS_PER_WARP; ++c)
      if (j[c] < V) ht[((long long)bh * K + i) * V + j[c]] = S[c];
  }
}

// Pass 1 (forward, state S): dq_t = scale * S_t do_t, partial over this V-tile.
// Pass 2 (reverse, adjoint dS): dS_t = scale q_t^T do_t + exp(g_{t+1}) dS_{t+1};
//   dk_t = dS_t v_t (partial over V-tile), dv_t = k_t dS_t (partial over K-tile);
//   dh0 = exp(g_0) dS_0.
template <typename T>
__device__ void recurrent_bwd(const T* q, const T* k, const T* v, const float* g,
                              const float* h0, const T* d_o, const float* dht, float* dq_part,
                              float* dk_part, float* dv_part, float* dh0, int B, int Tn, int H,
                              int K, int V, float scale) {
  __shared__ float red[R_TOK][R_WARPS][32];
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  const int iv = blockIdx.y, ik = blockIdx.z, bh = blockIdx.x;
  const int b = bh / H, h = bh % H;
  const int i = ik * R_ROWS + lane;
  const bool iok = i < K;
  const long long kpart = (long long)iv * B * Tn * H * K;
  const long long vpart = (long long)ik * B * Tn * H * V;
  int j[R_COLS_PER_WARP];
  float S[R_COLS_PER_WARP];
#pragma unroll
  for (int c = 0; c < R_COLS_PER_WARP; ++c) {
    j[c] = iv * R_COLS + w * R_COLS_PER_WARP + c;
    S[c] = (h0 != nullptr && iok && j[c] < V) ? h0[((long long)bh * K + i) * V + j[c]] : 0.f;
  }
  for (int t0 = 0; t0 < Tn; t0 += R_TOK) {
#pragma unroll
    for (int tt = 0; tt < R_TOK; ++tt) {
      const int t = t0 + tt;
      float p = 0.f;
      if (t < Tn) {
        const long long qk = (((long long)b * Tn + t) * H + h) * K;
        const long long vo = (((long long)b * Tn + t) * H + h) * V;
        const float ki = iok ? ld(k, qk + i) : 0.f;
        const float di = iok ? __expf(g[qk + i]) : 1.f;
#pragma unroll
        for (int c = 0; c < R_COLS_PER_WARP; ++c) {
          const bool jok = j[c] < V;
          S[c] = fmaf(di, S[c], ki * (jok ? ld(v, vo + j[c]) : 0.f));  // as in recurrent_fwd
          p += S[c] * (jok ? ld(d_o, vo + j[c]) : 0.f);
        }
      }
      red[tt][w][lane] = p;
    }
    __syncthreads();
    {
      const int t = t0 + w;  // R_TOK == R_WARPS: warp w finishes token t0 + w
      if (t < Tn && iok) {
        float s = 0.f;
#pragma unroll
        for (int ww = 0; ww < R_WARPS; ++ww) s += red[w][ww][lane];
        dq_part[kpart + (((long long)b * Tn + t) * H + h) * K + i] = s * scale;
      }
    }
    __syncthreads();
  }

  float dS[R_COLS_PER_WARP];
#pragma unroll
  for (int c = 0; c < R_COLS_PER_WARP; ++c)
    dS[c] = (dht != nullptr && iok && j[c] < V) ? dht[((long long)bh * K + i) * V + j[c]] : 0.f;
  for (int t0 = 0; t0 < Tn; t0 += R_TOK) {
#pragma unroll
    for (int tt = 0; tt < R_TOK; ++tt) {
      const int t = Tn - 1 - (t0 + tt);
      float p = 0.f;
      if (t >= 0) {
        const long long qk = (((long long)b * Tn + t) * H + h) * K;
        const long long vo = (((long long)b * Tn + t) * H + h) * V;
        const float qi = iok ? ld(q, qk + i) * scale : 0.f;
        const float ki = iok ? ld(k, qk + i) : 0.f;
        const float di = iok ? __expf(g[qk + i]) : 1.f;
#pragma unroll
        for (int c = 0; c < R_COLS_PER_WARP; ++c) {
          const bool jok = j[c] < V;
          dS[c] += qi * (jok ? ld(d_o, vo + j[c]) : 0.f);
          p += dS[c] * (jok ? ld(v, vo + j[c]) : 0.f);
          const float dvj = warp_sum(ki * dS[c]);
          if (lane == 0 && jok) dv_part[vpart + vo + j[c]] = dvj;
          dS[c] *= di;
        }
      }
      red[tt][w][lane] = p;
    }
    __syncthreads();
    {
      const int t = Tn - 1 - (t0 + w);
      if (t >= 0 && iok) {
        float s = 0.f;
#pragma unroll
        for (int ww = 0; ww < R_WARPS; ++ww) s += red[w][ww][lane];
        dk_part[kpart + (((long long)b * Tn + t) * H + h) * K + i] = s;
      }
    }
    __syncthreads();
  }
  if (dh0 != nullptr && iok) {
#pragma unroll
    for (int c = 0; c < R_COLS_PER_WARP; ++c)
      if (j[c] < V) dh0[((long long)bh * K + i) * V + j[c]] = dS[c];
  }
}

// ---------------------------------------------------------------------------------------------
// chunk / fused_chunk
// ---------------------------------------------------------------------------------------------
// Block: 256 threads, a BK x BV = 64 x 64 tile of the state in shared memory (fp32), tokens in
// sub-chunks of C = 16. Grid: (B*H*segments, ceil(V/64), ceil(K/64)).

#define BK 64
#define BV 64
#define CS 16           // sub-chunk (tokens)
#define LC 64           // chunk of the `chunk` schedule (states stored every LC tokens)
// Padded row length of the shared tiles: LD = 4 (mod 32) makes the tensor-core fragment loads
// A[(m0 + g) * LD + k0 + q] hit 32 distinct banks (a 65-float row gives 4-way conflicts).
#define LD 68
#define NTHREADS 256

struct Tiles {
  float S[BK * LD];   // state (or its adjoint) S[i][j]
  float q[CS * LD];   // raw q (times nothing)
  float k[CS * LD];
  float b[CS * LD];   // inclusive cumulative gate inside the sub-chunk
  float qg[CS * LD];  // scale * q * exp(b)
  float kd[CS * LD];  // k * exp(b_last - b)
  float v[CS * LD];
  float A[CS * CS];   // scale * causal (q k^T with gates) inside the sub-chunk
  float decay[BK];    // exp(b_last)
  float tot[4 * BK];  // per-quarter gate sums (the parallel cumulative sum)
};

struct TilesBwd {
  Tiles f;
  float d_o[CS * LD];
  float dA[CS * CS];  // scale * causal (do v^T)
};

// The chunk kernels' tiles live in dynamic shared memory (the backward's pass 48 KB); the launcher
// passes sizeof(Tiles) / sizeof(TilesBwd) bytes (CHUNK_FWD_SMEM / CHUNK_BWD_SMEM in
// crates/ops/src/gla/kernels.rs), and a kernel given less traps instead of corrupting memory.
extern __shared__ __align__(16) float dyn_smem[];

static_assert(sizeof(Tiles) == 45824, "update CHUNK_FWD_SMEM in crates/ops/src/gla/kernels.rs");
static_assert(sizeof(TilesBwd) == 51200, "update CHUNK_BWD_SMEM in crates/ops/src/gla/kernels.rs");



// One sub-chunk of inputs held in registers between its global load and its commit to shared
// memory, so the next sub-chunk's loads are in flight while the current one is computed on.
// Thread (c = tid % 64, quarter = tid / 64) holds tokens 4 quarter .. 4 quarter + 3 of channel c
// (row i of the K-tile for q, k, g; column j of the V-tile for v, do).
struct Fetch {
  float q[4], k[4], g[4], v[4], d[4];
};

// Loads the sub-chunk [t0, t0 + CS) (zero-padded past the sequence and the tiles).
template <typename T>
__device__ __forceinline__ void fetch(Fetch& f, const T* q, const T* k, const T* v, const float* g,
                                      const T* d_o, int b, int h, int t0, int Tn, int H, int K,
                                      int V, int ik, int iv) {
  const int c = threadIdx.x % BK, quarter = threadIdx.x / BK;
  const int i = ik * BK + c, j = iv * BV + c;
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int tg = t0 + 4 * quarter + r;
    const long long row = ((long long)b * Tn + tg) * H + h;
    const bool iok = tg < Tn && i < K, jok = tg < Tn && j < V;
    f.q[r] = iok ? ld(q, row * K + i) : 0.f;
    f.k[r] = iok ? ld(k, row * K + i) : 0.f;
    f.g[r] = iok ? g[row * K + i] : 0.f;
    f.v[r] = jok ? ld(v, row * V + j) : 0.f;
    f.d[r] = (jok && d_o != nullptr) ? ld(d_o, row * V + j) : 0.f;
  }
}

// Writes a fetched sub-chunk into the tiles and derives b (cumulative gates, a parallel scan over
// the four quarters), qg, kd and decay. Starts after and ends with a barrier.
__device__ void commit(Tiles& s, float* d_o_tile, const Fetch& f, float scale) {
  const int c = threadIdx.x % BK, quarter = threadIdx.x / BK;
  float local[4], acc = 0.f;
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int t = 4 * quarter + r;
    acc += f.g[r];
    local[r] = acc;
    s.q[t * LD + c] = f.q[r];
    s.k[t * LD + c] = f.k[r];
    s.v[t * LD + c] = f.v[r];
    if (d_o_tile != nullptr) d_o_tile[t * LD + c] = f.d[r];
  }
  s.tot[quarter * BK + c] = acc;
  __syncthreads();
  float before = 0.f, last = 0.f;
#pragma unroll
  for (int p = 0; p < 4; ++p) {
    const float x = s.tot[p * BK + c];
    before += p < quarter ? x : 0.f;
    last += x;
  }
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int t = 4 * quarter + r;
    const float bt = before + local[r];
    s.b[t * LD + c] = bt;
    s.qg[t * LD + c] = scale * f.q[r] * __expf(bt);
    s.kd[t * LD + c] = f.k[r] * __expf(last - bt);
  }
  if (quarter == 0) s.decay[c] = __expf(last);
  __syncthreads();
}

// A[t][u] = scale * sum_i q[t][i] k[u][i] exp(b[t][i] - b[u][i]) for u <= t, else 0 (partial over
// this K-tile). One thread per (t, u).
__device__ void compute_A(Tiles& s, float scale) {
  const int t = threadIdx.x / CS, u = threadIdx.x % CS;
  float acc[4] = {0.f, 0.f, 0.f, 0.f};  // independent chains: latency, not throughput, bounds this
  if (u <= t) {
#pragma unroll 4
    for (int i = 0; i < BK; ++i)
      acc[i & 3] +=
          s.q[t * LD + i] * s.k[u * LD + i] * __expf(s.b[t * LD + i] - s.b[u * LD + i]);
  }
  s.A[t * CS + u] = (acc[0] + acc[1] + acc[2] + acc[3]) * scale;
}

// dA[t][u] = scale * sum_j do[t][j] v[u][j] for u <= t, else 0 (partial over this V-tile).
__device__ void compute_dA(TilesBwd& s, float scale) {
  const int t = threadIdx.x / CS, u = threadIdx.x % CS;
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  if (u <= t) {
#pragma unroll 4
    for (int j = 0; j < BV; ++j) acc[j & 3] += s.d_o[t * LD + j] * s.f.v[u * LD + j];
  }
  s.dA[t * CS + u] = (acc[0] + acc[1] + acc[2] + acc[3]) * scale;
}

// Tensor cores: mma.sync m16n8k8 with tf32 operands and fp32 accumulation, fed from the fp32
// shared tiles. Each product is split into three tf32 products (hi*hi + hi*lo + lo*hi, "3xTF32")
// so results keep fp32 accuracy. A single tf32 product was measured to give bf16/fp16 gate
// gradients up to 1.8e-3 relative error where the naive same-precision computation is exact
// (T = 1), and to sit at the 2x-naive bound elsewhere: dg = revcumsum(q dq - k dk) cancels.

__device__ __forceinline__ unsigned to_tf32(float x) {
  unsigned r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return r;
}

__device__ __forceinline__ void mma_tf32(float c[4], const unsigned a[4], const unsigned b[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Warp-wide C[16 x 8] += A[m0:m0+16, k0:k0+8] * B[k0:k0+8, n0:n0+8], with A(m, k) =
// A[m * ars + k * acs] and B(k, n) = B[k * brs + n * bcs] in shared memory (strides give
// transposes for free). Accumulator layout (g = lane / 4, q = lane % 4): c[0] = (g, 2q),
// c[1] = (g, 2q + 1), c[2] = (g + 8, 2q), c[3] = (g + 8, 2q + 1), relative to (m0, n0).
__device__ __forceinline__ void mma_tile(float c[4], const float* A, int ars, int acs,
                                         const float* B, int brs, int bcs, int m0, int n0,
                                         int k0) {
  const int lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
  const float af[4] = {A[(m0 + g) * ars + (k0 + q) * acs], A[(m0 + g + 8) * ars + (k0 + q) * acs],
                       A[(m0 + g) * ars + (k0 + q + 4) * acs],
                       A[(m0 + g + 8) * ars + (k0 + q + 4) * acs]};
  const float bf[2] = {B[(k0 + q) * brs + (n0 + g) * bcs], B[(k0 + q + 4) * brs + (n0 + g) * bcs]};
  unsigned ah[4], bh[2];
#pragma unroll
  for (int i = 0; i < 4; ++i) ah[i] = to_tf32(af[i]);
#pragma unroll
  for (int i = 0; i < 2; ++i) bh[i] = to_tf32(bf[i]);
  unsigned al[4], bl[2];
#pragma unroll
  for (int i = 0; i < 4; ++i) al[i] = to_tf32(af[i] - __uint_as_float(ah[i]));
#pragma unroll
  for (int i = 0; i < 2; ++i) bl[i] = to_tf32(bf[i] - __uint_as_float(bh[i]));
  mma_tf32(c, al, bh);  // small terms first
  mma_tf32(c, ah, bl);
  mma_tf32(c, ah, bh);
}

// S[i][j] = decay[i] * S[i][j] + sum_t X[t][i] Y[t][j]: the 64 x 64 state as 32 tiles of 16 x 8,
// four per warp, each read, decayed, accumulated into and written back by its own warp.
__device__ void state_update(float* S, const float* decay, const float* X, const float* Y) {
  const int w = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
#pragma unroll
  for (int tile = w * 4; tile < w * 4 + 4; ++tile) {
    const int m0 = (tile >> 3) * 16, n0 = (tile & 7) * 8;
    float* r0 = S + (m0 + g) * LD + n0 + 2 * q;
    float* r1 = r0 + 8 * LD;
    const float d0 = decay[m0 + g], d1 = decay[m0 + g + 8];
    float c[4] = {d0 * r0[0], d0 * r0[1], d1 * r1[0], d1 * r1[1]};
    mma_tile(c, X, 1, LD, Y, LD, 1, m0, n0, 0);  // A(i, t) = X[t][i]
    mma_tile(c, X, 1, LD, Y, LD, 1, m0, n0, 8);
    r0[0] = c[0];
    r0[1] = c[1];
    r1[0] = c[2];
    r1[1] = c[3];
  }
}

// Copies a global [K, V] fp32 state tile into s.S (zero outside K x V), or zeros when src is null.
__device__ void load_state(float* S, const float* src, int K, int V, int ik, int iv) {
  for (int e = threadIdx.x; e < BK * BV; e += NTHREADS) {
    const int i = e / BV, j = e % BV;
    const int gi = ik * BK + i, gj = iv * BV + j;
    S[i * LD + j] = (src != nullptr && gi < K && gj < V) ? src[(long long)gi * V + gj] : 0.f;
  }
}

__device__ void store_state(const float* S, float* dst, int K, int V, int ik, int iv) {
  for (int e = threadIdx.x; e < BK * BV; e += NTHREADS) {
    const int i = e / BV, j = e % BV;
    const int gi = ik * BK + i, gj = iv * BV + j;
    if (gi < K && gj < V) dst[(long long)gi * V + gj] = S[i * LD + j];
  }
}

// Forward walk in sub-chunks of CS tokens. flags: GLA_FWD_OUTPUTS = compute outputs,
// GLA_FWD_PARALLEL = parallel over LC-chunks (grid x = B*H*NC; the state starts from hs[chunk],
// written by chunk_states).
// hs: [B, H, NC, K, V]; o_part: [NK, B, T, H, V]; ht: [B, H, K, V] or null.
template <typename T>
__device__ void chunk_fwd(const T* q, const T* k, const T* v, const float* g, const float* h0,
                          const float* hs, float* o_part, float* ht, int B, int Tn, int H, int K,
                          int V, float scale, int flags) {
  require_smem(sizeof(Tiles));
  Tiles& s = *reinterpret_cast<Tiles*>(dyn_smem);
  const int iv = blockIdx.y, ik = blockIdx.z;
  const int NC = (Tn + LC - 1) / LC;
  const bool parallel = flags & GLA_FWD_PARALLEL;
  const int bh = parallel ? blockIdx.x / NC : blockIdx.x;
  const int chunk = parallel ? blockIdx.x % NC : 0;
  const int b = bh / H, h = bh % H;
  const long long KV = (long long)K * V;
  const int t_begin = parallel ? chunk * LC : 0;
  const int t_end = parallel ? min(Tn, t_begin + LC) : Tn;

  load_state(s.S, parallel ? hs + ((long long)bh * NC + chunk) * KV
                           : (h0 != nullptr ? h0 + bh * KV : nullptr),
             K, V, ik, iv);
  // Warp w owns output columns n0..n0+7 of the V-tile; element e of its 16 x 8 accumulator is
  // token g + 8 (e / 2), column n0 + 2 q + e % 2.
  const int lane = threadIdx.x & 31, gq = lane >> 2, qq = lane & 3, n0 = (threadIdx.x >> 5) * 8;
  Fetch f;
  fetch(f, q, k, v, g, (const T*)nullptr, b, h, t_begin, Tn, H, K, V, ik, iv);
  for (int t0 = t_begin; t0 < t_end; t0 += CS) {
    __syncthreads();
    commit(s, nullptr, f, scale);
    if (t0 + CS < t_end) fetch(f, q, k, v, g, (const T*)nullptr, b, h, t0 + CS, Tn, H, K, V, ik, iv);
    if (flags & GLA_FWD_OUTPUTS) {
      compute_A(s, scale);
      __syncthreads();
      // o = qg S + A v  (qg and A carry the scale)
      float o[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int k0 = 0; k0 < BK; k0 += 8) mma_tile(o, s.qg, LD, 1, s.S, LD, 1, 0, n0, k0);
#pragma unroll
      for (int k0 = 0; k0 < CS; k0 += 8) mma_tile(o, s.A, CS, 1, s.v, LD, 1, 0, n0, k0);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int tg = t0 + gq + 8 * (e >> 1), gj = iv * BV + n0 + 2 * qq + (e & 1);
        if (tg < t_end && gj < V)
          o_part[(long long)ik * B * Tn * H * V + (((long long)b * Tn + tg) * H + h) * V + gj] =
              o[e];
      }
      __syncthreads();
    }
    state_update(s.S, s.decay, s.kd, s.v);
  }
  if (ht != nullptr) {
    __syncthreads();
    store_state(s.S, ht + bh * KV, K, V, ik, iv);
  }
}

// Backward walk in sub-chunks of CS tokens. flags: GLA_BWD_DQ = pass 1 (forward, dq),
// GLA_BWD_DKDV = pass 2 (reverse, dk and dv), GLA_BWD_PARALLEL = parallel over LC-chunks (states
// from hs, adjoints from dhs, both written by chunk_states; dhs[c] is the adjoint of the state at
// the end of chunk c).
// dh0 gets the adjoint of h0.
template <typename T>
__device__ void chunk_bwd(const T* q, const T* k, const T* v, const float* g, const float* h0,
                          const T* d_o, const float* dht, const float* hs, const float* dhs,
                          float* dq_part, float* dk_part, float* dv_part, float* dh0, int B,
                          int Tn, int H, int K, int V, float scale, int flags) {
  require_smem(sizeof(TilesBwd));
  TilesBwd& s = *reinterpret_cast<TilesBwd*>(dyn_smem);
  const int iv = blockIdx.y, ik = blockIdx.z;
  const int NC = (Tn + LC - 1) / LC;
  const bool parallel = flags & GLA_BWD_PARALLEL;
  const int bh = parallel ? blockIdx.x / NC : blockIdx.x;
  const int chunk = parallel ? blockIdx.x % NC : 0;
  const int b = bh / H, h = bh % H;
  const long long KV = (long long)K * V;
  const int t_begin = parallel ? chunk * LC : 0;
  const int t_end = parallel ? min(Tn, t_begin + LC) : Tn;
  const long long kpart = (long long)iv * B * Tn * H * K;
  const long long vpart = (long long)ik * B * Tn * H * V;
  // Warp w owns columns n0..n0+7 (state rows i for dq/dk, columns j for dv) of its 16 x 8
  // accumulators; element e is token g + 8 (e / 2), column n0 + 2 q + e % 2.
  const int lane = threadIdx.x & 31, gq = lane >> 2, qq = lane & 3, n0 = (threadIdx.x >> 5) * 8;

  if (flags & GLA_BWD_DQ) {
    load_state(s.f.S, parallel ? hs + ((long long)bh * NC + chunk) * KV
                               : (h0 != nullptr ? h0 + bh * KV : nullptr),
               K, V, ik, iv);
    Fetch f;
    fetch(f, q, k, v, g, d_o, b, h, t_begin, Tn, H, K, V, ik, iv);
    for (int t0 = t_begin; t0 < t_end; t0 += CS) {
      __syncthreads();
      commit(s.f, s.d_o, f, scale);
      if (t0 + CS < t_end) fetch(f, q, k, v, g, d_o, b, h, t0 + CS, Tn, H, K, V, ik, iv);
      compute_dA(s, scale);
      __syncthreads();
      // dq[t][i] = scale exp(b_t) (do_t S^T)[i] + sum_{u<=t} dA[t][u] k_u[i] exp(b_t - b_u)
      float dq[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int k0 = 0; k0 < BV; k0 += 8) mma_tile(dq, s.d_o, LD, 1, s.f.S, 1, LD, 0, n0, k0);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int t = gq + 8 * (e >> 1), c = n0 + 2 * qq + (e & 1);
        const float bt = s.f.b[t * LD + c];
        float acc = dq[e] * scale * __expf(bt);
        for (int u = 0; u <= t; ++u)
          acc += s.dA[t * CS + u] * s.f.k[u * LD + c] * __expf(bt - s.f.b[u * LD + c]);
        const int tg = t0 + t, gi = ik * BK + c;
        if (tg < t_end && gi < K)
          dq_part[kpart + (((long long)b * Tn + tg) * H + h) * K + gi] = acc;
      }
      __syncthreads();
      state_update(s.f.S, s.f.decay, s.f.kd, s.f.v);
    }
  }

  if (flags & GLA_BWD_DKDV) {
    __syncthreads();
    load_state(s.f.S, parallel ? dhs + ((long long)bh * NC + chunk) * KV
                               : (dht != nullptr ? dht + bh * KV : nullptr),
               K, V, ik, iv);
    const int last = t_begin + ((t_end - t_begin - 1) / CS) * CS;
    Fetch f;
    fetch(f, q, k, v, g, d_o, b, h, last, Tn, H, K, V, ik, iv);
    for (int t0 = last; t0 >= t_begin; t0 -= CS) {
      __syncthreads();
      commit(s.f, s.d_o, f, scale);
      if (t0 - CS >= t_begin) fetch(f, q, k, v, g, d_o, b, h, t0 - CS, Tn, H, K, V, ik, iv);
      compute_A(s.f, scale);
      compute_dA(s, scale);
      __syncthreads();
      // dk[u][i] = exp(b_last - b_u) (v_u dS^T)[i] + sum_{t>=u} dA[t][u] q_t[i] exp(b_t - b_u)
      float dk[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int k0 = 0; k0 < BV; k0 += 8)
        mma_tile(dk, s.f.v, LD, 1, s.f.S, 1, LD, 0, n0, k0);
      // dv[u][j] = (kd_u dS)[j] + sum_{t>=u} A[t][u] do_t[j]
      float dv[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int k0 = 0; k0 < BK; k0 += 8)
        mma_tile(dv, s.f.kd, LD, 1, s.f.S, LD, 1, 0, n0, k0);
#pragma unroll
      for (int k0 = 0; k0 < CS; k0 += 8)
        mma_tile(dv, s.f.A, 1, CS, s.d_o, LD, 1, 0, n0, k0);  // A'(u, t) = A[t][u]
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int u = gq + 8 * (e >> 1), c = n0 + 2 * qq + (e & 1);
        const float bu = s.f.b[u * LD + c];
        float acc = dk[e] * __expf(s.f.b[(CS - 1) * LD + c] - bu);
        for (int t = u; t < CS; ++t)
          acc += s.dA[t * CS + u] * s.f.q[t * LD + c] * __expf(s.f.b[t * LD + c] - bu);
        const int tg = t0 + u;
        const long long row = ((long long)b * Tn + tg) * H + h;
        if (tg < t_end && ik * BK + c < K) dk_part[kpart + row * K + ik * BK + c] = acc;
        if (tg < t_end && iv * BV + c < V) dv_part[vpart + row * V + iv * BV + c] = dv[e];
      }
      __syncthreads();
      state_update(s.f.S, s.f.decay, s.f.qg, s.d_o);
    }
    if (dh0 != nullptr) {
      __syncthreads();
      store_state(s.f.S, dh0 + bh * KV, K, V, ik, iv);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// chunk states (the sequential part of the `chunk` schedule)
// ---------------------------------------------------------------------------------------------
// Walks LC-token chunks with a 64 x 64 state tile held in registers as tensor-core accumulators
// (warp w owns tiles 4w .. 4w + 3 of 16 x 8). Per chunk c, with b the cumulative gate inside the
// chunk and B its total:
//   forward (reverse = 0):  stores S at the chunk start, then S = exp(B) S + (x exp(B - b))^T y
//                           with x = k, y = v;            at the end `last` = final state.
//   reverse (reverse = 1):  stores dS at the chunk end, then dS = exp(B) dS + (x exp(b))^T y
//                           with x = q, y = scale * do;   at the end `last` = d initial state.
// Every exponent is <= 0. states: [B, H, NC, K, V]. Grid: (B*H, ceil(V/64), ceil(K/64)).
struct StateTiles {
  float x[LC * LD];  // x weighted by its decay, [t][i]
  float y[LC * LD];  // [t][j]
  float tot[4 * BK];
  float decay[BK];
};

template <typename T>
__device__ void chunk_states(const T* x, const T* y, const float* g, const float* s0,
                             float* states, float* last, int B, int Tn, int H, int K, int V,
                             float yscale, int reverse) {
  __shared__ StateTiles s;
  const int bh = blockIdx.x, iv = blockIdx.y, ik = blockIdx.z;
  const int b = bh / H, h = bh % H;
  const int NC = (Tn + LC - 1) / LC;
  const long long KV = (long long)K * V;
  const int w = threadIdx.x >> 5, lane = threadIdx.x & 31, gq = lane >> 2, qq = lane & 3;
  const int c = threadIdx.x % BK, quarter = threadIdx.x / BK;  // loads: channel, 16 tokens
  constexpr int TPQ = LC / 4;                                   // tokens per quarter

  // Accumulator element e of tile p: row m0 + g + 8 (e / 2), column n0 + 2 q + e % 2.
  float acc[4][4];
#pragma unroll
  for (int p = 0; p < 4; ++p) {
    const int tile = w * 4 + p, m0 = (tile >> 3) * 16, n0 = (tile & 7) * 8;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int i = ik * BK + m0 + gq + 8 * (e >> 1), j = iv * BV + n0 + 2 * qq + (e & 1);
      acc[p][e] = (s0 != nullptr && i < K && j < V) ? s0[bh * KV + (long long)i * V + j] : 0.f;
    }
  }
  for (int step = 0; step < NC; ++step) {
    const int chunk = reverse ? NC - 1 - step : step;
    float* dst = states + ((long long)bh * NC + chunk) * KV;
#pragma unroll
    for (int p = 0; p < 4; ++p) {
      const int tile = w * 4 + p, m0 = (tile >> 3) * 16, n0 = (tile & 7) * 8;
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = ik * BK + m0 + gq + 8 * (e >> 1), j = iv * BV + n0 + 2 * qq + (e & 1);
        if (i < K && j < V) dst[(long long)i * V + j] = acc[p][e];
      }
    }
    // Load the chunk: thread (c, quarter) owns tokens quarter*16 .. +15 of channel c.
    const int i = ik * BK + c, j = iv * BV + c;
    float xr[TPQ], br[TPQ], run = 0.f;
#pragma unroll
    for (int r = 0; r < TPQ; ++r) {
      const int t = quarter * TPQ + r, tg = chunk * LC + t;
      const long long row = ((long long)b * Tn + tg) * H + h;
      const bool iok = tg < Tn && i < K, jok = tg < Tn && j < V;
      xr[r] = iok ? ld(x, row * K + i) : 0.f;
      run += iok ? g[row * K + i] : 0.f;
      br[r] = run;
      s.y[t * LD + c] = jok ? ld(y, row * V + j) * yscale : 0.f;
    }
    s.tot[quarter * BK + c] = run;
    __syncthreads();
    float before = 0.f, total = 0.f;
#pragma unroll
    for (int p = 0; p < 4; ++p) {
      const float v = s.tot[p * BK + c];
      before += p < quarter ? v : 0.f;
      total += v;
    }
#pragma unroll
    for (int r = 0; r < TPQ; ++r) {
      const float bt = before + br[r];
      s.x[(quarter * TPQ + r) * LD + c] = xr[r] * __expf(reverse ? bt : total - bt);
    }
    if (quarter == 0) s.decay[c] = __expf(total);
    __syncthreads();
#pragma unroll
    for (int p = 0; p < 4; ++p) {
      const int tile = w * 4 + p, m0 = (tile >> 3) * 16, n0 = (tile & 7) * 8;
      const float d0 = s.decay[m0 + gq], d1 = s.decay[m0 + gq + 8];
      acc[p][0] *= d0;
      acc[p][1] *= d0;
      acc[p][2] *= d1;
      acc[p][3] *= d1;
#pragma unroll
      for (int k0 = 0; k0 < LC; k0 += 8) mma_tile(acc[p], s.x, 1, LD, s.y, LD, 1, m0, n0, k0);
    }
    __syncthreads();
  }
  if (last != nullptr) {
#pragma unroll
    for (int p = 0; p < 4; ++p) {
      const int tile = w * 4 + p, m0 = (tile >> 3) * 16, n0 = (tile & 7) * 8;
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = ik * BK + m0 + gq + 8 * (e >> 1), j = iv * BV + n0 + 2 * qq + (e & 1);
        if (i < K && j < V) last[bh * KV + (long long)i * V + j] = acc[p][e];
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// gate gradient
// ---------------------------------------------------------------------------------------------
// dg[t] = sum_{s >= t} (q_s dq_s - k_s dk_s) + fterm, fterm[b,h,i] = sum_v S_T * dS_T (or 0).
// dq, dk: final fp32 gradients (scale included). Block: 8 warps x 32 channels; each warp owns
// 8 consecutive tokens of a 64-token tile, walked from the end. Grid: (B*H, ceil(K/32)).
template <typename T>
__device__ void gate_grad(const T* q, const T* k, const float* dq, const float* dk,
                          const float* fterm, float* dg, int B, int Tn, int H, int K) {
  __shared__ float tot[8][32];
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  const int bh = blockIdx.x, b = bh / H, h = bh % H;
  const int i = blockIdx.y * 32 + lane;
  const bool iok = i < K;
  float carry = (fterm != nullptr && iok) ? fterm[(long long)bh * K + i] : 0.f;
  const int ntile = (Tn + 63) / 64;
  for (int tile = ntile - 1; tile >= 0; --tile) {
    float d[8];
#pragma unroll
    for (int r = 0; r < 8; ++r) {
      const int t = tile * 64 + w * 8 + r;
      d[r] = 0.f;
      if (t < Tn && iok) {
        const long long e = (((long long)b * Tn + t) * H + h) * K + i;
        d[r] = ld(q, e) * dq[e] - ld(k, e) * dk[e];
      }
    }
#pragma unroll
    for (int r = 6; r >= 0; --r) d[r] += d[r + 1];
    tot[w][lane] = d[0];
    __syncthreads();
    float after = carry;
    for (int ww = w + 1; ww < 8; ++ww) after += tot[ww][lane];
#pragma unroll
    for (int r = 0; r < 8; ++r) {
      const int t = tile * 64 + w * 8 + r;
      if (t < Tn && iok) dg[(((long long)b * Tn + t) * H + h) * K + i] = d[r] + after;
    }
    for (int ww = 0; ww < 8; ++ww) carry += tot[ww][lane];
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------------------------
// entry points
// ---------------------------------------------------------------------------------------------
// Entry points, in the order of the launcher's kernel list (GLA in crates/ops/src/gla/kernels.rs).
#if WANT_KERNEL(0)
extern "C" __global__ void __launch_bounds__(R_WARPS * 32)
    ENTRY(gla_recurrent_fwd)(const input_t* q, const input_t* k, const input_t* v,
                             const float* g, const float* h0, float* o_part, float* ht, int B,
                             int Tn, int H, int K, int V, float scale) {
  recurrent_fwd<input_t>(q, k, v, g, h0, o_part, ht, B, Tn, H, K, V, scale);
}
#endif
#if WANT_KERNEL(1)
extern "C" __global__ void __launch_bounds__(R_WARPS * 32)
    ENTRY(gla_recurrent_bwd)(const input_t* q, const input_t* k, const input_t* v,
                             const float* g, const float* h0, const input_t* d_o,
                             const float* dht, float* dq_part, float* dk_part, float* dv_part,
                             float* dh0, int B, int Tn, int H, int K, int V, float scale) {
  recurrent_bwd<input_t>(q, k, v, g, h0, d_o, dht, dq_part, dk_part, dv_part, dh0, B, Tn, H, K,
                         V, scale);
}
#endif
#if WANT_KERNEL(2)
extern "C" __global__ void __launch_bounds__(NTHREADS, 2)
    ENTRY(gla_chunk_fwd)(const input_t* q, const input_t* k, const input_t* v, const float* g,
                         const float* h0, const float* hs, float* o_part, float* ht, int B,
                         int Tn, int H, int K, int V, float scale, int flags) {
  chunk_fwd<input_t>(q, k, v, g, h0, hs, o_part, ht, B, Tn, H, K, V, scale, flags);
}
#endif
#if WANT_KERNEL(3)
extern "C" __global__ void __launch_bounds__(NTHREADS, 2)
    ENTRY(gla_chunk_bwd)(const input_t* q, const input_t* k, const input_t* v, const float* g,
                         const float* h0, const input_t* d_o, const float* dht, const float* hs,
                         const float* dhs, float* dq_part, float* dk_part, float* dv_part,
                         float* dh0, int B, int Tn, int H, int K, int V, float scale, int flags) {
  chunk_bwd<input_t>(q, k, v, g, h0, d_o, dht, hs, dhs, dq_part, dk_part, dv_part, dh0, B, Tn, H,
                     K, V, scale, flags);
}
#endif
#if WANT_KERNEL(4)
extern "C" __global__ void __launch_bounds__(NTHREADS)
    ENTRY(gla_chunk_states)(const input_t* x, const input_t* y, const float* g, const float* s0,
                            float* states, float* last, int B, int Tn, int H, int K, int V,
                            float yscale, int reverse) {
  chunk_states<input_t>(x, y, g, s0, states, last, B, Tn, H, K, V, yscale, reverse);
}
#endif
#if WANT_KERNEL(5)
extern "C" __global__ void __launch_bounds__(256)
    ENTRY(gla_dg)(const input_t* q, const input_t* k, const float* dq, const float* dk,
                  const float* fterm, float* dg, int B, int Tn, int H, int K) {
  gate_grad<input_t>(q, k, dq, dk, fterm, dg, B, Tn, H, K);
}
#endif
