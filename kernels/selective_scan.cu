// Mamba's selective scan (mamba_ssm's selective_scan_fn, variable B and C, one group): forward
// and backward.
//
//   delta'_t = softplus(delta_t + bias)  (or delta_t + bias; softplus(v) = v past v = 20)
//   h_t      = exp(delta'_t A) h_{t-1} + delta'_t u_t B_t              per channel d, state n
//   y_t      = C_t . h_t + D u_t,       out_t = y_t silu(z_t)  (or y_t without z)
//
//   u, delta, z, out: [B, T, D]   B, C: [B, T, N]   A: [D, N] fp32 (< 0)   D, bias: [D] fp32
//   h0, final state: [B, D, N] fp32. Inputs and outputs in one dtype (fp32, bf16 or fp16), each
//   [B, T, *] tensor with its own batch and step strides (innermost dimension contiguous), so
//   column slices of a larger projection are read and written in place.
//
// Compiled at run time by NVRTC, one program per entry point and dtype (common.cuh). All
// arithmetic is fp32; the state never goes to memory except at chunk starts.
//
// Forward. The sequence is cut into chunks of SS_CHUNK = 32 steps. A block owns DC channels x all
// states of one batch row and walks a segment of chunks (the whole sequence unless segmented):
// thread = one channel x SS_NS = 4 consecutive states, the NG = NP / 4 state lanes of a channel
// adjacent (NP = N rounded up to a power of two >= 4; padded states have A = B = C = 0 and stay
// 0). Per chunk: prep (delta', x = delta' u, and B, C as fp32 into shared memory, zero past T and
// D, so padded steps are identities), the walk (per step and state: one multiply, one ex2
// (A is pre-scaled by log2 e), one multiply, one fma; y's partial over the thread's 4 states
// into shared memory), then per (t, d) y = sum of the NG partials + D u, out = y silu(z). The
// state at each chunk start goes to `ckpt` [B, chunks, D, N] fp32 for the backward (N / 8 bytes
// per (t, d): 2 at N = 16), with the pre-gate y (`ypre`, needed for dz) when z is given.
//
// Segments. When B x D / DC blocks cannot fill the GPU (B = 1, long T), the chunks are split
// into S segments walked in parallel: selective_scan_fwd_states walks segments 0 .. S-2 from a
// zero state (local end states, sum of delta' per channel), selective_scan_carry turns them into
// true segment starts (h_start[s+1] = exp2(A2 sum delta'_s) h_start[s] + local_end[s]; the
// segment's decay needs no per-step exps), and selective_scan_fwd walks every segment from its
// start. The backward does the same for the adjoint in reverse. Segmenting costs one more ex2
// per element (the local walk), so the launcher segments only what one segment cannot fill.
//
// Restarts (documents packed into one row). Where `reset` marks step t, the state restarts from
// zero: h_t = delta'_t u_t B_t. The prep stages SS_RESTART in place of delta' as that step's
// decay exponent (exp2 of it times A2 is 0), so the walks, the segment sums of delta' and the
// adjoint (mu_{t-1} = 0) need no test per step; x = delta' u keeps the true delta', and the
// backward's assembly takes delta' again from delta at those steps. g_t = mu_{t-1} h_{t-1} is then
// 0, so nothing reaches delta, A or the earlier steps through the restart's decay.
//
// Backward. With mu_t = exp(delta'_{t+1} A) lambda_{t+1} the adjoint flowing into step t from
// the future (mu_{T-1} = dL/dh_T) and lambda_t = dL/dh_t = C_t dy_t + mu_t (dy = dL/dy_t =
// dout_t silu(z_t)):
//   mu_{t-1} = exp(delta'_t A) lambda_t,   g_t = mu_{t-1} h_{t-1} = dL/d(delta'_t A)
//   du_t = delta'_t s_t + D dy_t,           s_t = sum_n lambda_t B_t
//   ddelta'_t = u_t s_t + sum_n A g_t,      ddelta_t = ddelta'_t sigmoid(delta_t + bias)
//   dB_t = sum_d delta'_t u_t lambda_t,     dC_t = sum_d dy_t h_t
//   dA = sum_{b,t} delta'_t g_t,  dD = sum_{b,t} dy_t u_t,  dbias = sum_{b,t} ddelta_t,
//   dh0 = mu_{-1},  dz_t = dout_t y_t silu'(z_t)
// A block owns 64 channels (two per thread) x 16 states per pass (4 lanes x 4 states; N > 16
// loops over passes, N <= 16 uses NP / 4 lanes) of one batch row and walks its segment's chunks in
// reverse. Per chunk: prep (delta', x, dy into shared memory; dz written), then per pass: pass A
// walks the chunk forward from its kept start state and leaves the state at each SS_SUB = 4-step
// sub-chunk start in shared memory; then per sub-chunk, last first, a recompute keeps its 4
// states and decays in registers and the reverse walk consumes them (per step and state 8 fp32
// operations, nothing recomputed); dB / dC partials (summed over the thread's two channels) and
// s / sum A g partials (over its four states) go through shared memory: dB / dC sums over the
// block's 64 channels to `part_bc` [D / 64, B, T, 2, N] fp32, s and sum A g over the states to a
// per-chunk tile, from which the chunk's du and ddelta are assembled and written. dA, dD and dbias
// accumulate per block over its segment into partials per (segment, batch); the reduce kernels
// add all partials in a fixed order. Two ex2 per element (pass A, recompute) against the
// forward's one.
//
// Invariants. Every sum has a fixed order (no atomics): results are deterministic, and both
// compile tiers (full and --Ofast-compile=mid) give the same bits because every multiply that
// feeds an add is written as an explicit fmaf (the optimiser may otherwise fuse a different
// product at each tier). Subnormals are flushed (--ftz=true; ex2.approx.ftz). softplus for small
// arguments uses log1p's series (lg2.approx is only absolutely accurate near 1); sigmoid(v) in the
// backward is -expm1(-delta'), from delta' alone.
//
// Floors (H100 SXM, 132 SMs x 16 ex2 per clock at ~1.755 GHz = 3.7e12 ex2/s; HBM ~3.0 TB/s).
// At B x T x D x N = 8 x 2048 x 2048 x 16: one ex2 per element is 5.4e8 ex2 = 0.145 ms per
// pass, 0.29 ms for forward + backward (one ex2 each); memory, bf16: forward u, delta, z in and
// out out, 8 bytes per (b, t, d) = 268 MB = 0.089 ms; backward u, delta, z, dout in and du,
// ddelta, dz out, 14 bytes = 470 MB = 0.157 ms; so the exponentials set the floor there.
// Estimates from instruction counts (not measurements), same shape: the forward is ex2-bound at
// ~1.25 ex2 per element (softplus and silu add 4 per (t, d)), 2.5 SM clocks per warp-element:
// 0.18 ms; the backward is issue-bound at ~23 instructions per element (2.3 ex2), ~5.7 clocks
// per warp-element: 0.42 ms, plus ~0.05 ms for the dB / dC partials (67 MB written and read).

