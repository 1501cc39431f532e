// The prelude every kernel source includes: element types, conversions, fast math, and how one
// NVRTC program selects its dtype and its kernel.
//
// Sources are compiled at run time by NVRTC with no CUDA headers (crates/cuda), so this file
// defines the few types and intrinsics the kernels need itself. The runtime compiles each kernel
// of a source as its own program, per input dtype:
//
//   -DKERNEL_DTYPE_F32 | -DKERNEL_DTYPE_BF16 | -DKERNEL_DTYPE_F16   the input dtype (`input_t`)
//   -DKERNEL_INDEX=i                                               only the i-th entry point
//
// A source guards each entry point with `#if WANT_KERNEL(i)`, i its index in the launcher's
// kernel list, and names it `ENTRY(name)`: `name_f32`, `name_bf16` or `name_f16`.

#pragma once

typedef unsigned short u16;

// 16-bit floats as their bits (no cuda_bf16.h / cuda_fp16.h under NVRTC without a toolkit).
struct bf16 {
  u16 bits;
};
struct f16 {
  u16 bits;
};

#if defined(KERNEL_DTYPE_F32)
typedef float input_t;
#define ENTRY(base) base##_f32
#elif defined(KERNEL_DTYPE_BF16)
typedef bf16 input_t;
#define ENTRY(base) base##_bf16
#elif defined(KERNEL_DTYPE_F16)
typedef f16 input_t;
#define ENTRY(base) base##_f16
#else
#error "compile with -DKERNEL_DTYPE_F32, -DKERNEL_DTYPE_BF16 or -DKERNEL_DTYPE_F16"
#endif

#ifndef KERNEL_INDEX
#define KERNEL_INDEX -1
#endif
// Whether this program defines entry point i (all of them without -DKERNEL_INDEX).
#define WANT_KERNEL(i) (KERNEL_INDEX < 0 || KERNEL_INDEX == (i))

// ---------------------------------------------------------------------------------------------
// Conversions
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(bf16 x) {
  return __int_as_float(((unsigned int)x.bits) << 16);
}
__device__ __forceinline__ float to_f32(f16 x) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x.bits));
  return f;
}

// fp32 to the element type, rounded to nearest even.
template <typename T>
__device__ __forceinline__ T from_f32(float x);
template <>
__device__ __forceinline__ float from_f32<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ bf16 from_f32<bf16>(float x) {
  bf16 r;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r.bits) : "f"(x));
  return r;
}
template <>
__device__ __forceinline__ f16 from_f32<f16>(float x) {
  f16 r;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r.bits) : "f"(x));
  return r;
}

// Element i of p as fp32 (64-bit index).
template <typename T>
__device__ __forceinline__ float ld(const T* p, long long i) {
  return to_f32(p[i]);
}

// ---------------------------------------------------------------------------------------------
// Fast math
// ---------------------------------------------------------------------------------------------

#define LOG2E 1.44269504f

// 2^x, one MUFU instruction (subnormal results flushed).
__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Traps unless the launch gave the block at least `bytes` of dynamic shared memory (the
// launchers' sizes and the kernels' layouts must agree).
__device__ __forceinline__ void require_smem(unsigned bytes) {
  unsigned r;
  asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(r));
  if (r < bytes) __trap();
}

// Sum over the 32 lanes of a warp, in every lane.
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// ---------------------------------------------------------------------------------------------
// Flag bits shared with the launchers (crates/ops/src/gla/kernels.rs names the same values; a test
// there reads them from this file)
// ---------------------------------------------------------------------------------------------

// gla.cu `gla_chunk_fwd`.
#define GLA_FWD_OUTPUTS 1  // write the outputs (else only walk the states)
#define GLA_FWD_PARALLEL 4  // one block per 64-token chunk, from the stored chunk states
// gla.cu `gla_chunk_bwd`.
#define GLA_BWD_DQ 1    // pass 1: forward walk, dq
#define GLA_BWD_DKDV 2  // pass 2: reverse walk, dk and dv
#define GLA_BWD_PARALLEL 4  // one block per 64-token chunk, from the stored (adjoint) states
