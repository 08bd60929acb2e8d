/* The cluster index (K-means over keys per KV head, centroid retrieval) through the C API,
 * against plain double-precision checks written here from the definitions: every key in the
 * cluster whose unit centroid has the largest cosine with it, raw centroids the mean of their
 * members, the estimates exp(q·C_c/√d) / Σ_j N_j exp(q·C_j/√d) averaged over a group's query
 * heads, threshold and budget selections from a ranking of the estimates, hierarchical
 * retrieval with every coarse cluster open equal to flat, calibration near its target,
 * incremental assignment from a cache, save/load round trips and damaged files, a retrieval
 * unioned with a streaming window driving sparse decode, readers sharing one index beside a
 * writer assigning new tokens, and bad input. */
#define _POSIX_C_SOURCE 200809L
#include <pthread.h>
#include <unistd.h>

#include "common.h"

enum { HK = 2, GROUP = 3, HQ = HK * GROUP, D = 32, N = 240, K = 12, K1 = 4, CENTERS = 9 };

/* A contiguous 2-D host tensor `[a, b]` over `data`. Returns `&tt->t`. */
static const kvsieve_tensor_t *tensor2(test_tensor *tt, void *data, kvsieve_dtype_t dtype, int64_t a, int64_t b) {
    memset(tt, 0, sizeof *tt);
    tt->shape[0] = a;
    tt->shape[1] = b;
    tt->t.data = data;
    tt->t.device.device_type = KVSIEVE_DEVICE_CPU;
    tt->t.ndim = 2;
    tt->t.dtype = dtype;
    tt->t.shape = tt->shape;
    return &tt->t;
}

static kvsieve_key_source_t from_tensor(const kvsieve_tensor_t *t) {
    kvsieve_key_source_t s;
    kvsieve_key_source_init(&s);
    s.tensor = t;
    return s;
}

static kvsieve_key_source_t from_cache(const kvsieve_cache_t *cache, uint64_t seq, size_t layer) {
    kvsieve_key_source_t s;
    kvsieve_key_source_init(&s);
    s.cache = cache;
    s.seq = seq;
    s.layer = layer;
    return s;
}

static kvsieve_cache_t *new_cache(size_t hk, size_t d, size_t ps, size_t pages, uint32_t key_rope) {
    kvsieve_cache_t *cache = NULL;
    kvsieve_cache_config_t cfg = kvsieve_cache_config_default(1, hk, d, ps, pages);
    cfg.dtype = dt_f32();
    cfg.key_rope = key_rope;
    cfg.track_key_bounds = false;
    EXPECT_OK(kvsieve_cache_new(&cfg, &cache));
    return cache;
}

/* Append n tokens to `seq` (layer 0), keys and values token-major [n][hk][d]. */
static void append_tokens(kvsieve_cache_t *cache, uint64_t seq, size_t start, size_t n, size_t hk, size_t d, float *k, float *v) {
    test_tensor tk, tv;
    EXPECT_OK(kvsieve_cache_append(cache, seq, n, NULL, NULL));
    EXPECT_OK(kvsieve_cache_write(cache, seq, 0, start, tensor3(&tk, k, dt_f32(), (int64_t)n, (int64_t)hk, (int64_t)d),
                                  tensor3(&tv, v, dt_f32(), (int64_t)n, (int64_t)hk, (int64_t)d)));
}

/* Keys drawn around `CENTERS` random directions per head (so that clusters exist), plus noise. */
static float *clustered_keys(size_t n, size_t hk, size_t d) {
    float *centers = rand_floats(CENTERS * hk * d, 2.0f), *k = (float *)malloc(n * hk * d * sizeof(float) + 1);
    size_t t, h, c;
    for (t = 0; t < n; t++) {
        for (h = 0; h < hk; h++) {
            size_t which = (size_t)(rng_next() % CENTERS);
            for (c = 0; c < d; c++) k[(t * hk + h) * d + c] = centers[(which * hk + h) * d + c] + rng_uniform(0.4f);
        }
    }
    free(centers);
    return k;
}

static double norm(const float *x, size_t d) {
    double s = 0.0;
    size_t c;
    for (c = 0; c < d; c++) s += (double)x[c] * (double)x[c];
    return sqrt(s);
}

/* An index's per-head arrays, read through the API. */
typedef struct {
    size_t k, k1, m;
    uint32_t sizes[N], offsets[N + 1], members[N];
    float cents[N * D], unit[N * D];
    uint32_t csizes[N], coffsets[N + 1], children[N];
    float ccents[N * D];
} head_arrays;

static void read_head(const kvsieve_cluster_index_t *ix, size_t h, head_arrays *a) {
    size_t len = 0;
    memset(a, 0, sizeof *a);
    EXPECT_OK(kvsieve_cluster_index_num_clusters(ix, &a->k));
    EXPECT_OK(kvsieve_cluster_index_num_coarse_clusters(ix, &a->k1));
    EXPECT_OK(kvsieve_cluster_index_clustered_len(ix, &a->m));
    EXPECT_OK(kvsieve_cluster_index_sizes(ix, h, a->sizes, N, &len));
    CHECK(len == a->k, "head %zu: %zu sizes", h, len);
    EXPECT_OK(kvsieve_cluster_index_member_offsets(ix, h, a->offsets, N + 1, &len));
    CHECK(len == a->k + 1, "head %zu: %zu offsets", h, len);
    EXPECT_OK(kvsieve_cluster_index_members(ix, h, a->members, N, &len));
    CHECK(len == a->m, "head %zu: %zu members", h, len);
    EXPECT_OK(kvsieve_cluster_index_centroids(ix, h, a->cents, N * D, &len));
    CHECK(len == a->k * D, "head %zu: %zu centroid values", h, len);
    EXPECT_OK(kvsieve_cluster_index_centroids_normalized(ix, h, a->unit, N * D, NULL));
    if (a->k1 > 0) {
        EXPECT_OK(kvsieve_cluster_index_coarse_sizes(ix, h, a->csizes, N, &len));
        CHECK(len == a->k1, "head %zu: %zu coarse sizes", h, len);
        EXPECT_OK(kvsieve_cluster_index_coarse_child_offsets(ix, h, a->coffsets, N + 1, &len));
        CHECK(len == a->k1 + 1, "head %zu: %zu coarse offsets", h, len);
        EXPECT_OK(kvsieve_cluster_index_coarse_children(ix, h, a->children, N, &len));
        CHECK(len == a->k, "head %zu: %zu coarse children", h, len);
        EXPECT_OK(kvsieve_cluster_index_coarse_centroids(ix, h, a->ccents, N * D, &len));
        CHECK(len == a->k1 * D, "head %zu: %zu coarse centroid values", h, len);
    }
}

/* Every token 0..m-1 in exactly one cluster, members ascending per cluster, sizes from the
 * offsets; each key's cluster has the largest cosine with its unit centroid (within eps) among
 * the unit centroids; each raw centroid is the mean of its members' keys (when `means`).
 * keys: [n][hk][d]. Returns 1 when all holds. */
static int check_head(const head_arrays *a, const float *keys, size_t hk, size_t h, int means, const char *what) {
    char *seen = (char *)calloc(a->m + 1, 1);
    size_t c, i, t, ch;
    int ok = a->offsets[0] == 0 && a->offsets[a->k] == a->m;
    for (c = 0; ok && c < a->k; c++) {
        if (a->sizes[c] != a->offsets[c + 1] - a->offsets[c]) ok = 0;
        for (i = a->offsets[c]; ok && i < a->offsets[c + 1]; i++) {
            t = a->members[i];
            if (t >= a->m || seen[t] || (i > a->offsets[c] && t <= a->members[i - 1])) {
                printf("  %s head %zu: member %zu of cluster %zu repeated, out of order or out of range\n", what, h, t, c);
                ok = 0;
            } else {
                seen[t] = 1;
            }
        }
    }
    for (t = 0; ok && t < a->m; t++) ok = seen[t];
    if (!ok) printf("  %s head %zu: members do not partition the clustered tokens\n", what, h);
    for (c = 0; ok && c < a->k; c++) {
        double un = norm(a->unit + c * D, D);
        if (fabs(un - 1.0) > 1e-4) {
            printf("  %s head %zu: unit centroid %zu has norm %g\n", what, h, c, un);
            ok = 0;
        }
        for (i = a->offsets[c]; ok && i < a->offsets[c + 1]; i++) {
            const float *x = keys + (a->members[i] * hk + h) * D;
            double nx = norm(x, D), own = 0.0, best = -INFINITY;
            size_t other;
            for (other = 0; other < a->k; other++) {
                double dot = 0.0;
                for (ch = 0; ch < D; ch++) dot += (double)x[ch] * (double)a->unit[other * D + ch];
                dot /= nx;
                if (other == c) own = dot;
                if (dot > best) best = dot;
            }
            if (own < best - 1e-5) {
                printf("  %s head %zu: token %u in cluster %zu at cosine %g, another centroid reaches %g\n", what, h, a->members[i], c, own,
                       best);
                ok = 0;
            }
        }
        if (ok && means && a->sizes[c] > 0) {
            for (ch = 0; ch < D; ch++) {
                double mean = 0.0;
                for (i = a->offsets[c]; i < a->offsets[c + 1]; i++) mean += (double)keys[(a->members[i] * hk + h) * D + ch];
                mean /= (double)a->sizes[c];
                if (fabs(mean - (double)a->cents[c * D + ch]) > 1e-5 * (1.0 + fabs(mean))) {
                    printf("  %s head %zu: centroid %zu channel %zu is %g, the mean of its members %g\n", what, h, c, ch,
                           (double)a->cents[c * D + ch], mean);
                    ok = 0;
                    break;
                }
            }
        }
    }
    free(seen);
    return ok;
}

/* Build ------------------------------------------------------------------------------------- */

static void build(void) {
    int before = g_failed;
    float *keys = clustered_keys(N, HK, D);
    kvsieve_cluster_index_t *ix = NULL, *ix2 = NULL;
    kvsieve_cluster_config_t cfg = kvsieve_cluster_config_default(K), got;
    kvsieve_key_source_t src;
    test_tensor tk;
    head_arrays *a = (head_arrays *)malloc(sizeof *a);
    size_t v = 0, h;

    CHECK(cfg.struct_size == sizeof cfg && cfg.num_clusters == K && cfg.cluster_fraction == 0.0 && cfg.exclude_window == 0 &&
              cfg.max_iter == 20 && cfg.seed == 0 && cfg.num_coarse_clusters == 0 && cfg.coarse_fraction == 0.0,
          "default cluster config");
    kvsieve_cluster_config_init(&got);
    src = from_tensor(tensor3(&tk, keys, dt_f32(), N, HK, D));
    cfg.seed = 5;
    EXPECT_OK(kvsieve_cluster_index_build(&src, &cfg, &ix));
    EXPECT_OK(kvsieve_cluster_index_num_kv_heads(ix, &v));
    CHECK(v == HK, "num_kv_heads %zu", v);
    EXPECT_OK(kvsieve_cluster_index_head_dim(ix, &v));
    CHECK(v == D, "head_dim %zu", v);
    EXPECT_OK(kvsieve_cluster_index_num_clusters(ix, &v));
    CHECK(v == K, "num_clusters %zu", v);
    EXPECT_OK(kvsieve_cluster_index_num_coarse_clusters(ix, &v));
    CHECK(v == 0, "num_coarse_clusters %zu", v);
    EXPECT_OK(kvsieve_cluster_index_seq_len_at_build(ix, &v));
    CHECK(v == N, "seq_len_at_build %zu", v);
    EXPECT_OK(kvsieve_cluster_index_seq_len(ix, &v));
    CHECK(v == N, "seq_len %zu", v);
    EXPECT_OK(kvsieve_cluster_index_clustered_len(ix, &v));
    CHECK(v == N, "clustered_len %zu", v);
    EXPECT_OK(kvsieve_cluster_index_get_config(ix, &got));
    CHECK(memcmp(&got, &cfg, sizeof cfg) == 0, "get_config round trip");
    for (h = 0; h < HK; h++) {
        read_head(ix, h, a);
        CHECK(check_head(a, keys, HK, h, 1, "absolute"), "head %zu: partition, nearest unit centroid, raw means", h);
    }

    /* A fraction of the tokens, an excluded window and a coarse level. */
    cfg = kvsieve_cluster_config_default(0);
    cfg.cluster_fraction = 0.05;
    cfg.exclude_window = 16;
    cfg.num_coarse_clusters = K1;
    EXPECT_OK(kvsieve_cluster_index_build(&src, &cfg, &ix2));
    EXPECT_OK(kvsieve_cluster_index_num_clusters(ix2, &v));
    CHECK(v == 11, "round(0.05 * 224) = 11 clusters, got %zu", v);
    EXPECT_OK(kvsieve_cluster_index_clustered_len(ix2, &v));
    CHECK(v == N - 16, "clustered_len %zu with a window of 16", v);
    EXPECT_OK(kvsieve_cluster_index_num_coarse_clusters(ix2, &v));
    CHECK(v == K1, "num_coarse_clusters %zu", v);
    EXPECT_OK(kvsieve_cluster_index_get_config(ix2, &got));
    CHECK(got.num_clusters == 0 && got.cluster_fraction == 0.05 && got.exclude_window == 16 && got.num_coarse_clusters == K1,
          "get_config keeps the fraction and the window");
    for (h = 0; h < HK; h++) {
        size_t c, i, ch, total = 0;
        char *kid = (char *)calloc(a->k + 1, 1);
        int ok = 1;
        read_head(ix2, h, a);
        CHECK(check_head(a, keys, HK, h, 1, "fraction"), "fraction head %zu: partition, nearest unit centroid, raw means", h);
        /* The coarse level: children partition the fine clusters; sizes and centroids are the
         * size-weighted sums and means of the children's. */
        for (c = 0; c < a->k1; c++) {
            double sz = 0.0;
            for (i = a->coffsets[c]; i < a->coffsets[c + 1]; i++) {
                if (a->children[i] >= a->k || kid[a->children[i]]) ok = 0;
                else kid[a->children[i]] = 1;
                sz += a->sizes[a->children[i] < a->k ? a->children[i] : 0];
            }
            if (sz != (double)a->csizes[c]) ok = 0;
            total += a->csizes[c];
            for (ch = 0; ok && ch < D && sz > 0; ch++) {
                double m = 0.0;
                for (i = a->coffsets[c]; i < a->coffsets[c + 1]; i++) m += (double)a->sizes[a->children[i]] * (double)a->cents[a->children[i] * D + ch];
                m /= sz;
                if (fabs(m - (double)a->ccents[c * D + ch]) > 1e-5 * (1.0 + fabs(m))) ok = 0;
            }
        }
        CHECK(ok && total == a->m, "coarse head %zu: children partition the fine clusters, sizes and centroids weighted", h);
        free(kid);
    }

    kvsieve_cluster_index_free(ix);
    kvsieve_cluster_index_free(ix2);
    kvsieve_cluster_index_free(NULL);
    free(a);
    free(keys);
    section_done("build: shape, every key in the cluster of its nearest centroid, centroids the mean of their members", before);
}

