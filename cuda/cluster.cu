// Centroid retrieval (Squeezed Attention) on the device, with the semantics of
// src/select/cluster/retrieve.rs.
//
// Index arrays (every KV head has the same cluster counts): raw-mean centroids
// cent[hk][k][d] (f32), sizes[hk][k], per clustered token its cluster assign[hk][m] and
// its rank among the cluster's members (ascending token order) rank[hk][m]; for the
// coarse level ccent[hk][k1][d], csizes[hk][k1] and each fine cluster's coarse parent
// parent[hk][k].
//
// Flat:         kvs_cluster_logits(fine) -> kvs_cluster_estimate_select -> kvs_cluster_gather
// Hierarchical: kvs_cluster_logits(coarse) -> kvs_cluster_estimate_select(coarse; its take
//               marks the opened coarse clusters) -> kvs_cluster_logits(fine, only the
//               children of opened ones) -> kvs_cluster_estimate_select(fine, denominator
//               with the closed coarse terms) -> kvs_cluster_gather
// Every launch size depends only on host-known sizes (hk, k, k1, m): a retrieval can be
// captured in a CUDA graph.
// kvsieve-hot: kvs_cluster
#include "select_common.cuh"

#define KVS_CL_WARPS 8

// logits[h][j][c] = (q_{h*g+j} . cent[h][c]) * scale for every cluster scored: all of them
// without `parent`, else those whose coarse parent is open (open[h][parent] > 0); other
// entries are left untouched. grid = (ceil(k / KVS_CL_WARPS), hk), block = 32 * KVS_CL_WARPS.
struct KvsClusterLogitsParams {
    const float* q;
    const float* cent;
    const unsigned* parent;
    const unsigned* open;
    float* logits;
    unsigned k;
    unsigned d;
    unsigned g;
    float scale;
    unsigned k1;
};

extern "C" __global__ void __launch_bounds__(32 * KVS_CL_WARPS) kvs_cluster_logits(const KvsClusterLogitsParams p) {
    const float* __restrict__ q = p.q;
    const float* __restrict__ cent = p.cent;
    const unsigned k = p.k, d = p.d, g = p.g, k1 = p.k1;
    const float scale = p.scale;
    const unsigned* __restrict__ parent = p.parent;
    const unsigned* __restrict__ open = p.open;
    float* __restrict__ logits = p.logits;
    const unsigned lane = threadIdx.x & 31;
    const unsigned c = blockIdx.x * KVS_CL_WARPS + (threadIdx.x >> 5);
    const unsigned h = blockIdx.y;
    if (c >= k) return;
    if (parent && open[(size_t)h * k1 + parent[(size_t)h * k + c]] == 0u) return;
    const float* cr = cent + ((size_t)h * k + c) * d;
    const float* qh = q + (size_t)h * g * d;
    for (unsigned j = 0; j < g; ++j) {
        const float* qr = qh + (size_t)j * d;
        float acc = 0.f;
        for (unsigned i = lane; i < d; i += 32) acc = fmaf(qr[i], cr[i], acc);
        acc = kvs_warp_sum(acc);
        if (lane == 0) logits[((size_t)h * g + j) * k + c] = acc * scale;
    }
}

#define KVS_EST_BLOCK 512
#define KVS_EST_MAX_GROUP 64