#include "common.cuh"

#define SS_CHUNK 32           // steps per chunk: staging unit and interval of the kept states
#define SS_SUB 4              // steps per backward sub-chunk (states and decays in registers)
#define SS_SUBS (SS_CHUNK / SS_SUB)
#define SS_NS 4               // states per thread
#define SS_MIN_THREADS 128    // forward block: max(128, 8 x state lanes) threads
#define SS_BWD_TILE 64        // channels per backward block, two per thread
#define SS_BWD_GROUPS 32      // channel pairs per backward block
#define SS_BWD_LANES 4        // most state lanes per backward channel pair (16 states per pass)
#define SS_SOFTPLUS_LINEAR 20.f
#define SS_RESTART 1e30f      // the decay exponent of a restart: exp2(SS_RESTART A2) = 0 for A <= -1e-28
#define LN2 0.69314718f

// A [B, T, W] tensor of input_t: element (b, t, i) at p + b * sb + t * st + i (null: absent).
struct Rows {
  void* p;
  long long sb;
  long long st;
};

// Every entry point's one argument, filled by the launcher per call (a #[repr(C)] twin in Rust).
struct ScanParams {
  Rows u, delta, z, Bm, Cm;  // inputs; z may be absent
  Rows out, ypre;            // forward outputs; ypre (pre-gate y) may be absent
  Rows dout;                 // backward input
  Rows du, ddelta, dz;       // backward outputs; dz when z
  Rows dB, dC;               // reduce outputs
  const float* A;            // [D, N]
  const float* Dskip;        // [D] or null
  const float* bias;         // [D] or null
  const float* h0;           // [B, D, N] or null
  const float* dhT;          // [B, D, N] or null: gradient of the final state
  float* hT;                 // [B, D, N] or null: final state
  float* ckpt;               // [B, chunks, D, N]: state at each chunk start
  float* seg;                // [S, B, D, N]: segment states / adjoints (segmented calls)
  float* dsum;               // [S, B, D]: sum of delta' per segment
  float* part_bc;            // [ceil(D / 64), B, T, 2, N]: dB, dC partials per channel tile
  float* part_a;             // [S, B, D, N]: dA partials
  float* part_dd;            // [S, B, 2, D]: dD, dbias partials
  float* work;               // [S, B, D, N]: adjoints between chunks when N > 16
  float* dh0;                // [B, D, N] or null
  float* dA;                 // [D, N]
  float* dD;                 // [D] or null
  float* dbias;              // [D] or null
  const bool* reset;         // [B, T] or null: true where the state restarts from zero
  int B, T, D, N;
  int segments;    // S
  int seg_chunks;  // chunks per segment (the last may have fewer)
  int softplus;    // 1: delta' = softplus(delta + bias)
  int reverse;     // selective_scan_carry: 0 states forward, 1 adjoints backward
};
static_assert(sizeof(Rows) == 24, "Rows layout");
static_assert(sizeof(ScanParams) == 13 * 24 + 18 * 8 + 8 * 4, "ScanParams layout");

// ---------------------------------------------------------------------------------------------
// Math
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ float lg2_approx(float x) {
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float rcp_approx(float x) {
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// softplus(v) = log1p(e^v), v past 20 as v. Below e = 2^-5, log1p's series to e^6 (truncation
// e^7 / 7 < 1.3e-10 e): lg2.approx(1 + e) there would carry ~2^-22 absolute error on a result ~e.
__device__ __forceinline__ float softplus_f(float v) {
  if (v > SS_SOFTPLUS_LINEAR) return v;
  const float e = exp2_approx(v * LOG2E);
  if (e < 0.03125f) {
    float q = fmaf(e, -1.f / 6.f, 0.2f);
    q = fmaf(e, q, -0.25f);
    q = fmaf(e, q, 1.f / 3.f);
    q = fmaf(e, q, -0.5f);
    q = fmaf(e, q, 1.f);
    return e * q;
  }
  return lg2_approx(1.f + e) * LN2;
}

// softplus'(v) = sigmoid(v) = -expm1(-softplus(v)), from delta' = softplus(v) alone; 1 where
// the forward took v itself. Below 2^-5 expm1's series (truncation x^6 / 720).
__device__ __forceinline__ float softplus_slope(float dp) {
  if (dp > SS_SOFTPLUS_LINEAR) return 1.f;
  if (dp < 0.03125f) {
    float q = fmaf(dp, 1.f / 120.f, -1.f / 24.f);
    q = fmaf(dp, q, 1.f / 6.f);
    q = fmaf(dp, q, -0.5f);
    q = fmaf(dp, q, 1.f);
    return dp * q;
  }
  return 1.f - exp2_approx(-dp * LOG2E);
}

__device__ __forceinline__ float sigmoid_f(float z) {
  return rcp_approx(1.f + exp2_approx(-z * LOG2E));
}

// N rounded up to a power of two >= SS_NS: the states a channel's lanes hold.
__device__ __forceinline__ int padded_states(int n) {
  int p = SS_NS;
  while (p < n) p *= 2;
  return p;
}

__device__ __forceinline__ int chunks_of(int T) { return (T + SS_CHUNK - 1) / SS_CHUNK; }

// Whether the state restarts from zero at step t of row b (a document begins there).
__device__ __forceinline__ bool restarts(const ScanParams& p, int b, int t) {
  return p.reset != nullptr && t < p.T && p.reset[(long long)b * p.T + t];
}

// ---------------------------------------------------------------------------------------------
// Row access: 8 consecutive elements of a row, one 16-byte access where the address allows
// (every row of a well-formed tensor agrees), element by element at the tensor's end.
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ const input_t* row_of(const Rows& r, int b, int t) {
  return static_cast<const input_t*>(r.p) + (long long)b * r.sb + (long long)t * r.st;
}
__device__ __forceinline__ input_t* row_out(const Rows& r, int b, int t) {
  return static_cast<input_t*>(r.p) + (long long)b * r.sb + (long long)t * r.st;
}

__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<unsigned long long>(p) & 15) == 0;
}

