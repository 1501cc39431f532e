// CUDA's built-ins on the CPU, for running a kernel source under kernels/ as C++ (see emu.py,
// which includes this before the prelude and the source, with their inline PTX rendered in C++).
//
// A launch runs the grid's blocks one after another on the calling thread. Each CUDA thread of a
// block is a ucontext with its own stack; a thread runs until it exits or waits:
//   __syncthreads()           until every thread of the block waits there (a thread that exits
//                             while others wait at a barrier stops the emulation: that is a hang
//                             or undefined behaviour on a GPU);
//   __syncwarp(), shuffles    until all 32 threads of its warp wait there (only full warps and
//                             full masks: anything else stops the emulation).
// Static __shared__ arrays become function-level statics (shared by the block's threads; blocks
// run one at a time); the dynamic shared memory is a fresh buffer per launch, filled with NaN
// bytes so that reading what no thread wrote shows. Subnormal floats are flushed (the kernels
// are compiled with --ftz=true): the launch sets the CPU's flush-to-zero and denormals-are-zero
// modes and restores them after.
//
// Not emulated: the GPU's rounding of approximate instructions (rsqrtf and ex2.approx are the
// CPU's correctly rounded functions), warp timing, memory ordering between blocks, bank
// conflicts, and alignment faults (emu.py's checks build with -fsanitize=alignment instead).
#pragma once
#include <ucontext.h>
#include <xmmintrin.h>

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
#define __launch_bounds__(...)

struct dim3u {
  unsigned x = 0, y = 0, z = 0;
};
inline dim3u threadIdx, blockIdx, blockDim, gridDim;

struct float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned x, y;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline float2 make_float2(float a, float b) { return {a, b}; }
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
inline uint2 make_uint2(unsigned a, unsigned b) { return {a, b}; }
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }

// The bits of `from` read as a `To`.
template <class To, class From>
inline To emu_bits(From from) {
  static_assert(sizeof(To) == sizeof(From), "a reinterpretation keeps the size");
  To to;
  memcpy(&to, &from, sizeof to);
  return to;
}
inline float __int_as_float(int i) { return emu_bits<float>(i); }
inline int __float_as_int(float f) { return emu_bits<int>(f); }
inline float __uint_as_float(unsigned u) { return emu_bits<float>(u); }
inline unsigned __float_as_uint(float f) { return emu_bits<unsigned>(f); }
inline float rsqrtf(float x) { return 1.f / sqrtf(x); }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float a, float b) { return a / b; }
template <class T>
inline T __ldg(const T* p) {
  return *p;
}
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }

[[noreturn]] inline void __trap() {
  fprintf(stderr, "__trap() in block (%u, %u, %u) thread %u\n", blockIdx.x, blockIdx.y,
          blockIdx.z, threadIdx.x);
  abort();
}

// f32 -> bf16 bits, rounded to nearest even (NaN stays NaN), as cvt.rn.bf16.f32.
inline unsigned short emu_f32_to_bf16(float x) {
  unsigned u = emu_bits<unsigned>(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (unsigned short)(u >> 16);
}

inline float emu_ftz(float x) { return std::fpclassify(x) == FP_SUBNORMAL ? 0.f * x : x; }

// ---- the scheduler ----
namespace emu {
enum State { RUNNABLE, AT_BARRIER, EXITED, AT_WARP_BARRIER };
inline std::vector<ucontext_t> ctx;
inline std::vector<State> state;
inline std::vector<std::vector<char>> stacks;
inline std::vector<uint64_t> lane_value;  // what each thread offers a shuffle
inline ucontext_t scheduler;
inline int current = 0;
inline std::function<void()> body;
inline std::vector<unsigned char> dynamic_smem;
constexpr size_t STACK_BYTES = 128 * 1024;

inline void trampoline() {
  body();
  state[current] = EXITED;
}

[[noreturn]] inline void fail(const char* what) {
  fprintf(stderr, "emulation stopped in block (%u, %u, %u) thread %u: %s\n", blockIdx.x,
          blockIdx.y, blockIdx.z, threadIdx.x, what);
  abort();
}

inline void wait(State s) {
  state[current] = s;
  swapcontext(&ctx[current], &scheduler);
}

inline void check_full_warp(unsigned mask) {
  if (mask != 0xffffffffu) fail("a warp operation with a partial mask");
  if (blockDim.x % 32 != 0) fail("a warp operation in a block that is not whole warps");
}
}  // namespace emu

inline void __syncthreads() { emu::wait(emu::AT_BARRIER); }

inline void __syncwarp(unsigned mask = 0xffffffffu) {
  emu::check_full_warp(mask);
  emu::wait(emu::AT_WARP_BARRIER);
}

// The value of lane `src` of the caller's warp (every lane calls it together).
template <class T>
inline T emu_exchange(T v, int src) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffles move at most 8 bytes");
  memcpy(&emu::lane_value[emu::current], &v, sizeof(T));
  emu::wait(emu::AT_WARP_BARRIER);
  T r;
  memcpy(&r, &emu::lane_value[(emu::current & ~31) + src], sizeof(T));
  emu::wait(emu::AT_WARP_BARRIER);
  return r;
}

