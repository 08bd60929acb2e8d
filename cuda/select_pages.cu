// Page-bound selection (Quest) on the device, with the semantics of src/select/pages.rs.
//
// Sequences come as a CSR page table: sequence b owns pages indices[indptr[b] ..
// indptr[b + 1]] (np_b pages, the last holding last_page_len[b] tokens). Per (sequence b,
// KV head h) a segment of np_b scores lives at seg_base(b, h) = indptr[b] * hk + h * np_b
// in the scores, kept-page and scratch arrays (nnz * hk entries in all).
//
// 1. kvs_page_scores_<dt>: score of page j for KV head h = max over the group's query
//    heads of sum_i (q_i < 0 ? min_i : max_i) * q_i (sign bit of q), -inf for an empty
//    page (min > max on channel 0). A page id at or past num_pool_pages scores -inf and
//    sets bit 0 of *status.
// 2. kvs_page_select: per segment, pages in rank order until their tokens reach the
//    budget (the crossing page whole), at least min(min_pages, np_b) pages; kept page
//    positions ascending into kept[seg_base ..], their count and tokens into seg_pages /
//    seg_tokens[b * hk + h]. A sequence within the budget keeps every page.
// 3. kvs_page_expand: CSR over all (b, h) segments: head_indptr[b * hk + h] and the
//    token indices (into the sequence, ascending) of every kept page.
//
// Launches depend only on host-known sizes (batch, nnz, num_kv_heads): the whole
// selection can be captured in a CUDA graph.
// kvsieve-hot: kvs_page_scores kvs_page_select
#include "select_common.cuh"

// Sequence of global page slot j: the largest b with indptr[b] <= j.
__device__ __forceinline__ unsigned kvs_seq_of(const unsigned* indptr, unsigned batch, unsigned j) {
    unsigned lo = 0, hi = batch;
    while (lo < hi) {
        unsigned mid = (lo + hi + 1) >> 1;
        if (indptr[mid] <= j) lo = mid;
        else hi = mid - 1;
    }
    return lo;
}

#define KVS_PS_WARPS 8

// grid.x = ceil(nnz * hk / KVS_PS_WARPS), block = 32 * KVS_PS_WARPS. q: f32 [batch][hq][d].
template <class L>
__device__ __forceinline__ void page_scores(const typename L::T* __restrict__ bounds, unsigned long long num_pool_pages,
                                            const unsigned* __restrict__ indptr, const unsigned* __restrict__ indices,
                                            unsigned batch, const float* __restrict__ q, unsigned hk, unsigned d,
                                            unsigned group, float* __restrict__ out, unsigned* __restrict__ status) {
    const unsigned lane = threadIdx.x & 31;
    const unsigned long long w = (unsigned long long)blockIdx.x * KVS_PS_WARPS + (threadIdx.x >> 5);
    const unsigned nnz = indptr[batch];
    if (w >= (unsigned long long)nnz * hk) return;
    const unsigned j = (unsigned)(w / hk), h = (unsigned)(w % hk);
    const unsigned b = kvs_seq_of(indptr, batch, j);
    const unsigned p0 = indptr[b], np = indptr[b + 1] - p0;
    float* o = out + (size_t)p0 * hk + (size_t)h * np + (j - p0);
    const unsigned page = indices[j];
    if ((unsigned long long)page >= num_pool_pages) {
        if (lane == 0) {
            *o = -INFINITY;
            atomicOr(status, 1u);
        }
        return;
    }
    const typename L::T* lo = bounds + ((size_t)page * hk + h) * 2 * d;
    const typename L::T* hi = lo + d;
    const bool empty = L::load(lo, 0) > L::load(hi, 0);
    if (empty) {
        if (lane == 0) *o = -INFINITY;
        return;
    }
    const float* qg = q + ((size_t)b * hk + h) * group * d;  // q of sequence b, head h's group
    float best = -INFINITY;
    for (unsigned g = 0; g < group; ++g) {
        const float* qr = qg + (size_t)g * d;
        float acc = 0.f;
        for (unsigned c = lane; c < d; c += 32) {
            const float x = qr[c];
            acc = fmaf(x, signbit(x) ? L::load(lo, c) : L::load(hi, c), acc);
        }
        acc = kvs_warp_sum(acc);
        best = fmaxf(best, acc);
    }
    if (lane == 0) *o = best;
}

struct KvsPageScoresParams {
    const void* bounds;
    const unsigned* indptr;
    const unsigned* indices;
    const float* q;
    float* out;
    unsigned* status;
    unsigned long long num_pool_pages;
    unsigned batch;
    unsigned hk;
    unsigned d;
    unsigned group;
};

#define KVS_PAGE_SCORES(name, L)                                                                                  \
    extern "C" __global__ void __launch_bounds__(32 * KVS_PS_WARPS) name(const KvsPageScoresParams p) {           \
        page_scores<L>((const typename L::T*)p.bounds, p.num_pool_pages, p.indptr, p.indices, p.batch, p.q, p.hk, \
                       p.d, p.group, p.out, p.status);                                                           \
    }