/* Estimates and selections ------------------------------------------------------------------- */

/* The estimate of every cluster of head h: for each query head j of the group,
 * exp(q_j·C_c/√d) / Σ_i N_i exp(q_j·C_i/√d), averaged over the group. q: [HQ][D]. */
static void ref_estimates(const float *q, const head_arrays *a, size_t h, double *s) {
    size_t j, c, ch;
    double *l = (double *)malloc(a->k * sizeof(double));
    for (c = 0; c < a->k; c++) s[c] = 0.0;
    for (j = 0; j < GROUP; j++) {
        const float *qj = q + (h * GROUP + j) * D;
        double m = -INFINITY, z = 0.0;
        for (c = 0; c < a->k; c++) {
            double dot = 0.0;
            for (ch = 0; ch < D; ch++) dot += (double)qj[ch] * (double)a->cents[c * D + ch];
            l[c] = dot / sqrt((double)D);
            if (l[c] > m) m = l[c];
        }
        for (c = 0; c < a->k; c++) z += (double)a->sizes[c] * exp(l[c] - m);
        for (c = 0; c < a->k; c++) s[c] += exp(l[c] - m) / z / GROUP;
    }
    free(l);
}

static int cmp_u32(const void *x, const void *y) {
    uint32_t a = *(const uint32_t *)x, b = *(const uint32_t *)y;
    return a < b ? -1 : a > b;
}

/* Tokens of the clusters with s > tau, ascending. Returns their count. */
static size_t ref_threshold(const head_arrays *a, const double *s, double tau, uint32_t *out) {
    size_t c, i, n = 0;
    for (c = 0; c < a->k; c++) {
        if (s[c] > tau) {
            for (i = a->offsets[c]; i < a->offsets[c + 1]; i++) out[n++] = a->members[i];
        }
    }
    qsort(out, n, sizeof *out, cmp_u32);
    return n;
}

/* Budget: clusters ranked by s (higher first, lower index on ties), whole, the first that
 * does not fit giving its lowest tokens. Returns the count. */
static size_t ref_budget(const head_arrays *a, const double *s, size_t budget, uint32_t *out) {
    size_t order[N], i, j, n = 0, left = budget;
    for (i = 0; i < a->k; i++) order[i] = i;
    for (i = 1; i < a->k; i++) {
        for (j = i; j > 0 && (s[order[j]] > s[order[j - 1]] || (s[order[j]] == s[order[j - 1]] && order[j] < order[j - 1])); j--) {
            size_t tmp = order[j];
            order[j] = order[j - 1];
            order[j - 1] = tmp;
        }
    }
    for (i = 0; i < a->k && left > 0; i++) {
        size_t c = order[i], take = a->sizes[c] < left ? a->sizes[c] : left;
        for (j = 0; j < take; j++) out[n++] = a->members[a->offsets[c] + j];
        left -= take;
    }
    qsort(out, n, sizeof *out, cmp_u32);
    return n;
}

/* Radii: per cluster the largest distance of a member's raw key (keys: [n][HK][D]) to the
 * raw centroid. */
static void ref_radii(const head_arrays *a, const float *keys, size_t h, double *r) {
    size_t c, i, ch;
    for (c = 0; c < a->k; c++) {
        r[c] = 0.0;
        for (i = a->offsets[c]; i < a->offsets[c + 1]; i++) {
            const float *k = keys + ((size_t)a->members[i] * HK + h) * D;
            double d2 = 0.0;
            for (ch = 0; ch < D; ch++) d2 += ((double)k[ch] - a->cents[c * D + ch]) * ((double)k[ch] - a->cents[c * D + ch]);
            if (sqrt(d2) > r[c]) r[c] = sqrt(d2);
        }
    }
}

/* Mixed budget: clusters alternately from the estimate ranking and from the ranking by
 * max_j (q_j.C_c + |q_j| r_c) / sqrt(D) (higher first, lower index on ties), each once. */
static size_t ref_mixed(const head_arrays *a, const float *q, size_t h, const double *s, const float *radii, size_t budget, uint32_t *out) {
    size_t o1[N], o2[N], order[N], i, j, c, n = 0, m = 0, i1 = 0, i2 = 0, left = budget;
    double bnd[N];
    char taken[N] = {0};
    for (c = 0; c < a->k; c++) {
        bnd[c] = -INFINITY;
        for (j = 0; j < GROUP; j++) {
            const float *qj = q + (h * GROUP + j) * D;
            double dot = 0.0, qn = 0.0, v;
            size_t ch;
            for (ch = 0; ch < D; ch++) {
                dot += (double)qj[ch] * a->cents[c * D + ch];
                qn += (double)qj[ch] * qj[ch];
            }
            v = (dot + sqrt(qn) * radii[c]) / sqrt((double)D);
            if (v > bnd[c]) bnd[c] = v;
        }
    }
    for (i = 0; i < a->k; i++) o1[i] = o2[i] = i;
    for (i = 1; i < a->k; i++) {
        for (j = i; j > 0 && (s[o1[j]] > s[o1[j - 1]] || (s[o1[j]] == s[o1[j - 1]] && o1[j] < o1[j - 1])); j--) {
            size_t t = o1[j]; o1[j] = o1[j - 1]; o1[j - 1] = t;
        }
        for (j = i; j > 0 && (bnd[o2[j]] > bnd[o2[j - 1]] || (bnd[o2[j]] == bnd[o2[j - 1]] && o2[j] < o2[j - 1])); j--) {
            size_t t = o2[j]; o2[j] = o2[j - 1]; o2[j - 1] = t;
        }
    }
    while (m < a->k) {
        while (i1 < a->k && taken[o1[i1]]) i1++;
        if (i1 < a->k) { taken[o1[i1]] = 1; order[m++] = o1[i1]; }
        while (i2 < a->k && taken[o2[i2]]) i2++;
        if (i2 < a->k) { taken[o2[i2]] = 1; order[m++] = o2[i2]; }
    }
    for (i = 0; i < a->k && left > 0; i++) {
        size_t cc = order[i], take = a->sizes[cc] < left ? a->sizes[cc] : left;
        for (j = 0; j < take; j++) out[n++] = a->members[a->offsets[cc] + j];
        left -= take;
    }
    qsort(out, n, sizeof *out, cmp_u32);
    return n;
}

static int same_head(const kvsieve_selection_t *sel, size_t h, const uint32_t *want, size_t n) {
    uint32_t got[N];
    size_t len = 0;
    if (!EXPECT_OK(kvsieve_selection_head(sel, h, got, N, &len))) return 0;
    return len == n && (n == 0 || memcmp(got, want, n * sizeof *want) == 0);
}

