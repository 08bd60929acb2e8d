/* Bad input to the selection, policy and sparse-attention entry points: each call must fail
 * with the right code and a message naming the parameter, and change nothing (out-parameters,
 * output buffers and the cache's sequences stay as they were). */
#include "common.h"

enum { LAYERS = 2, HK = 2, HQ = 4, D = 16, PS = 4, LEN = 6 };

static kvsieve_cache_t *g_cache;
static uint64_t g_seq; /* LEN tokens at positions 10.., written for both layers */
static float g_q[HQ * D];

static kvsieve_cache_t *new_cache(size_t pages, uint32_t key_rope, bool bounds) {
    kvsieve_cache_t *cache = NULL;
    kvsieve_cache_config_t cfg = kvsieve_cache_config_default(LAYERS, HK, D, PS, pages);
    cfg.dtype = dt_f32();
    cfg.key_rope = key_rope;
    cfg.track_key_bounds = bounds;
    EXPECT_OK(kvsieve_cache_new(&cfg, &cache));
    return cache;
}

static uint64_t filled_sequence(kvsieve_cache_t *cache) {
    uint64_t seq = 0;
    int32_t pos[LEN];
    float *k = rand_floats(LEN * HK * D, 1.0f), *v = rand_floats(LEN * HK * D, 1.0f);
    test_tensor tk, tv;
    size_t i;
    for (i = 0; i < LEN; i++) pos[i] = (int32_t)(10 + i);
    EXPECT_OK(kvsieve_cache_create_sequence(cache, &seq));
    EXPECT_OK(kvsieve_cache_append(cache, seq, LEN, pos, NULL));
    for (i = 0; i < LAYERS; i++)
        EXPECT_OK(kvsieve_cache_write(cache, seq, i, 0, tensor3(&tk, k, dt_f32(), LEN, HK, D), tensor3(&tv, v, dt_f32(), LEN, HK, D)));
    free(k);
    free(v);
    return seq;
}

/* The sequence still holds LEN tokens at positions 10.. and decodes as before. */
static float g_ref_out[HQ * D];
static void expect_seq_unchanged(const char *after) {
    size_t len = 99, n = 99, i;
    int32_t pos[LEN + 4];
    float out[HQ * D];
    test_tensor tq, to;
    int same = 1;
    EXPECT_OK(kvsieve_cache_seq_len(g_cache, g_seq, &len));
    EXPECT_OK(kvsieve_cache_positions(g_cache, g_seq, pos, LEN + 4, &n));
    for (i = 0; i < LEN && n == LEN; i++) same &= pos[i] == (int32_t)(10 + i);
    EXPECT_OK(kvsieve_cache_decode(g_cache, 1, &g_seq, 1, tensor3(&tq, g_q, dt_f32(), 1, HQ, D),
                                   tensor3(&to, out, dt_f32(), 1, HQ, D), NULL, NULL));
    CHECK(len == LEN && n == LEN && same && memcmp(out, g_ref_out, sizeof out) == 0, "sequence unchanged after %s (len %zu)",
          after, len);
}

