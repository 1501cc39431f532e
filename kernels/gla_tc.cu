// Gated linear attention, `chunk` schedule on tensor cores, for bf16 and fp16 inputs (the path
// training uses; fp32 inputs run the 3xTF32 kernels of kernels/gla.cu). History and
// measurements: docs/kernels.md.
//
//   S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t,   o_t = scale * q_t S_t
//   q, k, g: [B, T, H, K]   v, o: [B, T, H, V]   g: fp32 log gates (<= 0)   states fp32 in registers
//
// Prelude and compilation: `#include "common.cuh"` gives the element types, `to_f32`,
// `exp2_approx`, `require_smem` and the entry-point selection. The runtime (crates/cuda) compiles
// each entry point as its own NVRTC program per dtype (bf16, f16), with no CUDA headers and with
// subnormals flushed (--ftz=true); entry point i is guarded by `#if WANT_KERNEL(i)`, i its index
// in GLA_TC's kernel list in crates/ops/src/gla/kernels.rs. The launchers are in
// crates/ops/src/gla/tensor_core.rs.
//
// The chunked form (chunk C = 64 tokens, b = inclusive cumulative gate inside the chunk, b_L its
// last row, h_n the state entering chunk n, A the chunk's gated causal q k^T):
//   h_{n+1} = exp(b_L) h_n + (k exp(b_L - b))^T v                       states    (sequential)
//   o       = scale (q exp(b)) h_n + A v,  A_ts = scale sum_i q_ti k_si exp(b_ti - b_si), s <= t
//   dh_n    = exp(b_L) dh_{n+1} + scale (q exp(b))^T do                  states    (reverse)
//   dv      = A^T do + (k exp(b_L - b)) dh_{n+1}
//   dA      = scale do v^T (s <= t)
//   dq      = scale (do h_n^T) exp(b) + sum_{s<=t} dA_ts k_s exp(b_t - b_s)
//   dk      = (v dh_{n+1}^T) exp(b_L - b) + sum_{t>=s} dA_ts q_t exp(b_t - b_s)
//   dg_t    = sum_{s >= t in the chunk} (q_s dq_s - k_s dk_s)
//             + sum_{s in the chunk} k_s dk'_s + exp(b_L) sum_V h_n dh_{n+1}
//             (dk' = the state part of dk, (v dh_{n+1}^T) exp(b_L - b); see tc_bwd_dqk)
//
// Entry points, in launch order (grids: x, y, z):
//   gla_tc_attn         (chunks, B*H). Per chunk over its K-tiles: A [B*H, chunks, 64, 64] in the
//                       input dtype (zero above the diagonal), and the state products' operands
//                       qs = scale q exp(b), ks = k exp(b_L - b) ([B, T, H, K], input dtype) and
//                       the chunk decays exp(b_L) ([B*H, chunks, K] fp32). The later kernels read
//                       neither gates nor q and k, scan nothing and take no exps.
//   gla_tc_walk_o       K <= 128: (ceil(V / (16 warps)), B*H*segments). One walk over the chunks
//                       with the whole state in registers writes h_n per chunk ([B, H, chunks, K,
//                       V], input dtype), o = qs h_n + A v and the final state (fp32).
//   gla_tc_walk_dv      the same walk in reverse (backward): dh_{n+1} per chunk,
//                       dv = ks dh_{n+1} + A^T do, and dh_0.
//   gla_tc_bwd_dqk      (ceil(K/64), chunks, B*H): dq, dk (input dtype) and dg (fp32) per chunk.
//   gla_tc_states       the walk without outputs, a 64 x 64 state tile per block in registers,
//                       (ceil(V/64), ceil(K/64), B*H*segments): for K > 128 (or GPUs whose blocks
//                       cannot have the walk's shared memory), and as the end-state pre-walk of
//                       segmented walks (states null).
//   gla_tc_fwd_o / gla_tc_bwd_dv   (ceil(V/64), chunks, B*H): o and dv from the stored states,
//                       where gla_tc_states walked.
//   gla_tc_carry        (ceil(K V / 128), B*H): joins the segments' end states into each
//                       segment's start state and the final state, one element per thread.
//   gla_tc_fixup        (chunks, B*H): adds the carried state to the states of segments >= 1
//                       (gla_tc_states' segmented walks only).
//   *_wide              the output walks with 8 warps (128 V columns), three step buffers and one
//                       block per SM; the narrow ones have 4 warps (64 columns), two buffers and
//                       two blocks per SM. The launcher takes wide blocks where V > 64 and they
//                       walk in no more segments than narrow ones.
// Forward: attn, then walk_o; backward: walk_dv, then bwd_dqk. Everything the forward writes but
// o (states, A, qs, ks, decays) is kept for the backward. Few (batch, head) pairs and many chunks:
// a walk runs in segments in parallel (the launcher decides how many). For an output walk,
// gla_tc_states first walks the segments but the last from zero for their end states,
// gla_tc_carry joins them, and every segment then walks from its true start. gla_tc_states' own
// segmented walks write every state from a zero start, and gla_tc_fixup adds the carried state.
//
// Blocks and tiles: 128 threads (the wide walks 256); warp w owns rows 16 w .. 16 w + 15 of every
// 64-row product (the output walks: 16 V columns, with the state S^T for all K channels); 64 x 64
// tiles over K and V, zero-padded (any head dims). Tiles arrive by cp.async, all of a step at once
// (one round trip per step; rows not in 16-byte pieces take a synchronous element path);
// fragments by ldmatrix from shared rows of 72 elements (conflict-free); mma.sync m16n8k16 with
// fp32 accumulators. The output walk's state, packed to 16 bits, is the B fragment of x_out S, so
// it reaches the output product without shared memory. The walks load the next step (the wide
// output walk: the next two) while this one multiplies. Dynamic shared memory (static_asserts at
// the end), in bytes: StateSmem 37376, AttnSmem 38912, OutSmem 46080, DqkSmem 58624; the output
// walks at K = 128 111616 (narrow) and 195072 (wide). The kernels address a tile's rows with
// 32-bit offsets from one 64-bit base: the launcher rejects shapes where 64 tokens span 2^31
// elements or more.
//
// Numerics. Cumulative gates are kept in log2 units (every exp is a bare ex2), and every exponent
// taken is <= 0 except inside the diagonal blocks below. Intra-chunk products (A, and the
// dA-weighted sums of dq and dk) are rebased per 16-token block: for the rows of block w the
// reference is r = b at the block's first token (dk's sums: its last; see tc_bwd_dqk), so
// q exp(b_t - r) <= 1 and, for s in earlier blocks, k exp(r - b_s) <= 1. Inside the diagonal
// block k exp(r - b_s) can exceed 1 by at most exp(span), span = b_first - b_last of the block;
// where a channel's span exceeds SPAN_LIMIT its diagonal terms are taken exactly (an exp per
// pair, out of line) instead. These products take fp32 operands split into two bf16 halves
// (x = hi + lo, three mma: fp32-like accuracy and range); the state products (qs h, A v, ks dh,
// ...) take input-dtype operands, and fp32 boundary states given by the caller (h0, dht) enter as
// hi + lo halves. Everything accumulates in fp32. The chunk states are kept in the input dtype
// (as FLA does), and the walks go on from the rounded states they store, so the backward is the
// exact gradient of one slightly perturbed function; dg takes its boundary terms from the same
// states that dq and dk use, so their rounding does not show as a cancellation error. Every
// output and gradient of every test shape is within 2x of the naive same-precision computation
// (crates/ops/tests/cuda_gla.rs).
//
// Invariants:
//   - NVRTC's Quick and Full compile tiers (crates/cuda/src/compile.rs) must give bit-identical
//     results (crates/ops/tests/cuda_tiers.rs): write any multiply-add that has a choice of
//     products as an explicit fmaf.
//   - The shared-memory sizes the launchers pass (tensor_core.rs) must match the static_asserts
//     at the end of this file; a kernel given less traps.
//
// Measured (H100 80GB HBM3, bf16, bench/results/gla-h100-2026-11-26-v26-tiered.json; fastest of
// three rounds' medians, each call queued behind a 256 MiB write as Triton's do_bench does;
// fwd+bwd = forward + o.backward(do)), fwd / fwd+bwd ms: 8 x 2048 x 16 x D 0.159 / 0.420 (D = 32),
// 0.188 / 0.465 (64), 0.357 / 0.974 (128); at D = 128 4 x 4096 0.383 / 1.016, 2 x 8192
// 0.423 / 1.102, 1 x 16384 0.432 / 1.122. That is 0.17x to 0.28x flash-linear-attention's
// chunk_gla (bench/anchors.json) and 2.6x to 2.95x the memory floor at D = 128 (the file's
// `floor`). First call with empty caches, compilation included: 0.94 s (Quick tier; the Full
// tier took over at 1.83 s).

#include "common.cuh"

#define TC_C 64          // chunk length (tokens)
#define TC_T 64          // K / V tile
#define TC_THREADS 128
#define LDF 72           // fp32 row stride of shared tiles (float2 fragment loads conflict-free)
#define LDH 72           // 16-bit row stride (144-byte rows: ldmatrix conflict-free)
#define SPAN_LIMIT 86.f  // largest in-block gate span taken through rebased products (log2 units,
                         // ~60 nats)
// Two floats as one register of two 16-bit values (lo in the low half), rounded to nearest.
__device__ __forceinline__ unsigned pack_bf16(float lo, float hi) {
  unsigned r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}
__device__ __forceinline__ unsigned pack_f16(float lo, float hi) {
  unsigned r;
  asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}

// The two 16-bit values of a packed register (Op<T>::pack) as fp32.
template <typename T>
__device__ __forceinline__ float lo_half(unsigned p) {
  T a;
  a.bits = (u16)(p & 0xffffu);
  return to_f32(a);
}
template <typename T>
__device__ __forceinline__ float hi_half(unsigned p) {
  T a;
  a.bits = (u16)(p >> 16);
  return to_f32(a);
}

// Elements of a 16-bit shared tile (row stride LDH) as fp32: one, or the pair at (r, c), (r, c + 1)
// (c even: one 32-bit load).
template <typename T>
__device__ __forceinline__ float elem(const u16* X, int r, int c) {
  T a;
  a.bits = X[r * LDH + c];
  return to_f32(a);
}
template <typename T>
__device__ __forceinline__ float2 pair(const u16* X, int r, int c) {
  const unsigned w = *reinterpret_cast<const unsigned*>(X + r * LDH + c);
  return make_float2(lo_half<T>(w), hi_half<T>(w));
}