// v[k] = row[i + k] for i + k < n, else 0.
template <typename T>
__device__ __forceinline__ void load8(const T* row, int i, int n, float v[8]) {
  const T* p = row + i;
  if (i + 8 <= n && aligned16(p)) {
    if constexpr (sizeof(T) == 4) {
      const float4 a = __ldg(reinterpret_cast<const float4*>(p));
      const float4 c = __ldg(reinterpret_cast<const float4*>(p) + 1);
      v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w;
      v[4] = c.x, v[5] = c.y, v[6] = c.z, v[7] = c.w;
    } else {
      const uint4 a = __ldg(reinterpret_cast<const uint4*>(p));
      const unsigned w[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        T lo, hi;
        lo.bits = (u16)(w[k] & 0xffffu);
        hi.bits = (u16)(w[k] >> 16);
        v[2 * k] = to_f32(lo);
        v[2 * k + 1] = to_f32(hi);
      }
    }
    return;
  }
#pragma unroll
  for (int k = 0; k < 8; ++k) v[k] = i + k < n ? to_f32(p[k]) : 0.f;
}

// row[i + k] = v[k] for i + k < n.
template <typename T>
__device__ __forceinline__ void store8(T* row, int i, int n, const float v[8]) {
  T* p = row + i;
  if (i + 8 <= n && aligned16(p)) {
    if constexpr (sizeof(T) == 4) {
      reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
      reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
    } else {
      unsigned w[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const T lo = from_f32<T>(v[2 * k]), hi = from_f32<T>(v[2 * k + 1]);
        w[k] = (unsigned)lo.bits | ((unsigned)hi.bits << 16);
      }
      *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
    }
    return;
  }
#pragma unroll
  for (int k = 0; k < 8; ++k)
    if (i + k < n) p[k] = from_f32<T>(v[k]);
}

__device__ __forceinline__ float opt(const float* p, long long i) { return p ? p[i] : 0.f; }

// Columns [n0, n0 + cols) of B (or C) for the chunk's steps as fp32, zero past T and N:
// dst[t * cols + k] = M[b, t0 + t, n0 + k].
__device__ __forceinline__ void stage_states(const ScanParams& p, const Rows& M, int b, int t0,
                                             int n0, int cols, float* dst) {
  for (int e = threadIdx.x; e < SS_CHUNK * cols; e += blockDim.x) {
    const int t = e / cols, k = e % cols, n = n0 + k;
    dst[e] = (t0 + t < p.T && n < p.N) ? ld(row_of(M, b, t0 + t), n) : 0.f;
  }
}

// delta' for 8 channels from delta, zero on padded steps and channels.
__device__ __forceinline__ void delta_prime(const ScanParams& p, bool step_ok, int d,
                                            const float delta[8], float dp[8]) {
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    const float v = delta[k] + (d + k < p.D ? opt(p.bias, d + k) : 0.f);
    dp[k] = (step_ok && d + k < p.D) ? (p.softplus ? softplus_f(v) : v) : 0.f;
  }
}

// ---------------------------------------------------------------------------------------------
// Forward: selective_scan_fwd (OUTPUTS) and selective_scan_fwd_states (segment end states from
// zero). Grid (ceil(D / DC), B, S or S - 1), DC = threads / NG, threads = max(128, 8 NG).
// Shared memory (floats): dpx [CHUNK][DC] float2 (delta', x), Bs [CHUNK][NP]; with OUTPUTS also
// Cs [CHUNK][NP], us [CHUNK][DC], yp [CHUNK][threads].
// ---------------------------------------------------------------------------------------------

