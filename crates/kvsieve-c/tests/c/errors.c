/* Bad input at every entry point: each call must fail with the right code and a message
 * naming the parameter, and change nothing (out-parameters, output buffers and the cache's
 * sequences stay as they were). */
#include "common.h"

enum { HK = 2, HQ = 4, D = 16, PS = 4, PAGES = 4 };

static kvsieve_cache_t *g_cache;
static uint64_t g_seq; /* 6 tokens at positions 10..15, written for both layers */

static kvsieve_cache_t *new_cache(size_t pages, uint32_t key_rope, bool bounds) {
    kvsieve_cache_t *cache = NULL;
    kvsieve_cache_config_t cfg = kvsieve_cache_config_default(2, HK, D, PS, pages);
    cfg.dtype = dt_f32();
    cfg.key_rope = key_rope;
    cfg.track_key_bounds = bounds;
    EXPECT_OK(kvsieve_cache_new(&cfg, &cache));
    return cache;
}

static void fill(kvsieve_cache_t *cache, uint64_t seq, size_t n) {
    float *k = rand_floats(n * HK * D, 1.0f), *v = rand_floats(n * HK * D, 1.0f);
    test_tensor tk, tv;
    size_t layer;
    for (layer = 0; layer < 2; layer++)
        EXPECT_OK(kvsieve_cache_write(cache, seq, layer, 0, tensor3(&tk, k, dt_f32(), (int64_t)n, HK, D),
                                      tensor3(&tv, v, dt_f32(), (int64_t)n, HK, D)));
    free(k);
    free(v);
}

/* The sequence still holds 6 tokens at positions 10..15. */
static void expect_seq_unchanged(const char *after) {
    size_t len = 99, n = 99, i;
    int32_t pos[8];
    int same = 1;
    EXPECT_OK(kvsieve_cache_seq_len(g_cache, g_seq, &len));
    EXPECT_OK(kvsieve_cache_positions(g_cache, g_seq, pos, 8, &n));
    for (i = 0; i < 6 && n == 6; i++) same &= pos[i] == (int32_t)(10 + i);
    CHECK(len == 6 && n == 6 && same, "sequence unchanged after %s (len %zu)", after, len);
}

static void cache_config(void) {
    int before = g_failed;
    kvsieve_cache_t *sentinel = (kvsieve_cache_t *)&g_seq, *out = sentinel;
    kvsieve_cache_config_t cfg = kvsieve_cache_config_default(2, HK, D, PS, PAGES);

    EXPECT_ERR(kvsieve_cache_new(NULL, &out), KVSIEVE_ERROR_NULL_POINTER, "`config`");
    EXPECT_ERR(kvsieve_cache_new(&cfg, NULL), KVSIEVE_ERROR_NULL_POINTER, "`out`");
    cfg.page_size = 0;
    EXPECT_ERR(kvsieve_cache_new(&cfg, &out), KVSIEVE_ERROR_INVALID_ARGUMENT, "`page_size`");
    cfg.page_size = 4096;
    EXPECT_ERR(kvsieve_cache_new(&cfg, &out), KVSIEVE_ERROR_INVALID_ARGUMENT, "`page_size`");
    cfg = kvsieve_cache_config_default(2, HK, 12, PS, PAGES);
    EXPECT_ERR(kvsieve_cache_new(&cfg, &out), KVSIEVE_ERROR_UNSUPPORTED, "head_dim 12");
    cfg = kvsieve_cache_config_default(2, HK, 1024, PS, PAGES);
    EXPECT_ERR(kvsieve_cache_new(&cfg, &out), KVSIEVE_ERROR_UNSUPPORTED, "head_dim 1024");
    cfg = kvsieve_cache_config_default(0, HK, D, PS, PAGES);
    EXPECT_ERR(kvsieve_cache_new(&cfg, &out), KVSIEVE_ERROR_INVALID_ARGUMENT, "`num_layers`");
    cfg = kvsieve_cache_config_default(2, 0, D, PS, PAGES);
    EXPECT_ERR(kvsieve_cache_new(&cfg, &out), KVSIEVE_ERROR_INVALID_ARGUMENT, "`num_kv_heads`");
    cfg = kvsieve_cache_config_default(2, HK, D, PS, 0);
    EXPECT_ERR(kvsieve_cache_new(&cfg, &out), KVSIEVE_ERROR_INVALID_ARGUMENT, "`capacity_pages`");
    cfg = kvsieve_cache_config_default(2, HK, D, PS, PAGES);
    cfg.layout = 7;
    EXPECT_ERR(kvsieve_cache_new(&cfg, &out), KVSIEVE_ERROR_INVALID_ARGUMENT, "`layout`");
    cfg.layout = KVSIEVE_LAYOUT_NHD;
    cfg.key_rope = 3;
    EXPECT_ERR(kvsieve_cache_new(&cfg, &out), KVSIEVE_ERROR_INVALID_ARGUMENT, "`key_rope`");
    cfg.key_rope = KVSIEVE_KEYS_POST_ROPE;
    cfg.dtype = dtype_of(0, 32); /* int32 */
    EXPECT_ERR(kvsieve_cache_new(&cfg, &out), KVSIEVE_ERROR_DTYPE, "`dtype`");
    cfg.dtype = dt_f32();
    cfg.dtype.lanes = 4;
    EXPECT_ERR(kvsieve_cache_new(&cfg, &out), KVSIEVE_ERROR_DTYPE, "lanes 4");
    CHECK(out == sentinel, "out untouched by failed kvsieve_cache_new");
    section_done("cache configuration errors", before);
}

