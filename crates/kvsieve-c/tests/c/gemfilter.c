/* GemFilter and SnapKV through the C API, against plain double-precision references written
 * here from their definitions: token scores (the sum over query heads of q_h · k_t, GQA),
 * the centred average pool, GemFilter's selection (forced tokens kept, every other kept
 * token scoring at least as high as every token left out), SnapKV (causal softmax per window
 * query and head, votes on the prefix summed over the window and the group, pooled, top k-w
 * per KV head plus the window), filter-layer calibration with a needle planted at one layer,
 * compaction by a SnapKV selection per head followed by decode, and bad input. */
#include "common.h"

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

static kvsieve_cache_t *new_cache(size_t layers, size_t hk, size_t d, size_t ps, size_t pages, kvsieve_dtype_t dtype) {
    kvsieve_cache_t *cache = NULL;
    kvsieve_cache_config_t cfg = kvsieve_cache_config_default(layers, hk, d, ps, pages);
    cfg.dtype = dtype;
    cfg.track_key_bounds = false;
    EXPECT_OK(kvsieve_cache_new(&cfg, &cache));
    return cache;
}

/* A sequence of n tokens with K and V of every layer from `k[layer]`, `v[layer]`. */
static uint64_t stored(kvsieve_cache_t *cache, size_t layers, size_t n, size_t hk, size_t d, float **k, float **v) {
    uint64_t seq = 0;
    size_t layer;
    test_tensor tk, tv;
    EXPECT_OK(kvsieve_cache_create_sequence(cache, &seq));
    EXPECT_OK(kvsieve_cache_append(cache, seq, n, NULL, NULL));
    for (layer = 0; layer < layers; layer++)
        EXPECT_OK(kvsieve_cache_write(cache, seq, layer, 0, tensor3(&tk, k[layer], dt_f32(), (int64_t)n, (int64_t)hk, (int64_t)d),
                                      tensor3(&tv, v[layer], dt_f32(), (int64_t)n, (int64_t)hk, (int64_t)d)));
    return seq;
}

/* References ----------------------------------------------------------------------------- */

/* score[t] = sum over query heads h of q_h · k[t][h / group]. q: [hq][d]; keys: [n][hk][d]. */
static void ref_scores(const float *q, size_t hq, const float *keys, size_t n, size_t hk, size_t d, double *score) {
    size_t group = hq / hk, t, h, c;
    for (t = 0; t < n; t++) {
        double s = 0.0;
        for (h = 0; h < hq; h++) {
            for (c = 0; c < d; c++) s += (double)q[h * d + c] * (double)keys[(t * hk + h / group) * d + c];
        }
        score[t] = s;
    }
}

/* out[i] = mean of x[i - r ..= i + r] that exist, r = kernel / 2. */
static void ref_pool(const double *x, size_t n, size_t kernel, double *out) {
    size_t r = kernel / 2, i, j;
    for (i = 0; i < n; i++) {
        size_t a = i >= r ? i - r : 0, b = i + r + 1 < n ? i + r + 1 : n;
        double s = 0.0;
        for (j = a; j < b; j++) s += x[j];
        out[i] = s / (double)(b - a);
    }
}

/* SnapKV's votes for KV head `kh`: for each window query i (token prefix + i) and query
 * head of the group, the causal softmax over tokens 0..=prefix+i of scale * q · k, its
 * probabilities on the prefix summed. q_window: [w][hq][d]; keys: [n][hk][d]. */
static void ref_votes(const float *q_window, size_t w, size_t hq, const float *keys, size_t n, size_t hk, size_t d, size_t kh,
                      double scale, double *votes) {
    size_t group = hq / hk, prefix = n - w, i, j, t, c;
    double *logit = (double *)malloc(n * sizeof(double));
    for (t = 0; t < prefix; t++) votes[t] = 0.0;
    for (i = 0; i < w; i++) {
        for (j = 0; j < group; j++) {
            const float *qh = q_window + (i * hq + kh * group + j) * d;
            double m = -INFINITY, z = 0.0;
            for (t = 0; t <= prefix + i; t++) {
                double dot = 0.0;
                for (c = 0; c < d; c++) dot += (double)qh[c] * (double)keys[(t * hk + kh) * d + c];
                logit[t] = scale * dot;
                if (logit[t] > m) m = logit[t];
            }
            for (t = 0; t <= prefix + i; t++) z += exp(logit[t] - m);
            for (t = 0; t < prefix; t++) votes[t] += exp(logit[t] - m) / z;
        }
    }
    free(logit);
}

/* `kept` (len entries) is strictly ascending, has k entries, holds every forced token
 * (t < first or t >= last_from), and every other kept token scores at least as high as every
 * token left out, within eps. Prints what is wrong; returns 1 when all holds. */
static int valid_topk(const uint32_t *kept, size_t len, size_t k, const double *score, size_t n, size_t first, size_t last_from,
                      double eps, const char *what) {
    char *in = (char *)calloc(n + 1, 1);
    double worst_kept = INFINITY, best_left = -INFINITY;
    size_t i, t;
    int ok = len == k;
    if (!ok) printf("  %s: %zu tokens kept, expected %zu\n", what, len, k);
    for (i = 0; ok && i < len; i++) {
        if (kept[i] >= n || (i > 0 && kept[i] <= kept[i - 1])) {
            printf("  %s: not strictly ascending below %zu at %zu\n", what, n, i);
            ok = 0;
        } else {
            in[kept[i]] = 1;
        }
    }
    for (t = 0; ok && t < n; t++) {
        int forced = t < first || t >= last_from;
        if (forced && !in[t]) {
            printf("  %s: forced token %zu missing\n", what, t);
            ok = 0;
        }
        if (in[t] && !forced && score[t] < worst_kept) worst_kept = score[t];
        if (!in[t] && score[t] > best_left) best_left = score[t];
    }
    if (ok && worst_kept < best_left - eps) {
        printf("  %s: a kept token scores %g, below a left-out one at %g\n", what, worst_kept, best_left);
        ok = 0;
    }
    free(in);
    return ok;
}

