// Keys must be finite (the CPU entry points check; these kernels do not).
//
// Spherical K-means (Lloyd) on the device, with the semantics of
// src/select/cluster/kmeans.rs: assignment to the nearest unit centroid by the largest
// x̂·ĉ (ties to the lowest cluster), normalised-mean update (a cluster whose mean has
// length <= 1e-12 keeps its centroid), empty-cluster repair in ascending order, and the
// raw-key means of the final clusters.
//
// Keys are read in place: key (t, h) starts at keys + t * stride_t + h * stride_h
// (elements; channels contiguous). x̂ = x / ‖x‖ is never stored: argmax_c x·ĉ equals
// argmax_c x̂·ĉ, and the best dot product is scaled by inv_norm afterwards.
//
// State per KV head h (all arrays [hk][...]): cn[k][d] unit centroids (f32), csq[k],
// sizes[k], assign[n], best[n] (x̂·ĉ of the assigned centroid), and a control word
// ctl[h] = {done, iterations, changed, repaired, converged, pad, pad, pad}. Every kernel
// skips a head whose `done` is set, so the host launches max_iter iterations without
// reading anything back and the whole run can be captured in a CUDA graph.
//
// One iteration: kvs_kmeans_update_accumulate -> kvs_kmeans_update_finalize ->
// kvs_kmeans_assign_* -> kvs_kmeans_repair -> kvs_kmeans_iter_end. Before the first:
// kvs_kmeans_norms, kvs_kmeans_begin, kvs_kmeans_prep, assign, repair,
// kvs_kmeans_iter_end(count = 0).
//
// Update sums use 64-bit fixed point (2^-40 steps) accumulated with integer atomics: the
// result does not depend on the order in which points arrive.
// kvsieve-hot: kvs_kmeans_assign kvs_kmeans_update
#include "select_common.cuh"

// One parameter block for every kernel of this file (each reads the fields it needs).
// Arrays are [hk][...] as described above; keys are `dtype` elements.
struct KvsKmeansParams {
    const void* keys;
    float* inv_norm;     // [hk][n]
    float* xsq;          // [hk][n]
    float* cn;           // [hk][k][d]
    float* csq;          // [hk][k]
    unsigned* sizes;     // [hk][k]
    long long* sums;     // [hk][k][d]
    unsigned* ctl;       // [hk][8]
    kvs_u16* chi;        // [hk][kp][d] (tensor-core paths)
    kvs_u16* clo;        // [hk][kp][d] (split path)
    unsigned* assign;    // [hk][n]
    float* best;         // [hk][n]
    double* raw;         // [hk][k][d]
    float* centroids;    // [hk][k][d]
    double* inertia;     // [hk]
    float* d2;           // [hk][n] k-means++: squared distance to the nearest seed
    double* chunk_sums;  // [hk][ceil(n / 2048)]
    unsigned long long* rng;  // [hk] SplitMix64 states
    unsigned* chosen;    // [hk][n] 1 once a point is a seed
    unsigned* seeds;     // [hk][k]
    unsigned* near;      // [hk][n] k-means++: draw index of the nearest seed
    float* ss2;          // [hk][k] k-means++: squared distance of the new seed to each earlier one
    unsigned* radii;     // [hk][k] f32 bits of each cluster's radius (largest member distance)
    unsigned long long stride_t;
    unsigned long long stride_h;
    unsigned long long seed;
    unsigned n;
    unsigned d;
    unsigned k;
    unsigned kp;
    unsigned hk;
    unsigned count;
    unsigned step;       // k-means++: index of the seed being drawn
};

#define KVS_CTL 8
#define KVS_FIX_SCALE 1099511627776.0  // 2^40

__device__ __forceinline__ bool kvs_done(const unsigned* ctl, unsigned h) { return ctl[h * KVS_CTL + 0] != 0u; }

// inv_norm[h][t] = 1 / ‖key(t, h)‖ (0 for a zero key), xsq[h][t] = 1 or 0.
// grid = (ceil(n / 8), hk), block = 256 (a warp per key).
template <class L>
__device__ __forceinline__ void norms(const typename L::T* keys, unsigned long long stride_t, unsigned long long stride_h,
                                      unsigned n, unsigned d, float* inv_norm, float* xsq) {
    const unsigned lane = threadIdx.x & 31;
    const unsigned t = blockIdx.x * 8 + (threadIdx.x >> 5);
    const unsigned h = blockIdx.y;
    if (t >= n) return;
    const typename L::T* x = keys + t * stride_t + h * stride_h;
    double s = 0.0;
    for (unsigned c = lane; c < d; c += 32) {
        const double v = L::load(x, c);
        s += v * v;
    }
    s = kvs_warp_sum_d(s);
    if (lane == 0) {
        const bool nz = s > 0.0;
        inv_norm[(size_t)h * n + t] = nz ? (float)(1.0 / sqrt(s)) : 0.f;
        xsq[(size_t)h * n + t] = nz ? 1.f : 0.f;
    }
}

#define KVS_KM_NORMS(name, L)                                                                                       \
    extern "C" __global__ void __launch_bounds__(256) name(const KvsKmeansParams p) {                              \
        norms<L>((const typename L::T*)p.keys, p.stride_t, p.stride_h, p.n, p.d, p.inv_norm, p.xsq);               \
    }
KVS_KM_NORMS(kvs_kmeans_norms_f32, KvsF32)
KVS_KM_NORMS(kvs_kmeans_norms_f16, KvsF16)
KVS_KM_NORMS(kvs_kmeans_norms_bf16, KvsBF16)