static void handles_and_out_params(void) {
    int before = g_failed;
    uint64_t id = 12345;
    size_t len = 777;
    kvsieve_cache_stats_t stats;
    kvsieve_cache_config_t cfg;

    kvsieve_cache_stats_init(&stats);
    kvsieve_cache_config_init(&cfg);
    EXPECT_ERR(kvsieve_cache_create_sequence(NULL, &id), KVSIEVE_ERROR_NULL_POINTER, "`cache`");
    EXPECT_ERR(kvsieve_cache_create_sequence(g_cache, NULL), KVSIEVE_ERROR_NULL_POINTER, "`out_seq`");
    EXPECT_ERR(kvsieve_cache_fork(g_cache, 999, &id), KVSIEVE_ERROR_UNKNOWN_SEQUENCE, "unknown sequence id 999");
    EXPECT_ERR(kvsieve_cache_fork(g_cache, g_seq, NULL), KVSIEVE_ERROR_NULL_POINTER, "`out_seq`");
    CHECK(id == 12345, "out_seq untouched by failed calls");
    EXPECT_ERR(kvsieve_cache_free_sequence(g_cache, 999), KVSIEVE_ERROR_UNKNOWN_SEQUENCE, "999");
    EXPECT_ERR(kvsieve_cache_free_sequence(NULL, g_seq), KVSIEVE_ERROR_NULL_POINTER, "`cache`");
    EXPECT_ERR(kvsieve_cache_seq_len(g_cache, 999, &len), KVSIEVE_ERROR_UNKNOWN_SEQUENCE, "999");
    EXPECT_ERR(kvsieve_cache_seq_len(g_cache, g_seq, NULL), KVSIEVE_ERROR_NULL_POINTER, "`out_len`");
    CHECK(len == 777, "out_len untouched by failed calls");
    EXPECT_ERR(kvsieve_cache_stats(NULL, &stats), KVSIEVE_ERROR_NULL_POINTER, "`cache`");
    EXPECT_ERR(kvsieve_cache_stats(g_cache, NULL), KVSIEVE_ERROR_NULL_POINTER, "`out`");
    EXPECT_ERR(kvsieve_cache_get_config(g_cache, NULL), KVSIEVE_ERROR_NULL_POINTER, "`out`");
    EXPECT_ERR(kvsieve_cache_get_config(NULL, &cfg), KVSIEVE_ERROR_NULL_POINTER, "`cache`");
    EXPECT_ERR(kvsieve_cache_truncate(g_cache, g_seq, 7), KVSIEVE_ERROR_OUT_OF_RANGE, "`new_len`");
    EXPECT_ERR(kvsieve_cache_truncate(g_cache, 999, 0), KVSIEVE_ERROR_UNKNOWN_SEQUENCE, "999");
    expect_seq_unchanged("handle errors");
    section_done("handle and out-parameter errors", before);
}

static void append_and_capacity(void) {
    int before = g_failed;
    int64_t slots[32];
    int32_t pos[32];
    size_t i;
    kvsieve_cache_stats_t s0, s1;
    kvsieve_cache_stats_init(&s0);
    kvsieve_cache_stats_init(&s1);
    for (i = 0; i < 32; i++) slots[i] = -7, pos[i] = (int32_t)i;

    EXPECT_ERR(kvsieve_cache_append(g_cache, 999, 1, NULL, NULL), KVSIEVE_ERROR_UNKNOWN_SEQUENCE, "unknown sequence id 999");
    EXPECT_ERR(kvsieve_cache_append(NULL, g_seq, 1, NULL, NULL), KVSIEVE_ERROR_NULL_POINTER, "`cache`");
    /* 4 pages of 4 slots: 6 tokens hold 2 pages, so 20 more cannot fit. */
    EXPECT_OK(kvsieve_cache_stats(g_cache, &s0));
    EXPECT_ERR(kvsieve_cache_append(g_cache, g_seq, 20, pos, slots), KVSIEVE_ERROR_OUT_OF_PAGES, "needs 5 free pages");
    EXPECT_OK(kvsieve_cache_stats(g_cache, &s1));
    CHECK(slots[0] == -7 && slots[19] == -7, "out_slots untouched after out-of-pages");
    CHECK(s0.pages_used == s1.pages_used && s0.num_tokens == s1.num_tokens, "no page taken by a failed append");
    expect_seq_unchanged("out-of-pages append");
    /* Overlapping positions and slot buffers. */
    EXPECT_ERR(kvsieve_cache_append(g_cache, g_seq, 2, (const int32_t *)slots, slots), KVSIEVE_ERROR_INVALID_ARGUMENT,
               "`out_slots`");
    /* Misaligned positions. */
    EXPECT_ERR(kvsieve_cache_append(g_cache, g_seq, 2, (const int32_t *)((char *)pos + 1), NULL),
               KVSIEVE_ERROR_INVALID_ARGUMENT, "`positions`");
    expect_seq_unchanged("bad append arguments");
    section_done("append errors and exhausted capacity", before);
}