// D += A B, m16n8k16, fp32 accumulators. Fragment layouts (g = lane / 4, c = lane % 4):
//   a[0] = A(g, 2c..2c+1)  a[1] = A(g+8, 2c..)  a[2] = A(g, 2c+8..)  a[3] = A(g+8, 2c+8..)
//   b[0] = B(2c..2c+1, g)  b[1] = B(2c+8.., g)
//   d[0..1] = D(g, 2c..2c+1)  d[2..3] = D(g+8, 2c..2c+1)
__device__ __forceinline__ void mma_bf16(float d[4], const unsigned a[4], unsigned b0,
                                         unsigned b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void mma_f16(float d[4], const unsigned a[4], unsigned b0,
                                        unsigned b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// The input dtype's tensor-core operations.
template <typename T> struct Op;
template <> struct Op<bf16> {
  static __device__ __forceinline__ unsigned pack(float lo, float hi) { return pack_bf16(lo, hi); }
  static __device__ __forceinline__ void mma(float d[4], const unsigned a[4], unsigned b0,
                                             unsigned b1) {
    mma_bf16(d, a, b0, b1);
  }
};
template <> struct Op<f16> {
  static __device__ __forceinline__ unsigned pack(float lo, float hi) { return pack_f16(lo, hi); }
  static __device__ __forceinline__ void mma(float d[4], const unsigned a[4], unsigned b0,
                                             unsigned b1) {
    mma_f16(d, a, b0, b1);
  }
};

// x = hi + lo in bf16 pairs (about 16 significant bits, fp32 range).
struct Split {
  unsigned hi, lo;
};
__device__ __forceinline__ Split split(float x0, float x1) {
  Split s;
  s.hi = pack_bf16(x0, x1);
  const float h0 = __uint_as_float(s.hi << 16), h1 = __uint_as_float(s.hi & 0xffff0000u);
  s.lo = pack_bf16(x0 - h0, x1 - h1);
  return s;
}

// D += A B with split operands: lo*hi + hi*lo + hi*hi (the lo*lo term is below fp32 rounding of
// the bf16 pair's precision).
__device__ __forceinline__ void mma_split(float d[4], const Split a[4], Split b0, Split b1) {
  const unsigned ahi[4] = {a[0].hi, a[1].hi, a[2].hi, a[3].hi};
  const unsigned alo[4] = {a[0].lo, a[1].lo, a[2].lo, a[3].lo};
  mma_bf16(d, alo, b0.hi, b1.hi);
  mma_bf16(d, ahi, b0.lo, b1.lo);
  mma_bf16(d, ahi, b0.hi, b1.hi);
}

// The shared-window address of p (through the builtin, so that the compiler folds the offset
// arithmetic into 32-bit shared addresses instead of converting a generic 64-bit pointer).
__device__ __forceinline__ unsigned smem_addr(const void* p) {
  return (unsigned)__cvta_generic_to_shared(p);
}

__device__ __forceinline__ void ldsm_x4(unsigned r[4], const u16* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldsm_x4_t(unsigned r[4], const u16* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// Fragments from 16-bit shared tiles (row stride LDH). The names say how the tile is stored:
// `mk` holds A as [m][k], `km` as [k][m]; `nk` holds B as [n][k], `kn` as [k][n]. The B loaders
// fetch two n-tiles at once: b[0..1] for columns n0..n0+7, b[2..3] for n0+8..n0+15.
__device__ __forceinline__ void a_mk(unsigned a[4], const u16* X, int m0, int k0) {
  const int lane = threadIdx.x & 31;
  ldsm_x4(a, X + (m0 + (lane & 15)) * LDH + k0 + (lane >> 4) * 8);
}
__device__ __forceinline__ void a_km(unsigned a[4], const u16* X, int m0, int k0) {
  const int lane = threadIdx.x & 31;
  ldsm_x4_t(a, X + (k0 + (lane & 7) + ((lane >> 4) << 3)) * LDH + m0 + ((lane >> 3) & 1) * 8);
}
__device__ __forceinline__ void b_nk(unsigned b[4], const u16* X, int k0, int n0) {
  const int lane = threadIdx.x & 31;
  ldsm_x4(b, X + (n0 + (lane & 7) + ((lane >> 4) << 3)) * LDH + k0 + ((lane >> 3) & 1) * 8);
}
__device__ __forceinline__ void b_kn(unsigned b[4], const u16* X, int k0, int n0) {
  const int lane = threadIdx.x & 31;
  ldsm_x4_t(b, X + (k0 + (lane & 7) + ((lane >> 3) & 1) * 8) * LDH + n0 + (lane >> 4) * 8);
}

// acc[8][4] += A (16 x 64 k, rows m0..) * B (64 k x 64 n) over k in [k_begin, k_end).
template <typename T, bool A_KM, bool B_KN>
__device__ __forceinline__ void warp_gemm(float acc[8][4], const u16* A, const u16* B, int m0,
                                          int k_begin = 0, int k_end = 64) {
#pragma unroll
  for (int k0 = 0; k0 < 64; k0 += 16) {
    if (k0 < k_begin || k0 >= k_end) continue;
    unsigned a[4];
    if (A_KM) a_km(a, A, m0, k0); else a_mk(a, A, m0, k0);
#pragma unroll
    for (int n = 0; n < 4; ++n) {
      unsigned b[4];
      if (B_KN) b_kn(b, B, k0, 16 * n); else b_nk(b, B, k0, 16 * n);
      Op<T>::mma(acc[2 * n], a, b[0], b[1]);
      Op<T>::mma(acc[2 * n + 1], a, b[2], b[3]);
    }
  }
}

__device__ __forceinline__ void zero(float acc[8][4]) {
#pragma unroll
  for (int n = 0; n < 8; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[n][e] = 0.f;
}

// Row (relative to the warp's 16) and column of accumulator element e of n-tile n.
__device__ __forceinline__ int acc_row(int e) { return ((threadIdx.x & 31) >> 2) + 8 * (e >> 1); }
__device__ __forceinline__ int acc_col(int n, int e) {
  return 8 * n + 2 * (threadIdx.x & 3) + (e & 1);
}

// ---------------------------------------------------------------------------------------------
// tile loads
// ---------------------------------------------------------------------------------------------
// A [64 rows x 64 columns] tile of a [rows, H, D] tensor: row r at x + (row0 + r * H) * D, columns
// col0 .., zero past `nrows` rows and D columns. Where rows are 16-byte aligned (D % 8 == 0 for
// 16-bit data, K % 4 == 0 for gates) the copies are asynchronous (cp.async, zero-filled outside
// the tensor): every tile of a step is in flight at once, and `copies_done` waits for them all.
// Other sizes take a synchronous element-by-element path into the same layout.

// An invalid copy reads nothing (source size 0) and zero-fills: its address is never dereferenced.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 16 : 0));
}

// Waits for this thread's copies, then for every thread's (a barrier).
__device__ __forceinline__ void copies_done() {
  asm volatile("cp.async.wait_all;" ::: "memory");
  __syncthreads();
}

// Closes this thread's copies issued since the last commit into one group.
__device__ __forceinline__ void copies_commit() {
  asm volatile("cp.async.commit_group;" ::: "memory");
}

// Waits until at most `pending` of this thread's latest groups are still in flight, then for
// every thread (a barrier).
template <int pending>
__device__ __forceinline__ void copies_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(pending) : "memory");
  __syncthreads();
}

// Element by element, for rows not in whole 16-byte pieces (x: 16-bit elements if `wide` is
// false, fp32 otherwise); rare, so out of line: the kernels' common paths stay small (a shorter
// compile) and free of it.
__device__ __noinline__ void copy_tile_slow(void* dst, const void* base, int nrows, int stride,
                                            int D, int col0, int ld, bool wide) {
  for (int e = threadIdx.x; e < 64 * 64; e += blockDim.x) {
    const int r = e >> 6, c = e & 63;
    const bool ok = r < nrows && col0 + c < D;
    if (wide)
      static_cast<float*>(dst)[r * ld + c] = ok ? static_cast<const float*>(base)[r * stride + c] : 0.f;
    else
      static_cast<u16*>(dst)[r * ld + c] = ok ? static_cast<const u16*>(base)[r * stride + c] : (u16)0;
  }
}

// One 64-bit base per call; each thread's rows then sit at 32-bit multiples of the row stride
// (a tile spans 64 rows of a [rows, H, D] tensor: 64 H D < 2^31 elements, checked by the launcher).
template <typename T, int NT = TC_THREADS>
__device__ void copy_tile(u16* dst, const T* x, long long row0, int nrows, int H, int D, int col0) {
  const u16* base = reinterpret_cast<const u16*>(x) + row0 * D + col0;
  const int stride = H * D;
  if (D % 8 == 0) {
    constexpr int ROWS = NT / 8;  // rows per pass
    const int r = threadIdx.x >> 3, c = (threadIdx.x & 7) * 8;
    const bool col_ok = col0 + c < D;
    const u16* src = base + r * stride + c;
#pragma unroll
    for (int it = 0; it < 64 / ROWS; ++it)
      cp_async16(dst + (r + ROWS * it) * LDH + c, src + it * ROWS * stride,
                 col_ok && r + ROWS * it < nrows);
  } else {
    copy_tile_slow(dst, base, nrows, stride, D, col0, LDH, false);
  }
}

// The chunk's raw gates, channels col0 .. col0 + 63 (zero past the sequence and K).
__device__ void copy_gates(float* bs, const float* g, long long row0, int nrows, int H, int K,
                           int col0) {
  const float* base = g + row0 * K + col0;
  const int stride = H * K;
  if (K % 4 == 0) {
    const int r = threadIdx.x >> 4, c = (threadIdx.x & 15) * 4;
    const bool col_ok = col0 + c < K;
    const float* src = base + r * stride + c;
#pragma unroll
    for (int it = 0; it < 8; ++it)
      cp_async16(bs + (r + 8 * it) * LDF + c, src + it * 8 * stride, col_ok && r + 8 * it < nrows);
  } else {
    copy_tile_slow(bs, base, nrows, stride, K, col0, LDF, true);
  }
}

// In place: raw gates to their inclusive cumulative sum over the chunk's tokens, in log2 units
// (times log2 e: every use is an exp, taken as a bare ex2) (padding rows then repeat the last
// valid row, so row 63 is the chunk total). Thread (cg, rg) sums channels
// 4 cg .. 4 cg + 3 of rows 8 rg .. 8 rg + 7, then adds the totals of the row groups before it.
// Call after copies_done(); ends with a barrier. `tot`: 8 x 64 floats.
__device__ void cumsum_gates(float* bs, float* tot) {
  const int cg = threadIdx.x & 15, rg = threadIdx.x >> 4, c = 4 * cg;
  float4 x[8];
#pragma unroll
  for (int r = 0; r < 8; ++r) {
    x[r] = *reinterpret_cast<const float4*>(bs + (8 * rg + r) * LDF + c);
    if (r > 0) {
      x[r].x += x[r - 1].x;
      x[r].y += x[r - 1].y;
      x[r].z += x[r - 1].z;
      x[r].w += x[r - 1].w;
    }
  }
  *reinterpret_cast<float4*>(tot + rg * 64 + c) = x[7];
  __syncthreads();
  float4 before = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
  for (int p = 0; p < 7; ++p) {
    if (p >= rg) break;
    const float4 u = *reinterpret_cast<const float4*>(tot + p * 64 + c);
    before.x += u.x;
    before.y += u.y;
    before.z += u.z;
    before.w += u.w;
  }
#pragma unroll
  for (int r = 0; r < 8; ++r)
    *reinterpret_cast<float4*>(bs + (8 * rg + r) * LDF + c) =
        make_float4((x[r].x + before.x) * LOG2E, (x[r].y + before.y) * LOG2E,
                    (x[r].z + before.z) * LOG2E, (x[r].w + before.w) * LOG2E);
  __syncthreads();
}

// An fp32 [rows][D] tile (row r at src + r * D, columns col0 ..) as hi + lo tiles of the input
// dtype, zero-padded: the boundary states given in fp32 (h0, dht) keep their precision.
template <typename T>
__device__ __noinline__ void load_split(u16* hi, u16* lo, const float* src, int nrows, int D, int col0) {
  for (int e = threadIdx.x; e < 64 * 32; e += TC_THREADS) {
    const int r = e >> 5, c = (e & 31) * 2;
    float x0 = 0.f, x1 = 0.f;
    if (r < nrows) {
      if (col0 + c < D) x0 = src[(long long)r * D + col0 + c];
      if (col0 + c + 1 < D) x1 = src[(long long)r * D + col0 + c + 1];
    }
    const unsigned p = Op<T>::pack(x0, x1);
    *reinterpret_cast<unsigned*>(hi + r * LDH + c) = p;
    *reinterpret_cast<unsigned*>(lo + r * LDH + c) =
        Op<T>::pack(x0 - lo_half<T>(p), x1 - hi_half<T>(p));
  }
}

// Channels of the 16-token block at row r0 whose gate span exceeds SPAN_LIMIT, as a 64-bit mask
// (the same value in every lane of the warp).
__device__ __forceinline__ unsigned long long wide_spans(const float* bs, int r0) {
  const int lane = threadIdx.x & 31;
  const float* first = bs + r0 * LDF;
  const float* last = bs + (r0 + 15) * LDF;
  const unsigned lo = __ballot_sync(0xffffffffu, first[lane] - last[lane] > SPAN_LIMIT);
  const unsigned hi = __ballot_sync(0xffffffffu, first[lane + 32] - last[lane + 32] > SPAN_LIMIT);
  return ((unsigned long long)hi << 32) | lo;
}

// The exact (one exp per pair) diagonal-block terms of the channels in `wide`, whose gate span is
// too large to rebase. Rare, so kept out of line: the common path stays small.
template <typename T>
__device__ __noinline__ float wide_pair(const u16* qh, const u16* kh, const float* bs,
                                        unsigned long long wide, int t, int s) {
  float x = 0.f;
#pragma unroll 1
  for (unsigned long long m = wide; m != 0ull; m &= m - 1ull) {
    const int i = __ffsll((long long)m) - 1;
    x += elem<T>(qh, t, i) * elem<T>(kh, s, i) * exp2_approx(bs[t * LDF + i] - bs[s * LDF + i]);
  }
  return x;
}

// The exact diagonal-block sum of a fixed token f over its partners p = lo .. hi,
//   sum_p dA[t][s] x[p][i] exp(b[t][i] - b[s][i]),
// with (t, s) = (f, p) for dq (x = k, partners earlier) or (p, f) for dk (x = q, partners later).
template <typename T>
__device__ __noinline__ float wide_sum(const float* dA, const u16* x, const float* bs, int f,
                                       int lo, int hi, int i, bool later) {
  float acc = 0.f;
#pragma unroll 1
  for (int p = lo; p <= hi; ++p) {
    const int t = later ? p : f, s = later ? f : p;
    acc += dA[t * LDF + s] * elem<T>(x, p, i) * exp2_approx(bs[t * LDF + i] - bs[s * LDF + i]);
  }
  return acc;
}

// The wide-channel terms of a warp's 16 x 64 accumulator block (rows r0 .., zero where the
// channel is not in `wide`): dq's (x = k, later false) or dk's (x = q, later true). Into a local
// array, so that the caller's accumulators keep no address and the common path stays in
// registers; one call site instead of 32 unrolled ones (which made up 18% of the kernel's code).
template <typename T>
__device__ __noinline__ void wide_terms(float fix[8][4], const float* dA, const u16* x,
                                        const float* bs, int r0, unsigned long long wide,
                                        bool later) {
#pragma unroll 1
  for (int nn = 0; nn < 8; ++nn)
#pragma unroll 1
    for (int e = 0; e < 4; ++e) {
      const int row = r0 + acc_row(e), i = acc_col(nn, e);
      fix[nn][e] = ((wide >> i) & 1ull) != 0ull
                       ? wide_sum<T>(dA, x, bs, row, later ? row : r0, later ? r0 + 15 : row, i, later)
                       : 0.f;
    }
}

// ---------------------------------------------------------------------------------------------
// A = scale * causal(q k^T with gates): one K-tile's contribution to the warp's 16 rows
// ---------------------------------------------------------------------------------------------
// qh, kh: q and k of the chunk (16-bit tiles), bs: cumulative gates (this K-tile). Rows of block w are
// rebased to r = bs[16 w]: a = q exp(b_t - r) (<= 1), b = k exp(r - b_s) for s <= 16 w + 15.
// Columns past the diagonal block stay zero; the caller masks s > t and applies the scale.
template <typename T>
__device__ void accumulate_A(float acc[8][4], const u16* qh, const u16* kh, const float* bs) {
  const int w = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
  const int r0 = 16 * w;
  const unsigned long long wide = wide_spans(bs, r0);
#pragma unroll 1
  for (int k0 = 0; k0 < 64; k0 += 16) {
    const int ch[4] = {k0 + 2 * c, k0 + 2 * c + 1, k0 + 2 * c + 8, k0 + 2 * c + 9};
    float ref[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) ref[u] = bs[r0 * LDF + ch[u]];
    Split a[4];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
#pragma unroll
      for (int rr = 0; rr < 2; ++rr) {
        const int t = r0 + g + 8 * rr, u0 = 2 * half;
        const float2 qv = pair<T>(qh, t, ch[u0]);
        const float2 bv = *reinterpret_cast<const float2*>(bs + t * LDF + ch[u0]);
        a[rr + 2 * half] = split(qv.x * exp2_approx(bv.x - ref[u0]), qv.y * exp2_approx(bv.y - ref[u0 + 1]));
      }
    }
#pragma unroll
    for (int n = 0; n < 8; ++n) {
      if (n > 2 * w + 1) continue;
      const int s = 8 * n + g;
      const bool diag = n >= 2 * w;
      float kv[4];
#pragma unroll
      for (int u = 0; u < 4; u += 2) {
        const float2 k2 = pair<T>(kh, s, ch[u]);
        const float2 b2 = *reinterpret_cast<const float2*>(bs + s * LDF + ch[u]);
        kv[u] = k2.x * exp2_approx(ref[u] - b2.x);
        kv[u + 1] = k2.y * exp2_approx(ref[u + 1] - b2.y);
      }
      if (diag) {
#pragma unroll
        for (int u = 0; u < 4; ++u)
          if ((wide >> ch[u]) & 1ull) kv[u] = 0.f;
      }
      mma_split(acc[n], a, split(kv[0], kv[1]), split(kv[2], kv[3]));
    }
  }
  // Channels too wide to rebase: their diagonal-block terms, one exp per pair.
  if (wide != 0ull) {
#pragma unroll
    for (int n = 0; n < 8; ++n) {
      if (n != 2 * w && n != 2 * w + 1) continue;
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int t = r0 + acc_row(e), s = acc_col(n, e);
        if (s <= t) acc[n][e] += wide_pair<T>(qh, kh, bs, wide, t, s);
      }
    }
  }
}

