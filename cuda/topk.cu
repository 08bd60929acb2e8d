// Device top-k (radix select) over segments of f32 scores, and the conversion of f16 /
// bf16 vectors to f32 that the selection entry points use for their queries.
//
// kvsieve-hot: kvs_topk
//
// kvs_topk_segments: segment s is scores[seg_indptr[s] .. seg_indptr[s + 1]]; it keeps
// the min(k, len) best entries (higher score first, ties to the lower index, NaN as
// -inf) and writes their indices relative to the segment start, ascending, to
// out[s * k ..], and their number to out_count[s]. One block per segment; no host
// synchronisation, so it can be captured in a CUDA graph.
#include "select_common.cuh"

#define KVS_TOPK_BLOCK 512

struct KvsTopkParams {
    const float* scores;
    const unsigned* seg_indptr;
    unsigned* out;
    unsigned* out_count;
    unsigned k;
};

extern "C" __global__ void __launch_bounds__(KVS_TOPK_BLOCK) kvs_topk_segments(const KvsTopkParams p) {
    const float* __restrict__ scores = p.scores;
    const unsigned* __restrict__ seg_indptr = p.seg_indptr;
    const unsigned k = p.k;
    unsigned* __restrict__ out = p.out;
    unsigned* __restrict__ out_count = p.out_count;
    __shared__ unsigned hist[256];
    __shared__ unsigned sh[40];
    const unsigned s = blockIdx.x;
    const unsigned start = seg_indptr[s];
    const unsigned n = seg_indptr[s + 1] - start;
    const float* seg = scores + start;
    auto f = [&](unsigned i, unsigned& key, unsigned& w) {
        key = kvs_rank_key(seg[i]);
        w = 1u;
    };
    const KvsSel sel = kvs_block_select<KVS_TOPK_BLOCK>(n, k, f, hist, sh);
    unsigned* o = out + (size_t)s * k;
    const unsigned got = kvs_block_compact<KVS_TOPK_BLOCK>(
        n, sel, f, [&](unsigned i, unsigned, unsigned pos) { o[pos] = i; }, sh);
    if (threadIdx.x == 0) out_count[s] = got;
}

// out[i] = (float)in[i] for n elements of f16 (dtype 1) or bf16 (dtype 2); f32 is copied.
struct KvsToF32Params {
    const void* in;
    float* out;
    unsigned long long n;
    unsigned dtype;
};

extern "C" __global__ void kvs_to_f32(const KvsToF32Params p) {
    const void* __restrict__ in = p.in;
    float* __restrict__ out = p.out;
    const unsigned long long n = p.n;
    const unsigned dtype = p.dtype;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        float v;
        if (dtype == 1) v = kvs_f16_to_f32(((const kvs_u16*)in)[i]);
        else if (dtype == 2) v = kvs_bf16_to_f32(((const kvs_u16*)in)[i]);
        else v = ((const float*)in)[i];
        out[i] = v;
    }
}