template <bool OUTPUTS>
__device__ __forceinline__ void fwd_body(const ScanParams& p) {
  extern __shared__ float4 ss_smem[];
  const int N = p.N, D = p.D, T = p.T, NP = padded_states(N), NG = NP / SS_NS;
  const int threads = max(SS_MIN_THREADS, 8 * NG), DC = threads / NG;
  if ((int)blockDim.x != threads) __trap();
  const int tid = threadIdx.x, ng = tid % NG, c = tid / NG;
  const int d0 = blockIdx.x * DC, b = blockIdx.y, s = blockIdx.z;
  const int d = d0 + c, n0 = ng * SS_NS;
  const bool dok = d < D;
  const int nck = chunks_of(T);
  const int cbeg = s * p.seg_chunks, cend = min(cbeg + p.seg_chunks, nck);

  float2* dpx = reinterpret_cast<float2*>(ss_smem);
  float* Bs = reinterpret_cast<float*>(dpx + SS_CHUNK * DC);
  float* Cs = Bs + SS_CHUNK * NP;
  float* us = Cs + SS_CHUNK * NP;
  float* yp = us + SS_CHUNK * DC;
  require_smem(4u * (OUTPUTS ? SS_CHUNK * (3 * DC + 2 * NP + threads) : SS_CHUNK * (2 * DC + NP)));

  float a2[SS_NS], h[SS_NS];
#pragma unroll
  for (int i = 0; i < SS_NS; ++i) {
    const int n = n0 + i;
    const bool ok = dok && n < N;
    const long long bdn = ((long long)b * D + d) * N + n;
    a2[i] = ok ? p.A[(long long)d * N + n] * LOG2E : 0.f;
    h[i] = 0.f;
    if (OUTPUTS && ok) h[i] = s == 0 ? opt(p.h0, bdn) : p.seg[(long long)s * p.B * D * N + bdn];
  }
  float dsum = 0.f;

  for (int j = cbeg; j < cend; ++j) {
    const int t0 = j * SS_CHUNK;
    // Prep: delta', x = delta' u (and u) for CHUNK x DC, B (and C) for CHUNK x NP.
    for (int e = tid; e < SS_CHUNK * DC / 8; e += threads) {
      const int t = e / (DC / 8), cc = (e % (DC / 8)) * 8, tt = t0 + t;
      float uv[8], dv[8], dp[8];
      const bool step_ok = tt < T;
      if (step_ok) {
        load8(row_of(p.u, b, tt), d0 + cc, D, uv);
        load8(row_of(p.delta, b, tt), d0 + cc, D, dv);
      } else {
#pragma unroll
        for (int k = 0; k < 8; ++k) uv[k] = dv[k] = 0.f;
      }
      delta_prime(p, step_ok, d0 + cc, dv, dp);
      const bool restart = restarts(p, b, tt);
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        dpx[t * DC + cc + k] = make_float2(restart ? SS_RESTART : dp[k], dp[k] * uv[k]);
        if (OUTPUTS) us[t * DC + cc + k] = uv[k];
      }
    }
    stage_states(p, p.Bm, b, t0, 0, NP, Bs);
    if (OUTPUTS) stage_states(p, p.Cm, b, t0, 0, NP, Cs);
    __syncthreads();

    if (OUTPUTS && p.ckpt != nullptr && dok) {
      float* kp = p.ckpt + (((long long)b * nck + j) * D + d) * N + n0;
#pragma unroll
      for (int i = 0; i < SS_NS; ++i)
        if (n0 + i < N) kp[i] = h[i];
    }
    // The walk.
#pragma unroll 4
    for (int t = 0; t < SS_CHUNK; ++t) {
      const float2 px = dpx[t * DC + c];
      const float4 bq = *reinterpret_cast<const float4*>(Bs + t * NP + n0);
      const float bb[SS_NS] = {bq.x, bq.y, bq.z, bq.w};
#pragma unroll
      for (int i = 0; i < SS_NS; ++i)
        h[i] = fmaf(exp2_approx(px.x * a2[i]), h[i], px.y * bb[i]);
      if (OUTPUTS) {
        const float4 cq = *reinterpret_cast<const float4*>(Cs + t * NP + n0);
        float y = cq.x * h[0];
        y = fmaf(cq.y, h[1], y);
        y = fmaf(cq.z, h[2], y);
        y = fmaf(cq.w, h[3], y);
        yp[t * threads + tid] = y;
      } else {
        dsum += px.x;
      }
    }

    if (OUTPUTS) {
      __syncthreads();
      // Outputs: y = sum over the NG state lanes + D u; out = y silu(z).
      for (int e = tid; e < SS_CHUNK * DC / 8; e += threads) {
        const int t = e / (DC / 8), cc = (e % (DC / 8)) * 8, tt = t0 + t, dd = d0 + cc;
        if (tt >= T || dd >= D) continue;
        float y[8], zv[8];
#pragma unroll
        for (int k = 0; k < 8; ++k) {
          const float* part = yp + t * threads + (cc + k) * NG;
          float acc = part[0];
          for (int q = 1; q < NG; ++q) acc += part[q];
          y[k] = p.Dskip != nullptr && dd + k < D ? fmaf(p.Dskip[dd + k], us[t * DC + cc + k], acc)
                                                  : acc;
        }
        if (p.ypre.p != nullptr) store8(row_out(p.ypre, b, tt), dd, D, y);
        if (p.z.p != nullptr) {
          load8(row_of(p.z, b, tt), dd, D, zv);
#pragma unroll
          for (int k = 0; k < 8; ++k) y[k] = y[k] * (zv[k] * sigmoid_f(zv[k]));
        }
        store8(row_out(p.out, b, tt), dd, D, y);
      }
    }
    __syncthreads();  // the next chunk's prep overwrites what this one read
  }

  if (!dok) return;
  const long long bdn0 = ((long long)b * D + d) * N + n0;
  if (OUTPUTS) {
    if (s == p.segments - 1 && p.hT != nullptr) {
#pragma unroll
      for (int i = 0; i < SS_NS; ++i)
        if (n0 + i < N) p.hT[bdn0 + i] = h[i];
    }
  } else {
    float* out = p.seg + (long long)(s + 1) * p.B * D * N + bdn0;
#pragma unroll
    for (int i = 0; i < SS_NS; ++i)
      if (n0 + i < N) out[i] = h[i];
    if (ng == 0) p.dsum[((long long)s * p.B + b) * D + d] = dsum;
  }
}