static void construction(void) {
    int before = g_failed;
    kvsieve_selection_t *sentinel = (kvsieve_selection_t *)&g_seq, *out = sentinel, *a = NULL, *b = NULL;
    uint32_t indptr[3] = {0, 2, 4}, indices[4] = {1, 3, 0, 5};

    EXPECT_ERR(kvsieve_selection_from_csr(6, NULL, 3, indices, 4, &out), KVSIEVE_ERROR_NULL_POINTER, "`head_indptr`");
    EXPECT_ERR(kvsieve_selection_from_csr(6, indptr, 3, NULL, 4, &out), KVSIEVE_ERROR_NULL_POINTER, "`indices`");
    EXPECT_ERR(kvsieve_selection_from_csr(6, indptr, 3, indices, 4, NULL), KVSIEVE_ERROR_NULL_POINTER, "`out`");
    EXPECT_ERR(kvsieve_selection_from_csr(6, indptr, 1, indices, 0, &out), KVSIEVE_ERROR_SHAPE, "`head_indptr`");
    indptr[0] = 1;
    EXPECT_ERR(kvsieve_selection_from_csr(6, indptr, 3, indices, 4, &out), KVSIEVE_ERROR_INVALID_ARGUMENT, "head_indptr[0] == 0");
    indptr[0] = 0, indptr[1] = 5;
    EXPECT_ERR(kvsieve_selection_from_csr(6, indptr, 3, indices, 4, &out), KVSIEVE_ERROR_INVALID_ARGUMENT, "non-decreasing");
    indptr[1] = 2;
    EXPECT_ERR(kvsieve_selection_from_csr(6, indptr, 3, indices, 3, &out), KVSIEVE_ERROR_INVALID_ARGUMENT, "`head_indptr`");
    /* Unsorted within a head, a duplicate, an index past seq_len. */
    indices[1] = 0;
    EXPECT_ERR(kvsieve_selection_from_csr(6, indptr, 3, indices, 4, &out), KVSIEVE_ERROR_INVALID_ARGUMENT,
               "indices[1] = 0 is not greater than the previous index 1 in head 0");
    indices[1] = 1;
    EXPECT_ERR(kvsieve_selection_from_csr(6, indptr, 3, indices, 4, &out), KVSIEVE_ERROR_INVALID_ARGUMENT, "`indices`");
    indices[1] = 3;
    EXPECT_ERR(kvsieve_selection_from_csr(5, indptr, 3, indices, 4, &out), KVSIEVE_ERROR_OUT_OF_RANGE, "`indices[3]`");
    EXPECT_ERR(kvsieve_selection_same_for_all_heads(2, 6, indices + 1, 3, &out), KVSIEVE_ERROR_INVALID_ARGUMENT, "`indices`");
    EXPECT_ERR(kvsieve_selection_same_for_all_heads(0, 6, indices, 2, &out), KVSIEVE_ERROR_INVALID_ARGUMENT, "`num_kv_heads`");
    EXPECT_ERR(kvsieve_selection_dense(0, 6, &out), KVSIEVE_ERROR_INVALID_ARGUMENT, "`num_kv_heads`");
    /* A window of 0 tokens hides the query's own context. */
    EXPECT_ERR(kvsieve_selection_streaming(2, 6, 4, 0, &out), KVSIEVE_ERROR_INVALID_ARGUMENT, "`window`");
    EXPECT_ERR(kvsieve_selection_lambda(2, 6, 4, 0, &out), KVSIEVE_ERROR_INVALID_ARGUMENT, "`local`");
    CHECK(out == sentinel, "out untouched by failed constructors");

    EXPECT_OK(kvsieve_selection_dense(2, 6, &a));
    EXPECT_OK(kvsieve_selection_dense(2, 7, &b));
    EXPECT_ERR(kvsieve_selection_union(a, b, &out), KVSIEVE_ERROR_INVALID_ARGUMENT, "`other`");
    EXPECT_ERR(kvsieve_selection_intersection(a, NULL, &out), KVSIEVE_ERROR_NULL_POINTER, "`other`");
    EXPECT_ERR(kvsieve_selection_union(NULL, b, &out), KVSIEVE_ERROR_NULL_POINTER, "`selection`");
    CHECK(out == sentinel, "out untouched by failed union and intersection");
    kvsieve_selection_free(a);
    kvsieve_selection_free(b);
    kvsieve_selection_free(NULL);
    section_done("selection construction errors", before);
}

static void inspection(void) {
    int before = g_failed;
    kvsieve_selection_t *sel = NULL;
    uint32_t buf[16];
    size_t value = 77, per_head[4] = {7, 7, 7, 7}, i;
    kvsieve_selection_stats_t st;
    int untouched = 1;

    EXPECT_OK(kvsieve_selection_streaming(2, 20, 2, 3, &sel)); /* 5 tokens per head */
    memset(buf, 0xab, sizeof buf);
    memset(&st, 0xab, sizeof st);
    st.struct_size = sizeof st;
    EXPECT_ERR(kvsieve_selection_num_kv_heads(NULL, &value), KVSIEVE_ERROR_NULL_POINTER, "`selection`");
    EXPECT_ERR(kvsieve_selection_seq_len(sel, NULL), KVSIEVE_ERROR_NULL_POINTER, "`out`");
    EXPECT_ERR(kvsieve_selection_head(sel, 2, buf, 16, &value), KVSIEVE_ERROR_OUT_OF_RANGE, "`head`");
    EXPECT_ERR(kvsieve_selection_head(sel, 0, buf, 4, &value), KVSIEVE_ERROR_INVALID_ARGUMENT, "`capacity`");
    EXPECT_ERR(kvsieve_selection_head(sel, 0, NULL, 8, &value), KVSIEVE_ERROR_NULL_POINTER, "`indices`");
    EXPECT_ERR(kvsieve_selection_indices(sel, buf, 9, &value), KVSIEVE_ERROR_INVALID_ARGUMENT, "room for at least 10");
    EXPECT_ERR(kvsieve_selection_head_indptr(sel, buf, 2, &value), KVSIEVE_ERROR_INVALID_ARGUMENT, "`capacity`");
    EXPECT_ERR(kvsieve_selection_stats(sel, &st, per_head, 1), KVSIEVE_ERROR_INVALID_ARGUMENT, "`per_head_capacity`");
    EXPECT_ERR(kvsieve_selection_stats(sel, NULL, per_head, 4), KVSIEVE_ERROR_NULL_POINTER, "`out`");
    for (i = 0; i < 16; i++) untouched &= buf[i] == 0xababababu;
    for (i = 0; i < 4; i++) untouched &= per_head[i] == 7;
    CHECK(untouched && value == 77 && st.total == (size_t)0xababababababababull, "buffers and out-parameters untouched");
    kvsieve_selection_free(sel);
    section_done("selection inspection errors", before);
}