/* Scores and pooling --------------------------------------------------------------------- */

enum { HK = 2, GROUP = 3, HQ = HK * GROUP, D = 32, N = 150, PS = 16 };

static void scores_and_pooling(void) {
    int before = g_failed;
    kvsieve_cache_t *cache = new_cache(2, HK, D, PS, (N + PS - 1) / PS, dt_f16());
    float *k[2], *v[2], *keys = (float *)malloc(N * HK * D * sizeof(float)), *wide = (float *)calloc(2 * N * HK * D, sizeof(float));
    float *q = rand_floats(HQ * D, 1.0f), got[N], from_t[N], pooled[N];
    double want[N], want_pool[N], worst = 0.0, worst_pool = 0.0, worst_t = 0.0;
    size_t t, i, len = 0, kernels[3] = {1, 5, 7};
    test_tensor tq, tq3, tkeys;
    kvsieve_key_source_t src_c, src_t;
    uint64_t seq;

    for (i = 0; i < 2; i++) {
        k[i] = rand_floats(N * HK * D, 1.0f);
        v[i] = rand_floats(N * HK * D, 1.0f);
    }
    seq = stored(cache, 2, N, HK, D, k, v);
    /* The reference reads the keys as the float16 cache holds them. */
    EXPECT_OK(kvsieve_cache_read(cache, seq, 1, keys, NULL, N * HK * D));
    ref_scores(q, HQ, keys, N, HK, D, want);

    /* From the cache (layer 1), and from a float32 tensor seeing every other row of a wider
     * buffer (strided). */
    for (t = 0; t < N; t++) memcpy(wide + 2 * t * HK * D, keys + t * HK * D, HK * D * sizeof(float));
    tensor3(&tkeys, wide, dt_f32(), N, HK, D);
    set_strides3(&tkeys, 2 * HK * D, D, 1);
    src_c = from_cache(cache, seq, 1);
    src_t = from_tensor(&tkeys.t);
    EXPECT_OK(kvsieve_gemfilter_scores(tensor2(&tq, q, dt_f32(), HQ, D), &src_c, got, N, &len));
    CHECK(len == N, "scores from the cache: %zu written", len);
    EXPECT_OK(kvsieve_gemfilter_scores(tensor3(&tq3, q, dt_f32(), 1, HQ, D), &src_t, from_t, N + 5, NULL));
    for (t = 0; t < N; t++) {
        double e = fabs((double)got[t] - want[t]) / (1.0 + fabs(want[t]));
        double et = fabs((double)from_t[t] - want[t]) / (1.0 + fabs(want[t]));
        if (e > worst) worst = e;
        if (et > worst_t) worst_t = et;
    }
    CHECK(worst < 1e-4, "cache scores match the GQA reference (relative err %g)", worst);
    CHECK(worst_t < 1e-4, "strided tensor scores match the GQA reference (relative err %g)", worst_t);

    for (i = 0; i < 3; i++) {
        double x[N];
        for (t = 0; t < N; t++) x[t] = got[t];
        ref_pool(x, N, kernels[i], want_pool);
        EXPECT_OK(kvsieve_avg_pool(got, N, kernels[i], pooled));
        for (t = 0; t < N; t++) {
            double e = fabs((double)pooled[t] - want_pool[t]) / (1.0 + fabs(want_pool[t]));
            if (e > worst_pool) worst_pool = e;
        }
    }
    CHECK(worst_pool < 1e-5, "avg_pool with kernels 1, 5, 7 matches the reference (relative err %g)", worst_pool);
    {
        float one = 3.0f, out_one = 0.0f;
        EXPECT_OK(kvsieve_avg_pool(&one, 1, 9, &out_one));
        CHECK(out_one == 3.0f, "a kernel wider than the scores averages what exists (%g)", out_one);
        EXPECT_OK(kvsieve_avg_pool(NULL, 0, 3, NULL));
    }

    kvsieve_cache_free(cache);
    for (i = 0; i < 2; i++) {
        free(k[i]);
        free(v[i]);
    }
    free(keys);
    free(wide);
    free(q);
    section_done("gemfilter scores and avg_pool match the C reference", before);
}

/* GemFilter selection -------------------------------------------------------------------- */