static void write_errors(void) {
    int before = g_failed;
    float *k = rand_floats(6 * HK * D * 2, 1.0f), *v = rand_floats(6 * HK * D * 2, 1.0f);
    float *keys_before = nan_floats(6 * HK * D), *keys_after = nan_floats(6 * HK * D);
    test_tensor tk, tv;
    int64_t bad_shape2[2] = {6, HK * D};
    int64_t slots[3] = {0, 999, 1};

    EXPECT_OK(kvsieve_cache_read(g_cache, g_seq, 0, keys_before, NULL, 6 * HK * D));
    tensor3(&tk, k, dt_f32(), 6, HK, D);
    tensor3(&tv, v, dt_f32(), 6, HK, D);
    EXPECT_ERR(kvsieve_cache_write(g_cache, g_seq, 2, 0, &tk.t, &tv.t), KVSIEVE_ERROR_OUT_OF_RANGE, "`layer`");
    EXPECT_ERR(kvsieve_cache_write(g_cache, g_seq, 0, 1, &tk.t, &tv.t), KVSIEVE_ERROR_OUT_OF_RANGE, "`start`");
    EXPECT_ERR(kvsieve_cache_write(g_cache, 999, 0, 0, &tk.t, &tv.t), KVSIEVE_ERROR_UNKNOWN_SEQUENCE, "999");
    EXPECT_ERR(kvsieve_cache_write(g_cache, g_seq, 0, 0, NULL, &tv.t), KVSIEVE_ERROR_NULL_POINTER, "`k`");
    EXPECT_ERR(kvsieve_cache_write(g_cache, g_seq, 0, 0, &tk.t, NULL), KVSIEVE_ERROR_NULL_POINTER, "`v`");
    /* Wrong head_dim. */
    tensor3(&tk, k, dt_f32(), 6, HK, D / 2);
    EXPECT_ERR(kvsieve_cache_write(g_cache, g_seq, 0, 0, &tk.t, &tv.t), KVSIEVE_ERROR_SHAPE, "`k`: expected [6, 2, 16], got [6, 2, 8]");
    /* V with a different token count than K. */
    tensor3(&tk, k, dt_f32(), 6, HK, D);
    tensor3(&tv, v, dt_f32(), 5, HK, D);
    EXPECT_ERR(kvsieve_cache_write(g_cache, g_seq, 0, 0, &tk.t, &tv.t), KVSIEVE_ERROR_SHAPE, "`v`");
    tensor3(&tv, v, dt_f32(), 6, HK, D);
    /* Wrong number of dimensions. */
    tk.t.ndim = 2;
    tk.t.shape = bad_shape2;
    EXPECT_ERR(kvsieve_cache_write(g_cache, g_seq, 0, 0, &tk.t, &tv.t), KVSIEVE_ERROR_SHAPE, "`k`: expected [n, num_kv_heads, head_dim], got 2 dimensions");
    tensor3(&tk, k, dt_f32(), 6, HK, D);
    tk.t.ndim = -1;
    EXPECT_ERR(kvsieve_cache_write(g_cache, g_seq, 0, 0, &tk.t, &tv.t), KVSIEVE_ERROR_SHAPE, "`k`");
    /* Negative size, NULL shape. */
    tensor3(&tk, k, dt_f32(), 6, -2, D);
    EXPECT_ERR(kvsieve_cache_write(g_cache, g_seq, 0, 0, &tk.t, &tv.t), KVSIEVE_ERROR_SHAPE, "`k`");
    tensor3(&tk, k, dt_f32(), 6, HK, D);
    tk.t.shape = NULL;
    EXPECT_ERR(kvsieve_cache_write(g_cache, g_seq, 0, 0, &tk.t, &tv.t), KVSIEVE_ERROR_NULL_POINTER, "`k.shape`");
    /* Unsupported dtypes. */
    tensor3(&tk, k, dtype_of(0, 32), 6, HK, D);
    EXPECT_ERR(kvsieve_cache_write(g_cache, g_seq, 0, 0, &tk.t, &tv.t), KVSIEVE_ERROR_DTYPE, "`k`");
    tensor3(&tk, k, dtype_of(KVSIEVE_DTYPE_CODE_FLOAT, 64), 6, HK, D);
    EXPECT_ERR(kvsieve_cache_write(g_cache, g_seq, 0, 0, &tk.t, &tv.t), KVSIEVE_ERROR_DTYPE, "bits 64");
    tensor3(&tk, k, dtype_of(KVSIEVE_DTYPE_CODE_BFLOAT, 32), 6, HK, D);
    EXPECT_ERR(kvsieve_cache_write(g_cache, g_seq, 0, 0, &tk.t, &tv.t), KVSIEVE_ERROR_DTYPE, "`k`");
    /* Negative strides. */
    tensor3(&tk, k, dt_f32(), 6, HK, D);
    set_strides3(&tk, HK * D, -D, 1);
    EXPECT_ERR(kvsieve_cache_write(g_cache, g_seq, 0, 0, &tk.t, &tv.t), KVSIEVE_ERROR_SHAPE, "`k.strides`");
    /* NULL data with a nonzero size; a device other than the CPU. */
    tensor3(&tk, NULL, dt_f32(), 6, HK, D);
    EXPECT_ERR(kvsieve_cache_write(g_cache, g_seq, 0, 0, &tk.t, &tv.t), KVSIEVE_ERROR_NULL_POINTER, "`k.data`");
    tensor3(&tk, k, dt_f32(), 6, HK, D);
    tk.t.device.device_type = KVSIEVE_DEVICE_CUDA;
    EXPECT_ERR(kvsieve_cache_write(g_cache, g_seq, 0, 0, &tk.t, &tv.t), KVSIEVE_ERROR_UNSUPPORTED, "`k.device`");
    /* An extent that cannot exist. */
    tensor3(&tk, k, dt_f32(), 6, HK, D);
    set_strides3(&tk, INT64_MAX / 2, D, 1);
    EXPECT_ERR(kvsieve_cache_write(g_cache, g_seq, 0, 0, &tk.t, &tv.t), KVSIEVE_ERROR_INVALID_ARGUMENT, "`k`");
    /* write_slots: a slot the sequence does not hold; NULL slots. */
    tensor3(&tk, k, dt_f32(), 3, HK, D);
    tensor3(&tv, v, dt_f32(), 3, HK, D);
    EXPECT_ERR(kvsieve_cache_write_slots(g_cache, g_seq, 0, slots, 3, &tk.t, &tv.t), KVSIEVE_ERROR_OUT_OF_RANGE, "`slots[1]`");
    EXPECT_ERR(kvsieve_cache_write_slots(g_cache, g_seq, 0, NULL, 3, &tk.t, &tv.t), KVSIEVE_ERROR_NULL_POINTER, "`slots`");
    EXPECT_ERR(kvsieve_cache_write_slots(g_cache, g_seq, 5, slots, 1, &tk.t, &tv.t), KVSIEVE_ERROR_OUT_OF_RANGE, "`layer`");
    EXPECT_OK(kvsieve_cache_read(g_cache, g_seq, 0, keys_after, NULL, 6 * HK * D));
    CHECK(max_abs_diff(keys_before, keys_after, 6 * HK * D) == 0.0, "stored keys unchanged by failed writes");
    expect_seq_unchanged("failed writes");
    free(k), free(v), free(keys_before), free(keys_after);
    section_done("write errors", before);
}