static void policies(void) {
    int before = g_failed;
    kvsieve_policy_t *sentinel = (kvsieve_policy_t *)&g_seq, *p = sentinel, *good = NULL;
    kvsieve_error_t *err;
    char buf[8];
    size_t size = 77;
    uint32_t mode = 77;

    EXPECT_ERR(kvsieve_policy_parse(NULL, &p), KVSIEVE_ERROR_NULL_POINTER, "`text`");
    EXPECT_ERR(kvsieve_policy_parse("dense", NULL), KVSIEVE_ERROR_NULL_POINTER, "`out`");
    err = kvsieve_policy_parse("sinks=4;window=8;", &p);
    CHECK(kvsieve_error_parse_offset(err) == 8, "second default spec at byte 8 (%lld)", (long long)kvsieve_error_parse_offset(err));
    EXPECT_ERR(err, KVSIEVE_ERROR_PARSE, "parse error at byte 8");
    EXPECT_ERR(kvsieve_policy_parse("window=-4", &p), KVSIEVE_ERROR_PARSE, "byte 7");
    EXPECT_ERR(kvsieve_policy_parse("window=99999999999999999999999", &p), KVSIEVE_ERROR_PARSE, "byte 7");
    CHECK(p == sentinel, "out untouched by failed parses");
    err = kvsieve_policy_parse(NULL, &p);
    CHECK(kvsieve_error_parse_offset(err) == -1 && kvsieve_error_parse_offset(NULL) == -1, "parse offset -1 for other errors");
    kvsieve_error_free(err);

    EXPECT_OK(kvsieve_policy_parse("sinks=4,window=1024", &good));
    memset(buf, 'x', sizeof buf);
    EXPECT_ERR(kvsieve_policy_to_string(NULL, buf, 8, &size), KVSIEVE_ERROR_NULL_POINTER, "`policy`");
    EXPECT_ERR(kvsieve_policy_to_string(good, NULL, 0, NULL), KVSIEVE_ERROR_NULL_POINTER, "`out_size`");
    EXPECT_ERR(kvsieve_policy_to_string(good, buf, 8, &size), KVSIEVE_ERROR_INVALID_ARGUMENT, "room for at least 20 bytes");
    CHECK(size == 77 && memcmp(buf, "xxxxxxxx", 8) == 0, "buffer and size untouched by a failed to_string");
    EXPECT_ERR(kvsieve_policy_validate(NULL, 2, 2), KVSIEVE_ERROR_NULL_POINTER, "`policy`");
    EXPECT_ERR(kvsieve_policy_position_mode(good, 0, NULL, NULL), KVSIEVE_ERROR_NULL_POINTER, "`out_mode`");
    EXPECT_ERR(kvsieve_policy_position_mode(NULL, 0, &mode, NULL), KVSIEVE_ERROR_NULL_POINTER, "`policy`");
    CHECK(mode == 77, "mode untouched");
    kvsieve_policy_free(good);
    kvsieve_policy_free(NULL);
    section_done("policy errors", before);
}

