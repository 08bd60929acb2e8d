/* Versioned structs: every struct a program passes to kvsieve or has it fill begins with
 * struct_size, the size the program was compiled with. A size the library does not know (0,
 * as a struct made with memset or `= {0}` has; one smaller than any layout it knows; one
 * larger than its own, as from a newer header) is refused with
 * KVSIEVE_ERROR_INVALID_ARGUMENT naming `param.struct_size`, and the call changes nothing;
 * a struct kvsieve fills is written up to its struct_size and not a byte past it.
 *
 * Today every struct has one layout, so a smaller struct_size is refused too; reading an
 * older, smaller layout (the new fields taking their defaults) is tested in Rust with two
 * synthetic layouts (args.rs). */
#include "common.h"

enum { HK = 2, HQ = 4, D = 16, PS = 4, LEN = 8, PAGES = 4, CANARY = 32 };

static kvsieve_cache_t *g_cache;
static uint64_t g_seq;
static kvsieve_selection_t *g_sel;
static kvsieve_cluster_index_t *g_ix;
static test_tensor g_q2; /* [HQ, D]: a decode query */
static float g_q[HQ * D];

/* The struct sizes a program must not pass, for a struct whose size is `own`. */
static size_t bad_size(size_t own, int i) {
    return i == 0 ? 0 : i == 1 ? own - sizeof(size_t) : own + sizeof(size_t);
}

static int all_bytes(const void *p, size_t n, unsigned char b) {
    const unsigned char *c = (const unsigned char *)p;
    size_t i;
    for (i = 0; i < n; i++) {
        if (c[i] != b) return 0;
    }
    return 1;
}

static int all_nan(const float *p, size_t n) {
    size_t i;
    for (i = 0; i < n; i++) {
        if (!isnan(p[i])) return 0;
    }
    return 1;
}

static void setup(float *k, float *v) {
    kvsieve_cache_config_t cfg = kvsieve_cache_config_default(1, HK, D, PS, PAGES);
    kvsieve_cluster_config_t cc = kvsieve_cluster_config_default(3);
    kvsieve_key_source_t src;
    test_tensor tk, tv;
    size_t i;

    cfg.dtype = dt_f32();
    EXPECT_OK(kvsieve_cache_new(&cfg, &g_cache));
    EXPECT_OK(kvsieve_cache_create_sequence(g_cache, &g_seq));
    EXPECT_OK(kvsieve_cache_append(g_cache, g_seq, LEN, NULL, NULL));
    EXPECT_OK(kvsieve_cache_write(g_cache, g_seq, 0, 0, tensor3(&tk, k, dt_f32(), LEN, HK, D), tensor3(&tv, v, dt_f32(), LEN, HK, D)));
    EXPECT_OK(kvsieve_selection_dense(HK, LEN, &g_sel));
    kvsieve_key_source_init(&src);
    src.cache = g_cache;
    src.seq = g_seq;
    EXPECT_OK(kvsieve_cluster_index_build(&src, &cc, &g_ix));
    for (i = 0; i < HQ * D; i++) g_q[i] = rng_uniform(1.0f);
    memset(&g_q2, 0, sizeof g_q2);
    g_q2.shape[0] = HQ;
    g_q2.shape[1] = D;
    g_q2.t.data = g_q;
    g_q2.t.device.device_type = KVSIEVE_DEVICE_CPU;
    g_q2.t.ndim = 2;
    g_q2.t.dtype = dt_f32();
    g_q2.t.shape = g_q2.shape;
}

/* The sequence still holds its LEN tokens. */
static int cache_unchanged(void) {
    size_t len = 0;
    return kvsieve_cache_seq_len(g_cache, g_seq, &len) == NULL && len == LEN;
}