KVS_PAGE_SCORES(kvs_page_scores_f32, KvsF32)
KVS_PAGE_SCORES(kvs_page_scores_f16, KvsF16)
KVS_PAGE_SCORES(kvs_page_scores_bf16, KvsBF16)

#define KVS_SEL_BLOCK 512

// grid = (hk, batch), block = KVS_SEL_BLOCK.
struct KvsPageSelectParams {
    const float* scores;
    const unsigned* indptr;
    const unsigned* last_page_len;
    unsigned* kept;
    unsigned* seg_pages;
    unsigned* seg_tokens;
    unsigned hk;
    unsigned page_size;
    unsigned budget_tokens;
    unsigned min_pages;
};

extern "C" __global__ void __launch_bounds__(KVS_SEL_BLOCK) kvs_page_select(const KvsPageSelectParams p) {
    const float* __restrict__ scores = p.scores;
    const unsigned* __restrict__ indptr = p.indptr;
    const unsigned* __restrict__ last_page_len = p.last_page_len;
    const unsigned hk = p.hk, page_size = p.page_size, budget_tokens = p.budget_tokens, min_pages = p.min_pages;
    unsigned* __restrict__ kept = p.kept;
    unsigned* __restrict__ seg_pages = p.seg_pages;
    unsigned* __restrict__ seg_tokens = p.seg_tokens;
    __shared__ unsigned hist[256];
    __shared__ unsigned sh[40];
    const unsigned h = blockIdx.x, b = blockIdx.y;
    const unsigned p0 = indptr[b], np = indptr[b + 1] - p0;
    const size_t base = (size_t)p0 * hk + (size_t)h * np;
    const float* sc = scores + base;
    unsigned* kp = kept + base;
    const unsigned last = np ? last_page_len[b] : 0u;
    auto weighted = [&](unsigned i, unsigned& key, unsigned& w) {
        key = kvs_rank_key(sc[i]);
        w = i + 1 == np ? last : page_size;
    };
    auto write = [&](unsigned i, unsigned, unsigned pos) { kp[pos] = i; };
    KvsSel sel = kvs_block_select<KVS_SEL_BLOCK>(np, budget_tokens, weighted, hist, sh);
    unsigned count = kvs_block_compact<KVS_SEL_BLOCK>(np, sel, weighted, write, sh);
    const unsigned floor = min(min_pages, np);
    if (count < floor) {
        auto unit = [&](unsigned i, unsigned& key, unsigned& w) {
            key = kvs_rank_key(sc[i]);
            w = 1u;
        };
        sel = kvs_block_select<KVS_SEL_BLOCK>(np, floor, unit, hist, sh);
        count = kvs_block_compact<KVS_SEL_BLOCK>(np, sel, unit, write, sh);
    }
    __syncthreads();  // kp written by other threads
    if (threadIdx.x == 0) {
        unsigned tokens = count * page_size;
        if (count && kp[count - 1] + 1 == np) tokens -= page_size - last;
        seg_pages[b * hk + h] = count;
        seg_tokens[b * hk + h] = tokens;
    }
}

#define KVS_EXP_BLOCK 256

// grid = (hk, batch), block = KVS_EXP_BLOCK. head_indptr has batch * hk + 1 entries.
struct KvsPageExpandParams {
    const unsigned* indptr;
    const unsigned* kept;
    const unsigned* seg_tokens;
    unsigned* head_indptr;
    unsigned* out;
    unsigned hk;
    unsigned page_size;
};

extern "C" __global__ void __launch_bounds__(KVS_EXP_BLOCK) kvs_page_expand(const KvsPageExpandParams p) {
    const unsigned* __restrict__ indptr = p.indptr;
    const unsigned* __restrict__ kept = p.kept;
    const unsigned* __restrict__ seg_tokens = p.seg_tokens;
    const unsigned hk = p.hk, page_size = p.page_size;
    unsigned* __restrict__ head_indptr = p.head_indptr;
    unsigned* __restrict__ out = p.out;
    __shared__ unsigned sh[40];
    const unsigned h = blockIdx.x, b = blockIdx.y;
    const unsigned seg = b * hk + h;
    unsigned part = 0;
    for (unsigned s = threadIdx.x; s < seg; s += KVS_EXP_BLOCK) part += seg_tokens[s];
    const unsigned offset = kvs_block_sum_u<KVS_EXP_BLOCK>(part, sh);
    const unsigned ntok = seg_tokens[seg];
    if (threadIdx.x == 0) {
        head_indptr[seg] = offset;
        if (seg + 1 == gridDim.x * gridDim.y) head_indptr[seg + 1] = offset + ntok;
    }
    const unsigned p0 = indptr[b], np = indptr[b + 1] - p0;
    const unsigned* kp = kept + (size_t)p0 * hk + (size_t)h * np;
    // Every kept page but the sequence's last is full, and the last page comes last.
    for (unsigned t = threadIdx.x; t < ntok; t += KVS_EXP_BLOCK) {
        const unsigned m = t / page_size, slot = t - m * page_size;
        out[offset + t] = kp[m] * page_size + slot;
    }
}