static void query_errors(void) {
    int before = g_failed;
    int32_t pos[8] = {-1, -1, -1, -1, -1, -1, -1, -1};
    int32_t indptr[3] = {-1, -1, -1}, indices[4] = {-1, -1, -1, -1}, last[2] = {-1, -1};
    uint64_t ids[2];
    size_t n = 555, page_indices[2] = {1, 0}, far[1] = {9};
    float lo[HK * D], hi[HK * D], kbuf[6 * HK * D];
    kvsieve_cache_t *no_bounds = new_cache(2, KVSIEVE_KEYS_POST_ROPE, false);
    uint64_t s2;

    ids[0] = g_seq;
    ids[1] = g_seq;
    EXPECT_ERR(kvsieve_cache_positions(g_cache, g_seq, pos, 5, &n), KVSIEVE_ERROR_INVALID_ARGUMENT, "`capacity`");
    CHECK(pos[0] == -1 && n == 555, "positions and out_len untouched when the buffer is too small");
    EXPECT_ERR(kvsieve_cache_positions(g_cache, g_seq, NULL, 8, &n), KVSIEVE_ERROR_NULL_POINTER, "`positions`");
    EXPECT_ERR(kvsieve_cache_positions(g_cache, 999, pos, 8, &n), KVSIEVE_ERROR_UNKNOWN_SEQUENCE, "999");
    EXPECT_ERR(kvsieve_cache_page_table_size(g_cache, NULL, 1, &n), KVSIEVE_ERROR_NULL_POINTER, "`seq_ids`");
    EXPECT_ERR(kvsieve_cache_page_table_size(g_cache, ids, 2, NULL), KVSIEVE_ERROR_NULL_POINTER, "`out_num_indices`");
    ids[1] = 999;
    EXPECT_ERR(kvsieve_cache_page_table_size(g_cache, ids, 2, &n), KVSIEVE_ERROR_UNKNOWN_SEQUENCE, "999");
    ids[1] = g_seq;
    /* Two sequences of 2 pages need 4 indices; give 3. */
    EXPECT_ERR(kvsieve_cache_page_table(g_cache, ids, 2, indptr, indices, 3, last), KVSIEVE_ERROR_INVALID_ARGUMENT,
               "`indices_capacity`");
    CHECK(indptr[0] == -1 && indices[0] == -1 && last[0] == -1, "page table buffers untouched on failure");
    EXPECT_ERR(kvsieve_cache_page_table(g_cache, ids, 2, NULL, indices, 4, last), KVSIEVE_ERROR_NULL_POINTER, "`indptr`");
    EXPECT_ERR(kvsieve_cache_page_table(g_cache, ids, 2, indptr, indices, 4, NULL), KVSIEVE_ERROR_NULL_POINTER, "`last_page_len`");
    EXPECT_ERR(kvsieve_cache_page_table(g_cache, ids, 2, indptr, indptr, 4, last), KVSIEVE_ERROR_INVALID_ARGUMENT, "overlap");
    /* Key bounds. */
    EXPECT_ERR(kvsieve_cache_page_key_bounds(g_cache, g_seq, 0, 2, lo, hi, HK * D), KVSIEVE_ERROR_OUT_OF_RANGE, "`page_index`");
    EXPECT_ERR(kvsieve_cache_page_key_bounds(g_cache, g_seq, 2, 0, lo, hi, HK * D), KVSIEVE_ERROR_OUT_OF_RANGE, "`layer`");
    EXPECT_ERR(kvsieve_cache_page_key_bounds(g_cache, g_seq, 0, 0, lo, hi, HK * D - 1), KVSIEVE_ERROR_INVALID_ARGUMENT, "`capacity`");
    EXPECT_ERR(kvsieve_cache_page_key_bounds(g_cache, g_seq, 0, 0, NULL, hi, HK * D), KVSIEVE_ERROR_NULL_POINTER, "`min`");
    EXPECT_OK(kvsieve_cache_create_sequence(no_bounds, &s2));
    EXPECT_OK(kvsieve_cache_append(no_bounds, s2, 1, NULL, NULL));
    EXPECT_ERR(kvsieve_cache_page_key_bounds(no_bounds, s2, 0, 0, lo, hi, HK * D), KVSIEVE_ERROR_INVALID_ARGUMENT, "`track_key_bounds`");
    /* Reading K/V back. */
    EXPECT_ERR(kvsieve_cache_read(g_cache, g_seq, 0, NULL, NULL, 0), KVSIEVE_ERROR_NULL_POINTER, "`keys`");
    EXPECT_ERR(kvsieve_cache_read(g_cache, g_seq, 0, kbuf, NULL, 6 * HK * D - 1), KVSIEVE_ERROR_INVALID_ARGUMENT, "`capacity`");
    EXPECT_ERR(kvsieve_cache_read(g_cache, g_seq, 3, kbuf, NULL, 6 * HK * D), KVSIEVE_ERROR_OUT_OF_RANGE, "`layer`");
    EXPECT_ERR(kvsieve_cache_read(g_cache, g_seq, 0, kbuf, kbuf + 1, 6 * HK * D), KVSIEVE_ERROR_INVALID_ARGUMENT, "`keys`");
    /* Eviction. */
    EXPECT_ERR(kvsieve_cache_evict_pages(g_cache, g_seq, page_indices, 2), KVSIEVE_ERROR_INVALID_ARGUMENT, "`page_indices`");
    EXPECT_ERR(kvsieve_cache_evict_pages(g_cache, g_seq, far, 1), KVSIEVE_ERROR_OUT_OF_RANGE, "`page_indices[0]`");
    EXPECT_ERR(kvsieve_cache_evict_pages(g_cache, g_seq, NULL, 1), KVSIEVE_ERROR_NULL_POINTER, "`page_indices`");
    expect_seq_unchanged("failed queries and evictions");
    kvsieve_cache_free(no_bounds);
    section_done("query and eviction errors", before);
}