// ---------------------------------------------------------------------------------------------
// Backward: selective_scan_bwd (FULL) and selective_scan_bwd_dh (segment start adjoints from
// zero, segments 1 .. S-1). Grid (ceil(D / 64), B, S or S - 1), threads = 32 x NGB,
// NGB = min(NP / 4, 4) state lanes, SP = 4 NGB states per pass, NP / SP passes.
// Shared memory (floats): dpx [CHUNK][64] float2 (delta', x), dys [CHUNK][64], Cs [CHUNK][SP];
// FULL adds Bs [CHUNK][SP], hs [SUBS][threads][8], pbc [SUB][threads][8], psg [SUB][threads][4],
// acc [CHUNK][64][2]; the column sums at the segment end reuse pbc (bwd_dh: after Cs).
// ---------------------------------------------------------------------------------------------

struct BwdShape {
  int NP, NGB, SP, passes, threads;
};

__device__ __forceinline__ BwdShape bwd_shape(int N) {
  BwdShape s;
  s.NP = padded_states(N);
  s.NGB = min(s.NP / SS_NS, SS_BWD_LANES);
  s.SP = SS_NS * s.NGB;
  s.passes = s.NP / s.SP;
  s.threads = SS_BWD_GROUPS * s.NGB;
  return s;
}

