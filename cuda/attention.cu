// Paged decode attention (dense and sparse), split-K over chunks of each sequence's token
// list with the partial states merged by log-sum-exp, and merge_states.
//
// Semantics match the CPU backend (src/attention/decode.rs, kernel.rs):
// - query head h reads KV head h / group; scores = (scale * q) . k, optionally soft-capped
//   c * tanh(s / c); the LSE is natural-log; a query with no keys gives 0 and -inf;
// - dense: every token 0..seq_len of the sequence; sparse: the (sequence, KV head)'s list;
// - RoPE at read (pre-RoPE keys): Original rotates each key by its slot's stored position
//   and the query by the last token's; Contiguous numbers the tokens read 0, 1, ... in list
//   order and puts the query at the number of listed tokens before the last token;
//   Capped keeps true positions for keys closer than max_distance and, for farther keys,
//   leaves the key unrotated and rotates the query by max_distance.
//
// kvsieve-hot: kvsieve_decode_
//
// Work split: block (chunk, KV head x row group, sequence), 128 threads. A token is read by
// a group of head_dim / 8 threads holding 8 channels each (one 16-byte load of K and of V);
// the block's token groups each keep their own online-softmax state for the block's query
// rows, merged in shared memory at the end; then kvsieve_decode_merge combines chunks.

#include "common.cuh"

#define KVS_MAX_HALF_ROTARY 64

struct DecodeParams {
    uint64_t k;              // cache K base
    uint64_t v;              // cache V base
    uint64_t indptr;         // int32 [batch + 1]
    uint64_t indices;        // int32 page ids
    uint64_t last_page_len;  // int32 [batch]
    uint64_t positions;      // int32 [num_pages * page_size], 0 = token index
    uint64_t sel_indptr;     // int32 [batch * num_kv_heads + 1], 0 = dense
    uint64_t sel_indices;    // int32
    uint64_t q;              // [batch, num_qo_heads, head_dim], q_dtype
    uint64_t o_part;         // f32 [batch, num_qo_heads, max_chunks, head_dim]
    uint64_t lse_part;       // f32 [batch, num_qo_heads, max_chunks]
    int64_t k_stride[3];     // page, slot, head (elements)
    int64_t v_stride[3];
    int64_t q_stride[3];     // batch, head, channel (elements)
    int32_t batch;
    int32_t num_qo_heads;
    int32_t num_kv_heads;
    int32_t group;           // num_qo_heads / num_kv_heads
    int32_t row_groups;      // ceil(group / rows per block)
    int32_t page_shift;      // log2(page_size)
    int32_t chunk;           // list entries per chunk
    int32_t max_chunks;      // gridDim.x
    uint32_t q_dtype;
    float q_scale;           // scale, times log2(e) when there is no soft cap
    float soft_cap;          // 0 = none
    uint32_t rope_mode;      // 0 none, 1 original, 2 contiguous, 3 capped
    uint32_t rope_style;     // 0 half-split, 1 adjacent pairs
    int32_t rotary_dim;
    float position_scale;
    int32_t max_distance;
    float inv_freq[KVS_MAX_HALF_ROTARY];
};
static_assert(sizeof(DecodeParams) == 480, "DecodeParams must match src/backend/cuda/attention.rs");
static_assert(offsetof(DecodeParams, k_stride) == 88 && offsetof(DecodeParams, batch) == 160, "DecodeParams layout");
static_assert(offsetof(DecodeParams, q_dtype) == 192 && offsetof(DecodeParams, inv_freq) == 224, "DecodeParams layout");

#define ROPE_NONE 0u
#define ROPE_ORIGINAL 1u
#define ROPE_CONTIGUOUS 2u
#define ROPE_CAPPED 3u