// Start of a run: cn[h][c] scaled to unit length (zero rows kept), csq, sizes and the
// control words cleared, fixed-point sums zeroed. grid = (k, hk), block = 32.
extern "C" __global__ void __launch_bounds__(32) kvs_kmeans_begin(const KvsKmeansParams p) {
    float* cn = p.cn;
    float* csq = p.csq;
    const unsigned k = p.k, d = p.d;
    unsigned* sizes = p.sizes;
    long long* sums = p.sums;
    unsigned* ctl = p.ctl;
    const unsigned lane = threadIdx.x, c = blockIdx.x, h = blockIdx.y;
    float* row = cn + ((size_t)h * k + c) * d;
    double s = 0.0;
    for (unsigned i = lane; i < d; i += 32) s += (double)row[i] * row[i];
    s = kvs_warp_sum_d(s);
    const double norm = sqrt(s);
    float q = 0.f;
    for (unsigned i = lane; i < d; i += 32) {
        if (norm > 0.0) row[i] = (float)(row[i] / norm);
        q += row[i] * row[i];
        sums[((size_t)h * k + c) * d + i] = 0;
    }
    q = kvs_warp_sum(q);
    if (lane == 0) {
        csq[(size_t)h * k + c] = q;
        sizes[(size_t)h * k + c] = 0;
    }
    if (c == 0 && lane < KVS_CTL) ctl[h * KVS_CTL + lane] = 0u;
}

// Tensor-core copies of the centroids: hi = round(cn), lo = round(cn - hi) in the key
// dtype, [hk][kp][d] with rows k..kp zero. grid = (kp, hk), block = 32.
template <class L>
__device__ __forceinline__ void prep(const float* cn, unsigned k, unsigned kp, unsigned d, kvs_u16* chi, kvs_u16* clo) {
    const unsigned c = blockIdx.x, h = blockIdx.y;
    kvs_u16* oh = chi + ((size_t)h * kp + c) * d;
    kvs_u16* ol = clo ? clo + ((size_t)h * kp + c) * d : nullptr;
    for (unsigned i = threadIdx.x; i < d; i += 32) {
        const float v = c < k ? cn[((size_t)h * k + c) * d + i] : 0.f;
        const kvs_u16 hv = L::store(v);
        oh[i] = hv;
        if (ol) ol[i] = L::store(v - L::load(&hv, 0));
    }
}
#define KVS_KM_PREP(name, L)                                                                                        \
    extern "C" __global__ void __launch_bounds__(32) name(const KvsKmeansParams p) {                               \
        prep<L>(p.cn, p.k, p.kp, p.d, p.chi, p.clo);                                                               \
    }
KVS_KM_PREP(kvs_kmeans_prep_f16, KvsF16)
KVS_KM_PREP(kvs_kmeans_prep_bf16, KvsBF16)

// Record point t's assignment: changed count, sizes, best (scaled to x̂·ĉ).
__device__ __forceinline__ void kvs_km_record(unsigned h, unsigned t, unsigned n, unsigned k, unsigned c, float dot,
                                              const float* inv_norm, unsigned* assign, float* best, unsigned* sizes,
                                              unsigned* ctl) {
    const size_t i = (size_t)h * n + t;
    const unsigned old = assign[i];
    if (old != c) atomicAdd(&ctl[h * KVS_CTL + 2], 1u);
    assign[i] = c;
    best[i] = dot * inv_norm[i];
    atomicAdd(&sizes[(size_t)h * k + c], 1u);
}

// ------------------------------------------------------------ assignment, tensor cores
//
// A block of 8 warps takes 256 points of one head; warp w holds rows 32w..32w+31 as two
// m16 A fragments for the whole head_dim in registers. Centroid tiles of NT rows stream
// through shared memory (cp.async, double-buffered); each warp multiplies its rows with
// every tile (mma.sync m16n8k16, f32 accumulate; with SPLIT also the low parts of the
// centroids) and keeps a running (max, argmax) per row. grid = (ceil(n / 256), hk).

__device__ __forceinline__ void kvs_cp_async16(void* smem, const void* gmem) {
#ifdef KVS_EMU
    std::memcpy(smem, gmem, 16);  // completes at once; commit and wait have nothing to do
#else
    unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem));
#endif
}
#ifdef KVS_EMU
__device__ __forceinline__ void kvs_cp_commit() {}
template <int N>
__device__ __forceinline__ void kvs_cp_wait() {}
#else
__device__ __forceinline__ void kvs_cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void kvs_cp_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }
#endif

template <bool BF16>
__device__ __forceinline__ void kvs_mma(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
#ifdef KVS_EMU
    kvs_emu::mma_m16n8k16(BF16, c, a, b0, b1);
#else
    if (BF16) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    } else {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
#endif
}

#define KVS_MMA_WARPS 8
#define KVS_MMA_ROWS (32 * KVS_MMA_WARPS)