template <bool FULL>
__device__ __forceinline__ void bwd_body(const ScanParams& p) {
  extern __shared__ float4 ss_smem[];
  const int N = p.N, D = p.D, T = p.T;
  const BwdShape sh = bwd_shape(N);
  const int NGB = sh.NGB, SP = sh.SP, threads = sh.threads;
  if ((int)blockDim.x != threads) __trap();
  const int tid = threadIdx.x, ng = tid % NGB, cg = tid / NGB;
  const int d0 = blockIdx.x * SS_BWD_TILE, b = blockIdx.y, s = FULL ? blockIdx.z : blockIdx.z + 1;
  const int c0 = 2 * cg;  // tile channels c0, c0 + 1
  const int nck = chunks_of(T);
  const int cbeg = s * p.seg_chunks, cend = min(cbeg + p.seg_chunks, nck);
  const long long BDN = (long long)p.B * D * N;

  float2* dpx = reinterpret_cast<float2*>(ss_smem);
  float* dys = reinterpret_cast<float*>(dpx + SS_CHUNK * SS_BWD_TILE);
  float* Cs = dys + SS_CHUNK * SS_BWD_TILE;
  float* Bs = Cs + SS_CHUNK * SP;
  float* hs = Bs + SS_CHUNK * SP;
  float* pbc = hs + SS_SUBS * threads * 8;
  float* psg = pbc + SS_SUB * threads * 8;
  float* acc = psg + SS_SUB * threads * 4;
  float* scratch = FULL ? pbc : Bs;
  require_smem(4u * (FULL ? SS_CHUNK * (5 * SS_BWD_TILE + 2 * SP) +
                                threads * (8 * SS_SUBS + 12 * SS_SUB)
                          : SS_CHUNK * (3 * SS_BWD_TILE + SP) + 16 * threads));

  // The adjoint at the segment's end (bwd_dh walks from zero); scratch between chunks when there
  // are several passes.
  const float* mu_src = !FULL ? nullptr : p.segments > 1 ? p.seg + (long long)s * BDN : p.dhT;
  float* mu_work = !FULL              ? p.seg + (long long)(s - 1) * BDN
                   : p.work != nullptr ? p.work + (long long)s * BDN
                                       : nullptr;
  float* a_part = FULL ? p.part_a + (long long)s * BDN : nullptr;

  float mu[8], dAacc[8];  // (channel k, state i) at k * 4 + i
  float col[2][8];        // tile channel (tid % 8) * 8 + k: dD, dbias (bwd_dh: sum of delta')
#pragma unroll
  for (int q = 0; q < 2; ++q)
#pragma unroll
    for (int k = 0; k < 8; ++k) col[q][k] = 0.f;

  for (int j = cend - 1; j >= cbeg; --j) {
    const int t0 = j * SS_CHUNK;
    const bool first = j == cend - 1;  // the segment's last chunk, walked first
    // Prep: delta', x, dy into shared memory; dz out.
    for (int e = tid; e < SS_CHUNK * SS_BWD_TILE / 8; e += threads) {
      const int t = e / (SS_BWD_TILE / 8), cv = e % (SS_BWD_TILE / 8), cc = cv * 8;
      const int tt = t0 + t, dd = d0 + cc;
      const bool step_ok = tt < T;
      float uv[8], dv[8], dp[8], go[8];
#pragma unroll
      for (int k = 0; k < 8; ++k) uv[k] = dv[k] = go[k] = 0.f;
      if (step_ok) {
        if (FULL) load8(row_of(p.u, b, tt), dd, D, uv);
        load8(row_of(p.delta, b, tt), dd, D, dv);
        load8(row_of(p.dout, b, tt), dd, D, go);
      }
      delta_prime(p, step_ok, dd, dv, dp);
      if (p.z.p != nullptr && step_ok) {
        float zv[8], yv[8], dzv[8];
        load8(row_of(p.z, b, tt), dd, D, zv);
        if (FULL) load8(row_of(p.ypre, b, tt), dd, D, yv);
#pragma unroll
        for (int k = 0; k < 8; ++k) {
          const float sg = sigmoid_f(zv[k]);
          if (FULL) dzv[k] = go[k] * yv[k] * (sg * fmaf(zv[k], 1.f - sg, 1.f));
          go[k] = go[k] * (zv[k] * sg);
        }
        if (FULL) store8(row_out(p.dz, b, tt), dd, D, dzv);
      }
      const bool restart = restarts(p, b, tt);
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        const float decay_exponent = restart ? SS_RESTART : dp[k];
        dpx[t * SS_BWD_TILE + cc + k] = make_float2(decay_exponent, dp[k] * uv[k]);
        dys[t * SS_BWD_TILE + cc + k] = go[k];
        if (!FULL) col[0][k] += decay_exponent;
      }
    }

    for (int pass = 0; pass < sh.passes; ++pass) {
      const int nb = pass * SP + ng * SS_NS;  // this thread's first state
      if (pass > 0) __syncthreads();           // Bs / Cs of the previous pass read
      stage_states(p, p.Cm, b, t0, pass * SP, SP, Cs);
      if (FULL) stage_states(p, p.Bm, b, t0, pass * SP, SP, Bs);
      __syncthreads();

      float a2[8];
      long long idx[8];  // (b, d, n) offsets; -1 for padded channels / states
#pragma unroll
      for (int k = 0; k < 2; ++k)
#pragma unroll
        for (int i = 0; i < SS_NS; ++i) {
          const int dd = d0 + c0 + k, n = nb + i;
          const bool ok = dd < D && n < N;
          a2[k * 4 + i] = ok ? p.A[(long long)dd * N + n] * LOG2E : 0.f;
          idx[k * 4 + i] = ok ? ((long long)b * D + dd) * N + n : -1;
        }
      if (first || sh.passes > 1) {
#pragma unroll
        for (int q = 0; q < 8; ++q) {
          const float* src = first ? mu_src : mu_work;
          mu[q] = (src != nullptr && idx[q] >= 0) ? src[idx[q]] : 0.f;
          if (FULL) dAacc[q] = (!first && idx[q] >= 0) ? a_part[idx[q]] : 0.f;
        }
      }

      if (!FULL) {
        // Adjoint only: lambda_t = C_t dy_t + mu_t, mu_{t-1} = exp2(delta'_t A2) lambda_t.
#pragma unroll 2
        for (int t = SS_CHUNK - 1; t >= 0; --t) {
          const float4 px = *reinterpret_cast<const float4*>(dpx + t * SS_BWD_TILE + c0);
          const float2 dy = *reinterpret_cast<const float2*>(dys + t * SS_BWD_TILE + c0);
          const float4 cq = *reinterpret_cast<const float4*>(Cs + t * SP + ng * SS_NS);
          const float dpk[2] = {px.x, px.z}, dyk[2] = {dy.x, dy.y};
          const float cc[SS_NS] = {cq.x, cq.y, cq.z, cq.w};
#pragma unroll
          for (int k = 0; k < 2; ++k)
#pragma unroll
            for (int i = 0; i < SS_NS; ++i) {
              const int q = k * 4 + i;
              mu[q] = exp2_approx(dpk[k] * a2[q]) * fmaf(cc[i], dyk[k], mu[q]);
            }
        }
      } else {
        // Pass A: the chunk forward from its kept start; the state at each sub-chunk start.
        float h[8];
        const float* kp = p.ckpt + (((long long)b * nck + j) * D) * N;
#pragma unroll
        for (int q = 0; q < 8; ++q)
          h[q] = idx[q] >= 0 ? kp[(long long)(d0 + c0 + q / 4) * N + nb + q % 4] : 0.f;
        for (int sub = 0; sub < SS_SUBS; ++sub) {
          float4* hq = reinterpret_cast<float4*>(hs + (sub * threads + tid) * 8);
          hq[0] = make_float4(h[0], h[1], h[2], h[3]);
          hq[1] = make_float4(h[4], h[5], h[6], h[7]);
#pragma unroll
          for (int i = 0; i < SS_SUB; ++i) {
            const int t = sub * SS_SUB + i;
            const float4 px = *reinterpret_cast<const float4*>(dpx + t * SS_BWD_TILE + c0);
            const float4 bq = *reinterpret_cast<const float4*>(Bs + t * SP + ng * SS_NS);
            const float dpk[2] = {px.x, px.z}, xk[2] = {px.y, px.w};
            const float bb[SS_NS] = {bq.x, bq.y, bq.z, bq.w};
#pragma unroll
            for (int k = 0; k < 2; ++k)
#pragma unroll
              for (int n = 0; n < SS_NS; ++n) {
                const int q = k * 4 + n;
                h[q] = fmaf(exp2_approx(dpk[k] * a2[q]), h[q], xk[k] * bb[n]);
              }
          }
        }

        for (int sub = SS_SUBS - 1; sub >= 0; --sub) {
          // Recompute the sub-chunk: its states and decays in registers.
          float hst[SS_SUB][8], dA[SS_SUB][8], h0s[8];
          {
            const float4* hq = reinterpret_cast<const float4*>(hs + (sub * threads + tid) * 8);
            const float4 lo = hq[0], hi = hq[1];
            h0s[0] = lo.x, h0s[1] = lo.y, h0s[2] = lo.z, h0s[3] = lo.w;
            h0s[4] = hi.x, h0s[5] = hi.y, h0s[6] = hi.z, h0s[7] = hi.w;
          }
#pragma unroll
          for (int i = 0; i < SS_SUB; ++i) {
            const int t = sub * SS_SUB + i;
            const float4 px = *reinterpret_cast<const float4*>(dpx + t * SS_BWD_TILE + c0);
            const float4 bq = *reinterpret_cast<const float4*>(Bs + t * SP + ng * SS_NS);
            const float dpk[2] = {px.x, px.z}, xk[2] = {px.y, px.w};
            const float bb[SS_NS] = {bq.x, bq.y, bq.z, bq.w};
#pragma unroll
            for (int k = 0; k < 2; ++k)
#pragma unroll
              for (int n = 0; n < SS_NS; ++n) {
                const int q = k * 4 + n;
                dA[i][q] = exp2_approx(dpk[k] * a2[q]);
                hst[i][q] = fmaf(dA[i][q], i > 0 ? hst[i - 1][q] : h0s[q], xk[k] * bb[n]);
              }
          }
          // Reverse walk over the sub-chunk.
#pragma unroll
          for (int i = SS_SUB - 1; i >= 0; --i) {
            const int t = sub * SS_SUB + i;
            const float4 px = *reinterpret_cast<const float4*>(dpx + t * SS_BWD_TILE + c0);
            const float2 dy = *reinterpret_cast<const float2*>(dys + t * SS_BWD_TILE + c0);
            const float4 bq = *reinterpret_cast<const float4*>(Bs + t * SP + ng * SS_NS);
            const float4 cq = *reinterpret_cast<const float4*>(Cs + t * SP + ng * SS_NS);
            const float dpk[2] = {px.x, px.z}, xk[2] = {px.y, px.w}, dyk[2] = {dy.x, dy.y};
            const float bb[SS_NS] = {bq.x, bq.y, bq.z, bq.w};
            const float cc[SS_NS] = {cq.x, cq.y, cq.z, cq.w};
            float dBn[SS_NS], dCn[SS_NS], sk[2], agk[2];
#pragma unroll
            for (int k = 0; k < 2; ++k) {
              sk[k] = agk[k] = 0.f;
#pragma unroll
              for (int n = 0; n < SS_NS; ++n) {
                const int q = k * 4 + n;
                const float lam = fmaf(cc[n], dyk[k], mu[q]);
                const float mun = dA[i][q] * lam;
                const float g = mun * (i > 0 ? hst[i - 1][q] : h0s[q]);
                agk[k] = fmaf(a2[q], g, agk[k]);
                dAacc[q] = fmaf(dpk[k], g, dAacc[q]);
                sk[k] = fmaf(lam, bb[n], sk[k]);
                dBn[n] = k == 0 ? xk[0] * lam : fmaf(xk[1], lam, dBn[n]);
                dCn[n] = k == 0 ? dyk[0] * hst[i][q] : fmaf(dyk[1], hst[i][q], dCn[n]);
                mu[q] = mun;
              }
            }
            float4* bcq = reinterpret_cast<float4*>(pbc + (i * threads + tid) * 8);
            bcq[0] = make_float4(dBn[0], dBn[1], dBn[2], dBn[3]);
            bcq[1] = make_float4(dCn[0], dCn[1], dCn[2], dCn[3]);
            *reinterpret_cast<float4*>(psg + (i * threads + tid) * 4) =
                make_float4(sk[0], agk[0], sk[1], agk[1]);
          }
          __syncthreads();
          // dB / dC: output tid = (step i, state lane, value v), summed over the channel pairs.
          {
            const int i = tid / (8 * NGB), lane = (tid / 8) % NGB, v = tid % 8;
            const int tt = t0 + sub * SS_SUB + i, n = pass * SP + lane * SS_NS + v % 4;
            const float* src = pbc + (i * threads + lane) * 8 + v;
            float r = 0.f;
            for (int g2 = 0; g2 < SS_BWD_GROUPS; ++g2) r += src[g2 * NGB * 8];
            if (tt < T && n < N)
              p.part_bc[((((long long)blockIdx.x * p.B + b) * T + tt) * 2 + v / 4) * N + n] = r;
          }
          // s and sum A g: per (step, channel pair), summed over the state lanes.
          for (int e = tid; e < SS_SUB * SS_BWD_GROUPS; e += threads) {
            const int i = e / SS_BWD_GROUPS, g2 = e % SS_BWD_GROUPS;
            const float* src = psg + (i * threads + g2 * NGB) * 4;
            float4 r = *reinterpret_cast<const float4*>(src);
            for (int l = 1; l < NGB; ++l) {
              const float4 o = *reinterpret_cast<const float4*>(src + l * 4);
              r.x += o.x, r.y += o.y, r.z += o.z, r.w += o.w;
            }
            float4* dst =
                reinterpret_cast<float4*>(acc + ((sub * SS_SUB + i) * SS_BWD_TILE + 2 * g2) * 2);
            if (pass > 0) {
              const float4 o = *dst;
              r.x += o.x, r.y += o.y, r.z += o.z, r.w += o.w;
            }
            *dst = r;
          }
          __syncthreads();
        }
      }

      // After the pass: keep the adjoints (and dA) for the next chunk or write the results.
      const bool last = j == cbeg;
#pragma unroll
      for (int q = 0; q < 8; ++q) {
        if (idx[q] < 0) continue;
        if (sh.passes > 1 || (!FULL && last)) mu_work[idx[q]] = mu[q];
        if (FULL && (sh.passes > 1 || last)) a_part[idx[q]] = dAacc[q];
        if (FULL && last && s == 0 && p.dh0 != nullptr) p.dh0[idx[q]] = mu[q];
      }
    }

    if (FULL) {
      __syncthreads();
      // Assembly of the chunk's du and ddelta from s and sum A g.
      for (int e = tid; e < SS_CHUNK * SS_BWD_TILE / 8; e += threads) {
        const int t = e / (SS_BWD_TILE / 8), cc = (e % (SS_BWD_TILE / 8)) * 8;
        const int tt = t0 + t, dd = d0 + cc;
        if (tt >= T || dd >= D) continue;
        float uv[8], du[8], ddl[8], dpv[8];
        load8(row_of(p.u, b, tt), dd, D, uv);
        if (restarts(p, b, tt)) {
          // dpx holds the restart's decay exponent here: delta' again from delta.
          float dv[8];
          load8(row_of(p.delta, b, tt), dd, D, dv);
          delta_prime(p, true, dd, dv, dpv);
        } else {
#pragma unroll
          for (int k = 0; k < 8; ++k) dpv[k] = dpx[t * SS_BWD_TILE + cc + k].x;
        }
#pragma unroll
        for (int k = 0; k < 8; ++k) {
          const float2 sa = *reinterpret_cast<const float2*>(acc + (t * SS_BWD_TILE + cc + k) * 2);
          const float dp = dpv[k], dy = dys[t * SS_BWD_TILE + cc + k];
          const bool ok = dd + k < D;
          const float dsk = ok ? opt(p.Dskip, dd + k) : 0.f;
          du[k] = fmaf(dp, sa.x, dsk * dy);
          const float ddp = fmaf(uv[k], sa.x, sa.y * LN2);
          ddl[k] = p.softplus ? ddp * softplus_slope(dp) : ddp;
          col[0][k] = fmaf(dy, uv[k], col[0][k]);
          col[1][k] += ddl[k];
        }
        store8(row_out(p.du, b, tt), dd, D, du);
        store8(row_out(p.ddelta, b, tt), dd, D, ddl);
      }
    }
    __syncthreads();  // the next chunk's prep overwrites what this one read
  }

  // Column sums over the segment, in thread order: dD and dbias (FULL), sum of delta' (bwd_dh).
  // Thread tid's col[q][k] is tile channel (tid % 8) * 8 + k.
  __syncthreads();
