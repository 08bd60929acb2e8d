// Shared device helpers of the selection kernels: element loads, warp and block
// reductions and scans, and a block-wide weighted radix select with index-order
// compaction (the top-k used by page, cluster and GemFilter selection).
//
// Order of every selection: a higher score ranks first; equal scores rank by lower
// index; NaN counts as -inf; -0.0 equals +0.0 (as the CPU backend's rank order).
#pragma once

#include <stdint.h>

#define KVS_FULL_MASK 0xffffffffu

// Storage dtype codes (as kvsieve's DType): 0 f32, 1 f16, 2 bf16.
typedef unsigned short kvs_u16;

__device__ __forceinline__ float kvs_f16_to_f32(kvs_u16 h) {
#ifdef KVS_EMU
    __half x;
    std::memcpy(&x, &h, 2);
    return __half2float(x);
#else
    float f;
    asm("{ .reg .b16 t; mov.b16 t, %1; cvt.f32.f16 %0, t; }" : "=f"(f) : "h"(h));
    return f;
#endif
}

__device__ __forceinline__ float kvs_bf16_to_f32(kvs_u16 h) {
    return __uint_as_float(((unsigned)h) << 16);
}

__device__ __forceinline__ kvs_u16 kvs_f32_to_f16(float f) {
    kvs_u16 h;
#ifdef KVS_EMU
    __half x = __float2half_rn(f);
    std::memcpy(&h, &x, 2);
#else
    asm("{ .reg .b16 t; cvt.rn.f16.f32 t, %1; mov.b16 %0, t; }" : "=h"(h) : "f"(f));
#endif
    return h;
}

__device__ __forceinline__ kvs_u16 kvs_f32_to_bf16(float f) {
    kvs_u16 h;
#ifdef KVS_EMU
    __nv_bfloat16 x = __float2bfloat16_rn(f);
    std::memcpy(&h, &x, 2);
#else
    asm("{ .reg .b16 t; cvt.rn.bf16.f32 t, %1; mov.b16 %0, t; }" : "=h"(h) : "f"(f));
#endif
    return h;
}

// Element loads by storage type tag.
struct KvsF32 {
    typedef float T;
    static __device__ __forceinline__ float load(const float* p, size_t i) { return p[i]; }
};
struct KvsF16 {
    typedef kvs_u16 T;
    static __device__ __forceinline__ float load(const kvs_u16* p, size_t i) { return kvs_f16_to_f32(p[i]); }
    static __device__ __forceinline__ kvs_u16 store(float f) { return kvs_f32_to_f16(f); }
};
struct KvsBF16 {
    typedef kvs_u16 T;
    static __device__ __forceinline__ float load(const kvs_u16* p, size_t i) { return kvs_bf16_to_f32(p[i]); }
    static __device__ __forceinline__ kvs_u16 store(float f) { return kvs_f32_to_bf16(f); }
};

// ---------------------------------------------------------------- warp level

__device__ __forceinline__ float kvs_warp_sum(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(KVS_FULL_MASK, x, o);
    return x;
}

__device__ __forceinline__ double kvs_warp_sum_d(double x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(KVS_FULL_MASK, x, o);
    return x;
}

__device__ __forceinline__ unsigned kvs_warp_sum_u(unsigned x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(KVS_FULL_MASK, x, o);
    return x;
}

__device__ __forceinline__ float kvs_warp_max(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(KVS_FULL_MASK, x, o));
    return x;
}

// Inclusive scan over the lanes of a warp.
__device__ __forceinline__ unsigned kvs_warp_incl_scan(unsigned x) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        unsigned y = __shfl_up_sync(KVS_FULL_MASK, x, o);
        if (lane >= o) x += y;
    }
    return x;
}

// ---------------------------------------------------------------- block level
// Every block helper must be reached by all BLOCK threads of the block; `sh` is shared
// scratch of at least 34 words, free on entry and on return.

template <int BLOCK>
__device__ __forceinline__ unsigned kvs_block_sum_u(unsigned x, unsigned* sh) {
    static_assert(BLOCK % 32 == 0 && BLOCK <= 1024, "block of whole warps, at most 1024 threads");
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    x = kvs_warp_sum_u(x);
    if (lane == 0) sh[warp] = x;
    __syncthreads();
    if (warp == 0) {
        unsigned v = lane < BLOCK / 32 ? sh[lane] : 0u;
        v = kvs_warp_sum_u(v);
        if (lane == 0) sh[32] = v;
    }
    __syncthreads();
    unsigned r = sh[32];
    __syncthreads();
    return r;
}

template <int BLOCK>
__device__ __forceinline__ double kvs_block_sum_d(double x, double* sh) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    x = kvs_warp_sum_d(x);
    if (lane == 0) sh[warp] = x;
    __syncthreads();
    if (warp == 0) {
        double v = lane < BLOCK / 32 ? sh[lane] : 0.0;
        v = kvs_warp_sum_d(v);
        if (lane == 0) sh[32] = v;
    }
    __syncthreads();
    double r = sh[32];
    __syncthreads();
    return r;
}

template <int BLOCK>
__device__ __forceinline__ float kvs_block_max(float x, float* sh) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    x = kvs_warp_max(x);
    if (lane == 0) sh[warp] = x;
    __syncthreads();
    if (warp == 0) {
        float v = lane < BLOCK / 32 ? sh[lane] : -INFINITY;
        v = kvs_warp_max(v);
        if (lane == 0) sh[32] = v;
    }
    __syncthreads();
    float r = sh[32];
    __syncthreads();
    return r;
}