template <int D, int NT, bool BF16, bool SPLIT>
__device__ __forceinline__ void assign_mma(const kvs_u16* __restrict__ keys, unsigned long long stride_t,
                                           unsigned long long stride_h, unsigned n, const kvs_u16* __restrict__ chi,
                                           const kvs_u16* __restrict__ clo, const float* __restrict__ cn, unsigned k,
                                           unsigned kp, const float* __restrict__ inv_norm, unsigned* __restrict__ assign,
                                           float* __restrict__ best, unsigned* __restrict__ sizes,
                                           unsigned* __restrict__ ctl) {
    constexpr int LD = D + 8;            // padded smem row (halves): conflict-free fragment loads
    constexpr int PARTS = SPLIT ? 2 : 1;  // hi (and lo) planes
    constexpr int TILE = PARTS * NT * LD; // halves per buffer
    constexpr int KS = D / 16;
    constexpr int NF = NT / 8;
#ifdef KVS_EMU
    KVS_EMU_DYN_SHARED(kvs_u16, smem);
#else
    extern __shared__ __align__(16) kvs_u16 smem[];
#endif
    const unsigned h = blockIdx.y;
    if (kvs_done(ctl, h)) return;
    const unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const unsigned gid = lane >> 2, tig = lane & 3;
    const unsigned row0 = blockIdx.x * KVS_MMA_ROWS + warp * 32;

    // A fragments: rows row0 + mf*16 + {gid, gid+8}, columns ks*16 + tig*2 + {0,1} (+8).
    unsigned a[2][KS][4];
#pragma unroll
    for (int mf = 0; mf < 2; ++mf) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const unsigned t = row0 + mf * 16 + gid + r * 8;
            const unsigned* x = (const unsigned*)(keys + (size_t)t * stride_t + (size_t)h * stride_h);
#pragma unroll
            for (int ks = 0; ks < KS; ++ks) {
                a[mf][ks][r] = t < n ? x[(ks * 16 + tig * 2) / 2] : 0u;
                a[mf][ks][r + 2] = t < n ? x[(ks * 16 + 8 + tig * 2) / 2] : 0u;
            }
        }
    }

    const kvs_u16* ch = chi + (size_t)h * kp * D;
    const kvs_u16* cl = SPLIT ? clo + (size_t)h * kp * D : nullptr;
    auto load_tile = [&](unsigned tile, int buf) {
        kvs_u16* dst = smem + buf * TILE;
        constexpr int CHUNKS = NT * D / 8;  // 16-byte chunks per plane
        for (int i = threadIdx.x; i < PARTS * CHUNKS; i += KVS_MMA_ROWS) {
            const int part = i / CHUNKS, j = i % CHUNKS;
            const int r = j / (D / 8), col = (j % (D / 8)) * 8;
            const kvs_u16* src = (part ? cl : ch) + ((size_t)tile * NT + r) * D + col;
            kvs_cp_async16(dst + part * NT * LD + r * LD + col, src);
        }
        kvs_cp_commit();
    };

    float bv[4];
    unsigned bi[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        bv[i] = -INFINITY;
        bi[i] = 0u;
    }
    const unsigned tiles = kp / NT;
    load_tile(0, 0);
    for (unsigned tile = 0; tile < tiles; ++tile) {
        const int buf = tile & 1;
        if (tile + 1 < tiles) {
            load_tile(tile + 1, buf ^ 1);
            kvs_cp_wait<1>();
        } else {
            kvs_cp_wait<0>();
        }
        __syncthreads();
        const kvs_u16* sb = smem + buf * TILE;
        float acc[2][NF][4];
#pragma unroll
        for (int mf = 0; mf < 2; ++mf)
#pragma unroll
            for (int nf = 0; nf < NF; ++nf)
#pragma unroll
                for (int i = 0; i < 4; ++i) acc[mf][nf][i] = 0.f;
#pragma unroll
        for (int ks = 0; ks < KS; ++ks) {
#pragma unroll
            for (int part = 0; part < PARTS; ++part) {
#pragma unroll
                for (int nf = 0; nf < NF; ++nf) {
                    const kvs_u16* p = sb + part * NT * LD + (nf * 8 + gid) * LD + ks * 16 + tig * 2;
                    const unsigned b0 = *(const unsigned*)p;
                    const unsigned b1 = *(const unsigned*)(p + 8);
                    kvs_mma<BF16>(acc[0][nf], a[0][ks], b0, b1);
                    kvs_mma<BF16>(acc[1][nf], a[1][ks], b0, b1);
                }
            }
        }
        // Running argmax; columns are visited in increasing order, so a strict > keeps
        // the lowest index on ties.
#pragma unroll
        for (int nf = 0; nf < NF; ++nf) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const unsigned col = tile * NT + nf * 8 + tig * 2 + e;
                if (col < k) {
#pragma unroll
                    for (int mf = 0; mf < 2; ++mf) {
#pragma unroll
                        for (int r = 0; r < 2; ++r) {
                            const float v = acc[mf][nf][r * 2 + e];
                            const int s = mf * 2 + r;
                            if (v > bv[s]) {
                                bv[s] = v;
                                bi[s] = col;
                            }
                        }
                    }
                }
            }
        }
        __syncthreads();  // the buffer is refilled by the next iteration's prefetch
    }
    // Reduce over the 4 lanes of a quad (they hold different columns of the same rows).
#pragma unroll
    for (int s = 0; s < 4; ++s) {
#pragma unroll
        for (int o = 1; o < 4; o <<= 1) {
            const float ov = __shfl_xor_sync(KVS_FULL_MASK, bv[s], o);
            const unsigned oi = __shfl_xor_sync(KVS_FULL_MASK, bi[s], o);
            if (ov > bv[s] || (ov == bv[s] && oi < bi[s])) {
                bv[s] = ov;
                bi[s] = oi;
            }
        }
    }
    // Every lane of a quad now holds the 4 rows' winners; lane tig takes row tig and
    // recomputes its dot product with the f32 centroid, so `best` (inertia, repair
    // distances) does not carry the rounding of the tensor-core centroids.
    unsigned ci = 0;
#pragma unroll
    for (int s = 0; s < 4; ++s)
        if (s == (int)tig) ci = bi[s];
    const unsigned t = row0 + (tig >> 1) * 16 + gid + (tig & 1) * 8;
    if (t < n) {
        const kvs_u16* x = keys + (size_t)t * stride_t + (size_t)h * stride_h;
        const float* cr = cn + ((size_t)h * k + ci) * D;
        float dot = 0.f;
#pragma unroll 8
        for (int c = 0; c < D; ++c) dot = fmaf(BF16 ? kvs_bf16_to_f32(x[c]) : kvs_f16_to_f32(x[c]), cr[c], dot);
        kvs_km_record(h, t, n, k, ci, dot, inv_norm, assign, best, sizes, ctl);
    }
}

#define KVS_KM_MMA(name, D, NT, BF, SPLIT)                                                                          \
    extern "C" __global__ void __launch_bounds__(KVS_MMA_ROWS, 1) name(const KvsKmeansParams p) {                  \
        assign_mma<D, NT, BF, SPLIT>((const kvs_u16*)p.keys, p.stride_t, p.stride_h, p.n, p.chi, p.clo, p.cn, p.k, \
                                     p.kp, p.inv_norm, p.assign, p.best, p.sizes, p.ctl);                                \
    }