static void selection_on_cache(void) {
    int before = g_failed;
    kvsieve_selection_t *sentinel = (kvsieve_selection_t *)&g_seq, *out = sentinel;
    kvsieve_page_bounds_config_t pb;
    kvsieve_cache_t *no_bounds = new_cache(4, KVSIEVE_KEYS_POST_ROPE, false);
    kvsieve_cache_t *pre = new_cache(4, KVSIEVE_KEYS_PRE_ROPE, true);
    uint64_t s1 = filled_sequence(no_bounds), s2 = filled_sequence(pre);
    kvsieve_policy_t *p = NULL, *bad = NULL;
    test_tensor tq;

    kvsieve_page_bounds_config_init(&pb);
    pb.budget_tokens = 0;
    tensor3(&tq, g_q, dt_f32(), 1, HQ, D);
    EXPECT_ERR(kvsieve_selection_page_bounds(g_cache, g_seq, 0, &tq.t, &pb, &out), KVSIEVE_ERROR_INVALID_ARGUMENT,
               "`budget_tokens`");
    pb.budget_tokens = 4;
    EXPECT_ERR(kvsieve_selection_page_bounds(g_cache, g_seq, 0, &tq.t, NULL, &out), KVSIEVE_ERROR_NULL_POINTER, "`config`");
    EXPECT_ERR(kvsieve_selection_page_bounds(g_cache, g_seq, 2, &tq.t, &pb, &out), KVSIEVE_ERROR_OUT_OF_RANGE, "`layer`");
    EXPECT_ERR(kvsieve_selection_page_bounds(g_cache, 999, 0, &tq.t, &pb, &out), KVSIEVE_ERROR_UNKNOWN_SEQUENCE, "999");
    EXPECT_ERR(kvsieve_selection_page_bounds(no_bounds, s1, 0, &tq.t, &pb, &out), KVSIEVE_ERROR_INVALID_ARGUMENT,
               "`track_key_bounds`");
    EXPECT_ERR(kvsieve_selection_page_bounds(pre, s2, 0, &tq.t, &pb, &out), KVSIEVE_ERROR_INVALID_ARGUMENT, "`key_rope`");
    tensor3(&tq, g_q, dt_f32(), 1, HQ, D / 2);
    EXPECT_ERR(kvsieve_selection_page_bounds(g_cache, g_seq, 0, &tq.t, &pb, &out), KVSIEVE_ERROR_SHAPE, "`q`");
    tensor3(&tq, g_q, dt_f32(), 1, 3, D);
    EXPECT_ERR(kvsieve_selection_page_bounds(g_cache, g_seq, 0, &tq.t, &pb, &out), KVSIEVE_ERROR_INVALID_ARGUMENT,
               "multiple of num_kv_heads");
    tensor3(&tq, g_q, dt_f32(), 2, HQ / 2, D);
    EXPECT_ERR(kvsieve_selection_page_bounds(g_cache, g_seq, 0, &tq.t, &pb, &out), KVSIEVE_ERROR_SHAPE, "`q`");

    tensor3(&tq, g_q, dt_f32(), 1, HQ, D);
    EXPECT_OK(kvsieve_policy_parse("sinks=1,window=2", &p));
    EXPECT_OK(kvsieve_policy_parse("window=2;heads=0.3:dense", &bad));
    EXPECT_ERR(kvsieve_policy_select(p, g_cache, g_seq, 2, &tq.t, &out), KVSIEVE_ERROR_OUT_OF_RANGE, "`layer`");
    EXPECT_ERR(kvsieve_policy_select(bad, g_cache, g_seq, 0, &tq.t, &out), KVSIEVE_ERROR_OUT_OF_RANGE, "heads=0.3:dense");
    EXPECT_ERR(kvsieve_policy_select(NULL, g_cache, g_seq, 0, &tq.t, &out), KVSIEVE_ERROR_NULL_POINTER, "`policy`");
    EXPECT_ERR(kvsieve_policy_select(p, NULL, g_seq, 0, &tq.t, &out), KVSIEVE_ERROR_NULL_POINTER, "`cache`");
    EXPECT_ERR(kvsieve_policy_select(p, g_cache, g_seq, 0, NULL, &out), KVSIEVE_ERROR_NULL_POINTER, "`q`");
    CHECK(out == sentinel, "out untouched by failed selections");
    kvsieve_policy_free(p);
    kvsieve_policy_free(bad);
    kvsieve_cache_free(no_bounds);
    kvsieve_cache_free(pre);
    section_done("selection on a cache errors", before);
}

static int all_nan(const float *p, size_t n) {
    size_t i;
    for (i = 0; i < n; i++) {
        if (!isnan(p[i])) return 0;
    }
    return 1;
}