// cos/sin of (pos / position_scale) * inv_freq as the CPU computes them (f32 position
// divided in f32, angle in f64), with the f64 angle reduced to [-pi, pi] before sincosf.
__device__ __forceinline__ void rope_cs(const DecodeParams& p, float pos, int pair, float& c, float& s) {
    const float pf = pos / p.position_scale;
    const double ang = (double)pf * (double)p.inv_freq[pair];
    const double two_pi = 6.283185307179586;
    const double k = rint(ang * (1.0 / two_pi));
    const float r = (float)fma(-k, two_pi, ang);
    __sincosf(r, &s, &c);
}

// Rotate a whole row in shared memory (rows x head_dim floats) by `pos`; threads over pairs.
template <int D>
__device__ __forceinline__ void rotate_rows_shared(const DecodeParams& p, float* rows_s, int rows, float pos) {
    const int half = p.rotary_dim / 2;
    for (int i = threadIdx.x; i < rows * half; i += blockDim.x) {
        const int r = i / half;
        const int pr = i % half;
        int a, b;
        if (p.rope_style == 0) {
            a = pr;
            b = pr + half;
        } else {
            a = 2 * pr;
            b = 2 * pr + 1;
        }
        float c, s;
        rope_cs(p, pos, pr, c, s);
        float* x = rows_s + r * D;
        const float xa = x[a], xb = x[b];
        x[a] = xa * c - xb * s;
        x[b] = xa * s + xb * c;
    }
}

// Position of token t (page, slot known): stored, or t itself without positions.
__device__ __forceinline__ int slot_position(const DecodeParams& p, int page, int slot, int t) {
    if (p.positions == 0) return t;
    return reinterpret_cast<const int*>(p.positions)[((int64_t)page << p.page_shift) + slot];
}