// Dynamic shared memory: 2 * (SPLIT ? 2 : 1) * NT * (D + 8) * 2 bytes; kp a multiple of NT.
KVS_KM_MMA(kvs_kmeans_assign_mma_f16_d64, 64, 64, false, false)
KVS_KM_MMA(kvs_kmeans_assign_mma_f16_d128, 128, 64, false, false)
KVS_KM_MMA(kvs_kmeans_assign_mma_bf16_d64, 64, 64, true, false)
KVS_KM_MMA(kvs_kmeans_assign_mma_bf16_d128, 128, 64, true, false)
KVS_KM_MMA(kvs_kmeans_assign_mma_split_f16_d64, 64, 32, false, true)
KVS_KM_MMA(kvs_kmeans_assign_mma_split_f16_d128, 128, 32, false, true)
KVS_KM_MMA(kvs_kmeans_assign_mma_split_bf16_d64, 64, 32, true, true)
KVS_KM_MMA(kvs_kmeans_assign_mma_split_bf16_d128, 128, 32, true, true)

// ------------------------------------------------------------ assignment, CUDA cores
//
// Any dtype and head_dim (multiple of 32 up to 512): a warp per point, the point's
// channels spread over the lanes, every centroid in turn (f32 products and sums).
// grid = (ceil(n / 8), hk), block = 256.
template <class L>
__device__ __forceinline__ void assign_simt(const typename L::T* keys, unsigned long long stride_t,
                                            unsigned long long stride_h, unsigned n, unsigned d, const float* cn,
                                            unsigned k, const float* inv_norm, unsigned* assign, float* best,
                                            unsigned* sizes, unsigned* ctl) {
    const unsigned h = blockIdx.y;
    if (kvs_done(ctl, h)) return;
    const unsigned lane = threadIdx.x & 31;
    const unsigned t = blockIdx.x * 8 + (threadIdx.x >> 5);
    if (t >= n) return;
    const typename L::T* x = keys + t * stride_t + h * stride_h;
    float xv[16];
#pragma unroll
    for (int j = 0; j < 16; ++j) {
        const unsigned c = lane + 32 * j;
        xv[j] = c < d ? L::load(x, c) : 0.f;
    }
    const float* ch = cn + (size_t)h * k * d;
    float bv = -INFINITY;
    unsigned bi = 0;
    for (unsigned c = 0; c < k; ++c) {
        const float* cr = ch + (size_t)c * d;
        float acc = 0.f;
#pragma unroll
        for (int j = 0; j < 16; ++j) {
            const unsigned i = lane + 32 * j;
            if (i < d) acc = fmaf(xv[j], cr[i], acc);
        }
        acc = kvs_warp_sum(acc);
        if (acc > bv) {
            bv = acc;
            bi = c;
        }
    }
    if (lane == 0) kvs_km_record(h, t, n, k, bi, bv, inv_norm, assign, best, sizes, ctl);
}
#define KVS_KM_SIMT(name, L)                                                                                        \
    extern "C" __global__ void __launch_bounds__(256) name(const KvsKmeansParams p) {                              \
        assign_simt<L>((const typename L::T*)p.keys, p.stride_t, p.stride_h, p.n, p.d, p.cn, p.k, p.inv_norm,      \
                       p.assign, p.best, p.sizes, p.ctl);                                                          \
    }
KVS_KM_SIMT(kvs_kmeans_assign_simt_f32, KvsF32)
KVS_KM_SIMT(kvs_kmeans_assign_simt_f16, KvsF16)
KVS_KM_SIMT(kvs_kmeans_assign_simt_bf16, KvsBF16)

// ------------------------------------------------------------ update

// sums[h][assign][c] += x̂_c in fixed point. grid = (ceil(n / 8), hk), block = 256.
template <class L>
__device__ __forceinline__ void accumulate(const typename L::T* keys, unsigned long long stride_t,
                                           unsigned long long stride_h, unsigned n, unsigned d, unsigned k,
                                           const float* inv_norm, const unsigned* assign, long long* sums,
                                           const unsigned* ctl) {
    const unsigned h = blockIdx.y;
    if (kvs_done(ctl, h)) return;
    const unsigned lane = threadIdx.x & 31;
    const unsigned t = blockIdx.x * 8 + (threadIdx.x >> 5);
    if (t >= n) return;
    const float inv = inv_norm[(size_t)h * n + t];
    if (inv == 0.f) return;
    const typename L::T* x = keys + t * stride_t + h * stride_h;
    long long* s = sums + ((size_t)h * k + assign[(size_t)h * n + t]) * d;
    for (unsigned c = lane; c < d; c += 32) {
        const float v = L::load(x, c) * inv;
        atomicAdd((unsigned long long*)&s[c], (unsigned long long)__double2ll_rn((double)v * KVS_FIX_SCALE));
    }
}
#define KVS_KM_ACC(name, L)                                                                                         \
    extern "C" __global__ void __launch_bounds__(256) name(const KvsKmeansParams p) {                              \
        accumulate<L>((const typename L::T*)p.keys, p.stride_t, p.stride_h, p.n, p.d, p.k, p.inv_norm, p.assign,   \
                      p.sums, p.ctl);                                                                              \
    }
KVS_KM_ACC(kvs_kmeans_update_accumulate_f32, KvsF32)
KVS_KM_ACC(kvs_kmeans_update_accumulate_f16, KvsF16)
KVS_KM_ACC(kvs_kmeans_update_accumulate_bf16, KvsBF16)