static void selection(void) {
    int before = g_failed;
    kvsieve_cache_t *cache = new_cache(1, HK, D, PS, (N + PS - 1) / PS, dt_f32());
    float *k = rand_floats(N * HK * D, 1.0f), *v = rand_floats(N * HK * D, 1.0f), *q = rand_floats(HQ * D, 1.0f);
    double score[N], pooled[N], top = 0.0;
    uint32_t kept[N + 1];
    size_t cases[5][4] = {{20, 5, 4, 8}, {1, 1, 0, 0}, {N, 7, 0, 0}, {37, 3, 2, 2}, {12, 5, 12, 0}};
    size_t c, t, src_i;
    test_tensor tq, tk;
    kvsieve_key_source_t srcs[2];
    kvsieve_gemfilter_config_t def = kvsieve_gemfilter_config_default(24);
    uint64_t seq = stored(cache, 1, N, HK, D, &k, &v);

    CHECK(def.k == 24 && def.pool_kernel == 5 && def.keep_first == 0 && def.keep_last == 0, "default config: k %zu, pool %zu", def.k,
          def.pool_kernel);
    srcs[0] = from_cache(cache, seq, 0);
    srcs[1] = from_tensor(tensor3(&tk, k, dt_f32(), N, HK, D));
    ref_scores(q, HQ, k, N, HK, D, score);
    for (t = 0; t < N; t++) top = fabs(score[t]) > top ? fabs(score[t]) : top;
    for (c = 0; c < 6; c++) {
        kvsieve_gemfilter_config_t cfg = c < 5 ? kvsieve_gemfilter_config_default(cases[c][0]) : def;
        if (c < 5) {
            cfg.pool_kernel = cases[c][1];
            cfg.keep_first = cases[c][2];
            cfg.keep_last = cases[c][3];
        }
        ref_pool(score, N, cfg.pool_kernel, pooled);
        for (src_i = 0; src_i < 2; src_i++) {
            size_t len = 0;
            char what[96];
            snprintf(what, sizeof what, "%s, k %zu, pool %zu, first %zu, last %zu", src_i ? "tensor" : "cache", cfg.k, cfg.pool_kernel,
                     cfg.keep_first, cfg.keep_last);
            kept[cfg.k] = 0xdeadbeefu;
            EXPECT_OK(kvsieve_gemfilter_select(tensor2(&tq, q, dt_f32(), HQ, D), &srcs[src_i], &cfg, kept, cfg.k, &len));
            CHECK(valid_topk(kept, len, cfg.k, pooled, N, cfg.keep_first, N - cfg.keep_last, 1e-5 * (1.0 + top), what),
                  "gemfilter selection valid: %s", what);
            CHECK(kept[cfg.k] == 0xdeadbeefu, "nothing written past k: %s", what);
        }
    }
    kvsieve_cache_free(cache);
    free(k);
    free(v);
    free(q);
    section_done("gemfilter selection keeps the forced tokens and the best-scoring ones", before);
}

/* SnapKV --------------------------------------------------------------------------------- */

enum { SN = 120 };

static void snapkv_case(kvsieve_cache_t *cache, uint64_t seq, const float *k, size_t w, size_t keep, float scale, int use_tensor) {
    float *qw = rand_floats(w * HQ * D, 1.0f);
    double votes[SN], pooled[SN + 1];
    uint32_t head[SN], uni[SN], expect_union[SN];
    size_t h, t, len = 0, union_len = 0, heads = 0, seq_len = 0, n_expect = 0;
    char in_any[SN];
    char what[96];
    kvsieve_selection_t *sel = NULL;
    kvsieve_snapkv_config_t cfg;
    kvsieve_key_source_t src;
    test_tensor tq, tk;

    kvsieve_snapkv_config_init(&cfg);
    cfg.k = keep;
    cfg.pool_kernel = 7;
    cfg.scale = scale;
    src = use_tensor ? from_tensor(tensor3(&tk, (void *)k, dt_f32(), SN, HK, D)) : from_cache(cache, seq, 0);
    snprintf(what, sizeof what, "%s, w %zu, k %zu, scale %g", use_tensor ? "tensor" : "cache", w, keep, (double)scale);
    if (!EXPECT_OK(kvsieve_snapkv(tensor3(&tq, qw, dt_f32(), (int64_t)w, HQ, D), &src, &cfg, &sel, uni, SN, &union_len))) {
        free(qw);
        return;
    }
    EXPECT_OK(kvsieve_selection_num_kv_heads(sel, &heads));
    EXPECT_OK(kvsieve_selection_seq_len(sel, &seq_len));
    CHECK(heads == HK && seq_len == SN, "%s: selection of %zu heads over %zu tokens", what, heads, seq_len);
    memset(in_any, 0, sizeof in_any);
    for (h = 0; h < HK; h++) {
        ref_votes(qw, w, HQ, k, SN, HK, D, h, scale == 0.0f ? 1.0 / sqrt((double)D) : (double)scale, votes);
        ref_pool(votes, SN - w, 7, pooled);
        EXPECT_OK(kvsieve_selection_head(sel, h, head, SN, &len));
        /* The window is forced; the prefix ranks by the pooled votes (window scores unused). */
        for (t = SN - w; t < SN; t++) pooled[t] = INFINITY;
        CHECK(valid_topk(head, len, keep, pooled, SN, 0, SN - w, 1e-6, what), "snapkv head %zu valid: %s", h, what);
        for (t = 0; t < len; t++) in_any[head[t]] = 1;
    }
    for (t = 0; t < SN; t++) {
        if (in_any[t]) expect_union[n_expect++] = (uint32_t)t;
    }
    CHECK(union_len == n_expect && memcmp(uni, expect_union, n_expect * sizeof(uint32_t)) == 0, "%s: union of the heads (%zu tokens)",
          what, union_len);
    kvsieve_selection_free(sel);
    free(qw);
}

