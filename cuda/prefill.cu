// Prefill attention over paged K/V on tensor cores (mma.sync m16n8k16, f16 / bf16 in,
// f32 accumulate), with the semantics of src/attention/prefill.rs: the queries of
// sequence b are rows qo_indptr[b] .. qo_indptr[b + 1] of q and are its last tokens;
// query i of n sits at position p = seq_len - n + i and sees token t when t <= p (causal;
// every token without causal) and, for a KV head with a window (sinks s, window w), when
// t < s or max(p - t, 0) < w (StreamingLLM / the Λ-mask). Scores are scaled, optionally soft-capped
// (c * tanh(x / c)); the softmax runs online (FlashAttention-2 style); out gets the
// normalised output and lse (optional) the natural log-sum-exp of the scores.
//
// Grid (ceil(max_q_len / 64), num_qo_heads, batch), block 128 (4 warps of 16 query rows).
// K and V tiles of 64 tokens go through shared memory (V transposed), K/V read through
// the CSR page table. head_dim 64 or 128. Graph-capturable (no host dependence).
//
// With sel_indptr, KV head h of sequence b reads only its token list (ascending, CSR over
// (b, h) as CudaSelections), as prefill_sparse: the masks above then apply to those tokens.
// kvsieve-hot: kvs_prefill
#include "select_common.cuh"

struct KvsPrefillParams {
    const void* q;              // [total][hq][D]
    const void* k;              // paged, element strides below
    const void* v;
    void* out;                  // [total][hq][D], dtype of q
    float* lse;                 // [total][hq] or null
    const unsigned* qo_indptr;  // [batch + 1]
    const unsigned* kv_indptr;  // [batch + 1]
    const unsigned* kv_indices; // page ids
    const unsigned* last_page_len;
    const unsigned* sinks;      // [hk] or null (no windows)
    const unsigned* windows;    // [hk]; 0xffffffff: no window for that head
    const unsigned* sel_indptr; // [batch * hk + 1] or null: token lists per (sequence, KV head)
    const unsigned* sel_indices;
    unsigned long long k_stride_page, k_stride_slot, k_stride_head;
    unsigned long long v_stride_page, v_stride_slot, v_stride_head;
    unsigned batch;
    unsigned hq;
    unsigned hk;
    unsigned page_size;
    unsigned causal;
    float scale;
    float soft_cap;  // 0: none
};

#define KVS_PF_ROWS 64
#define KVS_PF_KEYS 64

template <bool BF16>
__device__ __forceinline__ unsigned kvs_pack2(float lo, float hi) {
    unsigned r;
#ifdef KVS_EMU
    unsigned short l, h;
    if (BF16) {
        __nv_bfloat16 a = __float2bfloat16_rn(lo), b = __float2bfloat16_rn(hi);
        std::memcpy(&l, &a, 2);
        std::memcpy(&h, &b, 2);
    } else {
        __half a = __float2half_rn(lo), b = __float2half_rn(hi);
        std::memcpy(&l, &a, 2);
        std::memcpy(&h, &b, 2);
    }
    r = (unsigned)l | ((unsigned)h << 16);
#else
    if (BF16) asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    else asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
#endif
    return r;
}

template <bool BF16>
__device__ __forceinline__ void kvs_mma_pf(float (&c)[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0,
                                           unsigned b1) {
#ifdef KVS_EMU
    const unsigned a[4] = {a0, a1, a2, a3};
    kvs_emu::mma_m16n8k16(BF16, c, a, b0, b1);
#else
    if (BF16) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    } else {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    }
#endif
}