// Zeroes s > t and applies the scale (the warp's 16 rows of A).
__device__ __forceinline__ void finish_A(float acc[8][4], float scale) {
  const int r0 = 16 * (threadIdx.x >> 5);
#pragma unroll
  for (int n = 0; n < 8; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e)
      acc[n][e] = acc_col(n, e) <= r0 + acc_row(e) ? acc[n][e] * scale : 0.f;
}

// Stores the warp's 16 x 64 accumulator rows (rows r0 .. of the tile) into a [rows, H, D] tensor,
// row r at out + (row0 + r * H) * D, columns col0 ..; rows past `nrows` and columns past D skipped.
template <typename T>
__device__ __forceinline__ void store_rows(T* out, const float acc[8][4], long long row0,
                                           int nrows, int H, int D, int col0) {
  const int lane = threadIdx.x & 31, c = col0 + 2 * (lane & 3);
  const int r = 16 * (threadIdx.x >> 5) + (lane >> 2);
  u16* base = reinterpret_cast<u16*>(out) + row0 * D + c;
  const bool whole = D % 2 == 0 && col0 + 64 <= D;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int rr = r + 8 * half;
    if (rr >= nrows) continue;
    u16* dst = base + rr * H * D;
#pragma unroll
    for (int n = 0; n < 8; ++n) {
      const unsigned p = Op<T>::pack(acc[n][2 * half], acc[n][2 * half + 1]);
      if (whole) {
        *reinterpret_cast<unsigned*>(dst + 8 * n) = p;
      } else {
        const int cc = c + 8 * n;
        if (cc < D) dst[8 * n] = (u16)(p & 0xffffu);
        if (cc + 1 < D) dst[8 * n + 1] = (u16)(p >> 16);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// chunk states
// ---------------------------------------------------------------------------------------------
// Grid (ceil(V/64), ceil(K/64), B*H). The 64 x 64 state tile lives in registers (warp w: rows
// 16 w .. of the K-tile). Per chunk n (in reverse order for the adjoint), with x already scaled
// by tc_attn (ks = k exp(b_L - b), qs = scale q exp(b)) and d = exp(b_L):
//   forward:  states[n] = h_n (input dtype);  h = d h + ks^T v
//   reverse:  states[n] = dh_{n+1};           dh = d dh + qs^T do
// `last` (fp32): the final state, or dh_0; `states` null: end states only (the segments'
// end states for tc_walk_out). Every tile of a step arrives by cp.async into one of
// two buffers while the previous step multiplies: one barrier per step.
struct StateSmem {
  u16 x[2][TC_C * LDH];
  u16 y[2][TC_C * LDH];
  float decay[2][TC_T];
};

// A 4-byte copy, zero-filled when invalid (its address is then never dereferenced).
__device__ __forceinline__ void cp_async4(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 4 : 0));
}

template <typename T>
__device__ void tc_states(const T* x, const T* y, const float* decay, const float* s0, T* states,
                          float* last, float* seg_last, float* seg_decay, float* cum, int seg_len,
                          int Tn, int H, int K, int V, int reverse) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  StateSmem& sm = *reinterpret_cast<StateSmem*>(smem_raw);
  const int NT = (Tn + TC_C - 1) / TC_C, S = (NT + seg_len - 1) / seg_len;
  const int iv = blockIdx.x, ik = blockIdx.y, bh = blockIdx.z / S, seg = blockIdx.z % S;
  const int b = bh / H, h = bh % H;
  // End states only (for tc_walk_out): the last segment's end is the final state, which
  // tc_walk_out's own walk of that segment reaches.
  if (states == nullptr && seg == S - 1) return;
  const int first = seg * seg_len, end = min(NT, first + seg_len);
  const bool writes_decay = iv == 0 && (threadIdx.x & 3) == 0;
  const long long KV = (long long)K * V;
  const int w = threadIdx.x >> 5, r0 = 16 * w, g8 = (threadIdx.x & 31) >> 2;
  const int col_k = ik * TC_T, col_v = iv * TC_T, krows = min(TC_T, K - col_k);

  float acc[8][4];
#pragma unroll
  for (int n = 0; n < 8; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int i = col_k + r0 + acc_row(e), j = col_v + acc_col(n, e);
      acc[n][e] = (seg == 0 && s0 != nullptr && i < K && j < V)
                      ? s0[bh * KV + (long long)i * V + j]
                      : 0.f;
    }
  // Decay from the segment's start to the current chunk, for the rows g and g + 8 of this lane.
  float run[2] = {1.f, 1.f};

  auto issue = [&](int step) {
    const int n = reverse ? NT - 1 - step : step;
    const int t0 = n * TC_C, nrows = min(TC_C, Tn - t0);
    const long long row0 = (long long)b * Tn * H + (long long)t0 * H + h;
    copy_tile(sm.x[step & 1], x, row0, nrows, H, K, col_k);
    copy_tile(sm.y[step & 1], y, row0, nrows, H, V, col_v);
    if (threadIdx.x < TC_T)
      cp_async4(&sm.decay[step & 1][threadIdx.x],
                decay + ((long long)bh * NT + n) * K + col_k + threadIdx.x, threadIdx.x < krows);
  };
  issue(first);
  for (int step = first; step < end; ++step) {
    const int n = reverse ? NT - 1 - step : step;
    // This step's tiles are in, and every warp is done with the other buffer.
    copies_done();
    if (step + 1 < end) issue(step + 1);
    if (states != nullptr)
      store_rows<T>(states + ((long long)bh * NT + n) * KV + (long long)col_k * V, acc, 0, krows,
                    1, V, col_v);
    if (cum != nullptr && writes_decay) {
#pragma unroll
      for (int u = 0; u < 2; ++u) {
        const int i = r0 + g8 + 8 * u;
        if (i < krows) cum[((long long)bh * NT + n) * K + col_k + i] = run[u];
      }
    }
    // The walk goes on from the stored (rounded) state, which the chunk's outputs and gradients
    // use: the backward is then the exact gradient of one slightly perturbed function. The first
    // step keeps an fp32 initial state as given.
    if (step > 0) {
#pragma unroll
      for (int nn = 0; nn < 8; ++nn)
#pragma unroll
        for (int e = 0; e < 4; e += 2) {
          const unsigned p = Op<T>::pack(acc[nn][e], acc[nn][e + 1]);
          acc[nn][e] = lo_half<T>(p);
          acc[nn][e + 1] = hi_half<T>(p);
        }
    }
    const float d0 = sm.decay[step & 1][r0 + g8], d1 = sm.decay[step & 1][r0 + g8 + 8];
    run[0] *= d0;
    run[1] *= d1;
#pragma unroll
    for (int nn = 0; nn < 8; ++nn) {
      acc[nn][0] *= d0;
      acc[nn][1] *= d0;
      acc[nn][2] *= d1;
      acc[nn][3] *= d1;
    }
    warp_gemm<T, true, true>(acc, sm.x[step & 1], sm.y[step & 1], r0);
  }
  // Unsegmented, the walk's end state is `last`; segmented, it goes to seg_last with the
  // segment's decay, for tc_carry.
  float* out = seg_last != nullptr ? seg_last + ((long long)bh * S + seg) * KV
                                   : (last != nullptr ? last + bh * KV : nullptr);
  if (out != nullptr) {
#pragma unroll
    for (int n = 0; n < 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = col_k + r0 + acc_row(e), j = col_v + acc_col(n, e);
        if (i < K && j < V) out[(long long)i * V + j] = acc[n][e];
      }
  }
  if (seg_last != nullptr && writes_decay) {
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      const int i = r0 + g8 + 8 * u;
      if (i < krows) seg_decay[((long long)bh * S + seg) * K + col_k + i] = run[u];
    }
  }
}