template <typename T, int D, int GR>
__device__ __forceinline__ void decode_body(const DecodeParams& p) {
    constexpr int VEC = 8;
    constexpr int TPG = D / VEC;  // threads per token
    constexpr int NT = 128;
    constexpr int NG = NT / TPG;  // token groups per block
    constexpr int U = GR <= 4 ? 4 : 2;  // tokens in flight per thread group

    __shared__ __align__(16) float q_s[2][GR][D];
    __shared__ __align__(16) float red_o[NG][GR][D];
    __shared__ float red_m[NG][GR];
    __shared__ float red_l[NG][GR];
    __shared__ int info_s[2];

    const int chunk_id = blockIdx.x;
    const int kh = blockIdx.y / p.row_groups;
    const int rg = blockIdx.y % p.row_groups;
    const int b = blockIdx.z;
    const int tid = threadIdx.x;
    const int tg = tid / TPG;
    const int lane = tid % TPG;
    const int c0 = lane * VEC;
    const int h0 = kh * p.group + rg * GR;
    const int rows = min(GR, p.group - rg * GR);
    const int page_size = 1 << p.page_shift;

    const int* indptr = reinterpret_cast<const int*>(p.indptr);
    const int* pages = reinterpret_cast<const int*>(p.indices);
    const int pbeg = indptr[b];
    const int npages = indptr[b + 1] - pbeg;
    const int seq_len = npages == 0 ? 0 : ((npages - 1) << p.page_shift) + reinterpret_cast<const int*>(p.last_page_len)[b];

    const int* list = nullptr;
    int n = seq_len;
    if (p.sel_indptr != 0) {
        const int* sp = reinterpret_cast<const int*>(p.sel_indptr);
        const int s0 = sp[b * p.num_kv_heads + kh];
        list = reinterpret_cast<const int*>(p.sel_indices) + s0;
        n = sp[b * p.num_kv_heads + kh + 1] - s0;
    }
    const int start = chunk_id * p.chunk;
    const int end = min(n, start + p.chunk);
    float* lse_part = reinterpret_cast<float*>(p.lse_part);
    float* o_part = reinterpret_cast<float*>(p.o_part);
    if (start >= end) {
        if (tid < rows) lse_part[((int64_t)b * p.num_qo_heads + h0 + tid) * p.max_chunks + chunk_id] = -INFINITY;
        return;
    }

    // Query rows, scaled; rotated by the query position when keys are read pre-RoPE.
    for (int i = tid; i < GR * D; i += NT) {
        const int r = i / D, ch = i % D;
        float x = 0.0f;
        if (r < rows) {
            x = kvs_load(reinterpret_cast<const void*>(p.q), p.q_dtype,
                         (int64_t)b * p.q_stride[0] + (int64_t)(h0 + r) * p.q_stride[1] + (int64_t)ch * p.q_stride[2]) *
                p.q_scale;
        }
        q_s[0][r][ch] = x;
        q_s[1][r][ch] = x;
    }
    if (tid == 0) {
        int qpos = 0;
        if (p.rope_mode != ROPE_NONE && seq_len > 0) {
            const int last = seq_len - 1;
            if (p.rope_mode == ROPE_CONTIGUOUS) {
                if (list == nullptr) {
                    qpos = last;
                } else {
                    int lo = 0, hi = n;  // first list index with list[i] >= last
                    while (lo < hi) {
                        const int mid = (lo + hi) >> 1;
                        if (list[mid] < last) lo = mid + 1; else hi = mid;
                    }
                    qpos = lo;
                }
            } else {
                qpos = slot_position(p, pages[pbeg + (last >> p.page_shift)], last & (page_size - 1), last);
            }
        }
        info_s[0] = qpos;
    }
    __syncthreads();
    const int qpos = info_s[0];
    if (p.rope_mode != ROPE_NONE) {
        rotate_rows_shared<D>(p, &q_s[0][0][0], GR, (float)qpos);
        if (p.rope_mode == ROPE_CAPPED) rotate_rows_shared<D>(p, &q_s[1][0][0], GR, (float)p.max_distance);
    }
    __syncthreads();

    float m[GR], l[GR], acc[GR][VEC];
#pragma unroll
    for (int r = 0; r < GR; ++r) {
        m[r] = -INFINITY;
        l[r] = 0.0f;
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[r][e] = 0.0f;
    }

    const char* kbase = reinterpret_cast<const char*>(p.k);
    const char* vbase = reinterpret_cast<const char*>(p.v);
    const int half = p.rotary_dim / 2;
    // Lane (within the warp) holding this thread's half-split partner channels.
    const int warp_lane = tid & 31;
    const int partner_lane = (c0 < half) ? warp_lane + half / VEC : (c0 < p.rotary_dim ? warp_lane - half / VEC : warp_lane);

    // Every thread of the block runs the same number of iterations (shuffles need the warp).
    for (int base = start; base < end; base += NG * U) {
        uint4 kr[U], vr[U];
        int kpos[U];
        bool valid[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int i = base + tg + u * NG;
            valid[u] = i < end;
            kpos[u] = 0;
            kr[u] = make_uint4(0, 0, 0, 0);
            vr[u] = make_uint4(0, 0, 0, 0);
            if (valid[u]) {
                const int t = list ? list[i] : i;
                valid[u] = t >= 0 && t < seq_len;
                if (valid[u]) {
                    const int page = pages[pbeg + (t >> p.page_shift)];
                    const int slot = t & (page_size - 1);
                    kr[u] = kvs_ld16(kbase + ((int64_t)page * p.k_stride[0] + (int64_t)slot * p.k_stride[1] +
                                              (int64_t)kh * p.k_stride[2] + c0) * sizeof(T));
                    vr[u] = kvs_ld16(vbase + ((int64_t)page * p.v_stride[0] + (int64_t)slot * p.v_stride[1] +
                                              (int64_t)kh * p.v_stride[2] + c0) * sizeof(T));
                    if (p.rope_mode == ROPE_CONTIGUOUS) {
                        kpos[u] = i;
                    } else if (p.rope_mode != ROPE_NONE) {
                        kpos[u] = slot_position(p, page, slot, t);
                    }
                }
            }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            float kf[VEC], vf[VEC];
            KvsElem<T>::unpack8(kr[u], kf);
            KvsElem<T>::unpack8(vr[u], vf);
            bool far = false;
            if (p.rope_mode != ROPE_NONE) {
                if (p.rope_mode == ROPE_CAPPED) far = (int64_t)qpos - (int64_t)kpos[u] >= (int64_t)p.max_distance;
                const float pos = (float)kpos[u];
                if (p.rope_style == 0) {
                    float other[VEC];
#pragma unroll
                    for (int e = 0; e < VEC; ++e) other[e] = __shfl_sync(KVS_FULL_MASK, kf[e], partner_lane);
                    if (!far && c0 < p.rotary_dim) {
#pragma unroll
                        for (int e = 0; e < VEC; ++e) {
                            const int ch = c0 + e;
                            float c, s;
                            if (ch < half) {
                                rope_cs(p, pos, ch, c, s);
                                kf[e] = kf[e] * c - other[e] * s;
                            } else {
                                rope_cs(p, pos, ch - half, c, s);
                                kf[e] = other[e] * s + kf[e] * c;
                            }
                        }
                    }
                } else if (!far) {
#pragma unroll
                    for (int e = 0; e < VEC; e += 2) {
                        const int ch = c0 + e;
                        if (ch < p.rotary_dim) {
                            float c, s;
                            rope_cs(p, pos, ch / 2, c, s);
                            const float xa = kf[e], xb = kf[e + 1];
                            kf[e] = xa * c - xb * s;
                            kf[e + 1] = xa * s + xb * c;
                        }
                    }
                }
            }
            const float* qrow = far ? &q_s[1][0][0] : &q_s[0][0][0];
            float s[GR];
#pragma unroll
            for (int r = 0; r < GR; ++r) {
                const float4 qa = *reinterpret_cast<const float4*>(qrow + r * D + c0);
                const float4 qb = *reinterpret_cast<const float4*>(qrow + r * D + c0 + 4);
                float d = qa.x * kf[0];
                d = fmaf(qa.y, kf[1], d);
                d = fmaf(qa.z, kf[2], d);
                d = fmaf(qa.w, kf[3], d);
                d = fmaf(qb.x, kf[4], d);
                d = fmaf(qb.y, kf[5], d);
                d = fmaf(qb.z, kf[6], d);
                d = fmaf(qb.w, kf[7], d);
                s[r] = d;
            }
#pragma unroll
            for (int off = TPG / 2; off > 0; off >>= 1) {
#pragma unroll
                for (int r = 0; r < GR; ++r) s[r] += __shfl_xor_sync(KVS_FULL_MASK, s[r], off);
            }
            if (valid[u]) {
#pragma unroll
                for (int r = 0; r < GR; ++r) {
                    float x = s[r];
                    if (p.soft_cap > 0.0f) x = p.soft_cap * tanhf(x / p.soft_cap) * KVS_LOG2E;
                    const float mn = fmaxf(m[r], x);
                    const float alpha = exp2f(m[r] - mn);
                    const float pr = exp2f(x - mn);
                    l[r] = fmaf(l[r], alpha, pr);
#pragma unroll
                    for (int e = 0; e < VEC; ++e) acc[r][e] = fmaf(acc[r][e], alpha, pr * vf[e]);
                    m[r] = mn;
                }
            }
        }
    }

    // Merge the token groups' states.
#pragma unroll
    for (int r = 0; r < GR; ++r) {
        if (lane == 0) {
            red_m[tg][r] = m[r];
            red_l[tg][r] = l[r];
        }
        *reinterpret_cast<float4*>(&red_o[tg][r][c0]) = make_float4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]);
        *reinterpret_cast<float4*>(&red_o[tg][r][c0 + 4]) = make_float4(acc[r][4], acc[r][5], acc[r][6], acc[r][7]);
    }
    __syncthreads();
    for (int i = tid; i < rows * D; i += NT) {
        const int r = i / D, ch = i % D;
        float mx = -INFINITY;
#pragma unroll
        for (int g = 0; g < NG; ++g) mx = fmaxf(mx, red_m[g][r]);
        const int64_t row = ((int64_t)b * p.num_qo_heads + h0 + r) * p.max_chunks + chunk_id;
        if (mx == -INFINITY) {
            o_part[row * D + ch] = 0.0f;
            if (ch == 0) lse_part[row] = -INFINITY;
            continue;
        }
        float sl = 0.0f, so = 0.0f;
#pragma unroll
        for (int g = 0; g < NG; ++g) {
            const float w = exp2f(red_m[g][r] - mx);
            sl = fmaf(red_l[g][r], w, sl);
            so = fmaf(red_o[g][r][ch], w, so);
        }
        o_part[row * D + ch] = so / sl;
        if (ch == 0) lse_part[row] = (mx + log2f(sl)) * KVS_LN2;
    }
}