static void estimates_and_selection(void) {
    int before = g_failed;
    float *keys = clustered_keys(N, HK, D), *q = rand_floats(HQ * D, 1.5f);
    kvsieve_cluster_index_t *ix = NULL;
    kvsieve_cluster_config_t cfg = kvsieve_cluster_config_default(K);
    kvsieve_retrieve_config_t rc;
    kvsieve_retrieve_stats_t st;
    kvsieve_selection_t *sel = NULL;
    kvsieve_key_source_t src;
    test_tensor tk, tq, tq3;
    head_arrays *a = (head_arrays *)malloc(HK * sizeof *a);
    double est[HK * N], want[N], worst = 0.0, taus[HK];
    uint32_t ref[N];
    size_t h, c, len = 0, n, budgets[4] = {1, 17, 100, N + 50}, b, total;

    kvsieve_retrieve_stats_init(&st);
    src = from_tensor(tensor3(&tk, keys, dt_f32(), N, HK, D));
    EXPECT_OK(kvsieve_cluster_index_build(&src, &cfg, &ix));
    for (h = 0; h < HK; h++) read_head(ix, h, &a[h]);
    EXPECT_OK(kvsieve_cluster_index_estimates(ix, tensor2(&tq, q, dt_f32(), HQ, D), est, HK * N, &len));
    CHECK(len == HK * K, "%zu estimates", len);
    for (h = 0; h < HK; h++) {
        double share = 0.0;
        ref_estimates(q, &a[h], h, want);
        for (c = 0; c < K; c++) {
            double e = fabs(est[h * K + c] - want[c]) / want[c];
            if (e > worst) worst = e;
            share += a[h].sizes[c] * est[h * K + c];
        }
        CHECK(fabs(share - 1.0) < 1e-5, "head %zu: the shares N_c s_c sum to 1 (%.9f)", h, share);
    }
    CHECK(worst < 1e-4, "estimates match the C formula (relative err %g)", worst);
    /* The same query as [1, HQ, D]. */
    {
        double est3[HK * K];
        EXPECT_OK(kvsieve_cluster_index_estimates(ix, tensor3(&tq3, q, dt_f32(), 1, HQ, D), est3, HK * K, NULL));
        CHECK(memcmp(est3, est, sizeof est3) == 0, "a [1, HQ, D] query gives the same estimates");
    }

    /* Thresholds: midway between two estimates of each head (so that the ranking decides). */
    for (h = 0; h < HK; h++) {
        double sorted[K];
        size_t i, j;
        for (i = 0; i < K; i++) sorted[i] = est[h * K + i];
        for (i = 1; i < K; i++)
            for (j = i; j > 0 && sorted[j] > sorted[j - 1]; j--) {
                double tmp = sorted[j];
                sorted[j] = sorted[j - 1];
                sorted[j - 1] = tmp;
            }
        taus[h] = 0.5 * (sorted[3 + h] + sorted[4 + h]);
    }
    rc = kvsieve_retrieve_config_default(1);
    rc.mode = KVSIEVE_RETRIEVE_THRESHOLD;
    rc.threshold = taus[0];
    EXPECT_OK(kvsieve_cluster_index_retrieve(ix, &tq.t, &rc, &sel, &st));
    total = 0;
    for (h = 0; h < HK; h++) {
        n = ref_threshold(&a[h], est + h * K, taus[0], ref);
        total += n;
        CHECK(same_head(sel, h, ref, n), "threshold %g, head %zu: the tokens of the clusters above it (%zu)", taus[0], h, n);
    }
    CHECK(st.centroid_evals == HK * GROUP * K && st.fine_evals == st.centroid_evals && st.coarse_evals == 0 && st.clusters_scored == HK * K &&
              st.coarse_kept == 0 && st.tokens_kept == total,
          "flat stats: %zu evals, %zu scored, %zu tokens", st.centroid_evals, st.clusters_scored, st.tokens_kept);
    kvsieve_selection_free(sel);

    rc.mode = KVSIEVE_RETRIEVE_PER_HEAD_THRESHOLD;
    rc.thresholds = taus;
    rc.num_thresholds = HK;
    EXPECT_OK(kvsieve_cluster_index_retrieve(ix, &tq.t, &rc, &sel, NULL));
    for (h = 0; h < HK; h++) {
        n = ref_threshold(&a[h], est + h * K, taus[h], ref);
        CHECK(same_head(sel, h, ref, n), "per-head threshold %g, head %zu (%zu tokens)", taus[h], h, n);
    }
    kvsieve_selection_free(sel);

    rc.mode = KVSIEVE_RETRIEVE_THRESHOLD;
    rc.threshold = -1.0;
    rc.seq_len = N + 10;
    EXPECT_OK(kvsieve_cluster_index_retrieve(ix, &tq.t, &rc, &sel, &st));
    EXPECT_OK(kvsieve_selection_seq_len(sel, &len));
    CHECK(len == N + 10 && st.tokens_kept == HK * N, "a negative threshold keeps every clustered token of a longer sequence");
    kvsieve_selection_free(sel);

    rc = kvsieve_retrieve_config_default(1);
    for (b = 0; b < 4; b++) {
        rc.budget = budgets[b];
        EXPECT_OK(kvsieve_cluster_index_retrieve(ix, &tq.t, &rc, &sel, &st));
        for (h = 0; h < HK; h++) {
            n = ref_budget(&a[h], est + h * K, budgets[b], ref);
            CHECK(n == (budgets[b] < N ? budgets[b] : N), "budget %zu keeps %zu tokens", budgets[b], n);
            CHECK(same_head(sel, h, ref, n), "budget %zu, head %zu: the best clusters, the last one's lowest tokens", budgets[b], h);
        }
        CHECK(st.tokens_kept == HK * (budgets[b] < N ? budgets[b] : N), "budget %zu: %zu tokens kept in all", budgets[b], st.tokens_kept);
        kvsieve_selection_free(sel);
    }

    /* Radii, and the mixed budget rule against a C ranking from them. */
    {
        float radii[HK][N];
        double rr[N], rworst = 0.0;
        for (h = 0; h < HK; h++) {
            EXPECT_OK(kvsieve_cluster_index_radii(ix, h, radii[h], N, &len));
            CHECK(len == K, "head %zu: %zu radii", h, len);
            ref_radii(&a[h], keys, h, rr);
            for (c = 0; c < K; c++) {
                double e = fabs(radii[h][c] - rr[c]) / (rr[c] > 1.0 ? rr[c] : 1.0);
                if (e > rworst) rworst = e;
            }
        }
        CHECK(rworst < 1e-4, "radii match the members' largest distance (relative err %g)", rworst);
        rc = kvsieve_retrieve_config_default(1);
        rc.mode = KVSIEVE_RETRIEVE_BUDGET_MIXED;
        for (b = 0; b < 4; b++) {
            rc.budget = budgets[b];
            EXPECT_OK(kvsieve_cluster_index_retrieve(ix, &tq.t, &rc, &sel, &st));
            for (h = 0; h < HK; h++) {
                n = ref_mixed(&a[h], q, h, est + h * K, radii[h], budgets[b], ref);
                CHECK(same_head(sel, h, ref, n), "mixed budget %zu, head %zu: alternating estimate and bound rankings", budgets[b], h);
            }
            kvsieve_selection_free(sel);
        }
        rc.mode = 7;
        EXPECT_ERR(kvsieve_cluster_index_retrieve(ix, &tq.t, &rc, &sel, NULL), KVSIEVE_ERROR_INVALID_ARGUMENT, "mode");
    }

    kvsieve_cluster_index_free(ix);
    free(a);
    free(keys);
    free(q);
    section_done("estimates match the C formula; threshold and budget selections match a C ranking", before);
}

/* Hierarchical -------------------------------------------------------------------------------- */

static int same_selection(const kvsieve_selection_t *x, const kvsieve_selection_t *y) {
    uint32_t a[HK * N], b[HK * N];
    size_t la = 0, lb = 0;
    EXPECT_OK(kvsieve_selection_indices(x, a, HK * N, &la));
    EXPECT_OK(kvsieve_selection_indices(y, b, HK * N, &lb));
    return la == lb && memcmp(a, b, la * sizeof *a) == 0;
}

static void hierarchical(void) {
    int before = g_failed;
    float *keys = clustered_keys(N, HK, D), *q = rand_floats(HQ * D, 1.5f);
    kvsieve_cluster_index_t *ix = NULL;
    kvsieve_cluster_config_t cfg = kvsieve_cluster_config_default(K);
    kvsieve_retrieve_config_t rc = kvsieve_retrieve_config_default(40);
    kvsieve_retrieve_stats_t st, st_flat;
    kvsieve_selection_t *flat = NULL, *hier = NULL;
    kvsieve_key_source_t src;
    test_tensor tk, tq;
    head_arrays *a = (head_arrays *)malloc(sizeof *a);
    size_t h, len;

    kvsieve_retrieve_stats_init(&st);
    kvsieve_retrieve_stats_init(&st_flat);
    cfg.num_coarse_clusters = K1;
    src = from_tensor(tensor3(&tk, keys, dt_f32(), N, HK, D));
    EXPECT_OK(kvsieve_cluster_index_build(&src, &cfg, &ix));
    tensor2(&tq, q, dt_f32(), HQ, D);

    /* Every coarse cluster open: the flat result, with the coarse centroids scored too. */
    EXPECT_OK(kvsieve_cluster_index_retrieve(ix, &tq.t, &rc, &flat, &st_flat));
    rc.hierarchical = true;
    EXPECT_OK(kvsieve_cluster_index_retrieve(ix, &tq.t, &rc, &hier, &st));
    CHECK(same_selection(flat, hier), "all coarse clusters open: the flat selection");
    CHECK(st.coarse_evals == HK * GROUP * K1 && st.fine_evals == HK * GROUP * K && st.centroid_evals == st.coarse_evals + st.fine_evals &&
              st.coarse_kept == HK * K1 && st.clusters_scored == HK * K && st.clusters_kept == st_flat.clusters_kept,
          "all open: %zu coarse and %zu fine evaluations", st.coarse_evals, st.fine_evals);
    kvsieve_selection_free(hier);

    /* A coarse budget: fewer fine centroids scored, counted as scored; the fine budget still met
     * when the opened clusters hold enough tokens. */
    rc.coarse_mode = KVSIEVE_COARSE_BUDGET;
    rc.coarse_budget = 1;
    EXPECT_OK(kvsieve_cluster_index_retrieve(ix, &tq.t, &rc, &hier, &st));
    CHECK(st.coarse_kept == HK && st.fine_evals == GROUP * st.clusters_scored && st.clusters_scored < HK * K &&
              st.centroid_evals == HK * GROUP * K1 + st.fine_evals,
          "coarse budget 1: one coarse cluster per head, %zu fine clusters scored", st.clusters_scored);
    for (h = 0; h < HK; h++) {
        uint32_t got[N], cluster_of[N];
        size_t i, j, c, ch, top = 0, want;
        double best = -INFINITY;
        int inside = 1;
        read_head(ix, h, a);
        for (c = 0; c < a->k; c++)
            for (i = a->offsets[c]; i < a->offsets[c + 1]; i++) cluster_of[a->members[i]] = (uint32_t)c;
        /* The coarse cluster opened is the one of highest estimate (the formula over coarse
         * centroids and sizes); every token kept lies under it. */
        for (c = 0; c < a->k1; c++) {
            double s = 0.0;
            for (j = 0; j < GROUP; j++) {
                double l[N], m = -INFINITY, z = 0.0;
                size_t c2;
                for (c2 = 0; c2 < a->k1; c2++) {
                    double dot = 0.0;
                    for (ch = 0; ch < D; ch++) dot += (double)q[(h * GROUP + j) * D + ch] * (double)a->ccents[c2 * D + ch];
                    l[c2] = dot / sqrt((double)D);
                    if (l[c2] > m) m = l[c2];
                }
                for (c2 = 0; c2 < a->k1; c2++) z += (double)a->csizes[c2] * exp(l[c2] - m);
                s += exp(l[c] - m) / z;
            }
            if (s > best) {
                best = s;
                top = c;
            }
        }
        EXPECT_OK(kvsieve_selection_head(hier, h, got, N, &len));
        for (i = 0; i < len; i++) {
            int under = 0;
            for (j = a->coffsets[top]; j < a->coffsets[top + 1]; j++) under |= a->children[j] == cluster_of[got[i]];
            inside &= under;
        }
        want = a->csizes[top] < 40 ? a->csizes[top] : 40;
        CHECK(inside && len == want, "coarse budget 1, head %zu: %zu tokens kept, all under coarse cluster %zu (%zu expected)", h, len, top,
              want);
    }
    kvsieve_selection_free(hier);

    rc.coarse_mode = KVSIEVE_COARSE_BUDGET_MULTIPLE;
    rc.coarse_budget_multiple = 100.0;
    EXPECT_OK(kvsieve_cluster_index_retrieve(ix, &tq.t, &rc, &hier, &st));
    CHECK(same_selection(flat, hier) && st.coarse_kept == HK * K1, "a coarse budget over the context opens every coarse cluster");
    kvsieve_selection_free(hier);
    rc.coarse_mode = KVSIEVE_COARSE_THRESHOLD;
    rc.coarse_threshold = 1e9;
    EXPECT_OK(kvsieve_cluster_index_retrieve(ix, &tq.t, &rc, &hier, &st));
    EXPECT_OK(kvsieve_selection_len(hier, &len));
    CHECK(st.coarse_kept == 0 && st.fine_evals == 0 && len == 0, "a coarse threshold above every estimate opens nothing");
    kvsieve_selection_free(hier);

    kvsieve_selection_free(flat);
    kvsieve_cluster_index_free(ix);
    free(a);
    free(keys);
    free(q);
    section_done("hierarchical retrieval: all coarse clusters open equals flat, budgets and evaluation counts", before);
}

/* Calibration --------------------------------------------------------------------------------- */

enum { M = 16 };