#pragma unroll
  for (int q = 0; q < 2; ++q)
#pragma unroll
    for (int k = 0; k < 8; ++k) scratch[(q * 8 + k) * threads + tid] = col[q][k];
  __syncthreads();
  for (int o = tid; o < 2 * SS_BWD_TILE; o += threads) {
    const int q = o / SS_BWD_TILE, c = o % SS_BWD_TILE, dd = d0 + c;
    if (dd >= D || (!FULL && q == 1)) continue;
    float r = 0.f;
    for (int th = c / 8; th < threads; th += 8) r += scratch[(q * 8 + c % 8) * threads + th];
    if (FULL)
      p.part_dd[(((long long)s * p.B + b) * 2 + q) * D + dd] = r;
    else
      p.dsum[((long long)s * p.B + b) * D + dd] = r;
  }
}

// ---------------------------------------------------------------------------------------------
// Entry points, in the launcher's order (KERNEL_INDEX)
// ---------------------------------------------------------------------------------------------

#if WANT_KERNEL(0)
extern "C" __global__ void ENTRY(selective_scan_fwd)(const ScanParams p) { fwd_body<true>(p); }
#endif

#if WANT_KERNEL(1)
extern "C" __global__ void ENTRY(selective_scan_fwd_states)(const ScanParams p) {
  fwd_body<false>(p);
}
#endif

