// Paged append: scatter new tokens' K and V into their slots, and the per-page key bounds
// (Quest): per page, KV head and channel, min and max of the keys of the page's written
// slots, stored in the cache dtype (so they are exact).
//
// Layouts (as the CPU backend): element (page, slot, head, channel) of K lives at
// k + page * k_stride_page + slot * k_stride_slot + head * k_stride_head + channel;
// bounds of (page, head) at bounds + (page * num_kv_heads + head) * 2 * head_dim: min[head_dim]
// then max[head_dim].

#include "common.cuh"

struct AppendParams {
    uint64_t k_src;         // [n, num_kv_heads, head_dim], src_dtype, strides below
    uint64_t v_src;
    uint64_t slot_mapping;  // int64 [n]: page * page_size + slot; negative = skip
    uint64_t k_cache;
    uint64_t v_cache;
    int64_t k_src_stride[3];
    int64_t v_src_stride[3];
    int64_t k_stride[3];    // page, slot, head (elements)
    int64_t v_stride[3];
    int32_t n;
    int32_t num_kv_heads;
    int32_t head_dim;
    int32_t page_size;
    uint32_t k_src_dtype;
    uint32_t v_src_dtype;
};
static_assert(sizeof(AppendParams) == 160, "AppendParams must match src/backend/cuda/attention.rs");
static_assert(offsetof(AppendParams, n) == 136, "AppendParams layout");

// grid (n, num_kv_heads), threads over channels.
template <typename T>
__device__ __forceinline__ void append_body(const AppendParams& p) {
    const int i = blockIdx.x;
    const int h = blockIdx.y;
    const int64_t slot_id = reinterpret_cast<const int64_t*>(p.slot_mapping)[i];
    if (slot_id < 0) return;
    const int64_t page = slot_id / p.page_size;
    const int64_t slot = slot_id % p.page_size;
    T* kc = reinterpret_cast<T*>(p.k_cache) + page * p.k_stride[0] + slot * p.k_stride[1] + h * p.k_stride[2];
    T* vc = reinterpret_cast<T*>(p.v_cache) + page * p.v_stride[0] + slot * p.v_stride[1] + h * p.v_stride[2];
    const int64_t ks = i * p.k_src_stride[0] + h * p.k_src_stride[1];
    const int64_t vs = i * p.v_src_stride[0] + h * p.v_src_stride[1];
    for (int c = threadIdx.x; c < p.head_dim; c += blockDim.x) {
        kc[c] = KvsElem<T>::from_float(kvs_load(reinterpret_cast<const void*>(p.k_src), p.k_src_dtype, ks + c * p.k_src_stride[2]));
        vc[c] = KvsElem<T>::from_float(kvs_load(reinterpret_cast<const void*>(p.v_src), p.v_src_dtype, vs + c * p.v_src_stride[2]));
    }
}

extern "C" __global__ void kvsieve_append_f16(const AppendParams p) { append_body<__half>(p); }
extern "C" __global__ void kvsieve_append_bf16(const AppendParams p) { append_body<__nv_bfloat16>(p); }

// One page's bounds update: fold the keys of the slots set in `mask` into the bounds,
// starting from the stored bounds, or from empty (min +inf, max -inf) when `reset`.
struct BoundsEntry {
    int32_t page;
    uint32_t reset;
    uint64_t mask;
};
static_assert(sizeof(BoundsEntry) == 16, "BoundsEntry must match src/backend/cuda/attention.rs");

struct BoundsParams {
    uint64_t k_cache;
    uint64_t bounds;
    uint64_t entries;  // BoundsEntry [num_entries], distinct pages
    int64_t k_stride[3];
    int32_t num_entries;
    int32_t num_kv_heads;
    int32_t head_dim;
    int32_t _pad;
};
static_assert(sizeof(BoundsParams) == 64, "BoundsParams must match src/backend/cuda/attention.rs");
static_assert(offsetof(BoundsParams, num_entries) == 48, "BoundsParams layout");

// grid (num_entries, num_kv_heads), threads over channels.
template <typename T>
__device__ __forceinline__ void bounds_body(const BoundsParams& p) {
    const BoundsEntry e = reinterpret_cast<const BoundsEntry*>(p.entries)[blockIdx.x];
    const int h = blockIdx.y;
    const T* kc = reinterpret_cast<const T*>(p.k_cache) + (int64_t)e.page * p.k_stride[0] + h * p.k_stride[2];
    T* bd = reinterpret_cast<T*>(p.bounds) + ((int64_t)e.page * p.num_kv_heads + h) * 2 * p.head_dim;
    for (int c = threadIdx.x; c < p.head_dim; c += blockDim.x) {
        float mn = e.reset ? INFINITY : KvsElem<T>::to_float(bd[c]);
        float mx = e.reset ? -INFINITY : KvsElem<T>::to_float(bd[p.head_dim + c]);
        uint64_t m = e.mask;
        while (m) {
            const int slot = __ffsll((long long)m) - 1;
            m &= m - 1;
            const float x = KvsElem<T>::to_float(kc[slot * p.k_stride[1] + c]);
            mn = fminf(mn, x);
            mx = fmaxf(mx, x);
        }
        bd[c] = KvsElem<T>::from_float(mn);
        bd[p.head_dim + c] = KvsElem<T>::from_float(mx);
    }
}

extern "C" __global__ void kvsieve_key_bounds_f16(const BoundsParams p) { bounds_body<__half>(p); }
extern "C" __global__ void kvsieve_key_bounds_bf16(const BoundsParams p) { bounds_body<__nv_bfloat16>(p); }