static void snapkv(void) {
    int before = g_failed;
    kvsieve_cache_t *cache = new_cache(1, HK, D, PS, (SN + PS - 1) / PS, dt_f32());
    /* Keys of a larger spread make the softmax peaked, so ranks are far apart. */
    float *k = rand_floats(SN * HK * D, 2.0f), *v = rand_floats(SN * HK * D, 1.0f);
    uint64_t seq = stored(cache, 1, SN, HK, D, &k, &v);
    size_t only_len = 0;
    float *qw = rand_floats(4 * HQ * D, 1.0f);
    kvsieve_selection_t *sel = NULL;
    kvsieve_snapkv_config_t cfg;
    kvsieve_key_source_t src = from_cache(cache, seq, 0);
    test_tensor tq;

    snapkv_case(cache, seq, k, 1, 10, 0.0f, 0);
    snapkv_case(cache, seq, k, 8, 40, 0.0f, 0);
    snapkv_case(cache, seq, k, 16, 16, 0.0f, 0);
    snapkv_case(cache, seq, k, 16, SN, 0.0f, 1);
    snapkv_case(cache, seq, k, 8, 30, 0.05f, 1);
    snapkv_case(cache, seq, k, SN, SN, 0.0f, 0);

    /* The union's length alone, without a buffer. */
    kvsieve_snapkv_config_init(&cfg);
    cfg.k = 20;
    cfg.pool_kernel = 7;
    EXPECT_OK(kvsieve_snapkv(tensor3(&tq, qw, dt_f32(), 4, HQ, D), &src, &cfg, &sel, NULL, 0, &only_len));
    CHECK(only_len >= 20 && only_len <= 2 * 20 - 4, "union length without a buffer: %zu", only_len);
    kvsieve_selection_free(sel);

    kvsieve_cache_free(cache);
    free(k);
    free(v);
    free(qw);
    section_done("snapkv matches the C reference of its definition", before);
}

/* Calibration ---------------------------------------------------------------------------- */

enum { CL = 3, CN = 200, CHQ = 4, NEEDLE_A = 80, NEEDLE_B = 90 };

static void calibration(void) {
    int before = g_failed;
    kvsieve_cache_t *cache = new_cache(CL, HK, D, PS, (CN + PS - 1) / PS, dt_f32());
    float *q[CL], *k[CL], *v[CL];
    kvsieve_tensor_t queries[CL];
    kvsieve_key_source_t keys[CL];
    test_tensor tq[CL], tk;
    double recalls[CL] = {-1, -1, -1};
    kvsieve_gemfilter_config_t cfg = kvsieve_gemfilter_config_default(32);
    size_t l, t, h, c;
    uint64_t seq;

    /* In the last layer the needle's keys align with the group sums of that layer's query;
     * elsewhere every key is noise. */
    for (l = 0; l < CL; l++) {
        q[l] = rand_floats(CHQ * D, 1.0f);
        k[l] = rand_floats(CN * HK * D, 0.3f);
        v[l] = rand_floats(CN * HK * D, 1.0f);
        queries[l] = *tensor2(&tq[l], q[l], dt_f32(), CHQ, D);
    }
    for (t = NEEDLE_A; t < NEEDLE_B; t++) {
        for (h = 0; h < HK; h++) {
            for (c = 0; c < D; c++) k[CL - 1][(t * HK + h) * D + c] += q[CL - 1][2 * h * D + c] + q[CL - 1][(2 * h + 1) * D + c];
        }
    }
    seq = stored(cache, CL, CN, HK, D, k, v);
    /* Layer 0 from a tensor, layers 1 and 2 from one cache. */
    keys[0] = from_tensor(tensor3(&tk, k[0], dt_f32(), CN, HK, D));
    keys[1] = from_cache(cache, seq, 1);
    keys[2] = from_cache(cache, seq, 2);
    EXPECT_OK(kvsieve_gemfilter_calibrate_layers(CL, queries, keys, NEEDLE_A, NEEDLE_B, &cfg, recalls));
    CHECK(recalls[CL - 1] == 1.0, "the needle's layer keeps the whole needle (recall %g)", recalls[CL - 1]);
    CHECK(recalls[0] < 0.5 && recalls[1] < 0.5, "the other layers miss most of it (recalls %g, %g)", recalls[0], recalls[1]);
    /* Each layer's recall equals the share of the needle in that layer's own selection. */
    for (l = 0; l < CL; l++) {
        uint32_t kept[32];
        size_t hit = 0, i;
        EXPECT_OK(kvsieve_gemfilter_select(&queries[l], &keys[l], &cfg, kept, 32, NULL));
        for (i = 0; i < 32; i++) hit += kept[i] >= NEEDLE_A && kept[i] < NEEDLE_B;
        CHECK(recalls[l] == (double)hit / (NEEDLE_B - NEEDLE_A), "layer %zu: recall %g from %zu needle tokens kept", l, recalls[l], hit);
    }
    EXPECT_OK(kvsieve_gemfilter_calibrate_layers(0, NULL, NULL, NEEDLE_A, NEEDLE_B, &cfg, NULL));

    kvsieve_cache_free(cache);
    for (l = 0; l < CL; l++) {
        free(q[l]);
        free(k[l]);
        free(v[l]);
    }
    section_done("calibration finds the layer holding the needle", before);
}

/* SnapKV, compaction and decode ---------------------------------------------------------- */

enum { XL = 2, XHQ = 4, XN = 100, XPS = 8, XW = 8, XK = 40 };

