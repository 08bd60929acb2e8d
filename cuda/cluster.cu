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
// Mixed ranking (Retrieve::MixedBudget): kvs_cluster_estimate_select in mode 2 (estimates
//               only) -> kvs_cluster_mixed_select (upper bounds from the radii, both
//               rankings, clusters taken from them in turn) -> kvs_cluster_gather
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
//   index) until `budget` tokens, the crossing cluster giving only the tokens it needs,
//   mode 2: none (kvs_cluster_mixed_select chooses; stats[h] gets only clusters scored).
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
    if (mode == 2) {
        if (threadIdx.x == 0) stats[h * 3 + 0] = nscored;
        return;
    }
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

#define KVS_MIX_BLOCK 512
#define KVS_MIX_SEEN 0x80000000u

// A cluster in a ranking: `key` orders as f64::total_cmp orders the score (larger first),
// ties to the lower index.
struct KvsRanked {
    unsigned long long key;
    unsigned long long idx;
};

__device__ __forceinline__ unsigned long long kvs_total_key(double x) {
    const unsigned long long b = (unsigned long long)__double_as_longlong(x);
    return (b >> 63) ? ~b : (b | 0x8000000000000000ull);
}

__device__ __forceinline__ bool kvs_ranks_before(const KvsRanked& a, const KvsRanked& b) {
    return a.key > b.key || (a.key == b.key && a.idx < b.idx);
}

// Sort a[0..n) (n a power of two) into rank order with a bitonic network; every thread of
// the block takes part.
template <int BLOCK>
__device__ void kvs_block_bitonic(KvsRanked* a, unsigned n) {
    for (unsigned size = 2; size <= n; size <<= 1) {
        for (unsigned stride = size >> 1; stride > 0; stride >>= 1) {
            for (unsigned i = threadIdx.x; i < n; i += BLOCK) {
                const unsigned j = i ^ stride;
                if (j <= i) continue;
                const KvsRanked x = a[i], y = a[j];
                // Blocks with bit `size` clear end in rank order, the others reversed.
                const bool swap = (i & size) == 0 ? kvs_ranks_before(y, x) : kvs_ranks_before(x, y);
                if (swap) {
                    a[i] = y;
                    a[j] = x;
                }
            }
            __syncthreads();
        }
    }
}

// Retrieve::MixedBudget for KV head h (grid = hk, block = KVS_MIX_BLOCK), after the
// estimates (mode 2 above): the upper bound of each scored cluster,
//   bound[h][c] = max_j (l_jc + |q_j| r_c / sqrt(d))   (logits already scaled; 0 unscored),
// then clusters taken alternately from the ranking by estimate and the ranking by bound
// (each once, the crossing one in part) until `budget` tokens. Only the clusters a ranking
// can reach are sorted: those at or above its budget cut (radix select of f32 keys, a
// superset of the f64 prefix). `cand` is scratch of 2 * cap entries per head (cap a power
// of two, at least k). Writes take[h][c] and stats[h] = {-, clusters kept, tokens kept}.
struct KvsClusterMixedParams {
    const float* logits;
    const float* q;
    const float* radii;
    const unsigned* sizes;
    const unsigned* parent;
    const unsigned* open;
    const double* est;
    double* bound;
    unsigned* take;
    unsigned* stats;
    KvsRanked* cand;
    unsigned k;
    unsigned g;
    unsigned d;
    unsigned k1;
    unsigned budget;
    unsigned cap;
    float scale;
};

static_assert(sizeof(KvsClusterMixedParams) == 120, "KvsClusterMixedParams must match src/backend/cuda/select/cluster.rs");

