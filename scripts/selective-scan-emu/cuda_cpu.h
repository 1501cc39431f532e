// The CUDA built-ins and the kernels/common.cuh API that kernels/selective_scan.cu uses, for the
// CPU (see run.py). One OS thread runs a block's CUDA threads as ucontexts; __syncthreads()
// parks the caller until every thread of the block has arrived (a thread that exits while
// others wait at a barrier aborts). Blocks run one after another; shared memory is one static
// array. PTX helpers become their C++ equivalents (ex2 -> exp2f with subnormals flushed).
#pragma once
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __shared__

struct dim3u {
  unsigned x = 0, y = 0, z = 0;
};
inline dim3u threadIdx, blockIdx, blockDim, gridDim;
inline size_t emu_dynamic_smem = 0;

struct float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline float2 make_float2(float a, float b) { return {a, b}; }
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }
inline float __int_as_float(int i) {
  float f;
  memcpy(&f, &i, 4);
  return f;
}
template <class T>
inline T __ldg(const T* p) {
  return *p;
}
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
[[noreturn]] inline void __trap() {
  fprintf(stderr, "__trap() in block (%u, %u, %u) thread %u\n", blockIdx.x, blockIdx.y,
          blockIdx.z, threadIdx.x);
  abort();
}

// ---- kernels/common.cuh ----
typedef unsigned short u16;
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
#endif
#define KERNEL_INDEX -1
#define WANT_KERNEL(i) (KERNEL_INDEX < 0 || KERNEL_INDEX == (i))
inline float ftz(float x) { return std::fpclassify(x) == FP_SUBNORMAL ? 0.f * x : x; }
inline float to_f32(float x) { return x; }
inline float to_f32(bf16 x) { return __int_as_float(((unsigned)x.bits) << 16); }
inline float to_f32(f16 x) {
  _Float16 h;
  memcpy(&h, &x.bits, 2);
  return (float)h;
}
template <typename T>
inline T from_f32(float x);
template <>
inline float from_f32<float>(float x) {
  return x;
}
template <>
inline bf16 from_f32<bf16>(float x) {
  unsigned u;
  memcpy(&u, &x, 4);
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return bf16{(u16)(u >> 16)};
}
template <>
inline f16 from_f32<f16>(float x) {
  const _Float16 h = (_Float16)x;
  f16 r;
  memcpy(&r.bits, &h, 2);
  return r;
}
template <typename T>
inline float ld(const T* p, long long i) {
  return to_f32(p[i]);
}
#define LOG2E 1.44269504f
inline float exp2_approx(float x) { return ftz(exp2f(x)); }
inline void require_smem(unsigned bytes) {
  if (emu_dynamic_smem < bytes) {
    fprintf(stderr, "require_smem: the launch gave %zu bytes, the kernel needs %u\n",
            emu_dynamic_smem, bytes);
    abort();
  }
}

// ---- the scheduler ----
namespace emu {
inline std::vector<ucontext_t> ctx;
inline std::vector<int> state;  // 0 runnable, 1 at a barrier, 2 exited
inline std::vector<std::vector<char>> stacks;
inline ucontext_t scheduler;
inline int current = 0;
inline std::function<void()> body;

inline void trampoline() {
  body();
  state[current] = 2;
}
}  // namespace emu

inline void __syncthreads() {
  emu::state[emu::current] = 1;
  swapcontext(&emu::ctx[emu::current], &emu::scheduler);
}

// Runs `kernel` for every block of `grid` with `threads` threads and `smem` bytes of dynamic
// shared memory.
inline void emu_launch(dim3u grid, unsigned threads, size_t smem, std::function<void()> kernel) {
  emu_dynamic_smem = smem;
  gridDim = grid;
  blockDim = {threads, 1, 1};
  emu::body = std::move(kernel);
  emu::ctx.assign(threads, ucontext_t{});
  emu::state.assign(threads, 0);
  emu::stacks.resize(threads);
  for (auto& s : emu::stacks) s.resize(256 * 1024);
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx = {x, y, z};
        for (unsigned t = 0; t < threads; ++t) {
          getcontext(&emu::ctx[t]);
          emu::ctx[t].uc_stack.ss_sp = emu::stacks[t].data();
          emu::ctx[t].uc_stack.ss_size = emu::stacks[t].size();
          emu::ctx[t].uc_link = &emu::scheduler;
          makecontext(&emu::ctx[t], emu::trampoline, 0);
          emu::state[t] = 0;
        }
        for (;;) {
          for (unsigned t = 0; t < threads; ++t) {
            if (emu::state[t] != 0) continue;
            emu::current = (int)t;
            threadIdx = {t, 0, 0};
            swapcontext(&emu::scheduler, &emu::ctx[t]);
          }
          int exited = 0, waiting = 0;
          for (unsigned t = 0; t < threads; ++t) {
            exited += emu::state[t] == 2;
            waiting += emu::state[t] == 1;
          }
          if (exited == (int)threads) break;
          if (exited) {
            fprintf(stderr, "block (%u, %u, %u): %d threads at a barrier, %d exited\n", x, y, z,
                    waiting, exited);
            abort();
          }
          for (unsigned t = 0; t < threads; ++t) emu::state[t] = 0;
        }
      }
}