// cn[h][c] = sums / ‖sums‖ where that length exceeds 1e-12 (else unchanged); csq; sums,
// sizes and the per-iteration counters cleared for the next assignment. grid = (k, hk),
// block = 32.
extern "C" __global__ void __launch_bounds__(32) kvs_kmeans_update_finalize(const KvsKmeansParams p) {
    long long* sums = p.sums;
    float* cn = p.cn;
    float* csq = p.csq;
    const unsigned k = p.k, d = p.d;
    unsigned* sizes = p.sizes;
    unsigned* ctl = p.ctl;
    const unsigned lane = threadIdx.x, c = blockIdx.x, h = blockIdx.y;
    if (kvs_done(ctl, h)) return;
    long long* s = sums + ((size_t)h * k + c) * d;
    float* row = cn + ((size_t)h * k + c) * d;
    double q = 0.0;
    for (unsigned i = lane; i < d; i += 32) {
        const double v = (double)s[i] / KVS_FIX_SCALE;
        q += v * v;
    }
    q = kvs_warp_sum_d(q);
    const double norm = sqrt(q);
    float r = 0.f;
    for (unsigned i = lane; i < d; i += 32) {
        if (norm > 1e-12) row[i] = (float)((double)s[i] / KVS_FIX_SCALE / norm);
        r += row[i] * row[i];
        s[i] = 0;
    }
    r = kvs_warp_sum(r);
    if (lane == 0) {
        csq[(size_t)h * k + c] = r;
        sizes[(size_t)h * k + c] = 0;
    }
    if (c == 0 && lane == 0) {
        ctl[h * KVS_CTL + 2] = 0u;
        ctl[h * KVS_CTL + 3] = 0u;
    }
}

// ------------------------------------------------------------ repair

#define KVS_REPAIR_BLOCK 1024

// Empty clusters in ascending order: the largest cluster (lowest index on ties) gives up
// its member farthest from its centroid (largest xsq - 2 best, lowest index on ties),
// which becomes the empty cluster's only member and centroid. Sets ctl.repaired.
// grid = hk, block = KVS_REPAIR_BLOCK. chi/clo (optional) get the new centroid rows.
template <class L>
__device__ __forceinline__ void repair(const typename L::T* keys, unsigned long long stride_t,
                                       unsigned long long stride_h, unsigned n, unsigned d, unsigned k, unsigned kp,
                                       const float* inv_norm, const float* xsq, unsigned* assign, float* best,
                                       unsigned* sizes, float* cn, float* csq, kvs_u16* chi, kvs_u16* clo,
                                       unsigned* ctl) {
    __shared__ unsigned sh[40];
    __shared__ float shv[32];
    __shared__ unsigned shi[32];
    const unsigned h = blockIdx.x;
    if (kvs_done(ctl, h)) return;
    const unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    unsigned* sz = sizes + (size_t)h * k;
    unsigned* a = assign + (size_t)h * n;
    float* bh = best + (size_t)h * n;
    const float* xs = xsq + (size_t)h * n;
    unsigned empties = 0;
    for (unsigned c = threadIdx.x; c < k; c += KVS_REPAIR_BLOCK) empties += sz[c] == 0u;
    empties = kvs_block_sum_u<KVS_REPAIR_BLOCK>(empties, sh);
    if (empties == 0) return;
    // (value, index) argmax with the lowest index on ties, over the block.
    auto argmax = [&](float v, unsigned i) -> unsigned {
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float ov = __shfl_xor_sync(KVS_FULL_MASK, v, o);
            const unsigned oi = __shfl_xor_sync(KVS_FULL_MASK, i, o);
            if (ov > v || (ov == v && oi < i)) {
                v = ov;
                i = oi;
            }
        }
        if (lane == 0) {
            shv[warp] = v;
            shi[warp] = i;
        }
        __syncthreads();
        if (warp == 0) {
            v = lane < KVS_REPAIR_BLOCK / 32 ? shv[lane] : -INFINITY;
            i = lane < KVS_REPAIR_BLOCK / 32 ? shi[lane] : 0xffffffffu;
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) {
                const float ov = __shfl_xor_sync(KVS_FULL_MASK, v, o);
                const unsigned oi = __shfl_xor_sync(KVS_FULL_MASK, i, o);
                if (ov > v || (ov == v && oi < i)) {
                    v = ov;
                    i = oi;
                }
            }
            if (lane == 0) sh[32] = i;
        }
        __syncthreads();
        const unsigned r = sh[32];
        __syncthreads();
        return r;
    };
    for (unsigned e = 0; e < k; ++e) {
        if (sz[e] != 0u) continue;  // uniform: sizes change only below, between barriers
        float v = -INFINITY;
        unsigned idx = 0xffffffffu;
        for (unsigned c = threadIdx.x; c < k; c += KVS_REPAIR_BLOCK) {
            const float s = (float)sz[c];
            if (s > v || (s == v && c < idx)) {
                v = s;
                idx = c;
            }
        }
        const unsigned l = argmax(v, idx);
        v = -INFINITY;
        idx = 0xffffffffu;
        for (unsigned t = threadIdx.x; t < n; t += KVS_REPAIR_BLOCK) {
            if (a[t] == l) {
                const float dist = xs[t] - 2.f * bh[t];
                if (dist > v || (dist == v && t < idx)) {
                    v = dist;
                    idx = t;
                }
            }
        }
        const unsigned p = argmax(v, idx);
        const float inv = inv_norm[(size_t)h * n + p];
        const typename L::T* x = keys + p * stride_t + h * stride_h;
        float* row = cn + ((size_t)h * k + e) * d;
        for (unsigned i = threadIdx.x; i < d; i += KVS_REPAIR_BLOCK) {
            const float xv = L::load(x, i) * inv;
            row[i] = xv;
            if (chi) {
                const kvs_u16 hv = L::store(xv);
                chi[((size_t)h * kp + e) * d + i] = hv;
                if (clo) clo[((size_t)h * kp + e) * d + i] = L::store(xv - L::load(&hv, 0));
            }
        }
        if (threadIdx.x == 0) {
            a[p] = e;
            sz[l] -= 1u;
            sz[e] = 1u;
            csq[(size_t)h * k + e] = xs[p];
            bh[p] = xs[p];
            ctl[h * KVS_CTL + 3] = 1u;
        }
        __syncthreads();
    }
}
// f32 keys never use tensor-core copies; their store is never called.
struct KvsF32R : KvsF32 {
    static __device__ __forceinline__ kvs_u16 store(float) { return 0; }
    static __device__ __forceinline__ float load(const kvs_u16*, size_t) { return 0.f; }
    using KvsF32::load;
};
#define KVS_KM_REPAIR(name, L)                                                                                      \
    extern "C" __global__ void __launch_bounds__(KVS_REPAIR_BLOCK) name(const KvsKmeansParams p) {                 \
        repair<L>((const typename L::T*)p.keys, p.stride_t, p.stride_h, p.n, p.d, p.k, p.kp, p.inv_norm, p.xsq,    \
                  p.assign, p.best, p.sizes, p.cn, p.csq, p.chi, p.clo, p.ctl);                                     \
    }