// Segmented walks (few (batch, head) pairs, long sequences): every segment of seg_len chunks
// walks from a zero state in parallel (tc_states), then tc_carry walks the S segments per state
// element, C_0 = 0, C_{s+1} = seg_decay_s C_s + seg_last_s (segment 0 starts from s0), writing
// C_s and, at the end, `last` (null: the last segment's end is not wanted and was not walked);
// tc_fixup adds cum_n C_s to every state of segment s >= 1.
// Carry grid (ceil(K V / 128), B*H): one state element per thread.
__device__ void tc_carry(const float* seg_last, const float* seg_decay, float* carry, float* last,
                         int S, int K, int V) {
  const int bh = blockIdx.y, KV = K * V, e = blockIdx.x * TC_THREADS + threadIdx.x;
  if (e >= KV) return;
  const int i = e / V;
  float c = 0.f;
  for (int seg = 0; seg < S; ++seg) {
    const long long at = (long long)bh * S + seg;
    if (seg > 0) carry[at * KV + e] = c;
    if (seg == S - 1 && last == nullptr) return;
    c = seg_decay[at * K + i] * c + seg_last[at * KV + e];
  }
  if (last != nullptr) last[(long long)bh * KV + e] = c;
}

// Grid (chunks, B*H): states[n] += cum[n] (rows) * carry[segment of n], for segments >= 1; eight
// elements per thread and step where rows hold whole 16-byte groups (V % 8 == 0).
template <typename T>
__device__ void tc_fixup(T* states, const float* cum, const float* carry, int seg_len, int Tn,
                         int K, int V, int reverse) {
  const int n = blockIdx.x, bh = blockIdx.y;
  const int NT = (Tn + TC_C - 1) / TC_C, S = (NT + seg_len - 1) / seg_len;
  const int seg = (reverse ? NT - 1 - n : n) / seg_len;
  if (seg == 0) return;
  const int KV = K * V;
  u16* st = reinterpret_cast<u16*>(states) + ((long long)bh * NT + n) * KV;
  const float* c = carry + ((long long)bh * S + seg) * KV;
  const float* dn = cum + ((long long)bh * NT + n) * K;
  if (V % 8 == 0) {
    for (int e = 8 * threadIdx.x; e < KV; e += 8 * TC_THREADS) {
      const float d = dn[e / V];
      const uint4 w = *reinterpret_cast<const uint4*>(st + e);
      const float4 c0 = *reinterpret_cast<const float4*>(c + e);
      const float4 c1 = *reinterpret_cast<const float4*>(c + e + 4);
      const float cv[8] = {c0.x, c0.y, c0.z, c0.w, c1.x, c1.y, c1.z, c1.w};
      unsigned words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
      for (int u = 0; u < 4; ++u)
        words[u] = Op<T>::pack(lo_half<T>(words[u]) + d * cv[2 * u],
                               hi_half<T>(words[u]) + d * cv[2 * u + 1]);
      *reinterpret_cast<uint4*>(st + e) = make_uint4(words[0], words[1], words[2], words[3]);
    }
  } else {
    for (int e = threadIdx.x; e < KV; e += TC_THREADS) {
      T v;
      v.bits = st[e];
      st[e] = (u16)(Op<T>::pack(to_f32(v) + dn[e / V] * c[e], 0.f) & 0xffffu);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// A and the scaled operands, once per chunk
// ---------------------------------------------------------------------------------------------
// Grid (chunks, B*H): A of the chunk over all K-tiles, stored in the input dtype as
// [B*H, chunks, 64 (t), 64 (s)] (zero above the diagonal and on padding rows); on the way, the
// operands of the state products in the input dtype, qs = scale q exp(b) and ks = k exp(b_L - b)
// ([B, T, H, K] like q), and the chunk's decay exp(b_L) (fp32, [B*H, chunks, K]): the walks and
// the output kernels then read neither the gates nor q and k.
struct AttnSmem {
  float bs[TC_C * LDF];
  u16 q[TC_C * LDH];
  u16 k[TC_C * LDH];
  float tot[8 * 64];
};

// Eight values of row r, columns col .. col + 7 of a [rows, H, D] tensor (row r at
// base + r * H * D), as the input dtype; columns past D skipped.
template <typename T>
__device__ __forceinline__ void store8(u16* base, int r, int H, int D, int col, const float v[8]) {
  unsigned w[4];
#pragma unroll
  for (int u = 0; u < 4; ++u) w[u] = Op<T>::pack(v[2 * u], v[2 * u + 1]);
  u16* dst = base + r * H * D + col;
  if (D % 8 == 0) {
    *reinterpret_cast<uint4*>(dst) = make_uint4(w[0], w[1], w[2], w[3]);
  } else {
    for (int j = 0; j < 8 && col + j < D; ++j) dst[j] = (u16)(w[j >> 1] >> (16 * (j & 1)));
  }
}

// qs and ks of this K-tile (cumulative gates in bs): thread rows tid / 8 + 16 i, columns
// 8 (tid % 8) .. + 7.
template <typename T>
__device__ void write_scaled(const AttnSmem& sm, T* qs, T* ks, long long row0, int nrows, int H,
                             int K, int col_k, float scale) {
  const int r = threadIdx.x >> 3, c = (threadIdx.x & 7) * 8;
  if (col_k + c >= K) return;
  u16* qbase = reinterpret_cast<u16*>(qs) + row0 * K;
  u16* kbase = reinterpret_cast<u16*>(ks) + row0 * K;
  const float4 l0 = *reinterpret_cast<const float4*>(sm.bs + 63 * LDF + c);
  const float4 l1 = *reinterpret_cast<const float4*>(sm.bs + 63 * LDF + c + 4);
  const float last[8] = {l0.x, l0.y, l0.z, l0.w, l1.x, l1.y, l1.z, l1.w};
#pragma unroll
  for (int it = 0; it < 4; ++it) {
    const int rr = r + 16 * it;
    if (rr >= nrows) break;
    const float4 b0 = *reinterpret_cast<const float4*>(sm.bs + rr * LDF + c);
    const float4 b1 = *reinterpret_cast<const float4*>(sm.bs + rr * LDF + c + 4);
    const float bv[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
    const uint4 qw = *reinterpret_cast<const uint4*>(sm.q + rr * LDH + c);
    const uint4 kw = *reinterpret_cast<const uint4*>(sm.k + rr * LDH + c);
    const unsigned qu[4] = {qw.x, qw.y, qw.z, qw.w}, ku[4] = {kw.x, kw.y, kw.z, kw.w};
    float qv[8], kv[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      T qe, ke;
      qe.bits = (u16)(qu[j >> 1] >> (16 * (j & 1)));
      ke.bits = (u16)(ku[j >> 1] >> (16 * (j & 1)));
      qv[j] = to_f32(qe) * scale * exp2_approx(bv[j]);
      kv[j] = to_f32(ke) * exp2_approx(last[j] - bv[j]);
    }
    store8<T>(qbase, rr, H, K, col_k + c, qv);
    store8<T>(kbase, rr, H, K, col_k + c, kv);
  }
}

template <typename T>
__device__ void tc_attn(const T* q, const T* k, const float* g, T* attn, T* qs, T* ks,
                        float* decay, int Tn, int H, int K, float scale) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  AttnSmem& sm = *reinterpret_cast<AttnSmem*>(smem_raw);
  const int n = blockIdx.x, bh = blockIdx.y;
  const int b = bh / H, h = bh % H;
  const int NT = (Tn + TC_C - 1) / TC_C;
  const int t0 = n * TC_C, nrows = min(TC_C, Tn - t0);
  const long long row0 = (long long)b * Tn * H + (long long)t0 * H + h;
  float acc[8][4];
  zero(acc);
  for (int col_k = 0; col_k < K; col_k += TC_T) {
    copy_tile(sm.q, q, row0, nrows, H, K, col_k);
    copy_tile(sm.k, k, row0, nrows, H, K, col_k);
    copy_gates(sm.bs, g, row0, nrows, H, K, col_k);
    copies_done();
    cumsum_gates(sm.bs, sm.tot);
    if (threadIdx.x < TC_T && col_k + threadIdx.x < K)
      decay[((long long)bh * NT + n) * K + col_k + threadIdx.x] =
          exp2_approx(sm.bs[63 * LDF + threadIdx.x]);
    write_scaled<T>(sm, qs, ks, row0, nrows, H, K, col_k, scale);
    accumulate_A<T>(acc, sm.q, sm.k, sm.bs);
    __syncthreads();
  }
  finish_A(acc, scale);
  store_rows<T>(attn + ((long long)bh * NT + n) * TC_C * TC_C, acc, 0, TC_C, 1, TC_C, 0);
}

// ---------------------------------------------------------------------------------------------
// forward output and dv: a state product plus an intra-chunk product
// ---------------------------------------------------------------------------------------------
// Grid (ceil(V/64), chunks, B*H); warp w owns rows 16 w .. of the chunk:
//   o  = qs h_n + A v              (tc_out<T, false>; chunk 0 takes an fp32 h0 exactly)
//   dv = ks dh_{n+1} + A^T do      (tc_out<T, true>; the last chunk takes an fp32 dht exactly)
// Per K-tile: x (qs or ks), the state tile and, for an fp32 boundary state, its low half; A
// arrives with the first K-tile and y (v or do) with the last.
struct OutSmem {
  u16 x[TC_C * LDH];
  u16 state[TC_T * LDH];  // [channel][v]
  u16 lo[TC_T * LDH];     // the fp32 boundary state's low half
  u16 a[TC_C * LDH];      // A [t][s]
  u16 y[TC_C * LDH];
};

template <typename T, bool ADJOINT>
__device__ void tc_out(const T* xs, const T* y, const T* states, const T* attn,
                       const float* boundary, T* out, int Tn, int H, int K, int V) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  OutSmem& sm = *reinterpret_cast<OutSmem*>(smem_raw);
  const int iv = blockIdx.x, n = blockIdx.y, bh = blockIdx.z;
  const int b = bh / H, h = bh % H;
  const int NT = (Tn + TC_C - 1) / TC_C;
  const int t0 = n * TC_C, nrows = min(TC_C, Tn - t0);
  const long long row0 = (long long)b * Tn * H + (long long)t0 * H + h;
  const int r0 = 16 * (threadIdx.x >> 5), col_v = iv * TC_T;
  const T* state_n = states + ((long long)bh * NT + n) * K * V;
  const float* exact =
      boundary != nullptr && n == (ADJOINT ? NT - 1 : 0) ? boundary + (long long)bh * K * V : nullptr;

  float acc[8][4];
  zero(acc);
  for (int col_k = 0; col_k < K; col_k += TC_T) {
    const int krows = min(TC_T, K - col_k);
    copy_tile(sm.x, xs, row0, nrows, H, K, col_k);
    if (exact != nullptr)
      load_split<T>(sm.state, sm.lo, exact + (long long)col_k * V, krows, V, col_v);
    else
      copy_tile(sm.state, state_n + (long long)col_k * V, 0, krows, 1, V, col_v);
    if (col_k == 0) copy_tile(sm.a, attn + ((long long)bh * NT + n) * TC_C * TC_C, 0, TC_C, 1, TC_C, 0);
    if (col_k + TC_T >= K) copy_tile(sm.y, y, row0, nrows, H, V, col_v);
    copies_done();
    // An fp32 boundary state takes a second pass over its low half (one copy of the code).
#pragma unroll 1
    for (int p = 0; p <= (int)(exact != nullptr); ++p)
      warp_gemm<T, false, true>(acc, sm.x, p == 0 ? sm.state : sm.lo, r0);
    __syncthreads();
  }
  // A v over the blocks s <= t of the warp's rows t, or A^T do over the blocks t >= s of its
  // rows s (the A operand (s, t) = A[t][s]: [k][m] storage).
  if (ADJOINT)
    warp_gemm<T, true, true>(acc, sm.a, sm.y, r0, r0, 64);
  else
    warp_gemm<T, false, true>(acc, sm.a, sm.y, r0, 0, r0 + 16);
  store_rows<T>(out, acc, row0, nrows, H, V, col_v);
}

// ---------------------------------------------------------------------------------------------
// state walk with the outputs (K <= 128)
// ---------------------------------------------------------------------------------------------
// Grid (ceil(V/(16 WARPS)), B*H*S): a block walks the chunks of one segment for 16 WARPS V
// columns with the whole state (K <= 128 channels) in registers, and per chunk n writes the kept
// state and the chunk's outputs, from one read of the chunk's operands:
//   forward (tc_walk_out<T, false>): states[n] = h_n;      o  = qs h_n + A v;        h = d h + ks^T v
//   adjoint (tc_walk_out<T, true>):  states[n] = dh_{n+1}; dv = ks dh_{n+1} + A^T do; dh = d dh + qs^T do
// i.e. out = x_out S + A' y, S = d S + x_walk^T y. Warp w holds the transposed state S^T (rows:
// the block's V columns 16 w .. 16 w + 15; columns: all K channels). Packed to 16 bits its
// accumulator fragments are the B fragments of x_out S, so the state reaches the output product
// without shared memory; each warp computes all 64 tokens' outputs for its 16 columns. Segment
// s >= 1 starts from carry[s] (tc_states walked the segments from zero for their end states and
// tc_carry joined them); `out` null: states only (the backward recomputing them).
// Two block shapes: 4 warps with two step buffers (two blocks per SM), or 8 warps with three
// (one block per SM, ~190 KB): the wide block loads a step's x_out, x_walk and A tiles once for
// 128 V columns, and keeps two steps' loads in flight.
#define WALK_TILE (TC_C * LDH)  // 16-bit elements of one 64 x 64 tile

// One step's buffer, in 16-bit elements: kt tiles of x_out, kt of x_walk, A, warps / 4 tiles of y,
// then 2 x 64 fp32 decays. After the step's products the same space stages its outputs and state.
__device__ __forceinline__ int walk_buffer(int kt, int warps) {
  return (2 * kt + 1 + warps / 4) * WALK_TILE + 2 * 2 * TC_T;
}

// The 64-row tile at `src` (row stride LDH) into rows of a [rows, H, D] tensor, row r at
// x + (row0 + r * H) * D, columns col0 ..; rows past `nrows` and columns past D skipped.
__device__ __noinline__ void store_tile_slow(u16* base, const u16* src, int nrows, int stride,
                                             int D, int col0) {
  for (int e = threadIdx.x; e < 64 * 64; e += blockDim.x) {
    const int r = e >> 6, c = e & 63;
    if (r < nrows && col0 + c < D) base[r * stride + c] = src[r * LDH + c];
  }
}
template <typename T, int NT = TC_THREADS>
__device__ void store_tile(T* x, const u16* src, long long row0, int nrows, int H, int D, int col0) {
  u16* base = reinterpret_cast<u16*>(x) + row0 * D + col0;
  const int stride = H * D;
  if (D % 8 == 0) {
    constexpr int ROWS = NT / 8;
    const int r = threadIdx.x >> 3, c = (threadIdx.x & 7) * 8;
    if (col0 + c >= D) return;
#pragma unroll
    for (int it = 0; it < 64 / ROWS; ++it) {
      const int rr = r + ROWS * it;
      if (rr < nrows)
        *reinterpret_cast<uint4*>(base + rr * stride + c) =
            *reinterpret_cast<const uint4*>(src + rr * LDH + c);
    }
  } else {
    store_tile_slow(base, src, nrows, stride, D, col0);
  }
}

// hb = the low halves of st, st - hb (hb: st packed to the input dtype).
template <typename T>
__device__ __forceinline__ void split_low(unsigned hb[16][2], const float st[16][4]) {
#pragma unroll
  for (int j = 0; j < 16; ++j)
#pragma unroll
    for (int u = 0; u < 2; ++u)
      hb[j][u] = Op<T>::pack(st[j][2 * u] - lo_half<T>(hb[j][u]),
                             st[j][2 * u + 1] - hi_half<T>(hb[j][u]));
}

// The walk's state S^T, warp-distributed (see tc_walk_out): st[j][e] is S[k][v] for
// k = 8 j + c2 + (e & 1), v = col_v + 16 w + g8 + 8 (e >> 1). Read from start[k * V + v].
__device__ __forceinline__ void load_state(float st[16][4], const float* start, int K, int V,
                                           int col_v, int w, int g8, int c2) {
#pragma unroll
  for (int j = 0; j < 16; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int k = 8 * j + c2 + (e & 1), v = col_v + 16 * w + g8 + 8 * (e >> 1);
      st[j][e] = start != nullptr && k < K && v < V ? start[(long long)k * V + v] : 0.f;
    }
}

// st (as load_state lays it out) into dst[at + k * V + v].
__device__ __forceinline__ void store_state(float* dst, long long at, const float st[16][4], int K,
                                            int V, int col_v, int w, int g8, int c2) {
#pragma unroll
  for (int j = 0; j < 16; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int k = 8 * j + c2 + (e & 1), v = col_v + 16 * w + g8 + 8 * (e >> 1);
      if (k < K && v < V) dst[at + (long long)k * V + v] = st[j][e];
    }
}

// hb = st packed to the input dtype; with `round`, st takes the packed values (the walk goes on
// from the kept state, as in tc_states).
template <typename T>
__device__ __forceinline__ void pack_state(unsigned hb[16][2], float st[16][4], bool round) {
#pragma unroll
  for (int j = 0; j < 16; ++j)
#pragma unroll
    for (int u = 0; u < 2; ++u) hb[j][u] = Op<T>::pack(st[j][2 * u], st[j][2 * u + 1]);
  if (round) {
#pragma unroll
    for (int j = 0; j < 16; ++j)
#pragma unroll
      for (int u = 0; u < 2; ++u) {
        st[j][2 * u] = lo_half<T>(hb[j][u]);
        st[j][2 * u + 1] = hi_half<T>(hb[j][u]);
      }
  }
}

// A warp's 64 x 16 outputs of a step: x_out S (hb: S packed; an fp32 initial state, `exact`,
// takes a second pass over its low half), plus A y over the blocks s <= t of the rows t, or
// A^T y over the blocks t >= s of the rows s (the A operand (s, t) = A[t][s]: [k][m] storage).
template <typename T, bool ADJOINT>
__device__ __forceinline__ void walk_outputs(float o[4][2][4], unsigned hb[16][2],
                                             const float st[16][4], const u16* xo,
                                             const u16* a_tile, const u16* y_tile, int kt, int wc,
                                             bool exact) {
#pragma unroll
  for (int m = 0; m < 4; ++m)
#pragma unroll
    for (int nb = 0; nb < 2; ++nb)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[m][nb][e] = 0.f;
#pragma unroll 1
  for (int p = 0; p <= (int)exact; ++p) {
    if (p == 1) split_low<T>(hb, st);
#pragma unroll
    for (int kk = 0; kk < 8; ++kk) {
      if (kk >= 4 * kt) break;
#pragma unroll
      for (int m = 0; m < 4; ++m) {
        unsigned a[4];
        a_mk(a, xo + (kk >> 2) * WALK_TILE, 16 * m, 16 * (kk & 3));
        Op<T>::mma(o[m][0], a, hb[2 * kk][0], hb[2 * kk + 1][0]);
        Op<T>::mma(o[m][1], a, hb[2 * kk][1], hb[2 * kk + 1][1]);
      }
    }
    if (p == 1) {
#pragma unroll
      for (int j = 0; j < 16; ++j)
#pragma unroll
        for (int u = 0; u < 2; ++u) hb[j][u] = Op<T>::pack(st[j][2 * u], st[j][2 * u + 1]);
    }
  }
#pragma unroll
  for (int m = 0; m < 4; ++m)
#pragma unroll
    for (int kb = 0; kb < 4; ++kb) {
      if (ADJOINT ? kb < m : kb > m) continue;
      unsigned a[4], bf[4];
      if (ADJOINT) a_km(a, a_tile, 16 * m, 16 * kb); else a_mk(a, a_tile, 16 * m, 16 * kb);
      b_kn(bf, y_tile, 16 * kb, wc);
      Op<T>::mma(o[m][0], a, bf[0], bf[1]);
      Op<T>::mma(o[m][1], a, bf[2], bf[3]);
    }
}

// S^T = S^T diag(d) + y^T x_walk for the warp's 16 columns.
template <typename T>
__device__ __forceinline__ void walk_state(float st[16][4], const float* dec, const u16* y_tile,
                                           const u16* xw, int kt, int wc, int c2) {
#pragma unroll
  for (int j = 0; j < 16; ++j) {
    if (j >= 8 * kt) break;
    const float2 d = *reinterpret_cast<const float2*>(dec + 8 * j + c2);
    st[j][0] *= d.x;
    st[j][1] *= d.y;
    st[j][2] *= d.x;
    st[j][3] *= d.y;
  }
#pragma unroll
  for (int tb = 0; tb < 4; ++tb) {
    unsigned a[4];
    a_km(a, y_tile, wc, 16 * tb);
#pragma unroll
    for (int qq = 0; qq < 8; ++qq) {
      if (qq >= 4 * kt) break;
      unsigned bf[4];
      b_kn(bf, xw + (qq >> 2) * WALK_TILE, 16 * tb, 16 * (qq & 3));
      Op<T>::mma(st[2 * qq], a, bf[0], bf[1]);
      Op<T>::mma(st[2 * qq + 1], a, bf[2], bf[3]);
    }
  }
}

template <typename T, bool ADJOINT, int WARPS, int STAGES>
__device__ void tc_walk_out(const T* x_out, const T* x_walk, const T* y, const float* decay,
                            const T* attn, const float* s0, const float* carry, T* states, T* out,
                            float* last, int seg_len, int Tn, int H, int K, int V) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  u16* smem = reinterpret_cast<u16*>(smem_raw);
  const int NCH = (Tn + TC_C - 1) / TC_C, S = (NCH + seg_len - 1) / seg_len;
  const int iv = blockIdx.x, bh = blockIdx.y / S, seg = blockIdx.y % S;
  const int b = bh / H, h = bh % H, kt = (K + TC_T - 1) / TC_T;
  const int first = seg * seg_len, end = min(NCH, first + seg_len);
  const long long KV = (long long)K * V;
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, g8 = lane >> 2, c2 = 2 * (lane & 3);
  const int col_v = iv * 16 * WARPS;
  constexpr int NT = 32 * WARPS, YT = WARPS / 4;  // threads, 64-column tiles of y per step
  // This warp's 16 columns: tile w / 4 of the step's y (and of the staged outputs and state).
  const int yt = w >> 2, wc = 16 * (w & 3);

  // S^T: st[j][e] is S[k][v] for k = 8 j + c2 + (e & 1), v = col_v + 16 w + g8 + 8 (e >> 1).
  float st[16][4];
  const float* start = seg == 0 ? s0 : carry + ((long long)bh * S + seg) * KV;
  if (seg == 0 && s0 != nullptr) start += bh * KV;
  load_state(st, start, K, V, col_v, w, g8, c2);

  auto issue = [&](int step) {
    const int n = ADJOINT ? NCH - 1 - step : step;
    const int t0 = n * TC_C, nrows = min(TC_C, Tn - t0);
    const long long row0 = (long long)b * Tn * H + (long long)t0 * H + h;
    u16* buf = smem + ((step - first) % STAGES) * walk_buffer(kt, WARPS);
    for (int i = 0; i < kt; ++i) {
      if (out != nullptr)
        copy_tile<T, NT>(buf + i * WALK_TILE, x_out, row0, nrows, H, K, TC_T * i);
      copy_tile<T, NT>(buf + (kt + i) * WALK_TILE, x_walk, row0, nrows, H, K, TC_T * i);
    }
    if (out != nullptr)
      copy_tile<T, NT>(buf + 2 * kt * WALK_TILE, attn + ((long long)bh * NCH + n) * TC_C * TC_C,
                       0, TC_C, 1, TC_C, 0);
    for (int u = 0; u < YT; ++u)
      copy_tile<T, NT>(buf + (2 * kt + 1 + u) * WALK_TILE, y, row0, nrows, H, V, col_v + TC_T * u);
    float* dec = reinterpret_cast<float*>(buf + (2 * kt + 1 + YT) * WALK_TILE);
    if (threadIdx.x < 2 * TC_T)
      cp_async4(&dec[threadIdx.x], decay + ((long long)bh * NCH + n) * K + threadIdx.x,
                threadIdx.x < K);
  };
  // Every thread commits one copy group per step (empty past the end): the wait for step s's
  // group leaves the STAGES - 2 later ones in flight.
  for (int p = 0; p < STAGES - 1; ++p) {
    if (first + p < end) issue(first + p);
    copies_commit();
  }
  for (int step = first; step < end; ++step) {
    const int n = ADJOINT ? NCH - 1 - step : step;
    const int t0 = n * TC_C, nrows = min(TC_C, Tn - t0);
    const long long row0 = (long long)b * Tn * H + (long long)t0 * H + h;
    u16* buf = smem + ((step - first) % STAGES) * walk_buffer(kt, WARPS);
    const u16* xo = buf;
    const u16* xw = buf + kt * WALK_TILE;
    const u16* a_tile = buf + 2 * kt * WALK_TILE;
    const u16* y_tile = buf + (2 * kt + 1 + yt) * WALK_TILE;
    const float* dec = reinterpret_cast<const float*>(buf + (2 * kt + 1 + YT) * WALK_TILE);
    copies_wait<STAGES - 2>();
    if (step + STAGES - 1 < end) issue(step + STAGES - 1);
    copies_commit();

    // The state entering the chunk in the input dtype: what is kept, and (after the first step,
    // which keeps an fp32 initial state exactly) what the walk goes on from, as in tc_states.
    unsigned hb[16][2];
    pack_state<T>(hb, st, step > 0);

    float o[4][2][4];
    if (out != nullptr)
      walk_outputs<T, ADJOINT>(o, hb, st, xo, a_tile, y_tile, kt, wc, step == 0 && start != nullptr);
    walk_state<T>(st, dec, y_tile, xw, kt, wc, c2);

    // Every warp is done with the step's tiles: stage the outputs and the state in their place,
    // then store both in 16-byte pieces.
    __syncthreads();
    u16* stage_o = buf + yt * WALK_TILE;
    u16* stage_s = buf + YT * WALK_TILE;
    if (out != nullptr) {
#pragma unroll
      for (int m = 0; m < 4; ++m)
#pragma unroll
        for (int nb = 0; nb < 2; ++nb)
#pragma unroll
          for (int u = 0; u < 2; ++u)
            *reinterpret_cast<unsigned*>(stage_o + (16 * m + g8 + 8 * u) * LDH + wc + 8 * nb +
                                         c2) = Op<T>::pack(o[m][nb][2 * u], o[m][nb][2 * u + 1]);
    }
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      if (j >= 8 * kt) break;
      u16* row = stage_s + ((j >> 3) * YT + yt) * WALK_TILE + (8 * (j & 7) + c2) * LDH + wc + g8;
#pragma unroll
      for (int u = 0; u < 2; ++u) {
        row[8 * u] = (u16)(hb[j][u] & 0xffffu);
        row[LDH + 8 * u] = (u16)(hb[j][u] >> 16);
      }
    }
    __syncthreads();
    T* state_n = states + ((long long)bh * NCH + n) * KV;
    for (int u = 0; u < YT; ++u) {
      if (out != nullptr)
        store_tile<T, NT>(out, buf + u * WALK_TILE, row0, nrows, H, V, col_v + TC_T * u);
      for (int i = 0; i < kt; ++i)
        store_tile<T, NT>(state_n + (long long)TC_T * i * V, stage_s + (i * YT + u) * WALK_TILE, 0,
                          min(TC_T, K - TC_T * i), 1, V, col_v + TC_T * u);
    }
  }
  // The last segment ends with the final state.
  if (last != nullptr && seg == S - 1) store_state(last, bh * KV, st, K, V, col_v, w, g8, c2);
}