#define KVS_DECODE(NAME, T, D, GR)                                                        \
    extern "C" __global__ void __launch_bounds__(128) NAME(const DecodeParams p) { \
        decode_body<T, D, GR>(p);                                                         \
    }

KVS_DECODE(kvsieve_decode_f16_d64_r1, __half, 64, 1)
KVS_DECODE(kvsieve_decode_f16_d64_r2, __half, 64, 2)
KVS_DECODE(kvsieve_decode_f16_d64_r4, __half, 64, 4)
KVS_DECODE(kvsieve_decode_f16_d64_r8, __half, 64, 8)
KVS_DECODE(kvsieve_decode_f16_d128_r1, __half, 128, 1)
KVS_DECODE(kvsieve_decode_f16_d128_r2, __half, 128, 2)
KVS_DECODE(kvsieve_decode_f16_d128_r4, __half, 128, 4)
KVS_DECODE(kvsieve_decode_f16_d128_r8, __half, 128, 8)
KVS_DECODE(kvsieve_decode_bf16_d64_r1, __nv_bfloat16, 64, 1)
KVS_DECODE(kvsieve_decode_bf16_d64_r2, __nv_bfloat16, 64, 2)
KVS_DECODE(kvsieve_decode_bf16_d64_r4, __nv_bfloat16, 64, 4)
KVS_DECODE(kvsieve_decode_bf16_d64_r8, __nv_bfloat16, 64, 8)
KVS_DECODE(kvsieve_decode_bf16_d128_r1, __nv_bfloat16, 128, 1)
KVS_DECODE(kvsieve_decode_bf16_d128_r2, __nv_bfloat16, 128, 2)
KVS_DECODE(kvsieve_decode_bf16_d128_r4, __nv_bfloat16, 128, 4)
KVS_DECODE(kvsieve_decode_bf16_d128_r8, __nv_bfloat16, 128, 8)