static void inputs(const float *k, const float *v) {
    int before = g_failed, i;
    float x[2 * HK * D], x0[2 * HK * D], out[HQ * D], lse[HQ], scores[LEN];
    double drecalls[2] = {-7.0, -7.0};
    int32_t pos[2] = {3, 4}, qo_indptr[2] = {0, 1};
    int32_t indptr[2] = {0, 2}, indices[2] = {0, 1}, last[1] = {PS};
    uint32_t picked[LEN];
    size_t out_len = 777, j;
    kvsieve_cache_t *sentinel_cache = (kvsieve_cache_t *)&g_seq, *new_cache = sentinel_cache;
    kvsieve_selection_t *sentinel_sel = (kvsieve_selection_t *)&g_seq, *sel = sentinel_sel;
    kvsieve_cluster_index_t *sentinel_ix = (kvsieve_cluster_index_t *)&g_seq, *ix = sentinel_ix;
    test_tensor tq, to, tx, tk;
    kvsieve_tensor_t queries[2];

    for (j = 0; j < 2 * HK * D; j++) x[j] = x0[j] = rng_uniform(1.0f);
    for (j = 0; j < LEN; j++) scores[j] = -1.0f, picked[j] = 99;
    for (j = 0; j < HQ * D; j++) out[j] = NAN;
    for (j = 0; j < HQ; j++) lse[j] = NAN;
    tensor3(&tq, g_q, dt_f32(), 1, HQ, D);
    tensor3(&to, out, dt_f32(), 1, HQ, D);
    tensor3(&tx, x, dt_f32(), 2, HK, D);
    tensor3(&tk, (void *)k, dt_f32(), LEN, HK, D);
    queries[0] = queries[1] = g_q2.t;

    for (i = 0; i < 3; i++) {
        kvsieve_cache_config_t cfg = kvsieve_cache_config_default(1, HK, D, PS, PAGES);
        kvsieve_attention_params_t params;
        kvsieve_rope_config_t rope;
        kvsieve_paged_kv_t kv;
        kvsieve_streaming_window_t windows[HK];
        kvsieve_key_source_t src, keys[2];
        kvsieve_gemfilter_config_t gcfg = kvsieve_gemfilter_config_default(4);
        kvsieve_snapkv_config_t scfg;
        kvsieve_page_bounds_config_t pb;
        kvsieve_cluster_config_t cc = kvsieve_cluster_config_default(3);
        kvsieve_retrieve_config_t rc = kvsieve_retrieve_config_default(4);
        kvsieve_retrieve_stats_t st;

        /* A cache configuration. */
        cfg.struct_size = bad_size(sizeof cfg, i);
        EXPECT_ERR(kvsieve_cache_new(&cfg, &new_cache), KVSIEVE_ERROR_INVALID_ARGUMENT, "`config.struct_size`");
        CHECK(new_cache == sentinel_cache, "cache_new: out untouched");

        /* Attention parameters, and the RoPE parameters alone and inside them. */
        kvsieve_attention_params_init(&params);
        params.struct_size = bad_size(sizeof params, i);
        EXPECT_ERR(kvsieve_cache_decode(g_cache, 0, &g_seq, 1, &tq.t, &to.t, lse, &params), KVSIEVE_ERROR_INVALID_ARGUMENT,
                   "`params.struct_size`");
        kvsieve_rope_config_init(&rope);
        rope.theta = 10000.0f;
        rope.struct_size = bad_size(sizeof rope, i);
        EXPECT_ERR(kvsieve_apply_rope(&tx.t, pos, 2, &rope), KVSIEVE_ERROR_INVALID_ARGUMENT, "`rope.struct_size`");
        CHECK(memcmp(x, x0, sizeof x) == 0, "apply_rope: x untouched");
        kvsieve_attention_params_init(&params);
        params.rope = &rope;
        EXPECT_ERR(kvsieve_cache_decode(g_cache, 0, &g_seq, 1, &tq.t, &to.t, lse, &params), KVSIEVE_ERROR_INVALID_ARGUMENT,
                   "`rope.struct_size`");

        /* A paged-memory descriptor: pages 0 and 1 of the prompt's K/V, packed NHD. */
        kvsieve_paged_kv_init(&kv);
        kv.k = k;
        kv.v = v;
        kv.dtype = dt_f32();
        kv.num_pages = 2, kv.page_size = PS, kv.num_kv_heads = HK, kv.head_dim = D;
        kv.k_strides[0] = kv.v_strides[0] = PS * HK * D;
        kv.k_strides[1] = kv.v_strides[1] = HK * D;
        kv.k_strides[2] = kv.v_strides[2] = D;
        kv.batch = 1, kv.indptr = indptr, kv.indices = indices, kv.last_page_len = last;
        EXPECT_OK(kvsieve_paged_decode(&kv, &tq.t, &to.t, NULL, NULL));
        for (j = 0; j < HQ * D; j++) out[j] = NAN;
        kv.struct_size = bad_size(sizeof kv, i);
        EXPECT_ERR(kvsieve_paged_decode(&kv, &tq.t, &to.t, lse, NULL), KVSIEVE_ERROR_INVALID_ARGUMENT, "`kv.struct_size`");

        /* Prefill windows: the first entry's size, then an entry differing from the first. */
        init_windows(windows, HK);
        windows[0].struct_size = bad_size(sizeof windows[0], i);
        EXPECT_ERR(kvsieve_cache_prefill_sparse(g_cache, 0, &g_seq, 1, &tq.t, qo_indptr, &g_sel, windows, HK, &to.t, lse, NULL),
                   KVSIEVE_ERROR_INVALID_ARGUMENT, "`windows[0].struct_size`");
        init_windows(windows, HK);
        windows[1].struct_size = bad_size(sizeof windows[1], i);
        EXPECT_ERR(kvsieve_paged_prefill_sparse(&kv, &tq.t, qo_indptr, &g_sel, windows, HK, &to.t, lse, NULL),
                   KVSIEVE_ERROR_INVALID_ARGUMENT, "`kv.struct_size`");
        kv.struct_size = sizeof kv;
        EXPECT_ERR(kvsieve_paged_prefill_sparse(&kv, &tq.t, qo_indptr, &g_sel, windows, HK, &to.t, lse, NULL),
                   KVSIEVE_ERROR_INVALID_ARGUMENT, "`windows[1].struct_size`");
        CHECK(all_nan(out, HQ * D) && all_nan(lse, HQ), "attention: out and lse untouched");

        /* Key sources, alone and in an array. */
        kvsieve_key_source_init(&src);
        src.tensor = &tk.t;
        keys[0] = keys[1] = src;
        src.struct_size = bad_size(sizeof src, i);
        EXPECT_ERR(kvsieve_gemfilter_scores(&g_q2.t, &src, scores, LEN, &out_len), KVSIEVE_ERROR_INVALID_ARGUMENT, "`keys.struct_size`");
        EXPECT_ERR(kvsieve_cluster_index_build(&src, &cc, &ix), KVSIEVE_ERROR_INVALID_ARGUMENT, "`keys.struct_size`");
        keys[1].struct_size = bad_size(sizeof src, i);
        EXPECT_ERR(kvsieve_gemfilter_calibrate_layers(2, queries, keys, 1, 2, &gcfg, drecalls), KVSIEVE_ERROR_INVALID_ARGUMENT,
                   "`keys[1].struct_size`");
        keys[0].struct_size = bad_size(sizeof src, i);
        EXPECT_ERR(kvsieve_gemfilter_calibrate_layers(2, queries, keys, 1, 2, &gcfg, drecalls), KVSIEVE_ERROR_INVALID_ARGUMENT,
                   "`keys[0].struct_size`");
        src.struct_size = sizeof src;

        /* GemFilter and SnapKV options. */
        gcfg.struct_size = bad_size(sizeof gcfg, i);
        EXPECT_ERR(kvsieve_gemfilter_select(&g_q2.t, &src, &gcfg, picked, LEN, &out_len), KVSIEVE_ERROR_INVALID_ARGUMENT,
                   "`config.struct_size`");
        keys[0].struct_size = keys[1].struct_size = sizeof src;
        EXPECT_ERR(kvsieve_gemfilter_calibrate_layers(2, queries, keys, 1, 2, &gcfg, drecalls), KVSIEVE_ERROR_INVALID_ARGUMENT,
                   "`config.struct_size`");
        kvsieve_snapkv_config_init(&scfg);
        scfg.k = 4;
        scfg.struct_size = bad_size(sizeof scfg, i);
        EXPECT_ERR(kvsieve_snapkv(&tq.t, &src, &scfg, &sel, picked, LEN, &out_len), KVSIEVE_ERROR_INVALID_ARGUMENT,
                   "`config.struct_size`");
        CHECK(out_len == 777 && scores[0] == -1.0f && picked[0] == 99 && drecalls[0] == -7.0 && drecalls[1] == -7.0,
              "gemfilter and snapkv: outputs untouched");

        /* Page-bound settings. */
        kvsieve_page_bounds_config_init(&pb);
        pb.budget_tokens = 4;
        pb.struct_size = bad_size(sizeof pb, i);
        EXPECT_ERR(kvsieve_selection_page_bounds(g_cache, g_seq, 0, &g_q2.t, &pb, &sel), KVSIEVE_ERROR_INVALID_ARGUMENT,
                   "`config.struct_size`");

        /* Cluster build and retrieval options. */
        kvsieve_key_source_init(&src);
        src.cache = g_cache;
        src.seq = g_seq;
        cc.struct_size = bad_size(sizeof cc, i);
        EXPECT_ERR(kvsieve_cluster_index_build(&src, &cc, &ix), KVSIEVE_ERROR_INVALID_ARGUMENT, "`config.struct_size`");
        CHECK(ix == sentinel_ix, "cluster_index_build: out untouched");
        kvsieve_retrieve_stats_init(&st);
        st.tokens_kept = 4242;
        rc.struct_size = bad_size(sizeof rc, i);
        EXPECT_ERR(kvsieve_cluster_index_retrieve(g_ix, &g_q2.t, &rc, &sel, &st), KVSIEVE_ERROR_INVALID_ARGUMENT, "`config.struct_size`");
        CHECK(sel == sentinel_sel && st.tokens_kept == 4242, "selections: out and stats untouched");
        CHECK(cache_unchanged(), "the cache is as it was");
    }
    section_done("input structs of an unknown struct_size are refused by name, nothing changed", before);
}