static void compaction(void) {
    int before = g_failed;
    kvsieve_cache_t *cache = new_cache(XL, HK, D, XPS, 20, dt_f32());
    float *k[XL], *v[XL];
    float kc[XK * HK * D], vc[XK * HK * D], q[XHQ * D], out[XHQ * D], lse[XHQ], ref_out[XHQ * D], ref_lse[XHQ];
    uint32_t keep[XL * HK * XK], keep_indptr[XL * HK + 1];
    int32_t pos[XN];
    size_t l, h, i, len = 0, npos = 0;
    kvsieve_snapkv_config_t cfg;
    test_tensor tq, to;
    uint64_t seq;

    for (l = 0; l < XL; l++) {
        k[l] = rand_floats(XN * HK * D, 2.0f);
        v[l] = rand_floats(XN * HK * D, 1.0f);
    }
    seq = stored(cache, XL, XN, HK, D, k, v);
    kvsieve_snapkv_config_init(&cfg);
    cfg.k = XK;
    cfg.pool_kernel = 7;
    /* Per layer, SnapKV's selection; list layer * HK + h is head h's tokens. */
    keep_indptr[0] = 0;
    for (l = 0; l < XL; l++) {
        float *qw = rand_floats(XW * XHQ * D, 1.0f);
        kvsieve_selection_t *sel = NULL;
        kvsieve_key_source_t src = from_cache(cache, seq, l);
        EXPECT_OK(kvsieve_snapkv(tensor3(&tq, qw, dt_f32(), XW, XHQ, D), &src, &cfg, &sel, NULL, 0, NULL));
        for (h = 0; h < HK; h++) {
            size_t n = 0;
            EXPECT_OK(kvsieve_selection_head(sel, h, keep + (l * HK + h) * XK, XK, &n));
            CHECK(n == XK, "layer %zu head %zu keeps %zu tokens", l, h, n);
            keep_indptr[l * HK + h + 1] = (uint32_t)((l * HK + h + 1) * XK);
        }
        kvsieve_selection_free(sel);
        free(qw);
    }
    EXPECT_OK(kvsieve_cache_compact(cache, seq, KVSIEVE_KEEP_PER_HEAD, keep_indptr, XL * HK, keep, XL * HK * XK));
    EXPECT_OK(kvsieve_cache_seq_len(cache, seq, &len));
    CHECK(len == XK, "%zu tokens after compaction", len);
    EXPECT_OK(kvsieve_cache_positions(cache, seq, pos, XN, &npos));
    for (i = 0; i < XK && npos == XK; i++) {
        if (pos[i] != (int32_t)keep[i]) break;
    }
    CHECK(npos == XK && i == XK, "positions of the first list survive");

    for (l = 0; l < XL; l++) {
        for (i = 0; i < XK; i++) {
            for (h = 0; h < HK; h++) {
                size_t t = keep[(l * HK + h) * XK + i];
                memcpy(kc + (i * HK + h) * D, k[l] + (t * HK + h) * D, D * sizeof(float));
                memcpy(vc + (i * HK + h) * D, v[l] + (t * HK + h) * D, D * sizeof(float));
            }
        }
        for (i = 0; i < XHQ * D; i++) q[i] = rng_uniform(1.0f);
        EXPECT_OK(kvsieve_cache_decode(cache, l, &seq, 1, tensor3(&tq, q, dt_f32(), 1, XHQ, D), tensor3(&to, out, dt_f32(), 1, XHQ, D), lse,
                                       NULL));
        ref_attention(q, kc, vc, XK, XHQ, HK, D, 0.0, 0.0, ref_out, ref_lse);
        CHECK(max_abs_diff(out, ref_out, XHQ * D) < 1e-4 && max_abs_diff(lse, ref_lse, XHQ) < 1e-4,
              "decode at layer %zu after compaction matches the kept tokens of each head (err %g)", l, max_abs_diff(out, ref_out, XHQ * D));
    }
    kvsieve_cache_free(cache);
    for (l = 0; l < XL; l++) {
        free(k[l]);
        free(v[l]);
    }
    section_done("snapkv selection compacts the cache per head; decode equals the reference over the kept tokens", before);
}

/* Bad input ------------------------------------------------------------------------------ */