// Per KV head (grid = hk, block = KVS_EST_BLOCK): estimates of the scored clusters,
//   est[h][c] = mean_j exp(l_jc - m_j) / D_j,  D_j = sum_scored N_c exp(l_jc - m_j)
//               + sum_{closed coarse C} N_C exp(l_jC - m_j),
// (m_j the largest logit of either set), then the clusters kept:
//   mode 0: est > thresholds[h] (take = size), mode 1: rank order (higher est, then lower
//   index) until `budget` tokens, the crossing cluster giving only the tokens it needs.
// Outputs take[h][c] (tokens taken from cluster c, 0 for the rest), est[h][c] (0 for an
// unscored cluster) and stats[h] = {clusters scored, clusters kept, tokens kept}.
// Without `parent` every cluster is scored and there are no coarse terms. g <= 64.
struct KvsClusterEstimateParams {
    const float* logits;
    const unsigned* sizes;
    const unsigned* parent;
    const unsigned* open;
    const float* clogits;
    const unsigned* csizes;
    const double* thresholds;
    double* est;
    unsigned* take;
    unsigned* stats;
    unsigned k;
    unsigned g;
    unsigned k1;
    unsigned mode;
    unsigned budget;
};

extern "C" __global__ void __launch_bounds__(KVS_EST_BLOCK)
kvs_cluster_estimate_select(const KvsClusterEstimateParams p) {
    const float* __restrict__ logits = p.logits;
    const unsigned* __restrict__ sizes = p.sizes;
    const unsigned k = p.k, g = p.g, k1 = p.k1, mode = p.mode, budget = p.budget;
    const unsigned* __restrict__ parent = p.parent;
    const unsigned* __restrict__ open = p.open;
    const float* __restrict__ clogits = p.clogits;
    const unsigned* __restrict__ csizes = p.csizes;
    const double* __restrict__ thresholds = p.thresholds;
    double* __restrict__ est = p.est;
    unsigned* __restrict__ take = p.take;
    unsigned* __restrict__ stats = p.stats;
    __shared__ unsigned hist[256];
    __shared__ unsigned sh[40];
    __shared__ double shd[40];
    __shared__ float mx[KVS_EST_MAX_GROUP];
    __shared__ double den[KVS_EST_MAX_GROUP];
    const unsigned h = blockIdx.x;
    const float* lh = logits + (size_t)h * g * k;
    const unsigned* sz = sizes + (size_t)h * k;
    const unsigned* par = parent ? parent + (size_t)h * k : nullptr;
    const unsigned* op = open ? open + (size_t)h * k1 : nullptr;
    const float* cl = clogits ? clogits + (size_t)h * g * k1 : nullptr;
    const unsigned* csz = csizes ? csizes + (size_t)h * k1 : nullptr;
    double* eh = est + (size_t)h * k;
    unsigned* th = take + (size_t)h * k;
    auto scored = [&](unsigned c) -> bool { return par == nullptr || op[par[c]] != 0u; };
    const bool extra = par != nullptr && cl != nullptr;

    for (unsigned j = 0; j < g; ++j) {
        const float* lj = lh + (size_t)j * k;
        float m = -INFINITY;
        for (unsigned c = threadIdx.x; c < k; c += KVS_EST_BLOCK)
            if (scored(c)) m = fmaxf(m, lj[c]);
        if (extra)
            for (unsigned c = threadIdx.x; c < k1; c += KVS_EST_BLOCK)
                if (op[c] == 0u) m = fmaxf(m, cl[(size_t)j * k1 + c]);
        m = kvs_block_max<KVS_EST_BLOCK>(m, (float*)sh);
        double s = 0.0;
        for (unsigned c = threadIdx.x; c < k; c += KVS_EST_BLOCK)
            if (scored(c)) s += (double)expf(lj[c] - m) * (double)sz[c];
        if (extra)
            for (unsigned c = threadIdx.x; c < k1; c += KVS_EST_BLOCK)
                if (op[c] == 0u) s += (double)expf(cl[(size_t)j * k1 + c] - m) * (double)csz[c];
        s = kvs_block_sum_d<KVS_EST_BLOCK>(s, shd);
        if (threadIdx.x == 0) {
            mx[j] = m;
            den[j] = s;
        }
    }
    __syncthreads();
    unsigned nscored = 0;
    for (unsigned c = threadIdx.x; c < k; c += KVS_EST_BLOCK) {
        double e = 0.0;
        if (scored(c)) {
            ++nscored;
            for (unsigned j = 0; j < g; ++j) e += (double)expf(lh[(size_t)j * k + c] - mx[j]) / den[j];
            e /= (double)g;
        }
        eh[c] = e;
        th[c] = 0u;
    }
    nscored = kvs_block_sum_u<KVS_EST_BLOCK>(nscored, sh);  // also orders the writes above
    unsigned kept = 0, tokens = 0;
    if (mode == 0) {
        const double t = thresholds[h];
        for (unsigned c = threadIdx.x; c < k; c += KVS_EST_BLOCK) {
            if (scored(c) && eh[c] > t) {
                th[c] = sz[c];
                ++kept;
                tokens += sz[c];
            }
        }
        kept = kvs_block_sum_u<KVS_EST_BLOCK>(kept, sh);
        tokens = kvs_block_sum_u<KVS_EST_BLOCK>(tokens, sh);
    } else {
        auto f = [&](unsigned c, unsigned& key, unsigned& w) {
            const bool s = scored(c);
            key = s ? kvs_rank_key((float)eh[c]) : 0u;
            w = s ? sz[c] : 0u;
        };
        const KvsSel sel = kvs_block_select<KVS_EST_BLOCK>(k, budget, f, hist, sh);
        unsigned part = 0;
        kept = kvs_block_compact<KVS_EST_BLOCK>(
            k, sel, f,
            [&](unsigned c, unsigned t, unsigned) {
                th[c] = t;
                part += t;
            },
            sh);
        tokens = kvs_block_sum_u<KVS_EST_BLOCK>(part, sh);
    }
    if (threadIdx.x == 0) {
        stats[h * 3 + 0] = nscored;
        stats[h * 3 + 1] = kept;
        stats[h * 3 + 2] = tokens;
    }
}

