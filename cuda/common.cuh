// Shared device helpers for kvsieve's kernels: element types, conversions, vector loads.
// Dtype codes match `crate::dtype::DType` (F32 = 0, F16 = 1, BF16 = 2).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stddef.h>
#include <stdint.h>

#define KVS_F32 0u
#define KVS_F16 1u
#define KVS_BF16 2u

#define KVS_FULL_MASK 0xffffffffu
#define KVS_LOG2E 1.4426950408889634f
#define KVS_LN2 0.6931471805599453f

// Element i of a buffer of the given dtype, as f32.
__device__ __forceinline__ float kvs_load(const void* p, uint32_t dtype, int64_t i) {
    if (dtype == KVS_F16) return __half2float(reinterpret_cast<const __half*>(p)[i]);
    if (dtype == KVS_BF16) return __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(p)[i]);
    return reinterpret_cast<const float*>(p)[i];
}

// Store x as element i (round to nearest even).
__device__ __forceinline__ void kvs_store(void* p, uint32_t dtype, int64_t i, float x) {
    if (dtype == KVS_F16) {
        reinterpret_cast<__half*>(p)[i] = __float2half_rn(x);
    } else if (dtype == KVS_BF16) {
        reinterpret_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(x);
    } else {
        reinterpret_cast<float*>(p)[i] = x;
    }
}

// Typed storage element: conversion to and from f32, unpacking 8 elements from 16 bytes.
template <typename T>
struct KvsElem;

template <>
struct KvsElem<__half> {
    static constexpr uint32_t code = KVS_F16;
    __device__ __forceinline__ static float to_float(__half x) { return __half2float(x); }
    __device__ __forceinline__ static __half from_float(float x) { return __float2half_rn(x); }
    __device__ __forceinline__ static void unpack8(const uint4& u, float* f) {
        const __half2* h = reinterpret_cast<const __half2*>(&u);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            float2 t = __half22float2(h[i]);
            f[2 * i] = t.x;
            f[2 * i + 1] = t.y;
        }
    }
};

template <>
struct KvsElem<__nv_bfloat16> {
    static constexpr uint32_t code = KVS_BF16;
    __device__ __forceinline__ static float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
    __device__ __forceinline__ static __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
    __device__ __forceinline__ static void unpack8(const uint4& u, float* f) {
        // bf16 -> f32 is a 16-bit shift: exact and cheap.
        const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            f[2 * i] = __uint_as_float(w[i] << 16);
            f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
        }
    }
};

// 16-byte read-only load (K/V pages, which no kernel writes while another reads them).
__device__ __forceinline__ uint4 kvs_ld16(const void* p) {
    return __ldg(reinterpret_cast<const uint4*>(p));
}