static void attention_errors(void) {
    int before = g_failed;
    float *q = rand_floats(4 * HQ * D, 1.0f), *out = nan_floats(4 * HQ * D), lse[16];
    test_tensor tq, to;
    uint64_t ids[2], unknown = 999;
    int32_t qo_bad[2] = {0, 7}, qo[2] = {0, 2};
    kvsieve_attention_params_t params;
    kvsieve_rope_config_t rope;
    kvsieve_cache_t *pre = new_cache(2, KVSIEVE_KEYS_PRE_ROPE, true);
    uint64_t pre_seq;
    size_t i;
    int untouched = 1;

    for (i = 0; i < 16; i++) lse[i] = 42.0f;
    ids[0] = ids[1] = g_seq;
    kvsieve_attention_params_init(&params);
    kvsieve_rope_config_init(&rope);
    tensor3(&tq, q, dt_f32(), 1, HQ, D);
    tensor3(&to, out, dt_f32(), 1, HQ, D);
    EXPECT_ERR(kvsieve_cache_decode(NULL, 0, ids, 1, &tq.t, &to.t, lse, NULL), KVSIEVE_ERROR_NULL_POINTER, "`cache`");
    EXPECT_ERR(kvsieve_cache_decode(g_cache, 0, NULL, 1, &tq.t, &to.t, lse, NULL), KVSIEVE_ERROR_NULL_POINTER, "`seq_ids`");
    EXPECT_ERR(kvsieve_cache_decode(g_cache, 0, ids, 1, NULL, &to.t, lse, NULL), KVSIEVE_ERROR_NULL_POINTER, "`q`");
    EXPECT_ERR(kvsieve_cache_decode(g_cache, 0, ids, 1, &tq.t, NULL, lse, NULL), KVSIEVE_ERROR_NULL_POINTER, "`out`");
    EXPECT_ERR(kvsieve_cache_decode(g_cache, 0, &unknown, 1, &tq.t, &to.t, lse, NULL), KVSIEVE_ERROR_UNKNOWN_SEQUENCE, "999");
    EXPECT_ERR(kvsieve_cache_decode(g_cache, 2, ids, 1, &tq.t, &to.t, lse, NULL), KVSIEVE_ERROR_OUT_OF_RANGE, "`layer`");
    /* Batch of two ids, q for one. */
    EXPECT_ERR(kvsieve_cache_decode(g_cache, 0, ids, 2, &tq.t, &to.t, lse, NULL), KVSIEVE_ERROR_SHAPE, "`q`");
    /* 3 query heads is not a multiple of 2 KV heads. */
    tensor3(&tq, q, dt_f32(), 1, 3, D);
    tensor3(&to, out, dt_f32(), 1, 3, D);
    EXPECT_ERR(kvsieve_cache_decode(g_cache, 0, ids, 1, &tq.t, &to.t, lse, NULL), KVSIEVE_ERROR_SHAPE, "`q`");
    tensor3(&tq, q, dt_f32(), 1, HQ, D);
    tensor3(&to, out, dt_f32(), 1, HQ, D - 8);
    EXPECT_ERR(kvsieve_cache_decode(g_cache, 0, ids, 1, &tq.t, &to.t, lse, NULL), KVSIEVE_ERROR_SHAPE, "`out`");
    tensor3(&to, out, dtype_of(1, 32), 1, HQ, D); /* uint32 */
    EXPECT_ERR(kvsieve_cache_decode(g_cache, 0, ids, 1, &tq.t, &to.t, lse, NULL), KVSIEVE_ERROR_DTYPE, "`out`");
    /* Output overlapping the query; LSE overlapping the output. */
    tensor3(&to, q + D, dt_f32(), 1, HQ, D);
    EXPECT_ERR(kvsieve_cache_decode(g_cache, 0, ids, 1, &tq.t, &to.t, lse, NULL), KVSIEVE_ERROR_INVALID_ARGUMENT, "`out`");
    tensor3(&to, out, dt_f32(), 1, HQ, D);
    EXPECT_ERR(kvsieve_cache_decode(g_cache, 0, ids, 1, &tq.t, &to.t, out + 3, NULL), KVSIEVE_ERROR_INVALID_ARGUMENT, "`lse`");
    /* Parameters. */
    params.scale = NAN;
    EXPECT_ERR(kvsieve_cache_decode(g_cache, 0, ids, 1, &tq.t, &to.t, lse, &params), KVSIEVE_ERROR_INVALID_ARGUMENT, "`scale`");
    params.scale = 0.0f;
    params.logit_soft_cap = -1.0f;
    EXPECT_ERR(kvsieve_cache_decode(g_cache, 0, ids, 1, &tq.t, &to.t, lse, &params), KVSIEVE_ERROR_INVALID_ARGUMENT, "`logit_soft_cap`");
    params.logit_soft_cap = 0.0f;
    params.rope = &rope;
    rope.theta = 10000.0f;
    rope.style = 9;
    EXPECT_ERR(kvsieve_cache_decode(g_cache, 0, ids, 1, &tq.t, &to.t, lse, &params), KVSIEVE_ERROR_INVALID_ARGUMENT, "`rope.style`");
    params.rope = NULL;
    params.position_mode = 7;
    EXPECT_ERR(kvsieve_cache_decode(g_cache, 0, ids, 1, &tq.t, &to.t, lse, &params), KVSIEVE_ERROR_INVALID_ARGUMENT, "`position_mode`");
    /* Renumbered positions need keys stored before RoPE. */
    params.position_mode = KVSIEVE_POSITIONS_CONTIGUOUS;
    EXPECT_ERR(kvsieve_cache_decode(g_cache, 0, ids, 1, &tq.t, &to.t, lse, &params), KVSIEVE_ERROR_INVALID_ARGUMENT, "`positions`");
    params.position_mode = KVSIEVE_POSITIONS_ORIGINAL;
    /* Keys stored before RoPE need a RoPE configuration; a bad one is named. */
    EXPECT_OK(kvsieve_cache_create_sequence(pre, &pre_seq));
    EXPECT_OK(kvsieve_cache_append(pre, pre_seq, 3, NULL, NULL));
    EXPECT_ERR(kvsieve_cache_decode(pre, 0, &pre_seq, 1, &tq.t, &to.t, lse, NULL), KVSIEVE_ERROR_INVALID_ARGUMENT, "`rope`");
    rope.style = KVSIEVE_ROPE_HALF_SPLIT;
    rope.theta = 0.5f;
    params.rope = &rope;
    EXPECT_ERR(kvsieve_cache_decode(pre, 0, &pre_seq, 1, &tq.t, &to.t, lse, &params), KVSIEVE_ERROR_INVALID_ARGUMENT, "`rope.theta`");
    rope.theta = 10000.0f;
    rope.rotary_dim = 7;
    EXPECT_ERR(kvsieve_cache_decode(pre, 0, &pre_seq, 1, &tq.t, &to.t, lse, &params), KVSIEVE_ERROR_INVALID_ARGUMENT, "`rope.rotary_dim`");
    rope.rotary_dim = 0;
    params.position_mode = KVSIEVE_POSITIONS_CAPPED;
    params.max_distance = 0;
    EXPECT_ERR(kvsieve_cache_decode(pre, 0, &pre_seq, 1, &tq.t, &to.t, lse, &params), KVSIEVE_ERROR_INVALID_ARGUMENT, "max_distance");
    params.position_mode = KVSIEVE_POSITIONS_ORIGINAL;
    params.rope = NULL;
    /* Prefill: bad and missing qo_indptr. */
    tensor3(&tq, q, dt_f32(), 2, HQ, D);
    tensor3(&to, out, dt_f32(), 2, HQ, D);
    EXPECT_ERR(kvsieve_cache_prefill(g_cache, 0, ids, 1, &tq.t, qo_bad, true, &to.t, lse, NULL), KVSIEVE_ERROR_INVALID_ARGUMENT, "`qo_indptr`");
    EXPECT_ERR(kvsieve_cache_prefill(g_cache, 0, ids, 1, &tq.t, NULL, true, &to.t, lse, NULL), KVSIEVE_ERROR_NULL_POINTER, "`qo_indptr`");
    /* An infinite scale. */
    params.scale = INFINITY;
    EXPECT_ERR(kvsieve_cache_prefill(g_cache, 0, ids, 1, &tq.t, qo, true, &to.t, lse, &params), KVSIEVE_ERROR_INVALID_ARGUMENT, "`scale`");
    params.scale = 0.0f;
    for (i = 0; i < 4 * HQ * D; i++) untouched &= isnan(out[i]);
    for (i = 0; i < 16; i++) untouched &= lse[i] == 42.0f;
    CHECK(untouched, "out and lse untouched by failed attention calls");
    kvsieve_cache_free(pre);
    free(q), free(out);
    section_done("attention errors", before);
}