static void sparse_attention(void) {
    int before = g_failed;
    float out[2 * HQ * D], lse[2 * HQ];
    test_tensor tq, to;
    kvsieve_selection_t *good = NULL, *short_sel = NULL, *three_heads = NULL, *sels[2];
    kvsieve_selection_t *sentinels[2] = {(kvsieve_selection_t *)&g_seq, (kvsieve_selection_t *)&g_q};
    kvsieve_streaming_window_t windows[3];
    kvsieve_policy_t *p = NULL, *bad = NULL;
    int32_t qo_indptr[2] = {0, 2};
    uint64_t ids[2];
    size_t i;

    for (i = 0; i < 2 * HQ * D; i++) out[i] = NAN;
    for (i = 0; i < 2 * HQ; i++) lse[i] = NAN;
    ids[0] = ids[1] = g_seq;
    EXPECT_OK(kvsieve_selection_streaming(HK, LEN, 1, 2, &good));
    EXPECT_OK(kvsieve_selection_streaming(HK, LEN - 1, 1, 2, &short_sel)); /* made for another length */
    EXPECT_OK(kvsieve_selection_dense(3, LEN, &three_heads));
    tensor3(&tq, g_q, dt_f32(), 1, HQ, D);
    tensor3(&to, out, dt_f32(), 1, HQ, D);

    EXPECT_ERR(kvsieve_cache_decode_sparse(g_cache, 0, &g_seq, 1, &tq.t, NULL, &to.t, lse, NULL), KVSIEVE_ERROR_NULL_POINTER,
               "`selections`");
    sels[0] = good, sels[1] = NULL;
    EXPECT_ERR(kvsieve_cache_decode_sparse(g_cache, 0, ids, 2, tensor3(&tq, g_q, dt_f32(), 2, HQ / 2, D), sels,
                                           tensor3(&to, out, dt_f32(), 2, HQ / 2, D), lse, NULL),
               KVSIEVE_ERROR_NULL_POINTER, "`selections[1]`");
    tensor3(&tq, g_q, dt_f32(), 1, HQ, D);
    tensor3(&to, out, dt_f32(), 1, HQ, D);
    EXPECT_ERR(kvsieve_cache_decode_sparse(g_cache, 0, &g_seq, 1, &tq.t, &short_sel, &to.t, lse, NULL),
               KVSIEVE_ERROR_INVALID_ARGUMENT, "`selections[0]`: expected a selection over the sequence's 6 tokens, built over 5");
    EXPECT_ERR(kvsieve_cache_decode_sparse(g_cache, 0, &g_seq, 1, &tq.t, &three_heads, &to.t, lse, NULL), KVSIEVE_ERROR_SHAPE,
               "`selections[0]`");
    EXPECT_ERR(kvsieve_cache_decode_sparse(g_cache, 2, &g_seq, 1, &tq.t, &good, &to.t, lse, NULL), KVSIEVE_ERROR_OUT_OF_RANGE,
               "`layer`");
    EXPECT_ERR(kvsieve_cache_decode_sparse(g_cache, 0, &g_seq, 1, &tq.t, &good, &to.t, (float *)g_q, NULL),
               KVSIEVE_ERROR_INVALID_ARGUMENT, "`lse`");

    /* Prefill windows: a window of 0 with sinks, a count that is not num_kv_heads. */
    init_windows(windows, 3);
    windows[1].sinks = 2;
    tensor3(&tq, g_q, dt_f32(), 2, HQ / 2, D);
    tensor3(&to, out, dt_f32(), 2, HQ / 2, D);
    EXPECT_ERR(kvsieve_cache_prefill_sparse(g_cache, 0, &g_seq, 1, &tq.t, qo_indptr, &good, windows, HK, &to.t, lse, NULL),
               KVSIEVE_ERROR_INVALID_ARGUMENT, "`windows[1].sinks`");
    windows[1].sinks = 0;
    EXPECT_ERR(kvsieve_cache_prefill_sparse(g_cache, 0, &g_seq, 1, &tq.t, qo_indptr, &good, windows, 3, &to.t, lse, NULL),
               KVSIEVE_ERROR_SHAPE, "`windows`");
    EXPECT_ERR(kvsieve_cache_prefill_sparse(g_cache, 0, &g_seq, 1, &tq.t, qo_indptr, &good, NULL, HK, &to.t, lse, NULL),
               KVSIEVE_ERROR_NULL_POINTER, "`windows`");
    EXPECT_ERR(kvsieve_cache_prefill_sparse(g_cache, 0, &g_seq, 1, &tq.t, qo_indptr, &short_sel, NULL, 0, &to.t, lse, NULL),
               KVSIEVE_ERROR_INVALID_ARGUMENT, "`selections[0]`");
    EXPECT_ERR(kvsieve_cache_prefill_sparse(g_cache, 0, &g_seq, 1, &tq.t, NULL, &good, NULL, 0, &to.t, lse, NULL),
               KVSIEVE_ERROR_NULL_POINTER, "`qo_indptr`");

    /* Under a policy: invalid policies, a layer out of range; out_selections untouched. */
    EXPECT_OK(kvsieve_policy_parse("sinks=1,window=2", &p));
    EXPECT_OK(kvsieve_policy_parse("window=0", &bad));
    tensor3(&tq, g_q, dt_f32(), 1, HQ, D);
    tensor3(&to, out, dt_f32(), 1, HQ, D);
    sels[0] = sentinels[0];
    EXPECT_ERR(kvsieve_cache_decode_with_policy(g_cache, 0, &g_seq, 1, &tq.t, bad, &to.t, lse, NULL, sels),
               KVSIEVE_ERROR_INVALID_ARGUMENT, "`window=0`");
    EXPECT_ERR(kvsieve_cache_decode_with_policy(g_cache, 2, &g_seq, 1, &tq.t, p, &to.t, lse, NULL, sels),
               KVSIEVE_ERROR_OUT_OF_RANGE, "`layer`");
    EXPECT_ERR(kvsieve_cache_decode_with_policy(g_cache, 0, &g_seq, 1, &tq.t, NULL, &to.t, lse, NULL, sels),
               KVSIEVE_ERROR_NULL_POINTER, "`policy`");
    EXPECT_ERR(kvsieve_cache_decode_with_policy(g_cache, 0, &g_seq, 1, &tq.t, p, &to.t, lse, NULL,
                                                (kvsieve_selection_t **)(void *)lse),
               KVSIEVE_ERROR_INVALID_ARGUMENT, "`out_selections`");
    CHECK(sels[0] == sentinels[0], "out_selections untouched by a failed decode_with_policy");
    tensor3(&tq, g_q, dt_f32(), 2, HQ / 2, D);
    tensor3(&to, out, dt_f32(), 2, HQ / 2, D);
    EXPECT_ERR(kvsieve_cache_prefill_with_policy(g_cache, 5, &g_seq, 1, &tq.t, qo_indptr, p, &to.t, lse, NULL),
               KVSIEVE_ERROR_OUT_OF_RANGE, "`layer`");
    EXPECT_ERR(kvsieve_cache_prefill_with_policy(g_cache, 0, &g_seq, 1, &tq.t, qo_indptr, bad, &to.t, lse, NULL),
               KVSIEVE_ERROR_INVALID_ARGUMENT, "`window=0`");
    CHECK(all_nan(out, 2 * HQ * D) && all_nan(lse, 2 * HQ), "outputs untouched by failed sparse attention");
    kvsieve_policy_free(p);
    kvsieve_policy_free(bad);
    kvsieve_selection_free(good);
    kvsieve_selection_free(short_sel);
    kvsieve_selection_free(three_heads);
    expect_seq_unchanged("failed sparse attention");
    section_done("sparse attention errors", before);
}