KVS_KM_REPAIR(kvs_kmeans_repair_f32, KvsF32R)
KVS_KM_REPAIR(kvs_kmeans_repair_f16, KvsF16)
KVS_KM_REPAIR(kvs_kmeans_repair_bf16, KvsBF16)

// End of an assignment pass: with count, iterations += 1 and, when nothing changed and
// nothing was repaired, done = converged = 1. grid = 1, block = hk (<= 1024).
extern "C" __global__ void kvs_kmeans_iter_end(const KvsKmeansParams p) {
    unsigned* ctl = p.ctl;
    const unsigned hk = p.hk, count = p.count;
    const unsigned h = threadIdx.x;
    if (h >= hk || kvs_done(ctl, h) || !count) return;
    unsigned* c = ctl + h * KVS_CTL;
    c[1] += 1u;
    if (c[2] == 0u && c[3] == 0u) {
        c[0] = 1u;
        c[4] = 1u;
    }
}

// out[h] = sum_t max(xsq + csq[assign] - 2 best, 0) in f64 (fixed order: deterministic).
// grid = hk, block = 1024.
extern "C" __global__ void __launch_bounds__(1024) kvs_kmeans_inertia(const KvsKmeansParams p) {
    const float* xsq = p.xsq;
    const float* csq = p.csq;
    const unsigned* assign = p.assign;
    const float* best = p.best;
    const unsigned n = p.n, k = p.k;
    double* out = p.inertia;
    __shared__ double sh[40];
    const unsigned h = blockIdx.x;
    double s = 0.0;
    for (unsigned t = threadIdx.x; t < n; t += 1024) {
        const size_t i = (size_t)h * n + t;
        const float v = xsq[i] + csq[(size_t)h * k + assign[i]] - 2.f * best[i];
        s += fmax((double)v, 0.0);
    }
    s = kvs_block_sum_d<1024>(s, sh);
    if (threadIdx.x == 0) out[h] = s;
}

// Raw-key sums per cluster (f64 atomics) for the raw centroids: raw[h][assign][c] += x.
// `raw` zeroed by the caller. grid = (ceil(n / 8), hk), block = 256.
template <class L>
__device__ __forceinline__ void raw_sums(const typename L::T* keys, unsigned long long stride_t,
                                         unsigned long long stride_h, unsigned n, unsigned d, unsigned k,
                                         const unsigned* assign, double* raw) {
    const unsigned lane = threadIdx.x & 31;
    const unsigned t = blockIdx.x * 8 + (threadIdx.x >> 5);
    const unsigned h = blockIdx.y;
    if (t >= n) return;
    const typename L::T* x = keys + t * stride_t + h * stride_h;
    double* s = raw + ((size_t)h * k + assign[(size_t)h * n + t]) * d;
    for (unsigned c = lane; c < d; c += 32) atomicAdd(&s[c], (double)L::load(x, c));
}
#define KVS_KM_RAW(name, L)                                                                                         \
    extern "C" __global__ void __launch_bounds__(256) name(const KvsKmeansParams p) {                              \
        raw_sums<L>((const typename L::T*)p.keys, p.stride_t, p.stride_h, p.n, p.d, p.k, p.assign, p.raw);         \
    }
KVS_KM_RAW(kvs_kmeans_raw_sums_f32, KvsF32)
KVS_KM_RAW(kvs_kmeans_raw_sums_f16, KvsF16)
KVS_KM_RAW(kvs_kmeans_raw_sums_bf16, KvsBF16)

// Radii: radii[h][c] = max over the members t of |key(t, h) - centroids[h][c]| (f64 sum of
// the squared f32 differences, as src/select/cluster/kmeans.rs), as the bits of a
// non-negative f32 (ordered as unsigned). `radii` zeroed by the caller, `centroids` the raw
// means. grid = (ceil(n / 8), hk), block = 256 (a warp per key).
template <class L>
__device__ __forceinline__ void radii_body(const KvsKmeansParams& p) {
    const unsigned lane = threadIdx.x & 31;
    const unsigned t = blockIdx.x * 8 + (threadIdx.x >> 5);
    const unsigned h = blockIdx.y;
    if (t >= p.n) return;
    const typename L::T* x = (const typename L::T*)p.keys + t * p.stride_t + h * p.stride_h;
    const unsigned c = p.assign[(size_t)h * p.n + t];
    const float* m = p.centroids + ((size_t)h * p.k + c) * p.d;
    double s = 0.0;
    for (unsigned i = lane; i < p.d; i += 32) {
        const double v = (double)(L::load(x, i) - m[i]);
        s += v * v;
    }
    s = kvs_warp_sum_d(s);
    if (lane == 0) atomicMax(&p.radii[(size_t)h * p.k + c], __float_as_uint((float)sqrt(s)));
}
#define KVS_KM_RADII(name, L)                                                                \
    extern "C" __global__ void __launch_bounds__(256) name(const KvsKmeansParams p) { radii_body<L>(p); }
KVS_KM_RADII(kvs_kmeans_radii_f32, KvsF32)
KVS_KM_RADII(kvs_kmeans_radii_f16, KvsF16)
KVS_KM_RADII(kvs_kmeans_radii_bf16, KvsBF16)