static void calibration(void) {
    int before = g_failed;
    float *keys = clustered_keys(N, HK, D), *qs = rand_floats(M * HQ * D, 1.5f);
    kvsieve_cluster_index_t *ix = NULL;
    kvsieve_cluster_config_t cfg = kvsieve_cluster_config_default(K);
    kvsieve_key_source_t src;
    test_tensor tk, tqs, tq;
    head_arrays *a = (head_arrays *)malloc(HK * sizeof *a);
    double tau[HK], kept[HK], targets[2] = {0.25, 0.6};
    size_t h, i, c, t, mode;

    src = from_tensor(tensor3(&tk, keys, dt_f32(), N, HK, D));
    EXPECT_OK(kvsieve_cluster_index_build(&src, &cfg, &ix));
    for (h = 0; h < HK; h++) read_head(ix, h, &a[h]);
    for (t = 0; t < 2; t++) {
        for (mode = 0; mode < 2; mode++) {
            double mine[HK] = {0.0, 0.0}, mean = 0.0, tokens_mean = 0.0;
            kvsieve_retrieve_config_t rc = kvsieve_retrieve_config_default(1);
            EXPECT_OK(kvsieve_cluster_index_calibrate(ix, tensor3(&tqs, qs, dt_f32(), M, HQ, D), targets[t], mode == 1, tau, HK, kept));
            if (mode == 0) CHECK(tau[0] == tau[1], "one threshold for every head (%g, %g)", tau[0], tau[1]);
            /* The kept fraction, recomputed from the estimates of each query; and retrieval with
             * the thresholds keeps that many tokens. */
            rc.mode = KVSIEVE_RETRIEVE_PER_HEAD_THRESHOLD;
            rc.thresholds = tau;
            rc.num_thresholds = HK;
            for (i = 0; i < M; i++) {
                double est[HK * K];
                kvsieve_selection_t *sel = NULL;
                kvsieve_retrieve_stats_t st;
                kvsieve_retrieve_stats_init(&st);
                tensor2(&tq, qs + i * HQ * D, dt_f32(), HQ, D);
                EXPECT_OK(kvsieve_cluster_index_estimates(ix, &tq.t, est, HK * K, NULL));
                for (h = 0; h < HK; h++) {
                    for (c = 0; c < K; c++) {
                        if (est[h * K + c] > tau[h]) mine[h] += (double)a[h].sizes[c] / N / M;
                    }
                }
                EXPECT_OK(kvsieve_cluster_index_retrieve(ix, &tq.t, &rc, &sel, &st));
                tokens_mean += (double)st.tokens_kept / (HK * N) / M;
                kvsieve_selection_free(sel);
            }
            for (h = 0; h < HK; h++) {
                CHECK(fabs(mine[h] - kept[h]) < 1e-9, "target %g, per_head %zu, head %zu: kept fraction %g, recomputed %g", targets[t], mode, h,
                      kept[h], mine[h]);
                mean += kept[h] / HK;
            }
            CHECK(fabs(mean - targets[t]) < 0.08, "target %g, per_head %zu: keeps %g", targets[t], mode, mean);
            CHECK(fabs(tokens_mean - mean) < 1e-9, "target %g, per_head %zu: retrieval with the thresholds keeps %g", targets[t], mode,
                  tokens_mean);
            if (mode == 1) {
                for (h = 0; h < HK; h++) CHECK(fabs(kept[h] - targets[t]) < 0.12, "per head %zu keeps %g of %g", h, kept[h], targets[t]);
            }
        }
    }
    EXPECT_OK(kvsieve_cluster_index_calibrate(ix, &tqs.t, 1.0, false, tau, HK, NULL));
    CHECK(tau[0] == -1.0 && tau[1] == -1.0, "a target of 1 keeps everything (tau %g)", tau[0]);

    kvsieve_cluster_index_free(ix);
    free(a);
    free(keys);
    free(qs);
    section_done("calibration keeps close to the target fraction", before);
}

/* assign_new and rebuild from a cache -------------------------------------------------------- */

enum { N0 = 120, EXTRA = 40, W = 8, PS = 16 };

static void incremental(void) {
    int before = g_failed;
    kvsieve_cache_t *cache = new_cache(HK, D, PS, (N0 + EXTRA + PS - 1) / PS + 1, KVSIEVE_KEYS_POST_ROPE);
    float *keys = clustered_keys(N0 + EXTRA, HK, D), *vals = rand_floats((N0 + EXTRA) * HK * D, 1.0f);
    kvsieve_cluster_index_t *ix = NULL;
    kvsieve_cluster_config_t cfg = kvsieve_cluster_config_default(10);
    kvsieve_key_source_t src;
    head_arrays *a = (head_arrays *)malloc(sizeof *a), *b = (head_arrays *)malloc(sizeof *b);
    size_t v = 0, added = 99, h;
    uint64_t seq = 0;

    EXPECT_OK(kvsieve_cache_create_sequence(cache, &seq));
    append_tokens(cache, seq, 0, N0, HK, D, keys, vals);
    src = from_cache(cache, seq, 0);
    cfg.exclude_window = W;
    cfg.num_coarse_clusters = 3;
    EXPECT_OK(kvsieve_cluster_index_build(&src, &cfg, &ix));
    EXPECT_OK(kvsieve_cluster_index_clustered_len(ix, &v));
    CHECK(v == N0 - W, "built from the cache: %zu tokens clustered", v);
    EXPECT_OK(kvsieve_cluster_index_assign_new(ix, &src, &added));
    CHECK(added == 0, "nothing new: %zu assigned", added);
    read_head(ix, 0, a);

    append_tokens(cache, seq, N0, EXTRA, HK, D, keys + N0 * HK * D, vals + N0 * HK * D);
    EXPECT_OK(kvsieve_cluster_index_assign_new(ix, &src, &added));
    CHECK(added == EXTRA, "%zu new tokens assigned", added);
    EXPECT_OK(kvsieve_cluster_index_clustered_len(ix, &v));
    CHECK(v == N0 + EXTRA - W, "clustered_len %zu", v);
    EXPECT_OK(kvsieve_cluster_index_seq_len(ix, &v));
    CHECK(v == N0 + EXTRA, "seq_len %zu", v);
    EXPECT_OK(kvsieve_cluster_index_seq_len_at_build(ix, &v));
    CHECK(v == N0, "seq_len_at_build %zu", v);
    for (h = 0; h < HK; h++) {
        size_t c, total = 0;
        read_head(ix, h, b);
        /* Centroids stay; every key, old and new, is in the cluster of its nearest unit centroid. */
        if (h == 0) CHECK(memcmp(a->unit, b->unit, a->k * D * sizeof(float)) == 0, "unit centroids do not move");
        CHECK(check_head(b, keys, HK, h, 0, "assign_new"), "after assign_new, head %zu: partition and nearest unit centroid", h);
        for (c = 0; c < b->k1; c++) total += b->csizes[c];
        CHECK(total == N0 + EXTRA - W, "head %zu: coarse sizes follow (%zu)", h, total);
    }

    EXPECT_OK(kvsieve_cluster_index_rebuild(ix, &src));
    EXPECT_OK(kvsieve_cluster_index_seq_len_at_build(ix, &v));
    CHECK(v == N0 + EXTRA, "rebuilt at %zu tokens", v);
    for (h = 0; h < HK; h++) {
        read_head(ix, h, b);
        CHECK(b->m == N0 + EXTRA - W && check_head(b, keys, HK, h, 1, "rebuild"), "after rebuild, head %zu: partition, nearest, means", h);
    }

    kvsieve_cluster_index_free(ix);
    kvsieve_cache_free(cache);
    free(a);
    free(b);
    free(keys);
    free(vals);
    section_done("assign_new and rebuild from a cache", before);
}

/* Save and load ------------------------------------------------------------------------------- */

static int temp_path(char *buf, size_t size, const char *tag) {
    const char *dir = getenv("TMPDIR");
    int fd;
    snprintf(buf, size, "%s/kvsieve_%s_XXXXXX", dir && dir[0] ? dir : "/tmp", tag);
    fd = mkstemp(buf);
    if (fd < 0) return 0;
    close(fd);
    return 1;
}

static unsigned char *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    unsigned char *data;
    long n;
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    n = ftell(f);
    fseek(f, 0, SEEK_SET);
    data = (unsigned char *)malloc((size_t)n + 1);
    *len = fread(data, 1, (size_t)n, f);
    fclose(f);
    return data;
}

static void write_file(const char *path, const unsigned char *data, size_t len) {
    FILE *f = fopen(path, "wb");
    if (!f) return;
    fwrite(data, 1, len, f);
    fclose(f);
}

static int same_arrays(const head_arrays *x, const head_arrays *y) {
    return x->k == y->k && x->k1 == y->k1 && x->m == y->m && memcmp(x->sizes, y->sizes, sizeof x->sizes) == 0 &&
           memcmp(x->offsets, y->offsets, sizeof x->offsets) == 0 && memcmp(x->members, y->members, sizeof x->members) == 0 &&
           memcmp(x->cents, y->cents, sizeof x->cents) == 0 && memcmp(x->unit, y->unit, sizeof x->unit) == 0 &&
           memcmp(x->csizes, y->csizes, sizeof x->csizes) == 0 && memcmp(x->coffsets, y->coffsets, sizeof x->coffsets) == 0 &&
           memcmp(x->children, y->children, sizeof x->children) == 0 && memcmp(x->ccents, y->ccents, sizeof x->ccents) == 0;
}

static void save_load(void) {
    int before = g_failed;
    float *keys = clustered_keys(N, HK, D), *q = rand_floats(HQ * D, 1.5f), *narrow = rand_floats(N * HK * 16, 1.0f);
    kvsieve_cluster_index_t *ix = NULL, *back = NULL, *sentinel = (kvsieve_cluster_index_t *)&before, *out = sentinel;
    kvsieve_cluster_config_t cfg = kvsieve_cluster_config_default(K), c1, c2;
    kvsieve_retrieve_config_t rc = kvsieve_retrieve_config_default(50);
    kvsieve_selection_t *s1 = NULL, *s2 = NULL;
    kvsieve_key_source_t src, shorter, other_d;
    test_tensor tk, tk_short, tk_d, tq;
    head_arrays *a = (head_arrays *)malloc(sizeof *a), *b = (head_arrays *)malloc(sizeof *b);
    char path[512], damaged[512];
    unsigned char *bytes = NULL;
    size_t len = 0, h, v1 = 0, v2 = 0;

    kvsieve_cluster_config_init(&c1);
    kvsieve_cluster_config_init(&c2);
    cfg.exclude_window = 10;
    cfg.num_coarse_clusters = K1;
    cfg.seed = 99;
    src = from_tensor(tensor3(&tk, keys, dt_f32(), N, HK, D));
    shorter = from_tensor(tensor3(&tk_short, keys, dt_f32(), N - 1, HK, D));
    other_d = from_tensor(tensor3(&tk_d, narrow, dt_f32(), N, HK, 16));
    EXPECT_OK(kvsieve_cluster_index_build(&src, &cfg, &ix));
    CHECK(temp_path(path, sizeof path, "cluster") && temp_path(damaged, sizeof damaged, "damaged"), "temporary files");

    EXPECT_OK(kvsieve_cluster_index_save(ix, path));
    EXPECT_OK(kvsieve_cluster_index_load(path, &back));
    EXPECT_OK(kvsieve_cluster_index_get_config(ix, &c1));
    EXPECT_OK(kvsieve_cluster_index_get_config(back, &c2));
    CHECK(c1.num_clusters == c2.num_clusters && c1.exclude_window == c2.exclude_window && c1.seed == c2.seed &&
              c1.num_coarse_clusters == c2.num_coarse_clusters && c1.max_iter == c2.max_iter,
          "configuration round trip");
    EXPECT_OK(kvsieve_cluster_index_seq_len_at_build(back, &v1));
    EXPECT_OK(kvsieve_cluster_index_clustered_len(back, &v2));
    CHECK(v1 == N && v2 == N - 10, "lengths round trip (%zu, %zu)", v1, v2);
    for (h = 0; h < HK; h++) {
        read_head(ix, h, a);
        read_head(back, h, b);
        CHECK(same_arrays(a, b), "head %zu: every array round trips exactly", h);
    }
    tensor2(&tq, q, dt_f32(), HQ, D);
    EXPECT_OK(kvsieve_cluster_index_retrieve(ix, &tq.t, &rc, &s1, NULL));
    EXPECT_OK(kvsieve_cluster_index_retrieve(back, &tq.t, &rc, &s2, NULL));
    CHECK(same_selection(s1, s2), "the loaded index retrieves the same tokens");
    kvsieve_selection_free(s1);
    kvsieve_selection_free(s2);
    kvsieve_cluster_index_free(back);
    back = NULL;

    /* Loading for a source: the same keys fit; another head_dim or a shorter sequence does not. */
    EXPECT_OK(kvsieve_cluster_index_load_for(path, &src, &back));
    kvsieve_cluster_index_free(back);
    EXPECT_ERR(kvsieve_cluster_index_load_for(path, &other_d, &out), KVSIEVE_ERROR_IO, "head_dim");
    EXPECT_ERR(kvsieve_cluster_index_load_for(path, &shorter, &out), KVSIEVE_ERROR_IO, "covers");

    /* Damaged files. */
    bytes = read_file(path, &len);
    CHECK(bytes != NULL && len > 1000, "the saved file holds %zu bytes", len);
    if (bytes) {
        write_file(damaged, bytes, len / 2);
        EXPECT_ERR(kvsieve_cluster_index_load(damaged, &out), KVSIEVE_ERROR_IO, "cluster index");
        write_file(damaged, bytes, 7);
        EXPECT_ERR(kvsieve_cluster_index_load(damaged, &out), KVSIEVE_ERROR_IO, "cluster index");
        bytes[len - 3] ^= 0x5a; /* inside the last tensor's data */
        write_file(damaged, bytes, len);
        EXPECT_ERR(kvsieve_cluster_index_load(damaged, &out), KVSIEVE_ERROR_IO, "cluster index");
        EXPECT_ERR(kvsieve_cluster_index_load_for(damaged, &src, &out), KVSIEVE_ERROR_IO, "cluster index");
        write_file(damaged, (const unsigned char *)"", 0);
        EXPECT_ERR(kvsieve_cluster_index_load(damaged, &out), KVSIEVE_ERROR_IO, "cluster index");
    }
    remove(damaged);
    EXPECT_ERR(kvsieve_cluster_index_load(damaged, &out), KVSIEVE_ERROR_IO, "cluster index");
    CHECK(out == sentinel, "load: out untouched on failure");
    EXPECT_ERR(kvsieve_cluster_index_save(ix, "/nonexistent-kvsieve-dir/index.safetensors"), KVSIEVE_ERROR_IO, "writing cluster index");

    remove(path);
    kvsieve_cluster_index_free(ix);
    free(bytes);
    free(a);
    free(b);
    free(keys);
    free(q);
    free(narrow);
    section_done("save and load round trip; truncated and corrupted files are io errors", before);
}