template <class T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  emu::check_full_warp(mask);
  const int lane = emu::current & 31;
  return emu_exchange(v, (lane & ~(width - 1)) + (src & (width - 1)));
}

template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  emu::check_full_warp(mask);
  const int lane = emu::current & 31, src = lane ^ lane_mask;
  return emu_exchange(v, src < ((lane & ~(width - 1)) + width) ? src : lane);
}

template <class T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  emu::check_full_warp(mask);
  const int lane = emu::current & 31, src = lane + (int)delta;
  return emu_exchange(v, src < ((lane & ~(width - 1)) + width) ? src : lane);
}

template <class T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  emu::check_full_warp(mask);
  const int lane = emu::current & 31, src = lane - (int)delta;
  return emu_exchange(v, src >= (lane & ~(width - 1)) ? src : lane);
}

// Runs `kernel` for every block of `grid` with `threads` threads and `smem` bytes of dynamic
// shared memory.
inline void emu_launch(dim3u grid, unsigned threads, size_t smem, std::function<void()> kernel) {
  using namespace emu;
  const unsigned mxcsr = _mm_getcsr();
  _mm_setcsr(mxcsr | 0x8040u);  // flush to zero, denormals are zero
  gridDim = grid;
  blockDim = {threads, 1, 1};
  body = std::move(kernel);
  ctx.assign(threads, ucontext_t{});
  state.assign(threads, RUNNABLE);
  lane_value.assign(threads, 0);
  if (stacks.size() < threads) stacks.resize(threads);
  for (auto& s : stacks) s.resize(STACK_BYTES);
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx = {x, y, z};
        dynamic_smem.assign(smem + 16, 0xff);
        for (unsigned t = 0; t < threads; ++t) {
          getcontext(&ctx[t]);
          ctx[t].uc_stack.ss_sp = stacks[t].data();
          ctx[t].uc_stack.ss_size = stacks[t].size();
          ctx[t].uc_link = &scheduler;
          makecontext(&ctx[t], trampoline, 0);
          state[t] = RUNNABLE;
        }
        for (;;) {
          for (unsigned t = 0; t < threads; ++t) {
            if (state[t] != RUNNABLE) continue;
            current = (int)t;
            threadIdx = {t, 0, 0};
            swapcontext(&scheduler, &ctx[t]);
          }
          // Release the warps whose threads all wait at a warp barrier.
          bool released = false;
          for (unsigned w = 0; w + 32 <= threads; w += 32) {
            bool all = true;
            for (unsigned t = w; t < w + 32; ++t) all = all && state[t] == AT_WARP_BARRIER;
            if (!all) continue;
            for (unsigned t = w; t < w + 32; ++t) state[t] = RUNNABLE;
            released = true;
          }
          if (released) continue;
          unsigned exited = 0, at_barrier = 0;
          for (unsigned t = 0; t < threads; ++t) {
            exited += state[t] == EXITED;
            at_barrier += state[t] == AT_BARRIER;
          }
          if (exited == threads) break;
          if (at_barrier == threads) {
            for (unsigned t = 0; t < threads; ++t) state[t] = RUNNABLE;
            continue;
          }
          fprintf(stderr,
                  "block (%u, %u, %u): stuck with %u threads at __syncthreads, %u exited and %u at "
                  "warp operations that not all of their warp reached\n",
                  x, y, z, at_barrier, exited, threads - exited - at_barrier);
          abort();
        }
      }
  _mm_setcsr(mxcsr);
}

// The dynamic shared memory of the running launch (16-byte aligned).
inline void* emu_dynamic_smem() {
  const uintptr_t p = reinterpret_cast<uintptr_t>(emu::dynamic_smem.data());
  return reinterpret_cast<void*>((p + 15) & ~uintptr_t(15));
}
inline size_t emu_dynamic_smem_bytes() {
  return emu::dynamic_smem.empty() ? 0 : emu::dynamic_smem.size() - 16;
}