static void paged_views(void) {
    int before = g_failed;
    float kmem[2 * PS * HK * D], out[HQ * D], lse[HQ];
    int32_t indptr[2] = {0, 2}, indices[2] = {1, 0}, last[1] = {2}, qo_indptr[2] = {0, 1};
    kvsieve_paged_kv_t kv;
    kvsieve_selection_t *sel = NULL, *wrong = NULL;
    kvsieve_streaming_window_t w[HK];
    test_tensor tq, to;
    size_t i;

    for (i = 0; i < 2 * PS * HK * D; i++) kmem[i] = rng_uniform(1.0f);
    for (i = 0; i < HQ * D; i++) out[i] = NAN;
    kvsieve_paged_kv_init(&kv);
    kv.k = kv.v = kmem;
    kv.device.device_type = KVSIEVE_DEVICE_CPU;
    kv.dtype = dt_f32();
    kv.num_pages = 2;
    kv.page_size = PS;
    kv.num_kv_heads = HK;
    kv.head_dim = D;
    kv.k_strides[0] = kv.v_strides[0] = PS * HK * D;
    kv.k_strides[1] = kv.v_strides[1] = HK * D;
    kv.k_strides[2] = kv.v_strides[2] = D;
    kv.batch = 1;
    kv.indptr = indptr;
    kv.indices = indices;
    kv.last_page_len = last;
    EXPECT_OK(kvsieve_selection_dense(HK, PS + 2, &sel));
    EXPECT_OK(kvsieve_selection_dense(HK, PS + 3, &wrong));
    tensor3(&tq, g_q, dt_f32(), 1, HQ, D);
    tensor3(&to, out, dt_f32(), 1, HQ, D);
    EXPECT_ERR(kvsieve_paged_decode_sparse(&kv, &tq.t, &wrong, &to.t, lse, NULL), KVSIEVE_ERROR_INVALID_ARGUMENT,
               "`selections[0]`");
    EXPECT_ERR(kvsieve_paged_decode_sparse(&kv, &tq.t, NULL, &to.t, lse, NULL), KVSIEVE_ERROR_NULL_POINTER, "`selections`");
    init_windows(w, HK);
    w[0].sinks = 1;
    EXPECT_ERR(kvsieve_paged_prefill_sparse(&kv, &tq.t, qo_indptr, &sel, w, HK, &to.t, lse, NULL),
               KVSIEVE_ERROR_INVALID_ARGUMENT, "`windows[0].sinks`");
    kv.indices = NULL;
    EXPECT_ERR(kvsieve_paged_decode_sparse(&kv, &tq.t, &sel, &to.t, lse, NULL), KVSIEVE_ERROR_NULL_POINTER, "`indices`");
    CHECK(all_nan(out, HQ * D), "output untouched by failed view calls");
    kvsieve_selection_free(sel);
    kvsieve_selection_free(wrong);
    section_done("view sparse attention errors", before);
}