#define KVS_GATHER_BLOCK 512

// Selection CSR over heads: head_indptr[h] = tokens kept by heads before h, and per head
// the clustered tokens t (ascending) with take[h][assign[h][t]] > rank[h][t].
// grid = hk, block = KVS_GATHER_BLOCK. head_indptr has hk + 1 entries.
struct KvsClusterGatherParams {
    const unsigned* take;
    const unsigned* assign;
    const unsigned* rank;
    const unsigned* stats;
    unsigned* head_indptr;
    unsigned* out;
    unsigned k;
    unsigned m;
};

extern "C" __global__ void __launch_bounds__(KVS_GATHER_BLOCK) kvs_cluster_gather(const KvsClusterGatherParams p) {
    const unsigned* __restrict__ take = p.take;
    const unsigned* __restrict__ assign = p.assign;
    const unsigned* __restrict__ rank = p.rank;
    const unsigned* __restrict__ stats = p.stats;
    const unsigned k = p.k, m = p.m;
    unsigned* __restrict__ head_indptr = p.head_indptr;
    unsigned* __restrict__ out = p.out;
    __shared__ unsigned sh[40];
    const unsigned h = blockIdx.x;
    unsigned offset = 0;
    for (unsigned i = 0; i < h; ++i) offset += stats[i * 3 + 2];
    if (threadIdx.x == 0) {
        head_indptr[h] = offset;
        if (h + 1 == gridDim.x) head_indptr[h + 1] = offset + stats[h * 3 + 2];
    }
    const unsigned* th = take + (size_t)h * k;
    const unsigned* ah = assign + (size_t)h * m;
    const unsigned* rh = rank + (size_t)h * m;
    unsigned base = offset;
    for (unsigned t0 = 0; t0 < m; t0 += KVS_GATHER_BLOCK) {
        const unsigned t = t0 + threadIdx.x;
        const bool keep = t < m && th[ah[t]] > rh[t];
        unsigned total;
        const unsigned pos = kvs_block_excl_scan<KVS_GATHER_BLOCK>(keep ? 1u : 0u, &total, sh);
        if (keep) out[base + pos] = t;
        base += total;
    }
}