static void view_errors(void) {
    int before = g_failed;
    enum { NP = 3 };
    float *k = rand_floats(NP * PS * HK * D, 1.0f), *v = rand_floats(NP * PS * HK * D, 1.0f);
    float *q = rand_floats(HQ * D, 1.0f), *out = nan_floats(HQ * D);
    int32_t indptr[2] = {0, 2}, indices[2] = {0, 3}, last[1] = {2}, good[2] = {0, 2}, last_zero[1] = {0};
    test_tensor tq, to;
    kvsieve_paged_kv_t kv;
    int32_t qo[2] = {0, 1};
    size_t i;
    int untouched = 1;

    kvsieve_paged_kv_init(&kv);
    kv.k = k, kv.v = v;
    kv.device.device_type = KVSIEVE_DEVICE_CPU;
    kv.dtype = dt_f32();
    kv.num_pages = NP, kv.page_size = PS, kv.num_kv_heads = HK, kv.head_dim = D;
    kv.k_strides[0] = kv.v_strides[0] = PS * HK * D;
    kv.k_strides[1] = kv.v_strides[1] = HK * D;
    kv.k_strides[2] = kv.v_strides[2] = D;
    kv.batch = 1, kv.indptr = indptr, kv.indices = indices, kv.last_page_len = last;
    tensor3(&tq, q, dt_f32(), 1, HQ, D);
    tensor3(&to, out, dt_f32(), 1, HQ, D);

    /* The table points at page 3 of a 3-page memory. */
    EXPECT_ERR(kvsieve_paged_decode(&kv, &tq.t, &to.t, NULL, NULL), KVSIEVE_ERROR_OUT_OF_RANGE, "`indices[1]`");
    EXPECT_ERR(kvsieve_paged_prefill(&kv, &tq.t, qo, true, &to.t, NULL, NULL), KVSIEVE_ERROR_OUT_OF_RANGE, "`indices[1]`");
    kv.indices = good;
    kv.last_page_len = last_zero;
    EXPECT_ERR(kvsieve_paged_decode(&kv, &tq.t, &to.t, NULL, NULL), KVSIEVE_ERROR_INVALID_ARGUMENT, "`last_page_len`");
    kv.last_page_len = last;
    EXPECT_ERR(kvsieve_paged_decode(NULL, &tq.t, &to.t, NULL, NULL), KVSIEVE_ERROR_NULL_POINTER, "`kv`");
    kv.indptr = NULL;
    EXPECT_ERR(kvsieve_paged_decode(&kv, &tq.t, &to.t, NULL, NULL), KVSIEVE_ERROR_NULL_POINTER, "`indptr`");
    kv.indptr = indptr;
    kv.indices = NULL;
    EXPECT_ERR(kvsieve_paged_decode(&kv, &tq.t, &to.t, NULL, NULL), KVSIEVE_ERROR_NULL_POINTER, "`indices`");
    kv.indices = good;
    kv.k = NULL;
    EXPECT_ERR(kvsieve_paged_decode(&kv, &tq.t, &to.t, NULL, NULL), KVSIEVE_ERROR_NULL_POINTER, "`k`");
    kv.k = (const char *)k + 2;
    EXPECT_ERR(kvsieve_paged_decode(&kv, &tq.t, &to.t, NULL, NULL), KVSIEVE_ERROR_INVALID_ARGUMENT, "aligned");
    kv.k = k;
    kv.k_strides[1] = -1;
    EXPECT_ERR(kvsieve_paged_decode(&kv, &tq.t, &to.t, NULL, NULL), KVSIEVE_ERROR_INVALID_ARGUMENT, "`k_strides[1]`");
    kv.k_strides[1] = HK * D;
    kv.v_strides[0] = INT64_MAX;
    EXPECT_ERR(kvsieve_paged_decode(&kv, &tq.t, &to.t, NULL, NULL), KVSIEVE_ERROR_INVALID_ARGUMENT, "`v_strides`");
    kv.v_strides[0] = PS * HK * D;
    kv.page_size = 0;
    EXPECT_ERR(kvsieve_paged_decode(&kv, &tq.t, &to.t, NULL, NULL), KVSIEVE_ERROR_INVALID_ARGUMENT, "`page_size`");
    kv.page_size = PS;
    kv.head_dim = 12;
    EXPECT_ERR(kvsieve_paged_decode(&kv, &tq.t, &to.t, NULL, NULL), KVSIEVE_ERROR_UNSUPPORTED, "head_dim 12");
    kv.head_dim = D;
    kv.num_kv_heads = 0;
    EXPECT_ERR(kvsieve_paged_decode(&kv, &tq.t, &to.t, NULL, NULL), KVSIEVE_ERROR_INVALID_ARGUMENT, "`num_kv_heads`");
    kv.num_kv_heads = HK;
    kv.dtype = dtype_of(KVSIEVE_DTYPE_CODE_FLOAT, 8);
    EXPECT_ERR(kvsieve_paged_decode(&kv, &tq.t, &to.t, NULL, NULL), KVSIEVE_ERROR_DTYPE, "`dtype`");
    kv.dtype = dt_f32();
    kv.device.device_type = KVSIEVE_DEVICE_CUDA;
    EXPECT_ERR(kvsieve_paged_decode(&kv, &tq.t, &to.t, NULL, NULL), KVSIEVE_ERROR_UNSUPPORTED, "`device`");
    kv.device.device_type = KVSIEVE_DEVICE_CPU;
    kv.key_rope = 5;
    EXPECT_ERR(kvsieve_paged_decode(&kv, &tq.t, &to.t, NULL, NULL), KVSIEVE_ERROR_INVALID_ARGUMENT, "`key_rope`");
    kv.key_rope = KVSIEVE_KEYS_PRE_ROPE;
    EXPECT_ERR(kvsieve_paged_decode(&kv, &tq.t, &to.t, NULL, NULL), KVSIEVE_ERROR_INVALID_ARGUMENT, "`rope`");
    kv.key_rope = KVSIEVE_KEYS_POST_ROPE;
    /* Output written into the engine's own K memory. */
    tensor3(&to, k, dt_f32(), 1, HQ, D);
    EXPECT_ERR(kvsieve_paged_decode(&kv, &tq.t, &to.t, NULL, NULL), KVSIEVE_ERROR_INVALID_ARGUMENT, "`k`");
    tensor3(&to, out, dt_f32(), 1, HQ, D);
    EXPECT_ERR(kvsieve_paged_prefill(&kv, &tq.t, NULL, true, &to.t, NULL, NULL), KVSIEVE_ERROR_NULL_POINTER, "`qo_indptr`");
    for (i = 0; i < HQ * D; i++) untouched &= isnan(out[i]);
    CHECK(untouched, "out untouched by failed view calls");
    /* The same descriptor, fixed, works. */
    EXPECT_OK(kvsieve_paged_decode(&kv, &tq.t, &to.t, NULL, NULL));
    free(k), free(v), free(q), free(out);
    section_done("view errors", before);
}