static void eviction_and_compaction(void) {
    int before = g_failed;
    kvsieve_policy_t *p = NULL, *bad = NULL;
    kvsieve_cache_t *pre = new_cache(8, KVSIEVE_KEYS_PRE_ROPE, false);
    kvsieve_cache_t *tight = new_cache(3, KVSIEVE_KEYS_POST_ROPE, false);
    uint64_t pre_seq = filled_sequence(pre), tight_seq = filled_sequence(tight);
    uint32_t keep[LAYERS * HK * 3], indptr[LAYERS * HK + 1];
    size_t evicted = 77, i;

    EXPECT_OK(kvsieve_policy_parse("sinks=1,window=1", &p));
    EXPECT_OK(kvsieve_policy_parse("sinks=1,window=1;layers=4:dense", &bad));
    EXPECT_ERR(kvsieve_cache_evict_for_policy(g_cache, g_seq, bad, &evicted), KVSIEVE_ERROR_OUT_OF_RANGE, "layers=4:dense");
    EXPECT_ERR(kvsieve_cache_evict_for_policy(g_cache, 999, p, &evicted), KVSIEVE_ERROR_UNKNOWN_SEQUENCE, "999");
    EXPECT_ERR(kvsieve_cache_evict_for_policy(g_cache, g_seq, NULL, &evicted), KVSIEVE_ERROR_NULL_POINTER, "`policy`");
    EXPECT_ERR(kvsieve_cache_evict_for_policy(NULL, g_seq, p, &evicted), KVSIEVE_ERROR_NULL_POINTER, "`cache`");
    CHECK(evicted == 77, "out_pages_evicted untouched");
    expect_seq_unchanged("failed evictions");

    /* Three tokens {0, 2, 5} per list. */
    for (i = 0; i < LAYERS * HK; i++) {
        keep[3 * i] = 0, keep[3 * i + 1] = 2, keep[3 * i + 2] = 5;
        indptr[i] = (uint32_t)(3 * i);
    }
    indptr[LAYERS * HK] = 3 * LAYERS * HK;
    EXPECT_ERR(kvsieve_cache_compact(g_cache, g_seq, 7, indptr, 1, keep, 3), KVSIEVE_ERROR_INVALID_ARGUMENT, "`kind`");
    EXPECT_ERR(kvsieve_cache_compact(g_cache, g_seq, KVSIEVE_KEEP_ALL, NULL, 1, keep, 3), KVSIEVE_ERROR_NULL_POINTER,
               "`keep_indptr`");
    EXPECT_ERR(kvsieve_cache_compact(g_cache, g_seq, KVSIEVE_KEEP_ALL, indptr, 1, NULL, 3), KVSIEVE_ERROR_NULL_POINTER, "`keep`");
    EXPECT_ERR(kvsieve_cache_compact(g_cache, g_seq, KVSIEVE_KEEP_ALL, indptr, 2, keep, 6), KVSIEVE_ERROR_INVALID_ARGUMENT,
               "`num_lists`");
    EXPECT_ERR(kvsieve_cache_compact(g_cache, g_seq, KVSIEVE_KEEP_PER_LAYER, indptr, 1, keep, 3),
               KVSIEVE_ERROR_INVALID_ARGUMENT, "num_layers = 2");
    EXPECT_ERR(kvsieve_cache_compact(g_cache, g_seq, KVSIEVE_KEEP_PER_HEAD, indptr, 2, keep, 6), KVSIEVE_ERROR_INVALID_ARGUMENT,
               "num_layers * num_kv_heads = 4");
    EXPECT_ERR(kvsieve_cache_compact(g_cache, g_seq, KVSIEVE_KEEP_ALL, indptr, 1, keep, 4), KVSIEVE_ERROR_INVALID_ARGUMENT,
               "`keep_indptr`");
    indptr[0] = 1;
    EXPECT_ERR(kvsieve_cache_compact(g_cache, g_seq, KVSIEVE_KEEP_ALL, indptr, 1, keep, 3), KVSIEVE_ERROR_INVALID_ARGUMENT,
               "keep_indptr[0] == 0");
    indptr[0] = 0;
    indptr[1] = 2; /* lists of 2 and 4 tokens */
    EXPECT_ERR(kvsieve_cache_compact(g_cache, g_seq, KVSIEVE_KEEP_PER_LAYER, indptr, 2, keep, 6), KVSIEVE_ERROR_SHAPE,
               "`keep[1]`");
    indptr[1] = 3;
    keep[2] = 1; /* {0, 2, 1}: not ascending */
    EXPECT_ERR(kvsieve_cache_compact(g_cache, g_seq, KVSIEVE_KEEP_ALL, indptr, 1, keep, 3), KVSIEVE_ERROR_INVALID_ARGUMENT,
               "`keep[0][2]`");
    keep[2] = LEN; /* past the sequence */
    EXPECT_ERR(kvsieve_cache_compact(g_cache, g_seq, KVSIEVE_KEEP_ALL, indptr, 1, keep, 3), KVSIEVE_ERROR_INVALID_ARGUMENT,
               "`keep[0][2]`");
    keep[2] = 5;
    EXPECT_ERR(kvsieve_cache_compact(g_cache, 999, KVSIEVE_KEEP_ALL, indptr, 1, keep, 3), KVSIEVE_ERROR_UNKNOWN_SEQUENCE, "999");
    expect_seq_unchanged("failed compactions");

    /* Lists that differ need post-RoPE keys; fresh pages need room in the pool. */
    keep[3 * 3 + 1] = 3;
    EXPECT_ERR(kvsieve_cache_compact(pre, pre_seq, KVSIEVE_KEEP_PER_HEAD, indptr, LAYERS * HK, keep, 3 * LAYERS * HK),
               KVSIEVE_ERROR_INVALID_ARGUMENT, "`keep`");
    for (i = 0; i < 6; i++) keep[i] = (uint32_t)i;
    indptr[1] = 6;
    EXPECT_ERR(kvsieve_cache_compact(tight, tight_seq, KVSIEVE_KEEP_ALL, indptr, 1, keep, 6), KVSIEVE_ERROR_OUT_OF_PAGES,
               "needs 2 free pages");
    {
        size_t len = 0;
        EXPECT_OK(kvsieve_cache_seq_len(pre, pre_seq, &len));
        CHECK(len == LEN, "pre-RoPE sequence unchanged");
        EXPECT_OK(kvsieve_cache_seq_len(tight, tight_seq, &len));
        CHECK(len == LEN, "sequence in a full pool unchanged");
    }
    kvsieve_policy_free(p);
    kvsieve_policy_free(bad);
    kvsieve_cache_free(pre);
    kvsieve_cache_free(tight);
    section_done("eviction and compaction errors", before);
}

int main(void) {
    test_tensor tq, to;
    size_t i;
    rng_seed(5);
    for (i = 0; i < HQ * D; i++) g_q[i] = rng_uniform(1.0f);
    g_cache = new_cache(8, KVSIEVE_KEYS_POST_ROPE, true);
    g_seq = filled_sequence(g_cache);
    EXPECT_OK(kvsieve_cache_decode(g_cache, 1, &g_seq, 1, tensor3(&tq, g_q, dt_f32(), 1, HQ, D),
                                   tensor3(&to, g_ref_out, dt_f32(), 1, HQ, D), NULL, NULL));
    construction();
    inspection();
    policies();
    selection_on_cache();
    sparse_attention();
    paged_views();
    eviction_and_compaction();
    kvsieve_cache_free(g_cache);
    return finish();
}