enum { EN = 30, EHQ = 4 };

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
    kvsieve_cache_t *cache = new_cache(1, HK, D, PS, 4, dt_f32());
    kvsieve_cache_t *pre = NULL;
    kvsieve_cache_config_t pre_cfg = kvsieve_cache_config_default(1, HK, D, PS, 4);
    float *k = rand_floats(EN * HK * D, 1.0f), *v = rand_floats(EN * HK * D, 1.0f), *q = rand_floats(EHQ * D, 1.0f);
    float *qw = rand_floats(4 * EHQ * D, 1.0f);
    float fbuf[EN + 4], pooled[EN];
    uint32_t ubuf[EN + 4];
    double recalls[2];
    size_t out_len = 777, len = 0;
    kvsieve_selection_t *sentinel = (kvsieve_selection_t *)&out_len, *sel = sentinel;
    kvsieve_key_source_t src, both, none, bad_layer, bad_seq, pre_src, flat;
    kvsieve_key_source_t cal_keys[2];
    kvsieve_tensor_t cal_q[2];
    kvsieve_gemfilter_config_t gcfg = kvsieve_gemfilter_config_default(5);
    kvsieve_snapkv_config_t scfg;
    test_tensor tq, tq3, tq_d, tk, tk2, tqw, tqw2, tqw3;
    uint64_t seq = stored(cache, 1, EN, HK, D, &k, &v), pre_seq;

    pre_cfg.dtype = dt_f32();
    pre_cfg.key_rope = KVSIEVE_KEYS_PRE_ROPE;
    EXPECT_OK(kvsieve_cache_new(&pre_cfg, &pre));
    pre_seq = stored(pre, 1, EN, HK, D, &k, &v);

    tensor2(&tq, q, dt_f32(), EHQ, D);
    tensor2(&tq3, q, dt_f32(), 3, D);      /* 3 query heads: not a multiple of 2 KV heads */
    tensor2(&tq_d, q, dt_f32(), EHQ / 2, 2 * D); /* head_dim 64 against keys of 32 */
    src = from_cache(cache, seq, 0);
    both = src;
    both.tensor = tensor3(&tk, k, dt_f32(), EN, HK, D);
    kvsieve_key_source_init(&none);
    bad_layer = from_cache(cache, seq, 1);
    bad_seq = from_cache(cache, seq + 100, 0);
    pre_src = from_cache(pre, pre_seq, 0);
    flat = from_tensor(tensor2(&tk2, k, dt_f32(), EN, HK * D));
    memset(fbuf, 0xab, sizeof fbuf);
    memset(ubuf, 0xab, sizeof ubuf);
    memset(pooled, 0xab, sizeof pooled);

    /* Scores. */
    EXPECT_ERR(kvsieve_gemfilter_scores(NULL, &src, fbuf, EN, &out_len), KVSIEVE_ERROR_NULL_POINTER, "`q`");
    EXPECT_ERR(kvsieve_gemfilter_scores(&tq.t, NULL, fbuf, EN, &out_len), KVSIEVE_ERROR_NULL_POINTER, "`keys`");
    EXPECT_ERR(kvsieve_gemfilter_scores(&tq.t, &none, fbuf, EN, &out_len), KVSIEVE_ERROR_INVALID_ARGUMENT, "`keys`");
    EXPECT_ERR(kvsieve_gemfilter_scores(&tq.t, &both, fbuf, EN, &out_len), KVSIEVE_ERROR_INVALID_ARGUMENT, "both are set");
    EXPECT_ERR(kvsieve_gemfilter_scores(&tq.t, &src, NULL, EN, &out_len), KVSIEVE_ERROR_NULL_POINTER, "`scores`");
    EXPECT_ERR(kvsieve_gemfilter_scores(&tq.t, &src, fbuf, EN - 1, &out_len), KVSIEVE_ERROR_INVALID_ARGUMENT, "`capacity`");
    EXPECT_ERR(kvsieve_gemfilter_scores(&tq3.t, &src, fbuf, EN, &out_len), KVSIEVE_ERROR_SHAPE, "`q`");
    EXPECT_ERR(kvsieve_gemfilter_scores(&tq_d.t, &src, fbuf, EN, &out_len), KVSIEVE_ERROR_SHAPE, "`q`");
    EXPECT_ERR(kvsieve_gemfilter_scores(&tq.t, &bad_layer, fbuf, EN, &out_len), KVSIEVE_ERROR_OUT_OF_RANGE, "`keys.layer`");
    EXPECT_ERR(kvsieve_gemfilter_scores(&tq.t, &bad_seq, fbuf, EN, &out_len), KVSIEVE_ERROR_UNKNOWN_SEQUENCE, "unknown sequence");
    EXPECT_ERR(kvsieve_gemfilter_scores(&tq.t, &pre_src, fbuf, EN, &out_len), KVSIEVE_ERROR_INVALID_ARGUMENT, "`keys`");
    EXPECT_ERR(kvsieve_gemfilter_scores(&tq.t, &flat, fbuf, EN, &out_len), KVSIEVE_ERROR_SHAPE, "`keys.tensor`");
    /* The scores would overwrite the query. */
    EXPECT_ERR(kvsieve_gemfilter_scores(&tq.t, &src, q, EN, &out_len), KVSIEVE_ERROR_INVALID_ARGUMENT, "`scores`");
    CHECK(all_bytes(fbuf, sizeof fbuf, 0xab) && out_len == 777, "scores: buffer and out_len untouched");

    /* Pooling. */
    EXPECT_ERR(kvsieve_avg_pool(k, EN, 0, pooled), KVSIEVE_ERROR_INVALID_ARGUMENT, "`kernel`");
    EXPECT_ERR(kvsieve_avg_pool(k, EN, 4, pooled), KVSIEVE_ERROR_INVALID_ARGUMENT, "`kernel`");
    EXPECT_ERR(kvsieve_avg_pool(NULL, EN, 5, pooled), KVSIEVE_ERROR_NULL_POINTER, "`scores`");
    EXPECT_ERR(kvsieve_avg_pool(k, EN, 5, NULL), KVSIEVE_ERROR_NULL_POINTER, "`out`");
    EXPECT_ERR(kvsieve_avg_pool(pooled, EN, 5, pooled), KVSIEVE_ERROR_INVALID_ARGUMENT, "`out`");
    CHECK(all_bytes(pooled, sizeof pooled, 0xab), "avg_pool: out untouched");

    /* GemFilter selection. */
    gcfg.k = 0;
    EXPECT_ERR(kvsieve_gemfilter_select(&tq.t, &src, &gcfg, ubuf, EN, &out_len), KVSIEVE_ERROR_OUT_OF_RANGE, "`k`");
    gcfg.k = EN + 1;
    EXPECT_ERR(kvsieve_gemfilter_select(&tq.t, &src, &gcfg, ubuf, EN + 4, &out_len), KVSIEVE_ERROR_OUT_OF_RANGE, "`k`");
    gcfg.k = 5;
    gcfg.pool_kernel = 0;
    EXPECT_ERR(kvsieve_gemfilter_select(&tq.t, &src, &gcfg, ubuf, EN, &out_len), KVSIEVE_ERROR_INVALID_ARGUMENT, "`pool_kernel`");
    gcfg.pool_kernel = 6;
    EXPECT_ERR(kvsieve_gemfilter_select(&tq.t, &src, &gcfg, ubuf, EN, &out_len), KVSIEVE_ERROR_INVALID_ARGUMENT, "`pool_kernel`");
    gcfg.pool_kernel = 5;
    gcfg.keep_first = 3;
    gcfg.keep_last = 3;
    EXPECT_ERR(kvsieve_gemfilter_select(&tq.t, &src, &gcfg, ubuf, EN, &out_len), KVSIEVE_ERROR_INVALID_ARGUMENT, "keep_first + keep_last");
    gcfg.keep_first = gcfg.keep_last = 0;
    EXPECT_ERR(kvsieve_gemfilter_select(&tq.t, &src, NULL, ubuf, EN, &out_len), KVSIEVE_ERROR_NULL_POINTER, "`config`");
    EXPECT_ERR(kvsieve_gemfilter_select(&tq.t, &src, &gcfg, ubuf, 4, &out_len), KVSIEVE_ERROR_INVALID_ARGUMENT, "`capacity`");
    EXPECT_ERR(kvsieve_gemfilter_select(&tq.t, &src, &gcfg, NULL, 5, &out_len), KVSIEVE_ERROR_NULL_POINTER, "`indices`");
    EXPECT_ERR(kvsieve_gemfilter_select(&tq3.t, &src, &gcfg, ubuf, EN, &out_len), KVSIEVE_ERROR_SHAPE, "`q`");
    EXPECT_ERR(kvsieve_gemfilter_select(NULL, &src, &gcfg, ubuf, EN, &out_len), KVSIEVE_ERROR_NULL_POINTER, "`q`");
    EXPECT_ERR(kvsieve_gemfilter_select(&tq.t, &none, &gcfg, ubuf, EN, &out_len), KVSIEVE_ERROR_INVALID_ARGUMENT, "`keys`");
    CHECK(all_bytes(ubuf, sizeof ubuf, 0xab) && out_len == 777, "gemfilter_select: indices and out_len untouched");

    /* SnapKV. */
    kvsieve_snapkv_config_init(&scfg);
    scfg.k = 10;
    scfg.pool_kernel = 7;
    tensor3(&tqw, qw, dt_f32(), 4, EHQ, D);
    tensor3(&tqw2, qw, dt_f32(), 4, 3, D);
    tensor3(&tqw3, NULL, dt_f32(), 0, EHQ, D);
    scfg.k = 0;
    EXPECT_ERR(kvsieve_snapkv(&tqw.t, &src, &scfg, &sel, ubuf, EN, &out_len), KVSIEVE_ERROR_OUT_OF_RANGE, "`k`");
    scfg.k = 3; /* fewer than the window */
    EXPECT_ERR(kvsieve_snapkv(&tqw.t, &src, &scfg, &sel, ubuf, EN, &out_len), KVSIEVE_ERROR_OUT_OF_RANGE, "`k`");
    scfg.k = EN + 1;
    EXPECT_ERR(kvsieve_snapkv(&tqw.t, &src, &scfg, &sel, ubuf, EN, &out_len), KVSIEVE_ERROR_OUT_OF_RANGE, "`k`");
    scfg.k = 10;
    scfg.pool_kernel = 0;
    EXPECT_ERR(kvsieve_snapkv(&tqw.t, &src, &scfg, &sel, ubuf, EN, &out_len), KVSIEVE_ERROR_INVALID_ARGUMENT, "`pool_kernel`");
    scfg.pool_kernel = 2;
    EXPECT_ERR(kvsieve_snapkv(&tqw.t, &src, &scfg, &sel, ubuf, EN, &out_len), KVSIEVE_ERROR_INVALID_ARGUMENT, "`pool_kernel`");
    scfg.pool_kernel = 7;
    scfg.scale = NAN;
    EXPECT_ERR(kvsieve_snapkv(&tqw.t, &src, &scfg, &sel, ubuf, EN, &out_len), KVSIEVE_ERROR_INVALID_ARGUMENT, "`scale`");
    scfg.scale = INFINITY;
    EXPECT_ERR(kvsieve_snapkv(&tqw.t, &src, &scfg, &sel, ubuf, EN, &out_len), KVSIEVE_ERROR_INVALID_ARGUMENT, "`scale`");
    scfg.scale = 0.0f;
    EXPECT_ERR(kvsieve_snapkv(&tqw2.t, &src, &scfg, &sel, ubuf, EN, &out_len), KVSIEVE_ERROR_SHAPE, "`q_window`");
    EXPECT_ERR(kvsieve_snapkv(&tq.t, &src, &scfg, &sel, ubuf, EN, &out_len), KVSIEVE_ERROR_SHAPE, "`q_window`");
    EXPECT_ERR(kvsieve_snapkv(&tqw3.t, &src, &scfg, &sel, ubuf, EN, &out_len), KVSIEVE_ERROR_OUT_OF_RANGE, "`q_window`");
    EXPECT_ERR(kvsieve_snapkv(NULL, &src, &scfg, &sel, ubuf, EN, &out_len), KVSIEVE_ERROR_NULL_POINTER, "`q_window`");
    EXPECT_ERR(kvsieve_snapkv(&tqw.t, NULL, &scfg, &sel, ubuf, EN, &out_len), KVSIEVE_ERROR_NULL_POINTER, "`keys`");
    EXPECT_ERR(kvsieve_snapkv(&tqw.t, &src, NULL, &sel, ubuf, EN, &out_len), KVSIEVE_ERROR_NULL_POINTER, "`config`");
    EXPECT_ERR(kvsieve_snapkv(&tqw.t, &src, &scfg, NULL, ubuf, EN, &out_len), KVSIEVE_ERROR_NULL_POINTER, "`out`");
    EXPECT_ERR(kvsieve_snapkv(&tqw.t, &bad_layer, &scfg, &sel, ubuf, EN, &out_len), KVSIEVE_ERROR_OUT_OF_RANGE, "`keys.layer`");
    /* Every head keeps the 4 window tokens and 6 more: at least 10 in the union. */
    EXPECT_ERR(kvsieve_snapkv(&tqw.t, &src, &scfg, &sel, ubuf, 9, &out_len), KVSIEVE_ERROR_INVALID_ARGUMENT, "`union_capacity`");
    EXPECT_ERR(kvsieve_snapkv(&tqw.t, &src, &scfg, &sel, (uint32_t *)qw, EN, &out_len), KVSIEVE_ERROR_INVALID_ARGUMENT, "`union_indices`");
    CHECK(sel == sentinel && all_bytes(ubuf, sizeof ubuf, 0xab) && out_len == 777, "snapkv: out, union buffer and out_union_len untouched");

    /* Calibration. */
    cal_q[0] = cal_q[1] = tq.t;
    cal_keys[0] = cal_keys[1] = src;
    recalls[0] = recalls[1] = -7.0;
    gcfg = kvsieve_gemfilter_config_default(5);
    EXPECT_ERR(kvsieve_gemfilter_calibrate_layers(2, cal_q, cal_keys, 10, 10, &gcfg, recalls), KVSIEVE_ERROR_INVALID_ARGUMENT, "`needle_end`");
    EXPECT_ERR(kvsieve_gemfilter_calibrate_layers(2, NULL, cal_keys, 10, 12, &gcfg, recalls), KVSIEVE_ERROR_NULL_POINTER, "`queries`");
    EXPECT_ERR(kvsieve_gemfilter_calibrate_layers(2, cal_q, NULL, 10, 12, &gcfg, recalls), KVSIEVE_ERROR_NULL_POINTER, "`keys`");
    EXPECT_ERR(kvsieve_gemfilter_calibrate_layers(2, cal_q, cal_keys, 10, 12, NULL, recalls), KVSIEVE_ERROR_NULL_POINTER, "`config`");
    EXPECT_ERR(kvsieve_gemfilter_calibrate_layers(2, cal_q, cal_keys, 10, 12, &gcfg, NULL), KVSIEVE_ERROR_NULL_POINTER, "`recalls`");
    cal_q[1] = tq3.t;
    EXPECT_ERR(kvsieve_gemfilter_calibrate_layers(2, cal_q, cal_keys, 10, 12, &gcfg, recalls), KVSIEVE_ERROR_SHAPE, "`queries[1]`");
    cal_q[1] = tq.t;
    cal_keys[1] = none;
    EXPECT_ERR(kvsieve_gemfilter_calibrate_layers(2, cal_q, cal_keys, 10, 12, &gcfg, recalls), KVSIEVE_ERROR_INVALID_ARGUMENT, "`keys[1]`");
    cal_keys[1] = bad_layer;
    EXPECT_ERR(kvsieve_gemfilter_calibrate_layers(2, cal_q, cal_keys, 10, 12, &gcfg, recalls), KVSIEVE_ERROR_OUT_OF_RANGE,
               "`keys[1].layer`");
    cal_keys[1] = src;
    gcfg.k = EN + 1;
    EXPECT_ERR(kvsieve_gemfilter_calibrate_layers(2, cal_q, cal_keys, 10, 12, &gcfg, recalls), KVSIEVE_ERROR_OUT_OF_RANGE, "`k`");
    gcfg.k = 5;
    gcfg.pool_kernel = 2;
    EXPECT_ERR(kvsieve_gemfilter_calibrate_layers(2, cal_q, cal_keys, 10, 12, &gcfg, recalls), KVSIEVE_ERROR_INVALID_ARGUMENT,
               "`pool_kernel`");
    CHECK(recalls[0] == -7.0 && recalls[1] == -7.0, "calibrate: recalls untouched");

    /* The cache is as it was. */
    EXPECT_OK(kvsieve_cache_seq_len(cache, seq, &len));
    CHECK(len == EN, "the cache still holds %zu tokens", len);

    kvsieve_cache_free(cache);
    kvsieve_cache_free(pre);
    free(k);
    free(v);
    free(q);
    free(qw);
    section_done("gemfilter and snapkv bad input: right codes, parameter named, nothing written", before);
}

int main(void) {
    rng_seed(77);
    scores_and_pooling();
    selection();
    snapkv();
    calibration();
    compaction();
    bad_input();
    return finish();
}