/* Calls that fill a versioned struct at `out`. */
static kvsieve_error_t *fill_cache_stats(void *out) { return kvsieve_cache_stats(g_cache, (kvsieve_cache_stats_t *)out); }
static kvsieve_error_t *fill_cache_config(void *out) { return kvsieve_cache_get_config(g_cache, (kvsieve_cache_config_t *)out); }
static kvsieve_error_t *fill_selection_stats(void *out) {
    return kvsieve_selection_stats(g_sel, (kvsieve_selection_stats_t *)out, NULL, 0);
}
static kvsieve_error_t *fill_cluster_config(void *out) {
    return kvsieve_cluster_index_get_config(g_ix, (kvsieve_cluster_config_t *)out);
}
static kvsieve_selection_t *g_retrieved;
static kvsieve_error_t *fill_retrieve_stats(void *out) {
    kvsieve_retrieve_config_t rc = kvsieve_retrieve_config_default(4);
    kvsieve_selection_t *sentinel = (kvsieve_selection_t *)&g_seq, *sel = sentinel;
    kvsieve_error_t *err = kvsieve_cluster_index_retrieve(g_ix, &g_q2.t, &rc, &sel, (kvsieve_retrieve_stats_t *)out);
    if (err) {
        CHECK(sel == sentinel, "retrieve: out untouched");
    } else {
        kvsieve_selection_free(g_retrieved);
        g_retrieved = sel;
    }
    return err;
}