static void rope_and_merge_errors(void) {
    int before = g_failed;
    float x[2 * 2 * D], a[2 * D], b[2 * D], o[2 * D], la[2] = {0, 0}, lb[2] = {0, 0}, lo[2] = {7, 7};
    int32_t pos[2] = {0, 1};
    int64_t shape2[2] = {2, 2 * D};
    test_tensor tx, ta, tb, to;
    kvsieve_rope_config_t rope;
    size_t i;
    for (i = 0; i < 4 * D; i++) x[i] = 1.0f;
    for (i = 0; i < 2 * D; i++) a[i] = b[i] = 1.0f, o[i] = -3.0f;
    kvsieve_rope_config_init(&rope);
    rope.theta = 10000.0f;

    tensor3(&tx, x, dt_f32(), 2, 2, D);
    EXPECT_ERR(kvsieve_apply_rope(&tx.t, pos, 1, &rope), KVSIEVE_ERROR_SHAPE, "`positions`");
    EXPECT_ERR(kvsieve_apply_rope(&tx.t, NULL, 2, &rope), KVSIEVE_ERROR_NULL_POINTER, "`positions`");
    EXPECT_ERR(kvsieve_apply_rope(&tx.t, pos, 2, NULL), KVSIEVE_ERROR_NULL_POINTER, "`rope`");
    EXPECT_ERR(kvsieve_apply_rope(NULL, pos, 2, &rope), KVSIEVE_ERROR_NULL_POINTER, "`x`");
    rope.theta = INFINITY;
    EXPECT_ERR(kvsieve_apply_rope(&tx.t, pos, 2, &rope), KVSIEVE_ERROR_INVALID_ARGUMENT, "`rope.theta`");
    rope.theta = 10000.0f;
    rope.position_scale = -1.0f;
    EXPECT_ERR(kvsieve_apply_rope(&tx.t, pos, 2, &rope), KVSIEVE_ERROR_INVALID_ARGUMENT, "`rope.position_scale`");
    rope.position_scale = 0.0f;
    rope.rotary_dim = 2 * D;
    EXPECT_ERR(kvsieve_apply_rope(&tx.t, pos, 2, &rope), KVSIEVE_ERROR_INVALID_ARGUMENT, "`rope.rotary_dim`");
    rope.rotary_dim = 0;
    tx.t.ndim = 2;
    tx.t.shape = shape2;
    EXPECT_ERR(kvsieve_apply_rope(&tx.t, pos, 2, &rope), KVSIEVE_ERROR_SHAPE, "`x`");
    tensor3(&tx, x, dt_f32(), 2, 2, D);
    EXPECT_ERR(kvsieve_apply_rope(&tx.t, (const int32_t *)x, 2, &rope), KVSIEVE_ERROR_INVALID_ARGUMENT, "`x`");
    for (i = 0; i < 4 * D; i++) CHECK(x[i] == 1.0f, "x untouched by failed apply_rope");

    tensor3(&ta, a, dt_f32(), 2, 1, D);
    tensor3(&tb, b, dt_f32(), 1, 2, D);
    tensor3(&to, o, dt_f32(), 2, 1, D);
    EXPECT_ERR(kvsieve_merge_states(&ta.t, la, &tb.t, lb, &to.t, lo), KVSIEVE_ERROR_SHAPE, "`v_b`");
    tensor3(&tb, b, dt_f32(), 2, 1, D);
    EXPECT_ERR(kvsieve_merge_states(&ta.t, NULL, &tb.t, lb, &to.t, lo), KVSIEVE_ERROR_NULL_POINTER, "`lse_a`");
    EXPECT_ERR(kvsieve_merge_states(&ta.t, la, &tb.t, lb, &to.t, NULL), KVSIEVE_ERROR_NULL_POINTER, "`lse_out`");
    EXPECT_ERR(kvsieve_merge_states(&ta.t, la, &tb.t, lb, &ta.t, lo), KVSIEVE_ERROR_INVALID_ARGUMENT, "`out`");
    EXPECT_ERR(kvsieve_merge_states(&ta.t, la, &tb.t, lb, &to.t, la), KVSIEVE_ERROR_INVALID_ARGUMENT, "`lse_out`");
    tensor3(&to, o, dt_f32(), 2, 1, D / 2);
    EXPECT_ERR(kvsieve_merge_states(&ta.t, la, &tb.t, lb, &to.t, lo), KVSIEVE_ERROR_SHAPE, "`out`");
    CHECK(o[0] == -3.0f && lo[0] == 7.0f, "merge outputs untouched on failure");
    section_done("rope and merge errors", before);
}

int main(void) {
    int32_t pos[6] = {10, 11, 12, 13, 14, 15};
    rng_seed(3);
    /* A cache of 4 pages of 4 slots; one sequence of 6 tokens at positions 10..15. */
    g_cache = new_cache(PAGES, KVSIEVE_KEYS_POST_ROPE, true);
    if (!g_cache) return finish();
    EXPECT_OK(kvsieve_cache_create_sequence(g_cache, &g_seq));
    EXPECT_OK(kvsieve_cache_append(g_cache, g_seq, 6, pos, NULL));
    fill(g_cache, g_seq, 6);

    cache_config();
    handles_and_out_params();
    append_and_capacity();
    write_errors();
    query_errors();
    attention_errors();
    view_errors();
    rope_and_merge_errors();
    kvsieve_cache_free(g_cache);
    return finish();
}