// ---------------------------------------------------------------------------------------------
// backward: dq, dk and the per-token gate-gradient terms
// ---------------------------------------------------------------------------------------------
// Grid (ceil(K/64), chunks, B*H). Pass 1 over V-tiles: dA = do v^T, dq = do h_n^T,
// dk = v dh_{n+1}^T (warp w: rows 16 w ..). Pass 2 on this K-tile: the gate factors, then the
// intra-chunk sums through dA in shared memory, rebased per block like A:
//   dq_t = exp(b_t - r) sum_{s <= t} dA_ts (k_s exp(r - b_s)),        r = b at block start
//   dk_s = exp(r' - b_s) sum_{t >= s} dA_ts (q_t exp(b_t - r')),      r' = b at block end
// Writes dq, dk (input dtype) and dg. With B the cumulative gate over the whole sequence,
// dL/dB_t = q_t dq_t - k_t dk_t and dg_t = sum_{s >= t} dL/dB_s. The part of that sum past
// this chunk is sum_V h_{n+1} dh_{n+1} (shifting B after the chunk scales h_{n+1}); with
// h_{n+1} = exp(b_L) h_n + sum_s (k_s exp(b_L - b_s))^T v_s that is
//   sum_{s in the chunk} k_s dk'_s + exp(b_L) sum_V h_n dh_{n+1}   (dk': the state part of dk)
// so dg needs only tiles this kernel holds anyway: no long cancelling sums, no pass over the
// sequence, no h_{n+1}. (Taking h_{n+1} dh_{n+1} from the stored, rounded states instead made it
// cancel inexactly against the chunk's k dk': dg at 2.4x the naive bf16 error at K 256, V 512.)
struct DqkSmem {
  union {
    struct {
      u16 d_o[TC_C * LDH];
      u16 v[TC_C * LDH];
      u16 h[TC_T * LDH];   // h_n [channel][v]
      u16 dh[TC_T * LDH];  // dh_{n+1} [channel][v]
      u16 hlo[TC_T * LDH];   // h0's low half (chunk 0 with an initial state)
      u16 dhlo[TC_T * LDH];  // dht's low half (last chunk with a final-state gradient)
    } p1;
    struct {
      float bs[TC_C * LDF];
      u16 q[TC_C * LDH];
      u16 k[TC_C * LDH];
      float dA[TC_C * LDF];  // dA [t][s], then q dq - k dk [t][channel]
    } p2;
  } u;
  float tot[8 * 64];
  float boundary[64];     // sum_V h_n dh_{n+1} per channel
  float state_sum[4][64]; // per warp: sum over its rows s of k_s dk'_s, per channel
};