#if WANT_KERNEL(2)
// Segment carry, one thread per (b, d, n). Forward (reverse = 0): seg[s + 1] holds segment s's
// local end state and becomes segment s + 1's start, h = exp2(A2 dsum[s]) h + seg[s + 1], from
// h0 (or 0). Backward (reverse = 1): seg[s - 1] holds segment s's local start adjoint and
// becomes segment s - 1's end adjoint, seg[S - 1] = dhT (or 0).
extern "C" __global__ void ENTRY(selective_scan_carry)(const ScanParams p) {
  const long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  const long long BDN = (long long)p.B * p.D * p.N;
  if (e >= BDN) return;
  const int n = (int)(e % p.N), d = (int)((e / p.N) % p.D), b = (int)(e / ((long long)p.D * p.N));
  const float a2 = p.A[(long long)d * p.N + n] * LOG2E;
  const int S = p.segments;
  if (!p.reverse) {
    float h = opt(p.h0, e);
    for (int s = 0; s + 1 < S; ++s) {
      const float decay = exp2_approx(a2 * p.dsum[((long long)s * p.B + b) * p.D + d]);
      float* slot = p.seg + (long long)(s + 1) * BDN + e;
      h = fmaf(decay, h, *slot);
      *slot = h;
    }
  } else {
    float mu = opt(p.dhT, e);
    p.seg[(long long)(S - 1) * BDN + e] = mu;
    for (int s = S - 1; s > 0; --s) {
      const float decay = exp2_approx(a2 * p.dsum[((long long)s * p.B + b) * p.D + d]);
      float* slot = p.seg + (long long)(s - 1) * BDN + e;
      mu = fmaf(decay, mu, *slot);
      *slot = mu;
    }
  }
}
#endif

#if WANT_KERNEL(3)
extern "C" __global__ void ENTRY(selective_scan_bwd)(const ScanParams p) { bwd_body<true>(p); }
#endif

#if WANT_KERNEL(4)
extern "C" __global__ void ENTRY(selective_scan_bwd_dh)(const ScanParams p) { bwd_body<false>(p); }
#endif

#if WANT_KERNEL(5)
// dB and dC: the partials of the ceil(D / 64) channel tiles added in tile order, one thread per
// (b, t, B or C, n), written in the input dtype.
extern "C" __global__ void ENTRY(selective_scan_reduce_bc)(const ScanParams p) {
  const long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  const long long per_tile = (long long)p.B * p.T * 2 * p.N;
  if (e >= per_tile) return;
  const int n = (int)(e % p.N), v = (int)((e / p.N) % 2);
  const long long bt = e / (2LL * p.N);
  const int t = (int)(bt % p.T), b = (int)(bt / p.T);
  const int tiles = (p.D + SS_BWD_TILE - 1) / SS_BWD_TILE;
  float r = 0.f;
  for (int k = 0; k < tiles; ++k) r += p.part_bc[k * per_tile + e];
  row_out(v == 0 ? p.dB : p.dC, b, t)[n] = from_f32<input_t>(r);
}
#endif

#if WANT_KERNEL(6)
// dA [D, N], dD and dbias [D]: the (segment, batch) partials added in order, one thread per
// element of dA, then of dD, then of dbias.
extern "C" __global__ void ENTRY(selective_scan_reduce_params)(const ScanParams p) {
  const long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  const long long DN = (long long)p.D * p.N, SB = (long long)p.segments * p.B;
  if (e < DN) {
    float r = 0.f;
    for (long long k = 0; k < SB; ++k) r += p.part_a[k * DN + e];
    p.dA[e] = r;
    return;
  }
  const long long f = e - DN;
  if (f >= 2LL * p.D) return;
  const int q = (int)(f / p.D), d = (int)(f % p.D);
  float* dst = q == 0 ? p.dD : p.dbias;
  if (dst == nullptr) return;
  float r = 0.f;
  for (long long k = 0; k < SB; ++k) r += p.part_dd[(k * 2 + q) * p.D + d];
  dst[d] = r;
}
#endif