// Exclusive prefix sum of `v` over the threads of the block (thread order); `*total`
// receives the block's sum.
template <int BLOCK>
__device__ __forceinline__ unsigned kvs_block_excl_scan(unsigned v, unsigned* total, unsigned* sh) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    unsigned x = kvs_warp_incl_scan(v);
    if (lane == 31) sh[warp] = x;
    __syncthreads();
    if (warp == 0) {
        unsigned s = lane < BLOCK / 32 ? sh[lane] : 0u;
        unsigned t = kvs_warp_incl_scan(s);
        if (lane < BLOCK / 32) sh[lane] = t - s;
        if (lane == 31) sh[32] = t;
    }
    __syncthreads();
    unsigned r = sh[warp] + x - v;
    *total = sh[32];
    __syncthreads();
    return r;
}

// ---------------------------------------------------------------- rank keys

// An unsigned key whose order is the rank order of scores: a larger key ranks first.
// NaN maps to the key of -inf, -0.0 to the key of +0.0.
__device__ __forceinline__ unsigned kvs_rank_key(float x) {
    unsigned b = __float_as_uint(x);
    if (x != x) b = 0xff800000u;  // NaN -> -inf
    if (x == 0.0f) b = 0u;        // -0 -> +0
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// ---------------------------------------------------------------- radix select
//
// Elements 0..n each have a key (larger ranks first, ties by lower index) and a weight.
// Walking the elements in rank order, the selection takes whole elements until the
// weight taken reaches `target`; the element at which it is reached is taken in part
// (only `target - weight before it`). With `target` at least the total weight every
// element is taken (`all`). `thresh` is the key of the crossing element and `rem` the
// weight still needed from the elements whose key equals `thresh` (taken in index order).
struct KvsSel {
    unsigned thresh;
    unsigned rem;
    int all;
};

// `f(i, key, weight)` gives element i's key and weight; it must be a pure function of i.
template <int BLOCK, class F>
__device__ __forceinline__ KvsSel kvs_block_select(unsigned n, unsigned target, F f, unsigned* hist, unsigned* sh) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    unsigned tot = 0;
    for (unsigned i = threadIdx.x; i < n; i += BLOCK) {
        unsigned k, w;
        f(i, k, w);
        tot += w;
    }
    tot = kvs_block_sum_u<BLOCK>(tot, sh);
    KvsSel s;
    if (target == 0) {
        // Nothing taken: no key is above the largest key, and nothing is needed at it.
        s.thresh = 0xffffffffu;
        s.rem = 0;
        s.all = 0;
        return s;
    }
    if (target >= tot) {
        s.thresh = 0;
        s.rem = 0;
        s.all = 1;
        return s;
    }
    s.all = 0;
    unsigned prefix = 0, r = target;
#pragma unroll 1
    for (int pass = 0; pass < 4; ++pass) {
        const int shift = 24 - 8 * pass;
        for (int i = threadIdx.x; i < 256; i += BLOCK) hist[i] = 0;
        __syncthreads();
        for (unsigned i = threadIdx.x; i < n; i += BLOCK) {
            unsigned k, w;
            f(i, k, w);
            bool match = pass == 0 || ((k ^ prefix) >> (shift + 8)) == 0u;
            if (match && w) atomicAdd(&hist[(k >> shift) & 255u], w);
        }
        __syncthreads();
        if (warp == 0) {
            // Lane l covers digits 255 - 8l down to 248 - 8l (rank order: high digits first).
            unsigned local[8];
            unsigned sum = 0;
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                local[j] = hist[255 - 8 * lane - j];
                sum += local[j];
            }
            unsigned inc = kvs_warp_incl_scan(sum);
            unsigned before = inc - sum;
            if (before < r && r <= inc) {
                unsigned c = before;
#pragma unroll
                for (int j = 0; j < 8; ++j) {
                    if (c + local[j] >= r) {
                        sh[32] = 255u - 8u * lane - j;
                        sh[33] = r - c;
                        break;
                    }
                    c += local[j];
                }
            }
        }
        __syncthreads();
        prefix |= sh[32] << shift;
        r = sh[33];
        __syncthreads();
    }
    s.thresh = prefix;
    s.rem = r;
    return s;
}

// Walk the elements in index order and call `emit(i, take, pos)` for each element the
// selection `s` takes (`take` of its weight, `pos` its ordinal among the taken ones).
// Returns the number of elements taken. Same `f` as the select.
template <int BLOCK, class F, class E>
__device__ unsigned kvs_block_compact(unsigned n, const KvsSel& s, F f, E emit, unsigned* sh) {
    unsigned base = 0, eqbase = 0;
    for (unsigned t0 = 0; t0 < n; t0 += BLOCK) {
        const unsigned i = t0 + threadIdx.x;
        unsigned k = 0, w = 0;
        if (i < n) f(i, k, w);
        const bool eq = !s.all && i < n && k == s.thresh;
        unsigned eqtot, kt;
        const unsigned eqpre = kvs_block_excl_scan<BLOCK>(eq ? w : 0u, &eqtot, sh) + eqbase;
        unsigned take = 0;
        if (i < n) {
            if (s.all || k > s.thresh) take = w;
            else if (eq && eqpre < s.rem) take = min(w, s.rem - eqpre);
        }
        const unsigned pos = kvs_block_excl_scan<BLOCK>(take > 0 ? 1u : 0u, &kt, sh) + base;
        if (take) emit(i, take, pos);
        base += kt;
        eqbase += eqtot;
    }
    return base;
}