/* Key dtypes and sources -------------------------------------------------------------------- */

/* Same index: every array of every head, and the lengths. */
static int same_index(const kvsieve_cluster_index_t *x, const kvsieve_cluster_index_t *y, head_arrays *a, head_arrays *b) {
    size_t h;
    int ok = 1;
    for (h = 0; h < HK; h++) {
        read_head(x, h, a);
        read_head(y, h, b);
        ok &= same_arrays(a, b);
    }
    return ok;
}

static void dtypes_and_sources(void) {
    int before = g_failed;
    enum { DN = 150 };
    kvsieve_cache_t *cache = NULL;
    kvsieve_cache_config_t ccfg = kvsieve_cache_config_default(1, HK, D, PS, (DN + PS - 1) / PS);
    float *keys = clustered_keys(DN, HK, D), *vals = rand_floats(DN * HK * D, 1.0f), *back = (float *)malloc(DN * HK * D * sizeof(float));
    uint16_t *h16, *b16;
    kvsieve_cluster_index_t *from_f32 = NULL, *from_f16 = NULL, *from_bf16 = NULL, *from_cache_ix = NULL, *from_back = NULL;
    kvsieve_cluster_config_t cfg = kvsieve_cluster_config_default(8);
    kvsieve_key_source_t src;
    head_arrays *a = (head_arrays *)malloc(sizeof *a), *b = (head_arrays *)malloc(sizeof *b);
    test_tensor tk;
    uint64_t seq = 0;
    size_t i;

    cfg.num_coarse_clusters = 3;
    /* float16 keys and the float32 tensor of the same values give the same index; likewise
     * bfloat16. */
    round_f16(keys, DN * HK * D);
    h16 = to_f16(keys, DN * HK * D);
    src = from_tensor(tensor3(&tk, keys, dt_f32(), DN, HK, D));
    EXPECT_OK(kvsieve_cluster_index_build(&src, &cfg, &from_f32));
    src = from_tensor(tensor3(&tk, h16, dt_f16(), DN, HK, D));
    EXPECT_OK(kvsieve_cluster_index_build(&src, &cfg, &from_f16));
    CHECK(same_index(from_f32, from_f16, a, b), "float16 keys: the index of their float32 values");
    b16 = to_bf16(keys, DN * HK * D);
    for (i = 0; i < DN * HK * D; i++) back[i] = bf16_to_f32(b16[i]);
    src = from_tensor(tensor3(&tk, b16, dt_bf16(), DN, HK, D));
    EXPECT_OK(kvsieve_cluster_index_build(&src, &cfg, &from_bf16));
    src = from_tensor(tensor3(&tk, back, dt_f32(), DN, HK, D));
    EXPECT_OK(kvsieve_cluster_index_build(&src, &cfg, &from_back));
    CHECK(same_index(from_bf16, from_back, a, b), "bfloat16 keys: the index of their float32 values");
    kvsieve_cluster_index_free(from_back);
    from_back = NULL;

    /* A float16 cache, read in place, and the float32 tensor of what it holds. */
    ccfg.dtype = dt_f16();
    ccfg.track_key_bounds = false;
    EXPECT_OK(kvsieve_cache_new(&ccfg, &cache));
    EXPECT_OK(kvsieve_cache_create_sequence(cache, &seq));
    append_tokens(cache, seq, 0, DN, HK, D, keys, vals);
    EXPECT_OK(kvsieve_cache_read(cache, seq, 0, back, NULL, DN * HK * D));
    src = from_cache(cache, seq, 0);
    EXPECT_OK(kvsieve_cluster_index_build(&src, &cfg, &from_cache_ix));
    src = from_tensor(tensor3(&tk, back, dt_f32(), DN, HK, D));
    EXPECT_OK(kvsieve_cluster_index_build(&src, &cfg, &from_back));
    CHECK(same_index(from_cache_ix, from_back, a, b), "a float16 cache: the index of the float32 tensor it holds");
    CHECK(same_index(from_cache_ix, from_f32, a, b), "the cache's float16 keys equal the rounded float32 keys");

    kvsieve_cluster_index_free(from_f32);
    kvsieve_cluster_index_free(from_f16);
    kvsieve_cluster_index_free(from_bf16);
    kvsieve_cluster_index_free(from_cache_ix);
    kvsieve_cluster_index_free(from_back);
    kvsieve_cache_free(cache);
    free(keys);
    free(vals);
    free(back);
    free(h16);
    free(b16);
    free(a);
    free(b);
    section_done("float16, bfloat16 and cache keys give the index of their float32 values", before);
}

/* Retrieval + streaming window -> sparse decode ---------------------------------------------- */

enum { SN = 200, SW = 16, SINKS = 4, BUDGET = 48 };

static void sparse_decode(void) {
    int before = g_failed;
    kvsieve_cache_t *cache = new_cache(HK, D, PS, (SN + PS - 1) / PS, KVSIEVE_KEYS_POST_ROPE);
    float *keys = clustered_keys(SN, HK, D), *vals = rand_floats(SN * HK * D, 1.0f), *q = rand_floats(HQ * D, 1.5f);
    float out[HQ * D], lse[HQ], ref_out[HQ * D], ref_lse[HQ];
    kvsieve_cluster_index_t *ix = NULL;
    kvsieve_cluster_config_t cfg = kvsieve_cluster_config_default(16);
    kvsieve_retrieve_config_t rc = kvsieve_retrieve_config_default(BUDGET);
    kvsieve_retrieve_stats_t st;
    kvsieve_selection_t *ret = NULL, *win = NULL, *both = NULL;
    const kvsieve_selection_t *sels[1];
    kvsieve_key_source_t src;
    test_tensor tq, to;
    uint32_t indptr[HK + 1], idx[HK * SN];
    size_t len = 0, h, i;
    uint64_t seq = 0;

    kvsieve_retrieve_stats_init(&st);
    EXPECT_OK(kvsieve_cache_create_sequence(cache, &seq));
    append_tokens(cache, seq, 0, SN, HK, D, keys, vals);
    src = from_cache(cache, seq, 0);
    cfg.exclude_window = SW;
    EXPECT_OK(kvsieve_cluster_index_build(&src, &cfg, &ix));
    EXPECT_OK(kvsieve_cluster_index_retrieve(ix, tensor3(&tq, q, dt_f32(), 1, HQ, D), &rc, &ret, &st));
    CHECK(st.tokens_kept == HK * BUDGET, "retrieval keeps %zu tokens", st.tokens_kept);
    EXPECT_OK(kvsieve_selection_streaming(HK, SN, SINKS, SW, &win));
    EXPECT_OK(kvsieve_selection_union(ret, win, &both));
    EXPECT_OK(kvsieve_selection_head_indptr(both, indptr, HK + 1, NULL));
    EXPECT_OK(kvsieve_selection_indices(both, idx, HK * SN, &len));
    for (h = 0; h < HK; h++) {
        int has_window = 1;
        for (i = SN - SW; i < SN; i++) {
            size_t j;
            int found = 0;
            for (j = indptr[h]; j < indptr[h + 1]; j++) found |= idx[j] == i;
            has_window &= found;
        }
        CHECK(has_window && indptr[h + 1] - indptr[h] >= BUDGET + SW, "head %zu reads the window and the retrieved clusters (%u tokens)", h,
              indptr[h + 1] - indptr[h]);
    }
    sels[0] = both;
    EXPECT_OK(kvsieve_cache_decode_sparse(cache, 0, &seq, 1, &tq.t, (kvsieve_selection_t *const *)sels, tensor3(&to, out, dt_f32(), 1, HQ, D),
                                          lse, NULL));
    ref_attention_sel(q, keys, vals, HQ, HK, D, indptr, idx, SN - 1, NULL, ref_out, ref_lse);
    CHECK(max_abs_diff(out, ref_out, HQ * D) < 1e-4 && max_abs_diff(lse, ref_lse, HQ) < 1e-4,
          "sparse decode over retrieval ∪ window matches the reference (err %g, lse err %g)", max_abs_diff(out, ref_out, HQ * D),
          max_abs_diff(lse, ref_lse, HQ));

    kvsieve_selection_free(ret);
    kvsieve_selection_free(win);
    kvsieve_selection_free(both);
    kvsieve_cluster_index_free(ix);
    kvsieve_cache_free(cache);
    free(keys);
    free(vals);
    free(q);
    section_done("retrieval unioned with a streaming window drives sparse decode", before);
}

/* Readers beside a writer ------------------------------------------------------------------ */

enum { TN0 = 160, TEXTRA = 48, TW = 8, READERS = 3, ITERS = 25, TBUDGET = 30 };

typedef struct {
    kvsieve_cluster_index_t *index;
    const float *q;
    const uint32_t *before, *after;
    size_t before_len, after_len;
    int runs, mismatches, errors, went_back;
} reader_arg;

static size_t sel_indices(const kvsieve_selection_t *sel, uint32_t *buf, size_t cap, int *errors) {
    size_t len = 0;
    kvsieve_error_t *err = kvsieve_selection_indices(sel, buf, cap, &len);
    if (err) {
        (*errors)++;
        kvsieve_error_free(err);
    }
    return len;
}

static void *reader(void *p) {
    reader_arg *r = (reader_arg *)p;
    kvsieve_retrieve_config_t rc = kvsieve_retrieve_config_default(TBUDGET);
    test_tensor tq;
    uint32_t got[HK * (TN0 + TEXTRA)];
    int i, seen_after = 0;
    rc.seq_len = TN0 + TEXTRA;
    tensor2(&tq, (void *)r->q, dt_f32(), HQ, D);
    for (i = 0; i < ITERS; i++) {
        kvsieve_selection_t *sel = NULL;
        kvsieve_error_t *err = kvsieve_cluster_index_retrieve(r->index, &tq.t, &rc, &sel, NULL);
        size_t len, clustered = 0;
        if (err) {
            r->errors++;
            kvsieve_error_free(err);
            continue;
        }
        len = sel_indices(sel, got, HK * (TN0 + TEXTRA), &r->errors);
        kvsieve_selection_free(sel);
        if (len == r->after_len && memcmp(got, r->after, len * sizeof *got) == 0) {
            seen_after = 1;
        } else if (len == r->before_len && memcmp(got, r->before, len * sizeof *got) == 0) {
            r->went_back += seen_after;
        } else {
            r->mismatches++;
        }
        err = kvsieve_cluster_index_clustered_len(r->index, &clustered);
        if (err) {
            r->errors++;
            kvsieve_error_free(err);
        } else if (clustered != TN0 - TW && clustered != TN0 + TEXTRA - TW) {
            r->mismatches++;
        }
        r->runs++;
    }
    return NULL;
}

