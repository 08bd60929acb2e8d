// CPU emulation of the CUDA execution model, for running kvsieve's kernels without a GPU.
//
// Force-included (`g++ -include kvs_emu.h -DKVS_EMU`) ahead of each `cuda/*.cu` file when
// scripts/cuda-emu.sh builds `target/cuda-emu/libcuda.so`. Each CUDA thread of a block is
// a fiber on the launching host thread; fibers switch only at `__syncthreads` and at warp
// collectives (shuffles, ballots, mma.sync), so a kernel that is correct on a GPU gives the
// same values here up to floating-point order. What this cannot show: timing, races
// between threads that do not synchronise, and the memory model across blocks (blocks run
// one after another).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_functions.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __launch_bounds__
#undef __align__
#undef __shared__
#undef __restrict__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// Blocks run one at a time, so one static copy per declaration is the block's shared memory.
#define __shared__ static
#define __restrict__ __restrict

namespace kvs_emu {
struct ThreadState;
extern ThreadState* cur;  // the running fiber
extern uint3 cur_tid;     // its threadIdx (kept beside `cur` for the macro below)
extern uint3 block_idx;
extern dim3 block_dim, grid_dim;
void syncthreads();
void* dyn_smem();
// Warp collectives. `kind`: 0 idx, 1 up, 2 down, 3 xor (shuffles); 4 ballot.
uint64_t warp_shfl(unsigned mask, int kind, uint64_t value, int arg, int width);
void mma_m16n8k16(bool bf16, float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1);
}  // namespace kvs_emu

#define threadIdx (kvs_emu::cur_tid)
#define blockIdx (kvs_emu::block_idx)
#define blockDim (kvs_emu::block_dim)
#define gridDim (kvs_emu::grid_dim)

#define KVS_EMU_DYN_SHARED(type, name) type* name = reinterpret_cast<type*>(kvs_emu::dyn_smem())

inline void __syncthreads() { kvs_emu::syncthreads(); }
inline void __threadfence() {}

template <typename T>
inline T kvs_emu_shfl(unsigned mask, int kind, T v, int arg, int width) {
    static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
    uint64_t u = 0;
    std::memcpy(&u, &v, sizeof(T));
    u = kvs_emu::warp_shfl(mask, kind, u, arg, width);
    T r;
    std::memcpy(&r, &u, sizeof(T));
    return r;
}
template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) { return kvs_emu_shfl(mask, 0, v, src, width); }
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned d, int width = 32) { return kvs_emu_shfl(mask, 1, v, (int)d, width); }
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned d, int width = 32) { return kvs_emu_shfl(mask, 2, v, (int)d, width); }
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int m, int width = 32) { return kvs_emu_shfl(mask, 3, v, m, width); }
inline unsigned __ballot_sync(unsigned mask, int pred) {
    return (unsigned)kvs_emu::warp_shfl(mask, 4, pred != 0, 0, 32);
}

template <typename T>
inline T __ldg(const T* p) { return *p; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline long long __double_as_longlong(double x) { long long u; std::memcpy(&u, &x, 8); return u; }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline void __sincosf(float x, float* s, float* c) { *s = sinf(x); *c = cosf(x); }
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
    return (unsigned long long)(((unsigned __int128)a * b) >> 64);
}
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
inline long long __double2ll_rn(double x) { return llrint(x); }

// One fiber runs at a time, so plain read-modify-write is atomic.
template <typename T>
inline T atomicAdd(T* p, T v) { T o = *p; *p = o + v; return o; }
template <typename T>
inline T atomicOr(T* p, T v) { T o = *p; *p = o | v; return o; }
template <typename T>
inline T atomicMax(T* p, T v) { T o = *p; *p = o > v ? o : v; return o; }
template <typename T>
inline T atomicMin(T* p, T v) { T o = *p; *p = o < v ? o : v; return o; }
template <typename T>
inline T atomicExch(T* p, T v) { T o = *p; *p = v; return o; }
template <typename T>
inline T atomicCAS(T* p, T cmp, T v) { T o = *p; if (o == cmp) *p = v; return o; }

using std::isfinite;
using std::isinf;
using std::isnan;
using std::max;
using std::signbit;
using std::min;