// Combine the chunks' partial states of each (sequence, query head) by their LSEs and write
// the output (out_dtype, strides) and the LSE.
struct DecodeMergeParams {
    uint64_t o_part;   // f32 [batch, num_qo_heads, max_chunks, head_dim]
    uint64_t lse_part; // f32 [batch, num_qo_heads, max_chunks]
    uint64_t out;      // [batch, num_qo_heads, head_dim]
    uint64_t lse;      // f32 [batch, num_qo_heads], 0 = not wanted
    int64_t out_stride[3];
    int32_t batch;
    int32_t num_qo_heads;
    int32_t head_dim;
    int32_t max_chunks;
    uint32_t out_dtype;
    int32_t _pad;
};
static_assert(sizeof(DecodeMergeParams) == 80, "DecodeMergeParams must match src/backend/cuda/attention.rs");
static_assert(offsetof(DecodeMergeParams, batch) == 56, "DecodeMergeParams layout");

// grid (batch * num_qo_heads), threads over channels.
extern "C" __global__ void kvsieve_decode_merge(const DecodeMergeParams p) {
    const int64_t bh = blockIdx.x;
    const int b = (int)(bh / p.num_qo_heads), h = (int)(bh % p.num_qo_heads);
    const float* lse = reinterpret_cast<const float*>(p.lse_part) + bh * p.max_chunks;
    const float* o = reinterpret_cast<const float*>(p.o_part) + bh * p.max_chunks * p.head_dim;
    float mx = -INFINITY;
    for (int c = 0; c < p.max_chunks; ++c) mx = fmaxf(mx, lse[c]);
    float wsum = 0.0f;
    if (mx != -INFINITY) {
        for (int c = 0; c < p.max_chunks; ++c) {
            if (lse[c] != -INFINITY) wsum += expf(lse[c] - mx);
        }
    }
    const int64_t ob = (int64_t)b * p.out_stride[0] + (int64_t)h * p.out_stride[1];
    for (int ch = threadIdx.x; ch < p.head_dim; ch += blockDim.x) {
        float acc = 0.0f;
        if (mx != -INFINITY) {
            for (int c = 0; c < p.max_chunks; ++c) {
                if (lse[c] != -INFINITY) acc = fmaf(expf(lse[c] - mx), o[(int64_t)c * p.head_dim + ch], acc);
            }
            acc /= wsum;
        }
        kvs_store(reinterpret_cast<void*>(p.out), p.out_dtype, ob + (int64_t)ch * p.out_stride[2], acc);
    }
    if (p.lse != 0 && threadIdx.x == 0) {
        reinterpret_cast<float*>(p.lse)[bh] = mx == -INFINITY ? -INFINITY : mx + logf(wsum);
    }
}