static void threads(void) {
    int before = g_failed;
    kvsieve_cache_t *cache = new_cache(HK, D, PS, (TN0 + TEXTRA + PS - 1) / PS + 1, KVSIEVE_KEYS_POST_ROPE);
    float *keys = clustered_keys(TN0 + TEXTRA, HK, D), *vals = rand_floats((TN0 + TEXTRA) * HK * D, 1.0f), *q = rand_floats(HQ * D, 1.5f);
    kvsieve_cluster_index_t *ix = NULL, *ref = NULL;
    kvsieve_cluster_config_t cfg = kvsieve_cluster_config_default(10);
    kvsieve_retrieve_config_t rc = kvsieve_retrieve_config_default(TBUDGET);
    kvsieve_selection_t *s_before = NULL, *s_after = NULL;
    kvsieve_key_source_t src, full;
    test_tensor tk, tq;
    static uint32_t b_idx[HK * (TN0 + TEXTRA)], a_idx[HK * (TN0 + TEXTRA)];
    reader_arg args[READERS];
    pthread_t tid[READERS];
    size_t added = 0;
    int i, errors = 0;
    uint64_t seq = 0;

    cfg.exclude_window = TW;
    /* The expected results, single-threaded: an index over the first TN0 tokens, before and
     * after assigning the rest. */
    full = from_tensor(tensor3(&tk, keys, dt_f32(), TN0 + TEXTRA, HK, D));
    EXPECT_OK(kvsieve_cache_create_sequence(cache, &seq));
    append_tokens(cache, seq, 0, TN0, HK, D, keys, vals);
    src = from_cache(cache, seq, 0);
    EXPECT_OK(kvsieve_cluster_index_build(&src, &cfg, &ref));
    rc.seq_len = TN0 + TEXTRA;
    tensor2(&tq, q, dt_f32(), HQ, D);
    EXPECT_OK(kvsieve_cluster_index_retrieve(ref, &tq.t, &rc, &s_before, NULL));
    EXPECT_OK(kvsieve_cluster_index_assign_new(ref, &full, &added));
    CHECK(added == TEXTRA, "reference: %zu tokens assigned", added);
    EXPECT_OK(kvsieve_cluster_index_retrieve(ref, &tq.t, &rc, &s_after, NULL));
    EXPECT_OK(kvsieve_cluster_index_build(&src, &cfg, &ix));

    for (i = 0; i < READERS; i++) {
        memset(&args[i], 0, sizeof args[i]);
        args[i].index = ix;
        args[i].q = q;
        args[i].before = b_idx;
        args[i].after = a_idx;
        args[i].before_len = sel_indices(s_before, b_idx, HK * (TN0 + TEXTRA), &errors);
        args[i].after_len = sel_indices(s_after, a_idx, HK * (TN0 + TEXTRA), &errors);
    }
    CHECK(args[0].before_len == HK * TBUDGET && args[0].after_len == HK * TBUDGET && errors == 0, "expected selections");
    for (i = 0; i < READERS; i++) pthread_create(&tid[i], NULL, reader, &args[i]);
    /* The writer: the cache grows (its exclusive lock), then the index takes the new tokens
     * (the index's exclusive lock, the cache's shared one). */
    append_tokens(cache, seq, TN0, TEXTRA, HK, D, keys + TN0 * HK * D, vals + TN0 * HK * D);
    EXPECT_OK(kvsieve_cluster_index_assign_new(ix, &src, &added));
    CHECK(added == TEXTRA, "writer: %zu tokens assigned", added);
    for (i = 0; i < READERS; i++) pthread_join(tid[i], NULL);
    for (i = 0; i < READERS; i++) {
        CHECK(args[i].runs == ITERS && args[i].errors == 0 && args[i].mismatches == 0 && args[i].went_back == 0,
              "reader %d: %d retrievals, each the result before or after the update (%d errors, %d other, %d back)", i, args[i].runs,
              args[i].errors, args[i].mismatches, args[i].went_back);
    }
    {
        kvsieve_selection_t *last = NULL;
        EXPECT_OK(kvsieve_cluster_index_retrieve(ix, &tq.t, &rc, &last, NULL));
        CHECK(same_selection(last, s_after), "after the writer: the single-threaded result");
        kvsieve_selection_free(last);
    }

    kvsieve_selection_free(s_before);
    kvsieve_selection_free(s_after);
    kvsieve_cluster_index_free(ix);
    kvsieve_cluster_index_free(ref);
    kvsieve_cache_free(cache);
    free(keys);
    free(vals);
    free(q);
    section_done("readers share one index beside a writer assigning new tokens", before);
}

/* Bad input ----------------------------------------------------------------------------------- */

enum { EN = 40 };

static int all_bytes(const void *p, size_t n, unsigned char b) {
    const unsigned char *c = (const unsigned char *)p;
    size_t i;
    for (i = 0; i < n; i++) {
        if (c[i] != b) return 0;
    }
    return 1;
}