template <typename T>
__device__ void tc_bwd_dqk(const T* q, const T* k, const T* v, const float* g, const T* d_o,
                           const T* hs, const T* dhs, const float* h0, const float* dht,
                           T* dq, T* dk, float* dg, int Tn, int H, int K, int V, float scale) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  DqkSmem& sm = *reinterpret_cast<DqkSmem*>(smem_raw);
  const int ik = blockIdx.x, n = blockIdx.y, bh = blockIdx.z;
  const int b = bh / H, h = bh % H;
  const int NT = (Tn + TC_C - 1) / TC_C;
  const int t0 = n * TC_C, nrows = min(TC_C, Tn - t0);
  const long long row0 = (long long)b * Tn * H + (long long)t0 * H + h;
  const int w = threadIdx.x >> 5, lane = threadIdx.x & 31, g8 = lane >> 2, c = lane & 3;
  const int r0 = 16 * w, col_k = ik * TC_T;
  const long long state = ((long long)bh * NT + n) * K * V + (long long)col_k * V;
  const int krows = min(TC_T, K - col_k);

  // The fp32 boundary states (h0 for chunk 0, dht for the last) are used as hi + lo halves.
  const bool exact_h = n == 0 && h0 != nullptr, exact_dh = n == NT - 1 && dht != nullptr;
  const long long given = ((long long)bh * K + col_k) * V;
  float dA[8][4], aq[8][4], ak[8][4];
  zero(dA);
  zero(aq);
  zero(ak);
  // Thread (channel tid / 2, half tid % 2) sums h_n dh_{n+1} over half of each V-tile.
  float boundary = 0.f;
  for (int vt = 0; vt * TC_T < V; ++vt) {
    const int col_v = vt * TC_T;
    copy_tile(sm.u.p1.d_o, d_o, row0, nrows, H, V, col_v);
    copy_tile(sm.u.p1.v, v, row0, nrows, H, V, col_v);
    if (exact_h)
      load_split<T>(sm.u.p1.h, sm.u.p1.hlo, h0 + given, krows, V, col_v);
    else
      copy_tile(sm.u.p1.h, hs + state, 0, krows, 1, V, col_v);
    if (exact_dh)
      load_split<T>(sm.u.p1.dh, sm.u.p1.dhlo, dht + given, krows, V, col_v);
    else
      copy_tile(sm.u.p1.dh, dhs + state, 0, krows, 1, V, col_v);
    copies_done();
    warp_gemm<T, false, false>(dA, sm.u.p1.d_o, sm.u.p1.v, r0);
    // An fp32 boundary state takes a second pass over its low half (one copy of the code).
#pragma unroll 1
    for (int p = 0; p <= (int)exact_h; ++p)
      warp_gemm<T, false, false>(aq, sm.u.p1.d_o, p == 0 ? sm.u.p1.h : sm.u.p1.hlo, r0);
#pragma unroll 1
    for (int p = 0; p <= (int)exact_dh; ++p)
      warp_gemm<T, false, false>(ak, sm.u.p1.v, p == 0 ? sm.u.p1.dh : sm.u.p1.dhlo, r0);
    {
      const int i = threadIdx.x >> 1, j0 = (threadIdx.x & 1) * 32;
#pragma unroll 8
      for (int j = j0; j < j0 + 32; j += 2) {
        float2 hv = pair<T>(sm.u.p1.h, i, j), dv = pair<T>(sm.u.p1.dh, i, j);
        if (exact_h) {
          const float2 lo = pair<T>(sm.u.p1.hlo, i, j);
          hv = make_float2(hv.x + lo.x, hv.y + lo.y);
        }
        if (exact_dh) {
          const float2 lo = pair<T>(sm.u.p1.dhlo, i, j);
          dv = make_float2(dv.x + lo.x, dv.y + lo.y);
        }
        boundary += hv.x * dv.x + hv.y * dv.y;
      }
    }
    __syncthreads();
  }
  boundary += __shfl_xor_sync(0xffffffffu, boundary, 1);
  if ((threadIdx.x & 1) == 0) sm.boundary[threadIdx.x >> 1] = boundary;
  copy_tile(sm.u.p2.q, q, row0, nrows, H, K, col_k);
  copy_tile(sm.u.p2.k, k, row0, nrows, H, K, col_k);
  copy_gates(sm.u.p2.bs, g, row0, nrows, H, K, col_k);
  float* dAs = sm.u.p2.dA;