// centroids[h][c] = raw / sizes (0 for an empty cluster). grid = (k, hk), block = 32.
extern "C" __global__ void __launch_bounds__(32) kvs_kmeans_raw_finish(const KvsKmeansParams p) {
    const double* raw = p.raw;
    const unsigned* sizes = p.sizes;
    const unsigned k = p.k, d = p.d;
    float* centroids = p.centroids;
    const unsigned c = blockIdx.x, h = blockIdx.y;
    const unsigned s = sizes[(size_t)h * k + c];
    for (unsigned i = threadIdx.x; i < d; i += 32) {
        const size_t j = ((size_t)h * k + c) * d + i;
        centroids[j] = s ? (float)(raw[j] / (double)s) : 0.f;
    }
}

// ------------------------------------------------------------ k-means++ seeding
//
// The draws of src/select/cluster/kmeans.rs (`plus_plus`): a SplitMix64 seeded by `seed`
// per head; the first seed is `below(n)`; each further seed draws u = next_f64() * total
// (total = the f64 sum of the per-chunk f64 sums of D², chunks of 2048 points, each chunk
// summed in point order) and takes the first point, in index order among those with
// D² > 0, at which the running f64 sum exceeds u; with total 0 the lowest-index point not
// yet a seed. D² = max(x̂sq_i + x̂sq_p - 2 x̂_i·x̂_p, 0) against the nearest seed so far.
// Per seed: kvs_kmeans_pp_update (step s: fold seed s in) then kvs_kmeans_pp_draw (draw
// seed s + 1). All sums are in the CPU's order; only the dot products differ in rounding.

#define KVS_PP_CHUNK 2048