static void bad_input(void) {
    int before = g_failed;
    float *keys = rand_floats(EN * HK * D, 1.0f), *nan_keys = rand_floats((EN + 5) * HK * D, 1.0f), *q = rand_floats(HQ * D, 1.0f);
    float *narrow = rand_floats(EN * HK * 16, 1.0f), *qnan = rand_floats(HQ * D, 1.0f), *vals = rand_floats(EN * HK * D, 1.0f);
    float fbuf[K * D + 4];
    double dbuf[HK * K + 4], taus[HK] = {0.0, 0.0};
    uint32_t ubuf[EN + 4];
    size_t out_len = 777, v = 0, added = 555;
    kvsieve_cluster_index_t *ix = NULL, *plain = NULL, *sentinel = (kvsieve_cluster_index_t *)&out_len, *out = sentinel;
    kvsieve_selection_t *sel_sentinel = (kvsieve_selection_t *)&out_len, *sel = sel_sentinel;
    kvsieve_cluster_config_t cfg = kvsieve_cluster_config_default(K), bad;
    kvsieve_retrieve_config_t rc = kvsieve_retrieve_config_default(5), r;
    kvsieve_retrieve_stats_t st;
    kvsieve_key_source_t src, none, empty_src, nan_src, narrow_src, short_src, pre_src;
    kvsieve_cache_t *pre = new_cache(HK, D, PS, 4, KVSIEVE_KEYS_PRE_ROPE);
    test_tensor tk, tk_empty, tk_nan, tk_narrow, tk_short, tq, tq3, tq_d, tq_nan, tqs_empty, tqs;
    uint64_t pre_seq = 0;

    nan_keys[(3 * HK + 1) * D + 5] = NAN;
    qnan[7] = NAN;
    src = from_tensor(tensor3(&tk, keys, dt_f32(), EN, HK, D));
    kvsieve_key_source_init(&none);
    empty_src = from_tensor(tensor3(&tk_empty, NULL, dt_f32(), 0, HK, D));
    nan_src = from_tensor(tensor3(&tk_nan, nan_keys, dt_f32(), EN, HK, D));
    narrow_src = from_tensor(tensor3(&tk_narrow, narrow, dt_f32(), EN, HK, 16));
    short_src = from_tensor(tensor3(&tk_short, keys, dt_f32(), EN - 1, HK, D));
    EXPECT_OK(kvsieve_cache_create_sequence(pre, &pre_seq));
    append_tokens(pre, pre_seq, 0, EN, HK, D, keys, vals);
    pre_src = from_cache(pre, pre_seq, 0);
    tensor2(&tq, q, dt_f32(), HQ, D);
    tensor2(&tq3, q, dt_f32(), 3, D);          /* 3 query heads: not a multiple of 2 KV heads */
    tensor2(&tq_d, q, dt_f32(), HQ / 2, 2 * D); /* head_dim 64 against an index of 32 */
    tensor2(&tq_nan, qnan, dt_f32(), HQ, D);
    tensor3(&tqs_empty, NULL, dt_f32(), 0, HQ, D);
    tensor3(&tqs, q, dt_f32(), 1, HQ, D);
    memset(fbuf, 0xab, sizeof fbuf);
    memset(dbuf, 0xab, sizeof dbuf);
    memset(ubuf, 0xab, sizeof ubuf);
    /* Statistics of the layout this program was compiled with, every field 0xab bytes. */
    memset(&st, 0xab, sizeof st);
    st.struct_size = sizeof st;

    /* Build. */
    EXPECT_ERR(kvsieve_cluster_index_build(NULL, &cfg, &out), KVSIEVE_ERROR_NULL_POINTER, "`keys`");
    EXPECT_ERR(kvsieve_cluster_index_build(&src, NULL, &out), KVSIEVE_ERROR_NULL_POINTER, "`config`");
    EXPECT_ERR(kvsieve_cluster_index_build(&src, &cfg, NULL), KVSIEVE_ERROR_NULL_POINTER, "`out`");
    EXPECT_ERR(kvsieve_cluster_index_build(&none, &cfg, &out), KVSIEVE_ERROR_INVALID_ARGUMENT, "`keys`");
    bad = cfg;
    bad.num_clusters = 0;
    EXPECT_ERR(kvsieve_cluster_index_build(&src, &bad, &out), KVSIEVE_ERROR_INVALID_ARGUMENT, "`num_clusters`");
    bad.num_clusters = EN + 1;
    EXPECT_ERR(kvsieve_cluster_index_build(&src, &bad, &out), KVSIEVE_ERROR_INVALID_ARGUMENT, "`num_clusters`");
    bad.num_clusters = 4;
    bad.cluster_fraction = 0.5;
    EXPECT_ERR(kvsieve_cluster_index_build(&src, &bad, &out), KVSIEVE_ERROR_INVALID_ARGUMENT, "`cluster_fraction`");
    bad.num_clusters = 0;
    bad.cluster_fraction = 1.5;
    EXPECT_ERR(kvsieve_cluster_index_build(&src, &bad, &out), KVSIEVE_ERROR_INVALID_ARGUMENT, "`cluster_fraction`");
    bad.cluster_fraction = 0.001; /* rounds to 0 clusters of 40 keys */
    EXPECT_ERR(kvsieve_cluster_index_build(&src, &bad, &out), KVSIEVE_ERROR_INVALID_ARGUMENT, "`cluster_fraction`");
    bad = cfg;
    bad.exclude_window = EN;
    EXPECT_ERR(kvsieve_cluster_index_build(&src, &bad, &out), KVSIEVE_ERROR_INVALID_ARGUMENT, "`exclude_window`");
    bad = cfg;
    bad.num_coarse_clusters = K + 1;
    EXPECT_ERR(kvsieve_cluster_index_build(&src, &bad, &out), KVSIEVE_ERROR_INVALID_ARGUMENT, "`num_coarse_clusters`");
    bad.num_coarse_clusters = 2;
    bad.coarse_fraction = 0.5;
    EXPECT_ERR(kvsieve_cluster_index_build(&src, &bad, &out), KVSIEVE_ERROR_INVALID_ARGUMENT, "`coarse_fraction`");
    EXPECT_ERR(kvsieve_cluster_index_build(&nan_src, &cfg, &out), KVSIEVE_ERROR_INVALID_ARGUMENT, "token 3, KV head 1");
    EXPECT_ERR(kvsieve_cluster_index_build(&empty_src, &cfg, &out), KVSIEVE_ERROR_INVALID_ARGUMENT, "`keys`");
    EXPECT_ERR(kvsieve_cluster_index_build(&pre_src, &cfg, &out), KVSIEVE_ERROR_INVALID_ARGUMENT, "`keys`");
    {
        kvsieve_key_source_t bad_layer = from_cache(pre, pre_seq, 3), bad_seq = from_cache(pre, pre_seq + 9, 0);
        EXPECT_ERR(kvsieve_cluster_index_build(&bad_layer, &cfg, &out), KVSIEVE_ERROR_OUT_OF_RANGE, "`keys.layer`");
        EXPECT_ERR(kvsieve_cluster_index_build(&bad_seq, &cfg, &out), KVSIEVE_ERROR_UNKNOWN_SEQUENCE, "unknown sequence");
    }
    CHECK(out == sentinel, "build: out untouched");

    cfg.num_coarse_clusters = 3;
    EXPECT_OK(kvsieve_cluster_index_build(&src, &cfg, &ix));
    cfg.num_coarse_clusters = 0;
    EXPECT_OK(kvsieve_cluster_index_build(&src, &cfg, &plain));

    /* Inspection. */
    EXPECT_ERR(kvsieve_cluster_index_num_clusters(NULL, &v), KVSIEVE_ERROR_NULL_POINTER, "`index`");
    EXPECT_ERR(kvsieve_cluster_index_num_clusters(ix, NULL), KVSIEVE_ERROR_NULL_POINTER, "`out`");
    EXPECT_ERR(kvsieve_cluster_index_get_config(ix, NULL), KVSIEVE_ERROR_NULL_POINTER, "`out`");
    EXPECT_ERR(kvsieve_cluster_index_sizes(ix, HK, ubuf, EN, &out_len), KVSIEVE_ERROR_OUT_OF_RANGE, "`head`");
    EXPECT_ERR(kvsieve_cluster_index_sizes(ix, 0, ubuf, K - 1, &out_len), KVSIEVE_ERROR_INVALID_ARGUMENT, "`capacity`");
    EXPECT_ERR(kvsieve_cluster_index_sizes(ix, 0, NULL, K, &out_len), KVSIEVE_ERROR_NULL_POINTER, "`sizes`");
    EXPECT_ERR(kvsieve_cluster_index_members(ix, 0, ubuf, EN - 1, &out_len), KVSIEVE_ERROR_INVALID_ARGUMENT, "`capacity`");
    EXPECT_ERR(kvsieve_cluster_index_member_offsets(ix, 0, ubuf, K, &out_len), KVSIEVE_ERROR_INVALID_ARGUMENT, "`capacity`");
    EXPECT_ERR(kvsieve_cluster_index_centroids(ix, 0, fbuf, K * D - 1, &out_len), KVSIEVE_ERROR_INVALID_ARGUMENT, "`capacity`");
    EXPECT_ERR(kvsieve_cluster_index_coarse_sizes(plain, 0, ubuf, EN, &out_len), KVSIEVE_ERROR_INVALID_ARGUMENT, "`index`");
    EXPECT_ERR(kvsieve_cluster_index_coarse_centroids(plain, 0, fbuf, K * D, &out_len), KVSIEVE_ERROR_INVALID_ARGUMENT, "`index`");
    EXPECT_ERR(kvsieve_cluster_index_coarse_children(ix, 0, ubuf, K - 1, &out_len), KVSIEVE_ERROR_INVALID_ARGUMENT, "`capacity`");
    EXPECT_ERR(kvsieve_cluster_index_sizes(ix, 0, (uint32_t *)&out_len, 2 * K, &out_len), KVSIEVE_ERROR_INVALID_ARGUMENT, "`sizes`");
    CHECK(all_bytes(ubuf, sizeof ubuf, 0xab) && all_bytes(fbuf, sizeof fbuf, 0xab) && out_len == 777, "inspection: buffers and out_len untouched");

    /* Estimates. */
    EXPECT_ERR(kvsieve_cluster_index_estimates(ix, &tq.t, dbuf, HK * K - 1, &out_len), KVSIEVE_ERROR_INVALID_ARGUMENT, "`capacity`");
    EXPECT_ERR(kvsieve_cluster_index_estimates(ix, &tq.t, NULL, HK * K, &out_len), KVSIEVE_ERROR_NULL_POINTER, "`estimates`");
    EXPECT_ERR(kvsieve_cluster_index_estimates(ix, NULL, dbuf, HK * K, &out_len), KVSIEVE_ERROR_NULL_POINTER, "`q`");
    EXPECT_ERR(kvsieve_cluster_index_estimates(ix, &tq_d.t, dbuf, HK * K, &out_len), KVSIEVE_ERROR_SHAPE, "`q`");
    EXPECT_ERR(kvsieve_cluster_index_estimates(ix, &tq.t, (double *)q, HK * K, &out_len), KVSIEVE_ERROR_INVALID_ARGUMENT, "`estimates`");
    CHECK(all_bytes(dbuf, sizeof dbuf, 0xab) && out_len == 777, "estimates: buffer and out_len untouched");

    /* Retrieval. */
    EXPECT_ERR(kvsieve_cluster_index_retrieve(NULL, &tq.t, &rc, &sel, &st), KVSIEVE_ERROR_NULL_POINTER, "`index`");
    EXPECT_ERR(kvsieve_cluster_index_retrieve(ix, NULL, &rc, &sel, &st), KVSIEVE_ERROR_NULL_POINTER, "`q`");
    EXPECT_ERR(kvsieve_cluster_index_retrieve(ix, &tq.t, NULL, &sel, &st), KVSIEVE_ERROR_NULL_POINTER, "`config`");
    EXPECT_ERR(kvsieve_cluster_index_retrieve(ix, &tq.t, &rc, NULL, &st), KVSIEVE_ERROR_NULL_POINTER, "`out`");
    r = rc;
    r.budget = 0;
    EXPECT_ERR(kvsieve_cluster_index_retrieve(ix, &tq.t, &r, &sel, &st), KVSIEVE_ERROR_INVALID_ARGUMENT, "`budget`");
    r = rc;
    r.mode = 7;
    EXPECT_ERR(kvsieve_cluster_index_retrieve(ix, &tq.t, &r, &sel, &st), KVSIEVE_ERROR_INVALID_ARGUMENT, "`mode`");
    r.mode = KVSIEVE_RETRIEVE_THRESHOLD;
    r.threshold = NAN;
    EXPECT_ERR(kvsieve_cluster_index_retrieve(ix, &tq.t, &r, &sel, &st), KVSIEVE_ERROR_INVALID_ARGUMENT, "`threshold`");
    r.mode = KVSIEVE_RETRIEVE_PER_HEAD_THRESHOLD;
    EXPECT_ERR(kvsieve_cluster_index_retrieve(ix, &tq.t, &r, &sel, &st), KVSIEVE_ERROR_NULL_POINTER, "`thresholds`");
    r.thresholds = taus;
    r.num_thresholds = 1;
    EXPECT_ERR(kvsieve_cluster_index_retrieve(ix, &tq.t, &r, &sel, &st), KVSIEVE_ERROR_SHAPE, "`thresholds`");
    r = rc;
    EXPECT_ERR(kvsieve_cluster_index_retrieve(ix, &tq3.t, &r, &sel, &st), KVSIEVE_ERROR_SHAPE, "`q`");
    EXPECT_ERR(kvsieve_cluster_index_retrieve(ix, &tq_d.t, &r, &sel, &st), KVSIEVE_ERROR_SHAPE, "`q`");
    EXPECT_ERR(kvsieve_cluster_index_retrieve(ix, &tq_nan.t, &r, &sel, &st), KVSIEVE_ERROR_INVALID_ARGUMENT, "`q`");
    r.seq_len = EN - 1;
    EXPECT_ERR(kvsieve_cluster_index_retrieve(ix, &tq.t, &r, &sel, &st), KVSIEVE_ERROR_OUT_OF_RANGE, "`seq_len`");
    r = rc;
    r.hierarchical = true;
    EXPECT_ERR(kvsieve_cluster_index_retrieve(plain, &tq.t, &r, &sel, &st), KVSIEVE_ERROR_INVALID_ARGUMENT, "`hierarchical`");
    r.coarse_mode = 9;
    EXPECT_ERR(kvsieve_cluster_index_retrieve(ix, &tq.t, &r, &sel, &st), KVSIEVE_ERROR_INVALID_ARGUMENT, "`coarse_mode`");
    r.coarse_mode = KVSIEVE_COARSE_THRESHOLD;
    r.coarse_threshold = NAN;
    EXPECT_ERR(kvsieve_cluster_index_retrieve(ix, &tq.t, &r, &sel, &st), KVSIEVE_ERROR_INVALID_ARGUMENT, "`coarse_threshold`");
    r.coarse_mode = KVSIEVE_COARSE_BUDGET;
    r.coarse_budget = 0;
    EXPECT_ERR(kvsieve_cluster_index_retrieve(ix, &tq.t, &r, &sel, &st), KVSIEVE_ERROR_INVALID_ARGUMENT, "`coarse_budget`");
    r.coarse_mode = KVSIEVE_COARSE_BUDGET_MULTIPLE;
    r.coarse_budget_multiple = -1.0;
    EXPECT_ERR(kvsieve_cluster_index_retrieve(ix, &tq.t, &r, &sel, &st), KVSIEVE_ERROR_INVALID_ARGUMENT, "`coarse_budget_multiple`");
    r.coarse_budget_multiple = 2.0;
    r.mode = KVSIEVE_RETRIEVE_THRESHOLD;
    r.threshold = 0.0;
    EXPECT_ERR(kvsieve_cluster_index_retrieve(ix, &tq.t, &r, &sel, &st), KVSIEVE_ERROR_INVALID_ARGUMENT, "`coarse_mode`");
    r = rc;
    {
        /* `out` inside the statistics. */
        kvsieve_retrieve_stats_t ov;
        kvsieve_retrieve_stats_init(&ov);
        ov.centroid_evals = 12345;
        EXPECT_ERR(kvsieve_cluster_index_retrieve(ix, &tq.t, &r, (kvsieve_selection_t **)&ov.centroid_evals, &ov),
                   KVSIEVE_ERROR_INVALID_ARGUMENT, "`out`");
        CHECK(ov.centroid_evals == 12345 && ov.struct_size == sizeof ov, "retrieve: overlapping out and stats untouched");
    }
    CHECK(sel == sel_sentinel && st.struct_size == sizeof st && all_bytes((const char *)&st + sizeof st.struct_size, sizeof st - sizeof st.struct_size, 0xab),
          "retrieve: out and stats untouched");
    {
        /* Per-head thresholds are read only in that mode. */
        kvsieve_selection_t *ok_sel = NULL;
        r = rc;
        r.thresholds = (const double *)&out_len;
        r.num_thresholds = (size_t)-1;
        EXPECT_OK(kvsieve_cluster_index_retrieve(ix, &tq.t, &r, &ok_sel, NULL));
        kvsieve_selection_free(ok_sel);
    }

    /* Calibration. */
    EXPECT_ERR(kvsieve_cluster_index_calibrate(ix, &tqs.t, 0.0, false, dbuf, HK, NULL), KVSIEVE_ERROR_INVALID_ARGUMENT, "`target_fraction`");
    EXPECT_ERR(kvsieve_cluster_index_calibrate(ix, &tqs.t, 1.5, false, dbuf, HK, NULL), KVSIEVE_ERROR_INVALID_ARGUMENT, "`target_fraction`");
    EXPECT_ERR(kvsieve_cluster_index_calibrate(ix, &tqs.t, NAN, false, dbuf, HK, NULL), KVSIEVE_ERROR_INVALID_ARGUMENT, "`target_fraction`");
    EXPECT_ERR(kvsieve_cluster_index_calibrate(ix, &tqs_empty.t, 0.5, false, dbuf, HK, NULL), KVSIEVE_ERROR_SHAPE, "`queries`");
    EXPECT_ERR(kvsieve_cluster_index_calibrate(ix, &tq.t, 0.5, false, dbuf, HK, NULL), KVSIEVE_ERROR_SHAPE, "`queries`");
    EXPECT_ERR(kvsieve_cluster_index_calibrate(ix, &tqs.t, 0.5, false, dbuf, HK - 1, NULL), KVSIEVE_ERROR_INVALID_ARGUMENT, "`capacity`");
    EXPECT_ERR(kvsieve_cluster_index_calibrate(ix, &tqs.t, 0.5, false, NULL, HK, NULL), KVSIEVE_ERROR_NULL_POINTER, "`thresholds`");
    EXPECT_ERR(kvsieve_cluster_index_calibrate(ix, NULL, 0.5, false, dbuf, HK, NULL), KVSIEVE_ERROR_NULL_POINTER, "`queries`");
    EXPECT_ERR(kvsieve_cluster_index_calibrate(ix, &tqs.t, 0.5, false, dbuf, HK, dbuf + 1), KVSIEVE_ERROR_INVALID_ARGUMENT, "`thresholds`");
    CHECK(all_bytes(dbuf, sizeof dbuf, 0xab), "calibrate: buffers untouched");

    /* assign_new and rebuild leave the index as it was. */
    EXPECT_ERR(kvsieve_cluster_index_assign_new(NULL, &src, &added), KVSIEVE_ERROR_NULL_POINTER, "`index`");
    EXPECT_ERR(kvsieve_cluster_index_assign_new(ix, NULL, &added), KVSIEVE_ERROR_NULL_POINTER, "`keys`");
    EXPECT_ERR(kvsieve_cluster_index_assign_new(ix, &narrow_src, &added), KVSIEVE_ERROR_SHAPE, "`keys`");
    EXPECT_ERR(kvsieve_cluster_index_assign_new(ix, &short_src, &added), KVSIEVE_ERROR_INVALID_ARGUMENT, "`keys`");
    memcpy(nan_keys, keys, EN * HK * D * sizeof(float));
    nan_keys[(EN + 2) * HK * D + 1] = NAN;
    tensor3(&tk_nan, nan_keys, dt_f32(), EN + 5, HK, D);
    EXPECT_ERR(kvsieve_cluster_index_assign_new(ix, &nan_src, &added), KVSIEVE_ERROR_INVALID_ARGUMENT, "token 42");
    EXPECT_ERR(kvsieve_cluster_index_assign_new(ix, &nan_src, (size_t *)(nan_keys + 4)), KVSIEVE_ERROR_INVALID_ARGUMENT, "`out_added`");
    EXPECT_ERR(kvsieve_cluster_index_rebuild(ix, &narrow_src), KVSIEVE_ERROR_SHAPE, "`keys`");
    EXPECT_ERR(kvsieve_cluster_index_rebuild(ix, &nan_src), KVSIEVE_ERROR_INVALID_ARGUMENT, "`keys`");
    EXPECT_OK(kvsieve_cluster_index_clustered_len(ix, &v));
    CHECK(v == EN && added == 555, "the index still clusters %zu tokens; out_added untouched", v);
    EXPECT_OK(kvsieve_cluster_index_seq_len_at_build(ix, &v));
    CHECK(v == EN, "the index was not rebuilt (%zu)", v);

    /* Files. */
    EXPECT_ERR(kvsieve_cluster_index_save(ix, NULL), KVSIEVE_ERROR_NULL_POINTER, "`path`");
    EXPECT_ERR(kvsieve_cluster_index_save(ix, ""), KVSIEVE_ERROR_INVALID_ARGUMENT, "`path`");
    EXPECT_ERR(kvsieve_cluster_index_save(NULL, "x"), KVSIEVE_ERROR_NULL_POINTER, "`index`");
    EXPECT_ERR(kvsieve_cluster_index_load(NULL, &out), KVSIEVE_ERROR_NULL_POINTER, "`path`");
    EXPECT_ERR(kvsieve_cluster_index_load("x", NULL), KVSIEVE_ERROR_NULL_POINTER, "`out`");
    EXPECT_ERR(kvsieve_cluster_index_load_for("x", NULL, &out), KVSIEVE_ERROR_NULL_POINTER, "`keys`");
    CHECK(out == sentinel, "load: out untouched");

    kvsieve_cluster_index_free(ix);
    kvsieve_cluster_index_free(plain);
    kvsieve_cache_free(pre);
    free(keys);
    free(nan_keys);
    free(q);
    free(narrow);
    free(qnan);
    free(vals);
    section_done("cluster bad input: right codes, parameter named, nothing written", before);
}