#pragma unroll
  for (int nn = 0; nn < 8; ++nn)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int t = r0 + acc_row(e), s = acc_col(nn, e);
      dAs[t * LDF + s] = s <= t ? dA[nn][e] * scale : 0.f;
    }
  copies_done();
  cumsum_gates(sm.u.p2.bs, sm.tot);
  const float* bs = sm.u.p2.bs;
  const u16* qh = sm.u.p2.q;
  const u16* kh = sm.u.p2.k;
  const unsigned long long wide = wide_spans(bs, r0);

  // dq: rows t of block w, k = s in [0, r0 + 16), n = channel.
  float acc[8][4];
  zero(acc);
#pragma unroll 1
  for (int k0 = 0; k0 <= r0; k0 += 16) {
    const bool diag = k0 == r0;
    Split a[4];
#pragma unroll
    for (int half = 0; half < 2; ++half)
#pragma unroll
      for (int rr = 0; rr < 2; ++rr) {
        const int t = r0 + g8 + 8 * rr, s = k0 + 2 * c + 8 * half;
        const float2 d2 = *reinterpret_cast<const float2*>(dAs + t * LDF + s);
        a[rr + 2 * half] = split(d2.x, d2.y);
      }
#pragma unroll
    for (int nn = 0; nn < 8; ++nn) {
      const int i = 8 * nn + g8;
      const float ref = bs[r0 * LDF + i];
      const bool skip = diag && ((wide >> i) & 1ull);
      float kv[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int s = k0 + 2 * c + (u & 1) + 8 * (u >> 1);
        kv[u] = skip ? 0.f : elem<T>(kh, s, i) * exp2_approx(ref - bs[s * LDF + i]);
      }
      mma_split(acc[nn], a, split(kv[0], kv[1]), split(kv[2], kv[3]));
    }
  }
#pragma unroll
  for (int nn = 0; nn < 8; ++nn)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int t = r0 + acc_row(e), i = acc_col(nn, e);
      const float bt = bs[t * LDF + i];
      aq[nn][e] = aq[nn][e] * scale * exp2_approx(bt) + acc[nn][e] * exp2_approx(bt - bs[r0 * LDF + i]);
    }
  // Rare (warp-uniform): channels too wide to rebase, their diagonal block one exp per pair. Kept
  // out of the loop above so that the common path has no call sites.
  if (wide != 0ull) {
    float fix[8][4];
    wide_terms<T>(fix, dAs, kh, bs, r0, wide, false);
#pragma unroll
    for (int nn = 0; nn < 8; ++nn)
#pragma unroll
      for (int e = 0; e < 4; ++e) aq[nn][e] += fix[nn][e];
  }

  // dk: rows s of block w, k = t in [r0, 64), n = channel.
  zero(acc);