__device__ __forceinline__ unsigned long long kvs_splitmix_next(unsigned long long* state) {
    unsigned long long z = (*state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// d2 = +inf, rng = seed, chosen = 0, first seed below(n). grid = (ceil(n / 256), hk), block 256.
extern "C" __global__ void __launch_bounds__(256) kvs_kmeans_pp_begin(const KvsKmeansParams p) {
    const unsigned h = blockIdx.y;
    for (unsigned t = blockIdx.x * 256 + threadIdx.x; t < p.n; t += gridDim.x * 256) {
        p.d2[(size_t)h * p.n + t] = INFINITY;
        p.chosen[(size_t)h * p.n + t] = 0u;
        p.near[(size_t)h * p.n + t] = 0u;
    }
    for (unsigned j = blockIdx.x * 256 + threadIdx.x; j < p.k; j += gridDim.x * 256) p.ss2[(size_t)h * p.k + j] = 0.f;
    if (blockIdx.x == 0 && threadIdx.x == 0) {
        unsigned long long st = p.seed;
        const unsigned first = (unsigned)__umul64hi(kvs_splitmix_next(&st), (unsigned long long)p.n);
        p.rng[h] = st;
        p.seeds[(size_t)h * p.k] = first;
    }
}

// ss2[h][j] = max(x̂sq(seed j) + x̂sq(seed step) - 2 x̂(seed j)·x̂(seed step), 0) for j < step.
// grid = (ceil(step / 8), hk), block 256 (a warp per earlier seed).
template <class L>
__device__ __forceinline__ void pp_ss2(const KvsKmeansParams& p) {
    const unsigned h = blockIdx.y, lane = threadIdx.x & 31;
    const unsigned j = blockIdx.x * 8 + (threadIdx.x >> 5);
    if (j >= p.step) return;
    const typename L::T* keys = (const typename L::T*)p.keys;
    const unsigned sp = p.seeds[(size_t)h * p.k + p.step], sj = p.seeds[(size_t)h * p.k + j];
    const typename L::T* xp = keys + sp * p.stride_t + h * p.stride_h;
    const typename L::T* xj = keys + sj * p.stride_t + h * p.stride_h;
    float acc = 0.f;
    for (unsigned i = lane; i < p.d; i += 32) acc = fmaf(L::load(xp, i), L::load(xj, i), acc);
    acc = kvs_warp_sum(acc) * p.inv_norm[(size_t)h * p.n + sp] * p.inv_norm[(size_t)h * p.n + sj];
    if (lane == 0) p.ss2[(size_t)h * p.k + j] = fmaxf(p.xsq[(size_t)h * p.n + sj] + p.xsq[(size_t)h * p.n + sp] - 2.f * acc, 0.f);
}
#define KVS_PP_SS2(name, L)                                                                                         \
    extern "C" __global__ void __launch_bounds__(256) name(const KvsKmeansParams p) { pp_ss2<L>(p); }
KVS_PP_SS2(kvs_kmeans_pp_ss2_f32, KvsF32)
KVS_PP_SS2(kvs_kmeans_pp_ss2_f16, KvsF16)
KVS_PP_SS2(kvs_kmeans_pp_ss2_bf16, KvsBF16)

// Fold seed `step` into D² and refresh the chunk sums. grid = (chunks, hk), block 256.
// As the CPU, only points the new seed may be nearer to are evaluated (D² > 0 and
// ss2[near] < 4 D² (1 + 1e-4) + 1e-6, by the triangle inequality), which changes no
// result; a chunk whose D² did not change keeps its sum. `chosen` of the new seed is set
// here (before any read by the next draw).
template <class L>
__device__ __forceinline__ void pp_update(const KvsKmeansParams& p) {
    __shared__ float xp[512];
    __shared__ int changed;
    const unsigned h = blockIdx.y, c = blockIdx.x;
    const unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const unsigned sp = p.seeds[(size_t)h * p.k + p.step];
    const typename L::T* keys = (const typename L::T*)p.keys;
    const float invp = p.inv_norm[(size_t)h * p.n + sp];
    const float xsqp = p.xsq[(size_t)h * p.n + sp];
    const typename L::T* xrow = keys + sp * p.stride_t + h * p.stride_h;
    for (unsigned i = threadIdx.x; i < p.d; i += 256) xp[i] = L::load(xrow, i) * invp;
    if (threadIdx.x == 0) changed = p.step == 0;
    __syncthreads();
    const unsigned t0 = c * KVS_PP_CHUNK, t1 = min(t0 + KVS_PP_CHUNK, p.n);
    float* d2 = p.d2 + (size_t)h * p.n;
    unsigned* near = p.near + (size_t)h * p.n;
    const float* ss2 = p.ss2 + (size_t)h * p.k;
    for (unsigned base = t0 + warp * 32; base < t1; base += 256) {
        const unsigned t = base + lane;
        float v = 0.f;
        bool cand = false;
        if (t < t1) {
            v = d2[t];
            cand = t == sp || (v > 0.f && ss2[near[t]] < 4.f * v * (1.f + 1e-4f) + 1e-6f);
        }
        unsigned mask = __ballot_sync(KVS_FULL_MASK, cand);
        while (mask) {
            const int src = __ffs(mask) - 1;
            mask &= mask - 1;
            const unsigned u = base + src;
            const typename L::T* x = keys + u * p.stride_t + h * p.stride_h;
            float acc = 0.f;
            for (unsigned i = lane; i < p.d; i += 32) acc = fmaf(L::load(x, i), xp[i], acc);
            acc = kvs_warp_sum(acc) * p.inv_norm[(size_t)h * p.n + u];
            if (lane == src) {
                const float nd = fmaxf(p.xsq[(size_t)h * p.n + u] + xsqp - 2.f * acc, 0.f);
                if (u == sp) {
                    d2[u] = 0.f;
                    near[u] = p.step;
                    changed = 1;
                } else if (nd < v) {
                    d2[u] = nd;
                    near[u] = p.step;
                    changed = 1;
                }
            }
        }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        if (changed) {
            double s = 0.0;  // in point order, as the CPU
            for (unsigned t = t0; t < t1; ++t) s += (double)d2[t];
            p.chunk_sums[(size_t)h * gridDim.x + c] = s;
        }
        if (sp >= t0 && sp < t1) p.chosen[(size_t)h * p.n + sp] = 1u;
    }
}
#define KVS_PP_UPDATE(name, L)                                                                                      \
    extern "C" __global__ void __launch_bounds__(256) name(const KvsKmeansParams p) { pp_update<L>(p); }
KVS_PP_UPDATE(kvs_kmeans_pp_update_f32, KvsF32)
KVS_PP_UPDATE(kvs_kmeans_pp_update_f16, KvsF16)
KVS_PP_UPDATE(kvs_kmeans_pp_update_bf16, KvsBF16)

// Draw seed step + 1 (see above). grid = hk, block = 32 (one thread walks, in order).
extern "C" __global__ void __launch_bounds__(32) kvs_kmeans_pp_draw(const KvsKmeansParams p) {
    if (threadIdx.x != 0) return;
    const unsigned h = blockIdx.x;
    const unsigned chunks = (p.n + KVS_PP_CHUNK - 1) / KVS_PP_CHUNK;
    const double* cs = p.chunk_sums + (size_t)h * chunks;
    const float* d2 = p.d2 + (size_t)h * p.n;
    double total = 0.0;
    for (unsigned c = 0; c < chunks; ++c) total += cs[c];
    unsigned long long st = p.rng[h];
    const double u = (double)(kvs_splitmix_next(&st) >> 11) * (1.0 / 9007199254740992.0) * total;
    p.rng[h] = st;
    unsigned pick = 0xffffffffu;
    if (total > 0.0) {
        double cum = 0.0;
        int last = -1;
        for (unsigned c = 0; c < chunks && pick == 0xffffffffu; ++c) {
            if (cum + cs[c] <= u) {
                cum += cs[c];
                if (cs[c] > 0.0) last = (int)c;
                continue;
            }
            const unsigned t1 = min((c + 1) * KVS_PP_CHUNK, p.n);
            for (unsigned t = c * KVS_PP_CHUNK; t < t1; ++t) {
                const float v = d2[t];
                if (v > 0.f) {
                    cum += (double)v;
                    last = (int)c;
                    if (cum > u) {
                        pick = t;
                        break;
                    }
                }
            }
        }
        if (pick == 0xffffffffu && last >= 0) {
            // Rounding left u beyond the running sum: the last point with D² > 0.
            const unsigned t1 = min(((unsigned)last + 1) * KVS_PP_CHUNK, p.n);
            for (unsigned t = (unsigned)last * KVS_PP_CHUNK; t < t1; ++t)
                if (d2[t] > 0.f) pick = t;
        }
    }
    if (pick == 0xffffffffu) {
        const unsigned* ch = p.chosen + (size_t)h * p.n;
        for (unsigned t = 0; t < p.n; ++t)
            if (ch[t] == 0u) {
                pick = t;
                break;
            }
    }
    p.seeds[(size_t)h * p.k + p.step + 1] = pick;
}

// Initial unit centroids from the seeds: cn[h][c] = x̂[seeds[h][c]]. grid = (k, hk), block 32.
template <class L>
__device__ __forceinline__ void pp_gather(const KvsKmeansParams& p) {
    const unsigned c = blockIdx.x, h = blockIdx.y;
    const unsigned t = p.seeds[(size_t)h * p.k + c];
    const typename L::T* x = (const typename L::T*)p.keys + t * p.stride_t + h * p.stride_h;
    const float inv = p.inv_norm[(size_t)h * p.n + t];
    for (unsigned i = threadIdx.x; i < p.d; i += 32) p.cn[((size_t)h * p.k + c) * p.d + i] = L::load(x, i) * inv;
}
#define KVS_PP_GATHER(name, L)                                                                                      \
    extern "C" __global__ void __launch_bounds__(32) name(const KvsKmeansParams p) { pp_gather<L>(p); }
KVS_PP_GATHER(kvs_kmeans_pp_gather_f32, KvsF32)
KVS_PP_GATHER(kvs_kmeans_pp_gather_f16, KvsF16)
KVS_PP_GATHER(kvs_kmeans_pp_gather_bf16, KvsBF16)