/* A policy with clusters= through a cluster set ----------------------------------------------- */

enum { PN = 200, PEXTRA = 24 };

static void policy_clusters(void) {
    int before = g_failed;
    kvsieve_cache_t *cache = new_cache(HK, D, PS, (PN + PEXTRA + PS - 1) / PS, KVSIEVE_KEYS_POST_ROPE);
    float *keys = clustered_keys(PN + PEXTRA, HK, D), *vals = rand_floats((PN + PEXTRA) * HK * D, 1.0f), *q = rand_floats(HQ * D, 1.5f);
    float out[HQ * D], lse[HQ], want[HQ * D], want_lse[HQ], ref_out[HQ * D], ref_lse[HQ], poisoned[HQ * D];
    kvsieve_policy_t *policy = NULL;
    kvsieve_cluster_set_t *set = NULL;
    kvsieve_cluster_index_t *ix = NULL;
    kvsieve_cluster_config_t cfg = kvsieve_cluster_config_default(16);
    kvsieve_retrieve_config_t rc = kvsieve_retrieve_config_default(BUDGET);
    kvsieve_retrieve_stats_t st;
    kvsieve_selection_t *ret = NULL, *win = NULL, *both = NULL, *got[1] = {NULL}, *sentinel = (kvsieve_selection_t *)&g_passed;
    const kvsieve_selection_t *sels[1];
    kvsieve_key_source_t src;
    test_tensor tq, to, tp;
    uint32_t indptr[HK + 1], idx[HK * PN], gindptr[HK + 1], gidx[HK * PN];
    size_t len = 0, glen = 0, layers = 99, clustered = 0, nclusters = 0, held = 0, scored = 0, assigned = 0, removed = 0, radii_read = 99, i;
    uint64_t seq = 0, other = 0;
    int same;

    kvsieve_retrieve_stats_init(&st);
    EXPECT_OK(kvsieve_cache_create_sequence(cache, &seq));
    append_tokens(cache, seq, 0, PN, HK, D, keys, vals);
    EXPECT_OK(kvsieve_policy_parse("sinks=4,window=16,clusters=48,clusters_k=16", &policy));
    EXPECT_OK(kvsieve_cluster_set_new(0, &set));
    for (i = 0; i < HQ * D; i++) poisoned[i] = NAN;

    /* Before the set is built: an error saying what to build, nothing written. */
    EXPECT_ERR(kvsieve_cache_decode_with_clusters(cache, 0, &seq, 1, tensor3(&tq, q, dt_f32(), 1, HQ, D), policy, set,
                                                  tensor3(&tp, poisoned, dt_f32(), 1, HQ, D), NULL, NULL, got, &scored, NULL),
               KVSIEVE_ERROR_INVALID_ARGUMENT, "build the ClusterIndexSet");
    CHECK(got[0] == NULL && isnan(poisoned[0]) && isnan(poisoned[HQ * D - 1]), "nothing written on failure");
    EXPECT_ERR(kvsieve_cache_decode_with_policy(cache, 0, &seq, 1, &tq.t, policy, &tp.t, NULL, NULL, NULL),
               KVSIEVE_ERROR_INVALID_ARGUMENT, "clusters=");

    EXPECT_OK(kvsieve_cluster_set_build(set, cache, seq, policy, &layers));
    EXPECT_OK(kvsieve_cluster_set_info(set, seq, 0, &held, &clustered, &nclusters));
    CHECK(layers == 1 && held == 1 && clustered == PN - 16 && nclusters == 16, "built: %zu layers, %zu indexes, %zu clustered, %zu clusters",
          layers, held, clustered, nclusters);

    /* The same index by hand: budget retrieval ∪ sinks + window, then sparse decode. */
    src = from_cache(cache, seq, 0);
    cfg.num_clusters = 16;
    cfg.exclude_window = 16;
    cfg.max_iter = 10;
    EXPECT_OK(kvsieve_cluster_index_build(&src, &cfg, &ix));
    EXPECT_OK(kvsieve_cluster_index_retrieve(ix, tensor3(&tq, q, dt_f32(), 1, HQ, D), &rc, &ret, &st));
    EXPECT_OK(kvsieve_selection_streaming(HK, PN, 4, 16, &win));
    EXPECT_OK(kvsieve_selection_union(ret, win, &both));
    sels[0] = both;
    EXPECT_OK(kvsieve_cache_decode_sparse(cache, 0, &seq, 1, &tq.t, (kvsieve_selection_t *const *)sels, tensor3(&to, want, dt_f32(), 1, HQ, D),
                                          want_lse, NULL));

    got[0] = sentinel;
    EXPECT_OK(kvsieve_cache_decode_with_clusters(cache, 0, &seq, 1, &tq.t, policy, set, tensor3(&to, out, dt_f32(), 1, HQ, D), lse, NULL,
                                                 got, &scored, &radii_read));
    EXPECT_OK(kvsieve_selection_head_indptr(both, indptr, HK + 1, NULL));
    EXPECT_OK(kvsieve_selection_indices(both, idx, HK * PN, &len));
    same = got[0] != NULL && got[0] != sentinel;
    if (same) {
        EXPECT_OK(kvsieve_selection_head_indptr(got[0], gindptr, HK + 1, NULL));
        EXPECT_OK(kvsieve_selection_indices(got[0], gidx, HK * PN, &glen));
        same = glen == len && memcmp(gindptr, indptr, sizeof indptr) == 0 && memcmp(gidx, idx, len * sizeof(uint32_t)) == 0;
    }
    CHECK(same, "the policy's selection is retrieval ∪ sinks ∪ window (%zu vs %zu tokens)", glen, len);
    CHECK(scored == HK * 16, "centroid rows scored: %zu", scored);
    CHECK(radii_read == 0, "no radii read by the estimate ranking: %zu", radii_read);
    CHECK(max_abs_diff(out, want, HQ * D) == 0.0 && max_abs_diff(lse, want_lse, HQ) == 0.0, "decode equals decode_sparse over that selection");
    ref_attention_sel(q, keys, vals, HQ, HK, D, indptr, idx, PN - 1, NULL, ref_out, ref_lse);
    CHECK(max_abs_diff(out, ref_out, HQ * D) < 1e-4 && max_abs_diff(lse, ref_lse, HQ) < 1e-4, "and the reference (err %g)",
          max_abs_diff(out, ref_out, HQ * D));
    kvsieve_selection_free(got[0]);

    /* The same set serves a policy ranking clusters with rank=mixed, which reads radii. */
    {
        kvsieve_policy_t *mixed = NULL;
        EXPECT_OK(kvsieve_policy_parse("sinks=4,window=16,clusters=48,clusters_k=16,rank=mixed", &mixed));
        EXPECT_OK(kvsieve_cache_decode_with_clusters(cache, 0, &seq, 1, &tq.t, mixed, set, &to.t, NULL, NULL, NULL, &scored, &radii_read));
        CHECK(scored == HK * 16 && radii_read == HK * 16, "rank=mixed: %zu centroid rows and %zu radii read", scored, radii_read);
        kvsieve_policy_free(mixed);
    }

    /* New tokens are read until an update assigns those past the window. */
    append_tokens(cache, seq, PN, PEXTRA, HK, D, keys + PN * HK * D, vals + PN * HK * D);
    EXPECT_OK(kvsieve_cache_decode_with_clusters(cache, 0, &seq, 1, &tq.t, policy, set, &to.t, NULL, NULL, got, NULL, NULL));
    EXPECT_OK(kvsieve_selection_head_indptr(got[0], gindptr, HK + 1, NULL));
    EXPECT_OK(kvsieve_selection_indices(got[0], gidx, HK * PN, &glen));
    same = 1;
    for (i = PN - 16; i < PN + PEXTRA; i++) {
        size_t j;
        int found = 0;
        for (j = gindptr[0]; j < gindptr[1]; j++) found |= gidx[j] == i;
        same &= found;
    }
    CHECK(same, "tokens not yet in the index are read");
    kvsieve_selection_free(got[0]);
    EXPECT_OK(kvsieve_cluster_set_update(set, cache, seq, &assigned));
    EXPECT_OK(kvsieve_cluster_set_info(set, seq, 0, NULL, &clustered, NULL));
    CHECK(assigned == PEXTRA && clustered == PN + PEXTRA - 16, "update assigned %zu, covers %zu", assigned, clustered);

    /* Bad input: codes and parameter names, the set unchanged. */
    EXPECT_ERR(kvsieve_cluster_set_build(NULL, cache, seq, policy, NULL), KVSIEVE_ERROR_NULL_POINTER, "set");
    EXPECT_ERR(kvsieve_cluster_set_build(set, cache, 77, policy, NULL), KVSIEVE_ERROR_UNKNOWN_SEQUENCE, "77");
    EXPECT_ERR(kvsieve_cache_decode_with_clusters(cache, 0, &seq, 1, &tq.t, policy, NULL, &tp.t, NULL, NULL, NULL, NULL, NULL),
               KVSIEVE_ERROR_NULL_POINTER, "set");
    EXPECT_OK(kvsieve_cache_create_sequence(cache, &other));
    EXPECT_ERR(kvsieve_cluster_set_build(set, cache, other, policy, NULL), KVSIEVE_ERROR_INVALID_ARGUMENT, "prefill first");
    EXPECT_OK(kvsieve_cache_truncate(cache, seq, 100));
    EXPECT_ERR(kvsieve_cluster_set_update(set, cache, seq, &assigned), KVSIEVE_ERROR_INVALID_ARGUMENT, "rebuild");
    EXPECT_ERR(kvsieve_cache_decode_with_clusters(cache, 0, &seq, 1, &tq.t, policy, set, &tp.t, NULL, NULL, NULL, NULL, NULL),
               KVSIEVE_ERROR_INVALID_ARGUMENT, "build it again");
    CHECK(isnan(poisoned[0]), "nothing written on failure");
    EXPECT_OK(kvsieve_cluster_set_info(set, seq, 0, &held, &clustered, NULL));
    CHECK(held == 1 && clustered == PN + PEXTRA - 16, "a failed update leaves the set unchanged");
    EXPECT_OK(kvsieve_cluster_set_remove_sequence(set, seq, &removed));
    EXPECT_OK(kvsieve_cluster_set_info(set, seq, 0, &held, &clustered, &nclusters));
    CHECK(removed == 1 && held == 0 && clustered == 0 && nclusters == 0, "remove_sequence drops the index");

    kvsieve_selection_free(ret);
    kvsieve_selection_free(win);
    kvsieve_selection_free(both);
    kvsieve_cluster_index_free(ix);
    kvsieve_cluster_set_free(set);
    kvsieve_cluster_set_free(NULL);
    kvsieve_policy_free(policy);
    kvsieve_cache_free(cache);
    free(keys);
    free(vals);
    free(q);
    section_done("a clusters= policy through a cluster set: selection, decode, update, staleness and bad input", before);
}

int main(void) {
    rng_seed(2024);
    build();
    estimates_and_selection();
    hierarchical();
    calibration();
    incremental();
    save_load();
    dtypes_and_sources();
    sparse_decode();
    threads();
    bad_input();
    policy_clusters();
    return finish();
}