#pragma unroll 1
  for (int k0 = r0; k0 < 64; k0 += 16) {
    const bool diag = k0 == r0;
    Split a[4];
#pragma unroll
    for (int half = 0; half < 2; ++half)
#pragma unroll
      for (int rr = 0; rr < 2; ++rr) {
        const int s = r0 + g8 + 8 * rr, t = k0 + 2 * c + 8 * half;
        a[rr + 2 * half] = split(dAs[t * LDF + s], dAs[(t + 1) * LDF + s]);
      }
#pragma unroll
    for (int nn = 0; nn < 8; ++nn) {
      const int i = 8 * nn + g8;
      const float ref = bs[(r0 + 15) * LDF + i];
      const bool skip = diag && ((wide >> i) & 1ull);
      float qv[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int t = k0 + 2 * c + (u & 1) + 8 * (u >> 1);
        qv[u] = skip ? 0.f : elem<T>(qh, t, i) * exp2_approx(bs[t * LDF + i] - ref);
      }
      mma_split(acc[nn], a, split(qv[0], qv[1]), split(qv[2], qv[3]));
    }
  }
  // dk = dk' + the intra sum; the warp's rows' sums of k_s dk'_s per channel go to state_sum.
#pragma unroll
  for (int nn = 0; nn < 8; ++nn) {
    float col_sum[2] = {0.f, 0.f};
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int s = r0 + acc_row(e), i = acc_col(nn, e);
      const float bsv = bs[s * LDF + i];
      const float dk_state = ak[nn][e] * exp2_approx(bs[63 * LDF + i] - bsv);
      col_sum[e & 1] += elem<T>(kh, s, i) * dk_state;
      ak[nn][e] = dk_state + acc[nn][e] * exp2_approx(bs[(r0 + 15) * LDF + i] - bsv);
    }
#pragma unroll
    for (int u = 0; u < 2; ++u) {
#pragma unroll
      for (int m = 4; m < 32; m <<= 1) col_sum[u] += __shfl_xor_sync(0xffffffffu, col_sum[u], m);
      if (g8 == 0) sm.state_sum[w][acc_col(nn, u)] = col_sum[u];
    }
  }
  if (wide != 0ull) {
    float fix[8][4];
    wide_terms<T>(fix, dAs, qh, bs, r0, wide, true);
#pragma unroll
    for (int nn = 0; nn < 8; ++nn)
#pragma unroll
      for (int e = 0; e < 4; ++e) ak[nn][e] += fix[nn][e];
  }

  // dg: q dq - k dk (fp32, before dq and dk are rounded) into shared memory, then the reverse
  // cumulative sum over the chunk's tokens plus the boundary term (thread = channel, half).
  store_rows<T>(dq, aq, row0, nrows, H, K, col_k);
  store_rows<T>(dk, ak, row0, nrows, H, K, col_k);
  __syncthreads();  // every warp is done reading dA
#pragma unroll
  for (int nn = 0; nn < 8; ++nn)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int t = r0 + acc_row(e), i = acc_col(nn, e);
      dAs[t * LDF + i] = elem<T>(qh, t, i) * aq[nn][e] - elem<T>(kh, t, i) * ak[nn][e];
    }
  __syncthreads();
  {
    const int i = threadIdx.x & 63, half = threadIdx.x >> 6;
    float run[32];
    float acc_after = 0.f;
#pragma unroll
    for (int r = 31; r >= 0; --r) {
      acc_after += dAs[(32 * half + r) * LDF + i];
      run[r] = acc_after;
    }
    if (half == 1) sm.tot[i] = acc_after;
    __syncthreads();
    const float boundary = sm.state_sum[0][i] + sm.state_sum[1][i] + sm.state_sum[2][i] +
                           sm.state_sum[3][i] + exp2_approx(bs[63 * LDF + i]) * sm.boundary[i];
    const float after = boundary + (half == 0 ? sm.tot[i] : 0.f);
    if (col_k + i < K) {
#pragma unroll
      for (int r = 0; r < 32; ++r) {
        const int t = 32 * half + r;
        if (t < nrows) dg[(row0 + (long long)t * H) * K + col_k + i] = run[r] + after;
      }
    }
  }
}

// Shared-memory sizes the launcher passes (crates/ops/src/gla/tensor_core.rs); a kernel given less
// traps.
static_assert(sizeof(StateSmem) == 37376, "update STATES_SMEM in crates/ops/src/gla/tensor_core.rs");
static_assert(sizeof(AttnSmem) == 38912, "update ATTN_SMEM in crates/ops/src/gla/tensor_core.rs");
static_assert(sizeof(OutSmem) == 46080, "update OUT_SMEM in crates/ops/src/gla/tensor_core.rs");
static_assert(sizeof(DqkSmem) == 58624, "update BWD_DQK_SMEM in crates/ops/src/gla/tensor_core.rs");
// tc_walk_out at K = 128: 2 or 3 step buffers of walk_buffer(2, 4 or 8) 16-bit elements.
static_assert(2 * 2 * (6 * WALK_TILE + 4 * TC_T) == 111616, "update WalkBlock::smem in crates/ops/src/gla/tensor_core.rs");
static_assert(2 * 3 * (7 * WALK_TILE + 4 * TC_T) == 195072, "update WalkBlock::smem in crates/ops/src/gla/tensor_core.rs");


// Entry points, in the order of the launcher's kernel list (GLA_TC in crates/ops/src/gla/kernels.rs).
#if defined(KERNEL_DTYPE_F32)
#error "gla_tc.cu is for bf16 and fp16 inputs (kernels/gla.cu serves fp32)"
#endif

#if WANT_KERNEL(0)
extern "C" __global__ void __launch_bounds__(TC_THREADS, 4)
    ENTRY(gla_tc_states)(const input_t* x, const input_t* y, const float* decay, const float* s0,
                         input_t* states, float* last, float* seg_last, float* seg_decay,
                         float* cum, int seg_len, int Tn, int H, int K, int V, int reverse) {
  require_smem(sizeof(StateSmem));
  tc_states<input_t>(x, y, decay, s0, states, last, seg_last, seg_decay, cum, seg_len, Tn, H, K,
                     V, reverse);
}
#endif
#if WANT_KERNEL(1)
extern "C" __global__ void __launch_bounds__(TC_THREADS, 5)
    ENTRY(gla_tc_attn)(const input_t* q, const input_t* k, const float* g, input_t* attn,
                       input_t* qs, input_t* ks, float* decay, int Tn, int H, int K,
                       float scale) {
  require_smem(sizeof(AttnSmem));
  tc_attn<input_t>(q, k, g, attn, qs, ks, decay, Tn, H, K, scale);
}
#endif
#if WANT_KERNEL(2)
extern "C" __global__ void __launch_bounds__(TC_THREADS, 4)
    ENTRY(gla_tc_fwd_o)(const input_t* qs, const input_t* v, const input_t* hs,
                        const input_t* attn, const float* h0, input_t* o, int Tn, int H, int K,
                        int V) {
  require_smem(sizeof(OutSmem));
  tc_out<input_t, false>(qs, v, hs, attn, h0, o, Tn, H, K, V);
}
#endif
#if WANT_KERNEL(3)
extern "C" __global__ void __launch_bounds__(TC_THREADS, 4)
    ENTRY(gla_tc_bwd_dv)(const input_t* ks, const input_t* d_o, const input_t* dhs,
                         const input_t* attn, const float* dht, input_t* dv, int Tn, int H, int K,
                         int V) {
  require_smem(sizeof(OutSmem));
  tc_out<input_t, true>(ks, d_o, dhs, attn, dht, dv, Tn, H, K, V);
}
#endif
#if WANT_KERNEL(4)
extern "C" __global__ void __launch_bounds__(TC_THREADS, 3)
    ENTRY(gla_tc_bwd_dqk)(const input_t* q, const input_t* k, const input_t* v, const float* g,
                          const input_t* d_o, const input_t* hs, const input_t* dhs, const float* h0,
                          const float* dht, input_t* dq, input_t* dk, float* dg, int Tn, int H,
                          int K, int V, float scale) {
  require_smem(sizeof(DqkSmem));
  tc_bwd_dqk<input_t>(q, k, v, g, d_o, hs, dhs, h0, dht, dq, dk, dg, Tn, H, K, V, scale);
}
#endif
#if WANT_KERNEL(5)
extern "C" __global__ void __launch_bounds__(TC_THREADS)
    ENTRY(gla_tc_carry)(const float* seg_last, const float* seg_decay, float* carry, float* last,
                        int S, int K, int V) {
  tc_carry(seg_last, seg_decay, carry, last, S, K, V);
}
#endif
#if WANT_KERNEL(6)
extern "C" __global__ void __launch_bounds__(TC_THREADS)
    ENTRY(gla_tc_fixup)(input_t* states, const float* cum, const float* carry, int seg_len,
                        int Tn, int K, int V, int reverse) {
  tc_fixup<input_t>(states, cum, carry, seg_len, Tn, K, V, reverse);
}
#endif
// The output walks: forward (o) and adjoint (dv), each with narrow and wide blocks.
#define WALK_ENTRY(name, adjoint, warps, stages, blocks_per_sm)                                   \
  extern "C" __global__ void __launch_bounds__(32 * warps, blocks_per_sm) ENTRY(name)(          \
      const input_t* x_out, const input_t* x_walk, const input_t* y, const float* decay,        \
      const input_t* attn, const float* s0, const float* carry, input_t* states, input_t* out,  \
      float* last, int seg_len, int Tn, int H, int K, int V) {                                  \
    require_smem(2 * stages * walk_buffer((K + TC_T - 1) / TC_T, warps));                        \
    tc_walk_out<input_t, adjoint, warps, stages>(x_out, x_walk, y, decay, attn, s0, carry,       \
                                                 states, out, last, seg_len, Tn, H, K, V);       \
  }
#if WANT_KERNEL(7)
WALK_ENTRY(gla_tc_walk_o, false, 4, 2, 2)
#endif
#if WANT_KERNEL(8)
WALK_ENTRY(gla_tc_walk_dv, true, 4, 2, 2)
#endif
#if WANT_KERNEL(9)
WALK_ENTRY(gla_tc_walk_o_wide, false, 8, 3, 1)
#endif
#if WANT_KERNEL(10)
WALK_ENTRY(gla_tc_walk_dv_wide, true, 8, 3, 1)
#endif