template <int D, bool BF16>
__device__ __forceinline__ void prefill(const KvsPrefillParams& p) {
    constexpr int KS = D / 16;       // k-steps of Q·K
    constexpr int NF = KVS_PF_KEYS / 8;  // score fragments per row block
    constexpr int ND = D / 8;        // output fragments
    constexpr int LDK = D + 8;       // padded rows (halves)
    constexpr int LDV = KVS_PF_KEYS + 8;
    __shared__ __align__(16) kvs_u16 ks[KVS_PF_KEYS * LDK];
    __shared__ __align__(16) kvs_u16 vt[D * LDV];

    const unsigned b = blockIdx.z, hqo = blockIdx.y;
    const unsigned q0 = p.qo_indptr[b], qlen = p.qo_indptr[b + 1] - q0;
    const unsigned tile0 = blockIdx.x * KVS_PF_ROWS;
    if (tile0 >= qlen) return;  // uniform over the block
    const unsigned hkv = hqo / (p.hq / p.hk);
    const unsigned p0 = p.kv_indptr[b], np = p.kv_indptr[b + 1] - p0;
    const unsigned seq_len = np ? (np - 1) * p.page_size + p.last_page_len[b] : 0u;
    const unsigned first_pos = seq_len - qlen;  // position of query 0
    const bool windowed = p.sinks != nullptr && p.windows[hkv] != 0xffffffffu;
    const unsigned sinks = windowed ? p.sinks[hkv] : 0u;
    const unsigned window = windowed ? p.windows[hkv] : 0u;

    const unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const unsigned gid = lane >> 2, tig = lane & 3;
    const unsigned rbase = tile0 + warp * 16;  // this warp's first query row (within the sequence)

    // Q fragments (rows rbase + gid, rbase + gid + 8).
    const kvs_u16* qp = (const kvs_u16*)p.q;
    unsigned qa[KS][4];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const unsigned i = rbase + gid + r * 8;
        const unsigned* row = (const unsigned*)(qp + ((size_t)(q0 + i) * p.hq + hqo) * D);
#pragma unroll
        for (int s = 0; s < KS; ++s) {
            qa[s][r] = i < qlen ? row[(s * 16 + tig * 2) / 2] : 0u;
            qa[s][r + 2] = i < qlen ? row[(s * 16 + 8 + tig * 2) / 2] : 0u;
        }
    }

    float o[ND][4];
#pragma unroll
    for (int n = 0; n < ND; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) o[n][e] = 0.f;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};

    // Keys the block's rows can see: causal end and window start (sinks aside).
    const unsigned last_row = min(tile0 + KVS_PF_ROWS, qlen) - 1;
    const unsigned key_end = min(p.causal ? first_pos + last_row + 1 : seq_len, seq_len);
    const unsigned first_row_pos = first_pos + tile0;
    const unsigned win_start = windowed && first_row_pos + 1 > window ? first_row_pos + 1 - window : 0u;
    // Keys in order: tokens 0..key_end, or the head's selected tokens below key_end.
    const unsigned* list = nullptr;
    unsigned nkeys = key_end;
    if (p.sel_indptr) {
        const unsigned s0 = p.sel_indptr[b * p.hk + hkv], s1 = p.sel_indptr[b * p.hk + hkv + 1];
        list = p.sel_indices + s0;
        unsigned lo = 0, hi = s1 - s0;  // first entry >= key_end (ascending lists)
        while (lo < hi) {
            const unsigned mid = (lo + hi) >> 1;
            if (list[mid] < key_end) lo = mid + 1;
            else hi = mid;
        }
        nkeys = lo;
    }
    __shared__ unsigned toks[KVS_PF_KEYS];

    const kvs_u16* kb = (const kvs_u16*)p.k;
    const kvs_u16* vb = (const kvs_u16*)p.v;
    for (unsigned j0 = 0; j0 < nkeys; j0 += KVS_PF_KEYS) {
        const unsigned jl = min(j0 + KVS_PF_KEYS, nkeys) - 1;
        const unsigned tfirst = list ? list[j0] : j0, tlast = list ? list[jl] : jl;
        if (windowed && tfirst >= sinks && tlast + 1 <= win_start) continue;  // uniform
        __syncthreads();  // previous tile fully read
        if (threadIdx.x < KVS_PF_KEYS) {
            const unsigned jj = j0 + threadIdx.x;
            toks[threadIdx.x] = jj < nkeys ? (list ? list[jj] : jj) : 0xffffffffu;
        }
        for (unsigned c = threadIdx.x; c < KVS_PF_KEYS * (D / 8); c += blockDim.x) {
            const unsigned r = c / (D / 8), col = (c % (D / 8)) * 8;
            const unsigned jj = j0 + r;
            uint4 kv4 = make_uint4(0, 0, 0, 0), vv4 = make_uint4(0, 0, 0, 0);
            if (jj < nkeys) {
                const unsigned t = list ? list[jj] : jj;
                const unsigned page = p.kv_indices[p0 + t / p.page_size], slot = t % p.page_size;
                kv4 = *(const uint4*)(kb + page * p.k_stride_page + slot * p.k_stride_slot + hkv * p.k_stride_head + col);
                vv4 = *(const uint4*)(vb + page * p.v_stride_page + slot * p.v_stride_slot + hkv * p.v_stride_head + col);
            }
            *(uint4*)(ks + r * LDK + col) = kv4;
            const kvs_u16* vh = (const kvs_u16*)&vv4;
#pragma unroll
            for (int j = 0; j < 8; ++j) vt[(col + j) * LDV + r] = vh[j];
        }
        __syncthreads();

        float s[NF][4];
#pragma unroll
        for (int n = 0; n < NF; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) s[n][e] = 0.f;
#pragma unroll
            for (int kk = 0; kk < KS; ++kk) {
                const kvs_u16* bp = ks + (n * 8 + gid) * LDK + kk * 16 + tig * 2;
                kvs_mma_pf<BF16>(s[n], qa[kk][0], qa[kk][1], qa[kk][2], qa[kk][3], *(const unsigned*)bp,
                                 *(const unsigned*)(bp + 8));
            }
        }
        // Scale, cap, mask; row maxima (rows gid and gid + 8 of the warp).
        float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int n = 0; n < NF; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int r = e >> 1;
                const unsigned i = rbase + gid + r * 8;
                const unsigned t = toks[n * 8 + tig * 2 + (e & 1)];
                const unsigned pos = first_pos + i;
                bool vis = i < qlen && t != 0xffffffffu && (!p.causal || t <= pos);
                if (windowed) vis = vis && (t < sinks || (t > pos ? 0u : pos - t) < window);  // distance saturates at 0
                float x = s[n][e] * p.scale;
                if (p.soft_cap > 0.f) x = p.soft_cap * tanhf(x / p.soft_cap);
                x = vis ? x : -INFINITY;
                s[n][e] = x;
                mx[r] = fmaxf(mx[r], x);
            }
        }
        float corr[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(KVS_FULL_MASK, mx[r], 1));
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(KVS_FULL_MASK, mx[r], 2));
            const float mn = fmaxf(m[r], mx[r]);
            const float mu = mn == -INFINITY ? 0.f : mn;
            corr[r] = __expf(m[r] - mu);  // 0 when m was -inf
            m[r] = mn;
            l[r] *= corr[r];