// merge_states: (v_a, lse_a) and (v_b, lse_b) over disjoint key sets -> (out, lse_out).
struct MergeStatesParams {
    uint64_t va;
    uint64_t vb;
    uint64_t lse_a;  // f32 [n, heads]
    uint64_t lse_b;
    uint64_t out;
    uint64_t lse_out;
    int64_t va_stride[3];
    int64_t vb_stride[3];
    int64_t out_stride[3];
    int32_t n;
    int32_t heads;
    int32_t head_dim;
    uint32_t va_dtype;
    uint32_t vb_dtype;
    uint32_t out_dtype;
};
static_assert(sizeof(MergeStatesParams) == 144, "MergeStatesParams must match src/backend/cuda/attention.rs");
static_assert(offsetof(MergeStatesParams, n) == 120, "MergeStatesParams layout");

// grid (n * heads), threads over channels.
extern "C" __global__ void kvsieve_merge_states(const MergeStatesParams p) {
    const int64_t ih = blockIdx.x;
    const int i = (int)(ih / p.heads), h = (int)(ih % p.heads);
    const float la = reinterpret_cast<const float*>(p.lse_a)[ih];
    const float lb = reinterpret_cast<const float*>(p.lse_b)[ih];
    float wa = 0.0f, wb = 0.0f, lse;
    if (lb == -INFINITY) {
        wa = la == -INFINITY ? 0.0f : 1.0f;
        lse = la;
    } else if (la == -INFINITY) {
        wb = 1.0f;
        lse = lb;
    } else {
        const float mx = fmaxf(la, lb);
        const float ea = expf(la - mx), eb = expf(lb - mx);
        const float inv = 1.0f / (ea + eb);
        wa = ea * inv;
        wb = eb * inv;
        lse = mx + logf(ea + eb);
    }
    const int64_t oa = (int64_t)i * p.va_stride[0] + (int64_t)h * p.va_stride[1];
    const int64_t ob = (int64_t)i * p.vb_stride[0] + (int64_t)h * p.vb_stride[1];
    const int64_t oo = (int64_t)i * p.out_stride[0] + (int64_t)h * p.out_stride[1];
    for (int ch = threadIdx.x; ch < p.head_dim; ch += blockDim.x) {
        float x = 0.0f;
        if (wa != 0.0f) x = wa * kvs_load(reinterpret_cast<const void*>(p.va), p.va_dtype, oa + (int64_t)ch * p.va_stride[2]);
        if (wb != 0.0f) x = fmaf(wb, kvs_load(reinterpret_cast<const void*>(p.vb), p.vb_dtype, ob + (int64_t)ch * p.vb_stride[2]), x);
        kvs_store(reinterpret_cast<void*>(p.out), p.out_dtype, oo + (int64_t)ch * p.out_stride[2], x);
    }
    if (threadIdx.x == 0) reinterpret_cast<float*>(p.lse_out)[ih] = lse;
}
