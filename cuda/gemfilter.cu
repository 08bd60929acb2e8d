// GemFilter on the device, with the semantics of src/select/gemfilter.rs: per token the
// sum over query heads of q_h·k_t (unscaled), computed per KV head from the sum of its
// group's queries; a centred average pool with the forced first / last tokens at +inf;
// the top-k then comes from kvs_topk_segments (topk.cu). No host synchronisation.
// kvsieve-hot: kvs_gemfilter_scores
#include "select_common.cuh"

#define KVS_GF_WARPS 8

// scores[t] = sum_h qsum_h · key(t, h), qsum_h = sum of the group's query rows (q f32
// [hq][d], query head j in KV head j / g). Keys: key(t, h) at keys + t * stride_t + h *
// stride_h, channels contiguous. grid = ceil(n / (KVS_GF_WARPS * 4)) blocks of
// 32 * KVS_GF_WARPS threads, dynamic shared memory hk * d * 4 bytes.
template <class L>
__device__ __forceinline__ void gf_scores(const typename L::T* __restrict__ keys, unsigned long long stride_t,
                                          unsigned long long stride_h, unsigned n, unsigned hk, unsigned d,
                                          unsigned g, const float* __restrict__ q, float* __restrict__ scores) {
#ifdef KVS_EMU
    KVS_EMU_DYN_SHARED(float, qsum);
#else
    extern __shared__ float qsum[];
#endif
    for (unsigned i = threadIdx.x; i < hk * d; i += blockDim.x) {
        const unsigned h = i / d, c = i % d;
        float s = 0.f;
        for (unsigned j = 0; j < g; ++j) s += q[((size_t)h * g + j) * d + c];
        qsum[i] = s;
    }
    __syncthreads();
    const unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const unsigned t0 = (blockIdx.x * KVS_GF_WARPS + warp) * 4;
    for (unsigned t = t0; t < t0 + 4 && t < n; ++t) {
        float total = 0.f;
        for (unsigned h = 0; h < hk; ++h) {
            const typename L::T* x = keys + t * stride_t + h * stride_h;
            const float* qs = qsum + h * d;
            float acc = 0.f;
            for (unsigned c = lane; c < d; c += 32) acc = fmaf(qs[c], L::load(x, c), acc);
            total += kvs_warp_sum(acc);
        }
        if (lane == 0) scores[t] = total;
    }
}

struct KvsGemfilterScoresParams {
    const void* keys;
    const float* q;
    float* scores;
    unsigned long long stride_t;
    unsigned long long stride_h;
    unsigned n;
    unsigned hk;
    unsigned d;
    unsigned g;
};

#define KVS_GF_SCORES(name, L)                                                                                      \
    extern "C" __global__ void __launch_bounds__(32 * KVS_GF_WARPS) name(const KvsGemfilterScoresParams p) {       \
        gf_scores<L>((const typename L::T*)p.keys, p.stride_t, p.stride_h, p.n, p.hk, p.d, p.g, p.q, p.scores);     \
    }
KVS_GF_SCORES(kvs_gemfilter_scores_f32, KvsF32)
KVS_GF_SCORES(kvs_gemfilter_scores_f16, KvsF16)
KVS_GF_SCORES(kvs_gemfilter_scores_bf16, KvsBF16)

// out[i] = mean of in[i - r ..= i + r] that exist (r = kernel / 2, f64 sum), or +inf for
// i < keep_first or i + keep_last >= n. grid-stride over n.
struct KvsAvgPoolParams {
    const float* in;
    float* out;
    unsigned n;
    unsigned kernel;
    unsigned keep_first;
    unsigned keep_last;
};

extern "C" __global__ void kvs_avg_pool(const KvsAvgPoolParams p) {
    const float* __restrict__ in = p.in;
    float* __restrict__ out = p.out;
    const unsigned n = p.n, kernel = p.kernel, keep_first = p.keep_first, keep_last = p.keep_last;
    const unsigned r = kernel / 2;
    for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        if (i < keep_first || (unsigned long long)i + keep_last >= n) {
            out[i] = INFINITY;
            continue;
        }
        const unsigned a = i >= r ? i - r : 0u;
        const unsigned b = (unsigned)min((unsigned long long)i + r + 1, (unsigned long long)n);
        double s = 0.0;
        for (unsigned j = a; j < b; ++j) s += in[j];
        out[i] = (float)(s / (double)(b - a));
    }
}