#pragma unroll
            for (int n = 0; n < NF; ++n) {
                const float e0 = __expf(s[n][2 * r] - mu), e1 = __expf(s[n][2 * r + 1] - mu);
                s[n][2 * r] = e0;
                s[n][2 * r + 1] = e1;
                l[r] += e0 + e1;
            }
        }
#pragma unroll
        for (int n = 0; n < ND; ++n) {
            o[n][0] *= corr[0];
            o[n][1] *= corr[0];
            o[n][2] *= corr[1];
            o[n][3] *= corr[1];
        }
        // O += P V: P's accumulator layout is the A-fragment layout of 16-key chunks.
#pragma unroll
        for (int kc = 0; kc < KVS_PF_KEYS / 16; ++kc) {
            const unsigned a0 = kvs_pack2<BF16>(s[2 * kc][0], s[2 * kc][1]);
            const unsigned a1 = kvs_pack2<BF16>(s[2 * kc][2], s[2 * kc][3]);
            const unsigned a2 = kvs_pack2<BF16>(s[2 * kc + 1][0], s[2 * kc + 1][1]);
            const unsigned a3 = kvs_pack2<BF16>(s[2 * kc + 1][2], s[2 * kc + 1][3]);
#pragma unroll
            for (int n = 0; n < ND; ++n) {
                const kvs_u16* bp = vt + (n * 8 + gid) * LDV + kc * 16 + tig * 2;
                kvs_mma_pf<BF16>(o[n], a0, a1, a2, a3, *(const unsigned*)bp, *(const unsigned*)(bp + 8));
            }
        }
    }
    // Finish: the row sums over the quad, then out = O / l and lse = m + ln(l).
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        l[r] += __shfl_xor_sync(KVS_FULL_MASK, l[r], 1);
        l[r] += __shfl_xor_sync(KVS_FULL_MASK, l[r], 2);
    }
    kvs_u16* out = (kvs_u16*)p.out;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const unsigned i = rbase + gid + r * 8;
        if (i >= qlen) continue;
        const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
        unsigned* orow = (unsigned*)(out + ((size_t)(q0 + i) * p.hq + hqo) * D);
#pragma unroll
        for (int n = 0; n < ND; ++n) orow[(n * 8 + tig * 2) / 2] = kvs_pack2<BF16>(o[n][2 * r] * inv, o[n][2 * r + 1] * inv);
        if (p.lse && tig == 0) p.lse[(size_t)(q0 + i) * p.hq + hqo] = l[r] > 0.f ? m[r] + logf(l[r]) : -INFINITY;
    }
}

extern "C" __global__ void __launch_bounds__(128) kvs_prefill_f16_d64(const KvsPrefillParams p) { prefill<64, false>(p); }
extern "C" __global__ void __launch_bounds__(128) kvs_prefill_f16_d128(const KvsPrefillParams p) { prefill<128, false>(p); }
extern "C" __global__ void __launch_bounds__(128) kvs_prefill_bf16_d64(const KvsPrefillParams p) { prefill<64, true>(p); }
extern "C" __global__ void __launch_bounds__(128) kvs_prefill_bf16_d128(const KvsPrefillParams p) { prefill<128, true>(p); }