extern "C" __global__ void __launch_bounds__(KVS_MIX_BLOCK, 1) kvs_cluster_mixed_select(const KvsClusterMixedParams p) {
    const unsigned k = p.k, g = p.g, d = p.d, k1 = p.k1, budget = p.budget, cap = p.cap;
    __shared__ unsigned hist[256];
    __shared__ unsigned sh[40];
    __shared__ float qn[KVS_EST_MAX_GROUP];
    __shared__ unsigned count[2];
    const unsigned h = blockIdx.x;
    const unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const float* lh = p.logits + (size_t)h * g * k;
    const unsigned* sz = p.sizes + (size_t)h * k;
    const float* rh = p.radii + (size_t)h * k;
    const unsigned* par = p.parent ? p.parent + (size_t)h * k : nullptr;
    const unsigned* op = p.open ? p.open + (size_t)h * k1 : nullptr;
    const double* eh = p.est + (size_t)h * k;
    double* bh = p.bound + (size_t)h * k;
    unsigned* th = p.take + (size_t)h * k;
    KvsRanked* cand = p.cand + (size_t)h * 2 * cap;
    auto scored = [&](unsigned c) -> bool { return par == nullptr || op[par[c]] != 0u; };

    // Norms of the group's query rows, scaled as the logits are.
    for (unsigned j = warp; j < g; j += KVS_MIX_BLOCK / 32) {
        const float* qr = p.q + ((size_t)h * g + j) * d;
        float s = 0.f;
        for (unsigned i = lane; i < d; i += 32) s = fmaf(qr[i], qr[i], s);
        s = kvs_warp_sum(s);
        if (lane == 0) qn[j] = sqrtf(s) * p.scale;
    }
    __syncthreads();
    for (unsigned c = threadIdx.x; c < k; c += KVS_MIX_BLOCK) {
        double b = 0.0;
        if (scored(c)) {
            b = -INFINITY;
            for (unsigned j = 0; j < g; ++j) b = fmax(b, (double)lh[(size_t)j * k + c] + (double)qn[j] * (double)rh[c]);
        }
        bh[c] = b;
        th[c] = 0u;
    }
    __syncthreads();

    // Each ranking's reachable clusters, sorted.
    for (unsigned r = 0; r < 2; ++r) {
        const double* score = r == 0 ? eh : bh;
        KvsRanked* list = cand + (size_t)r * cap;
        auto f = [&](unsigned c, unsigned& key, unsigned& w) {
            const bool s = scored(c);
            key = s ? kvs_rank_key((float)score[c]) : 0u;
            w = s ? sz[c] : 0u;
        };
        const KvsSel sel = kvs_block_select<KVS_MIX_BLOCK>(k, budget, f, hist, sh);
        unsigned n = 0;
        for (unsigned t0 = 0; t0 < k; t0 += KVS_MIX_BLOCK) {
            const unsigned c = t0 + threadIdx.x;
            bool keep = false;
            if (c < k) {
                unsigned key, w;
                f(c, key, w);
                keep = scored(c) && (sel.all || key >= sel.thresh);
            }
            unsigned total;
            const unsigned pos = kvs_block_excl_scan<KVS_MIX_BLOCK>(keep ? 1u : 0u, &total, sh);
            if (keep) list[n + pos] = KvsRanked{kvs_total_key(score[c]), c};
            n += total;
        }
        unsigned n2 = 1;
        while (n2 < n) n2 <<= 1;
        for (unsigned i = n + threadIdx.x; i < n2; i += KVS_MIX_BLOCK) list[i] = KvsRanked{0ull, 0xffffffffull};
        if (threadIdx.x == 0) count[r] = n;
        __syncthreads();
        kvs_block_bitonic<KVS_MIX_BLOCK>(list, n2);
    }

    // Take clusters from the two rankings in turn, each once.
    if (threadIdx.x == 0) {
        unsigned left = budget, kept = 0, tokens = 0, at0 = 0, at1 = 0;
        // The next cluster of `list` not taken yet, if any, taken (in part if it crosses).
        auto take_next = [&](const KvsRanked* list, unsigned n, unsigned& at) -> bool {
            while (at < n && (th[list[at].idx] & KVS_MIX_SEEN)) ++at;
            if (at == n) return false;
            const unsigned c = (unsigned)list[at].idx;
            const unsigned t = min(sz[c], left);
            th[c] = t | KVS_MIX_SEEN;
            left -= t;
            ++kept;
            tokens += t;
            return true;
        };
        while (left > 0) {
            const bool a = take_next(cand, count[0], at0);
            if (left == 0) break;
            const bool b = take_next(cand + cap, count[1], at1);
            if (!a && !b) break;
        }
        p.stats[h * 3 + 1] = kept;
        p.stats[h * 3 + 2] = tokens;
    }
    __syncthreads();
    for (unsigned c = threadIdx.x; c < k; c += KVS_MIX_BLOCK) th[c] &= ~KVS_MIX_SEEN;
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