/* A struct of `own` bytes at the start of a buffer of canary bytes (0x5a): refused for every
 * other struct_size, with nothing written; with its own, written up to its end, the canary
 * after it intact, struct_size left as it was. */
static void check_out(const char *name, kvsieve_error_t *(*fill)(void *), size_t own, const char *needle) {
    union {
        size_t size;
        double d;
        void *p;
        unsigned char bytes[256];
    } buf;
    int i;
    for (i = 0; i < 3; i++) {
        size_t bad = bad_size(own, i);
        memset(buf.bytes, 0x5a, sizeof buf.bytes);
        buf.size = bad;
        EXPECT_ERR(fill(buf.bytes), KVSIEVE_ERROR_INVALID_ARGUMENT, needle);
        CHECK(buf.size == bad && all_bytes(buf.bytes + sizeof(size_t), own + CANARY - sizeof(size_t), 0x5a),
              "%s: struct_size %zu: nothing written", name, bad);
    }
    memset(buf.bytes, 0x5a, sizeof buf.bytes);
    buf.size = own;
    EXPECT_OK(fill(buf.bytes));
    CHECK(buf.size == own && !all_bytes(buf.bytes + sizeof(size_t), own - sizeof(size_t), 0x5a) &&
              all_bytes(buf.bytes + own, CANARY, 0x5a),
          "%s: written up to struct_size and not past it", name);
}

static void outputs(void) {
    int before = g_failed;
    kvsieve_cache_stats_t cs;
    check_out("cache_stats", fill_cache_stats, sizeof(kvsieve_cache_stats_t), "`out.struct_size`");
    check_out("cache_get_config", fill_cache_config, sizeof(kvsieve_cache_config_t), "`out.struct_size`");
    check_out("selection_stats", fill_selection_stats, sizeof(kvsieve_selection_stats_t), "`out.struct_size`");
    check_out("cluster_index_get_config", fill_cluster_config, sizeof(kvsieve_cluster_config_t), "`out.struct_size`");
    check_out("cluster_index_retrieve stats", fill_retrieve_stats, sizeof(kvsieve_retrieve_stats_t), "`stats.struct_size`");
    /* A struct from its initialiser receives every field. */
    kvsieve_cache_stats_init(&cs);
    EXPECT_OK(kvsieve_cache_stats(g_cache, &cs));
    CHECK(cs.struct_size == sizeof cs && cs.pages_total == PAGES && cs.num_tokens == LEN, "cache_stats from kvsieve_cache_stats_init");
    section_done("output structs: another struct_size refused untouched, their own written and no byte past it", before);
}

int main(void) {
    float *k = rand_floats(LEN * HK * D, 1.0f), *v = rand_floats(LEN * HK * D, 1.0f);
    rng_seed(11);
    setup(k, v);
    inputs(k, v);
    outputs();
    kvsieve_selection_free(g_retrieved);
    kvsieve_selection_free(g_sel);
    kvsieve_cluster_index_free(g_ix);
    kvsieve_cache_free(g_cache);
    free(k);
    free(v);
    return finish();
}
