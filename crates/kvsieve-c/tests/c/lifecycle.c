/* Sequence lifecycle on a cache: configuration round trip, statistics, the two-step page
 * table export, fork with copy-on-write, truncate, evicting pages from the middle, positions,
 * per-page key bounds, freeing, and decode over an empty sequence. */
#include "common.h"

enum { LAYERS = 2, HK = 2, D = 16, PS = 4, PAGES = 16, ROW = HK * D };

static kvsieve_cache_t *cache;

/* Deterministic K for (layer, token, head, channel), distinct per token: the tests below
 * recognise tokens by their keys. V is the negation. */
static float key_value(size_t layer, size_t token, size_t head, size_t c) {
    return (float)(layer * 1000 + token) + 0.01f * (float)(head * D + c);
}

/* Write tokens [start, start + n) of `seq` with key_value(.., first_id + i, ..). */
static void write_tokens(uint64_t seq, size_t start, size_t n, size_t first_id) {
    float *k = (float *)malloc(n * ROW * sizeof(float)), *v = (float *)malloc(n * ROW * sizeof(float));
    test_tensor tk, tv;
    size_t layer, i, h, c;
    for (layer = 0; layer < LAYERS; layer++) {
        for (i = 0; i < n; i++)
            for (h = 0; h < HK; h++)
                for (c = 0; c < D; c++) {
                    k[(i * HK + h) * D + c] = key_value(layer, first_id + i, h, c);
                    v[(i * HK + h) * D + c] = -key_value(layer, first_id + i, h, c);
                }
        EXPECT_OK(kvsieve_cache_write(cache, seq, layer, start, tensor3(&tk, k, dt_f32(), (int64_t)n, HK, D),
                                      tensor3(&tv, v, dt_f32(), (int64_t)n, HK, D)));
    }
    free(k);
    free(v);
}

/* The token ids (recovered from channel 0 of head 0 of layer 1's keys) of `seq`. */
static size_t token_ids(uint64_t seq, size_t *ids, size_t cap) {
    size_t len = 0, t;
    float *k, *v;
    EXPECT_OK(kvsieve_cache_seq_len(cache, seq, &len));
    if (len > cap) return 0;
    k = nan_floats(len * ROW + 1);
    v = nan_floats(len * ROW + 1);
    EXPECT_OK(kvsieve_cache_read(cache, seq, 1, k, v, len * ROW));
    for (t = 0; t < len; t++) {
        ids[t] = (size_t)(k[t * ROW] - 1000.0f + 0.5f);
        CHECK(v[t * ROW + 3] == -k[t * ROW + 3], "values follow keys");
    }
    free(k);
    free(v);
    return len;
}

static int ids_are(uint64_t seq, const size_t *want, size_t n) {
    size_t got[64], len = token_ids(seq, got, 64), i;
    if (len != n) return 0;
    for (i = 0; i < n; i++)
        if (got[i] != want[i]) return 0;
    return 1;
}

static kvsieve_cache_stats_t stats(void) {
    kvsieve_cache_stats_t s;
    kvsieve_cache_stats_init(&s);
    EXPECT_OK(kvsieve_cache_stats(cache, &s));
    return s;
}

static void config_round_trip(void) {
    int before = g_failed;
    kvsieve_cache_config_t cfg = kvsieve_cache_config_default(LAYERS, HK, D, PS, PAGES), got;
    CHECK(cfg.struct_size == sizeof cfg && cfg.dtype.code == KVSIEVE_DTYPE_CODE_FLOAT && cfg.dtype.bits == 16 &&
              cfg.layout == KVSIEVE_LAYOUT_NHD && cfg.key_rope == KVSIEVE_KEYS_POST_ROPE && cfg.track_key_bounds,
          "defaults: f16, NHD, post-RoPE, key bounds on");
    cfg.dtype = dt_f32();
    cfg.layout = KVSIEVE_LAYOUT_HND;
    EXPECT_OK(kvsieve_cache_new(&cfg, &cache));
    /* Every field but struct_size garbage: all of them are written. */
    memset(&got, 0xff, sizeof got);
    got.struct_size = sizeof got;
    EXPECT_OK(kvsieve_cache_get_config(cache, &got));
    CHECK(got.struct_size == sizeof got && got.num_layers == LAYERS && got.num_kv_heads == HK && got.head_dim == D && got.page_size == PS &&
              got.capacity_pages == PAGES && got.dtype.code == 2 && got.dtype.bits == 32 && got.dtype.lanes == 1 &&
              got.layout == KVSIEVE_LAYOUT_HND && got.key_rope == KVSIEVE_KEYS_POST_ROPE && got.track_key_bounds,
          "kvsieve_cache_get_config returns the configuration");
    section_done("configuration round trip", before);
}

static void fork_truncate_evict(void) {
    int before = g_failed;
    uint64_t a, b, c, pair[2];
    size_t n = 0, len = 0, i;
    int32_t indptr[3], indices[16], last[2], pos[16];
    size_t evict[1] = {1};
    kvsieve_cache_stats_t s;
    size_t want[16];
    int64_t slots[4];

    /* A: 10 tokens = pages of 4, 4, 2. */
    EXPECT_OK(kvsieve_cache_create_sequence(cache, &a));
    EXPECT_OK(kvsieve_cache_append(cache, a, 10, NULL, NULL));
    write_tokens(a, 0, 10, 0);
    s = stats();
    CHECK(s.pages_total == PAGES && s.pages_used == 3 && s.pages_free == PAGES - 3 && s.num_sequences == 1 &&
              s.num_tokens == 10,
          "stats after 10 tokens: used %zu, tokens %zu", s.pages_used, s.num_tokens);
    CHECK(s.bytes_per_page == 2 * LAYERS * PS * HK * D * sizeof(float) && s.bytes_used == 3 * s.bytes_per_page &&
              s.bytes_reserved >= PAGES * s.bytes_per_page,
          "stats bytes: per page %zu", s.bytes_per_page);

    /* Two-step page table export. */
    EXPECT_OK(kvsieve_cache_page_table_size(cache, &a, 1, &n));
    CHECK(n == 3, "page_table_size of A is 3, got %zu", n);
    EXPECT_OK(kvsieve_cache_page_table(cache, &a, 1, indptr, indices, n, last));
    CHECK(indptr[0] == 0 && indptr[1] == 3 && last[0] == 2, "A's table: indptr [0, 3], last_page_len 2");
    CHECK(indices[0] != indices[1] && indices[1] != indices[2] && indices[0] != indices[2], "A's pages are distinct");

    /* Fork: B shares all of A's pages. */
    EXPECT_OK(kvsieve_cache_fork(cache, a, &b));
    s = stats();
    CHECK(s.pages_used == 3 && s.num_sequences == 2 && s.num_tokens == 20, "fork shares pages: used %zu", s.pages_used);
    pair[0] = a;
    pair[1] = b;
    EXPECT_OK(kvsieve_cache_page_table_size(cache, pair, 2, &n));
    EXPECT_OK(kvsieve_cache_page_table(cache, pair, 2, indptr, indices, 16, last));
    CHECK(n == 6 && indptr[1] == 3 && indptr[2] == 6 && last[0] == 2 && last[1] == 2, "table of [A, B]");
    CHECK(indices[0] == indices[3] && indices[1] == indices[4] && indices[2] == indices[5], "B's pages are A's");

    /* Appending to B copies the shared, partly filled last page; A is unaffected. */
    EXPECT_OK(kvsieve_cache_append(cache, b, 1, NULL, slots));
    write_tokens(b, 10, 1, 100);
    s = stats();
    CHECK(s.pages_used == 4, "copy-on-write took one page, used %zu", s.pages_used);
    EXPECT_OK(kvsieve_cache_page_table(cache, pair, 2, indptr, indices, 16, last));
    CHECK(indices[2] != indices[5] && indices[0] == indices[3] && last[0] == 2 && last[1] == 3,
          "B's last page is now its own");
    CHECK(slots[0] == (int64_t)indices[5] * PS + 2, "slot of B's new token is in its copied page");
    for (i = 0; i < 10; i++) want[i] = i;
    CHECK(ids_are(a, want, 10), "A still holds tokens 0..9");
    want[10] = 100;
    CHECK(ids_are(b, want, 11), "B holds tokens 0..9 then 100");

    /* Truncate B into a page it shares with A: B gets its own copy, A keeps its tokens. */
    EXPECT_OK(kvsieve_cache_truncate(cache, b, 5));
    EXPECT_OK(kvsieve_cache_seq_len(cache, b, &len));
    CHECK(len == 5, "B truncated to 5 tokens, got %zu", len);
    CHECK(ids_are(b, want, 5), "B holds tokens 0..4");
    CHECK(ids_are(a, want, 10), "A unaffected by B's truncation");
    EXPECT_OK(kvsieve_cache_page_table(cache, pair, 2, indptr, indices, 16, last));
    CHECK(indptr[2] - indptr[1] == 2 && last[1] == 1 && indices[3] == indices[0] && indices[4] != indices[1],
          "B: first page shared, second page copied, last_page_len 1");
    EXPECT_OK(kvsieve_cache_positions(cache, b, pos, 16, &n));
    CHECK(n == 5 && pos[0] == 0 && pos[4] == 4, "B's positions are 0..4");

    /* C: 12 tokens at positions 100..111; evicting its middle page keeps the others' positions. */
    for (i = 0; i < 12; i++) pos[i] = (int32_t)(100 + i);
    EXPECT_OK(kvsieve_cache_create_sequence(cache, &c));
    EXPECT_OK(kvsieve_cache_append(cache, c, 12, pos, NULL));
    write_tokens(c, 0, 12, 200);
    EXPECT_OK(kvsieve_cache_evict_pages(cache, c, evict, 1));
    EXPECT_OK(kvsieve_cache_seq_len(cache, c, &len));
    CHECK(len == 8, "C holds 8 tokens after evicting a page, got %zu", len);
    memset(pos, 0, sizeof pos);
    EXPECT_OK(kvsieve_cache_positions(cache, c, pos, 16, &n));
    CHECK(n == 8 && pos[0] == 100 && pos[3] == 103 && pos[4] == 108 && pos[7] == 111, "C's positions skip 104..107");
    for (i = 0; i < 4; i++) want[i] = 200 + i, want[4 + i] = 208 + i;
    CHECK(ids_are(c, want, 8), "C holds tokens 200..203, 208..211");
    /* Appending continues after the last stored position. */
    EXPECT_OK(kvsieve_cache_append(cache, c, 1, NULL, NULL));
    EXPECT_OK(kvsieve_cache_positions(cache, c, pos, 16, &n));
    CHECK(n == 9 && pos[8] == 112, "next position after 111 is 112, got %d", pos[8]);

    /* Free everything: every page returns. */
    EXPECT_OK(kvsieve_cache_free_sequence(cache, a));
    EXPECT_OK(kvsieve_cache_free_sequence(cache, b));
    EXPECT_OK(kvsieve_cache_free_sequence(cache, c));
    s = stats();
    CHECK(s.pages_used == 0 && s.pages_free == PAGES && s.num_sequences == 0 && s.num_tokens == 0,
          "all pages free after freeing every sequence");
    EXPECT_ERR(kvsieve_cache_seq_len(cache, a, &len), KVSIEVE_ERROR_UNKNOWN_SEQUENCE, "unknown sequence");
    section_done("fork, truncate, evict, page table export, stats", before);
}

static void key_bounds(void) {
    int before = g_failed;
    uint64_t s;
    float lo[ROW], hi[ROW];
    size_t h, c;
    int ok = 1;
    EXPECT_OK(kvsieve_cache_create_sequence(cache, &s));
    EXPECT_OK(kvsieve_cache_append(cache, s, 6, NULL, NULL));
    write_tokens(s, 0, 6, 40);
    /* Page 1 holds tokens 44, 45 (ids increase with the token, so min is 44, max 45). */
    EXPECT_OK(kvsieve_cache_page_key_bounds(cache, s, 1, 1, lo, hi, ROW));
    for (h = 0; h < HK; h++)
        for (c = 0; c < D; c++) {
            ok &= lo[h * D + c] == key_value(1, 44, h, c);
            ok &= hi[h * D + c] == key_value(1, 45, h, c);
        }
    CHECK(ok, "bounds of page 1, layer 1 are tokens 44 and 45");
    /* After truncating to 5, page 1 holds only token 44. */
    EXPECT_OK(kvsieve_cache_truncate(cache, s, 5));
    EXPECT_OK(kvsieve_cache_page_key_bounds(cache, s, 0, 1, lo, hi, ROW));
    ok = 1;
    for (h = 0; h < HK; h++)
        for (c = 0; c < D; c++) ok &= lo[h * D + c] == key_value(0, 44, h, c) && hi[h * D + c] == key_value(0, 44, h, c);
    CHECK(ok, "bounds of a truncated page cover only the kept token");
    /* A page whose slots were appended but never written has empty bounds. */
    EXPECT_OK(kvsieve_cache_append(cache, s, 4, NULL, NULL));
    EXPECT_OK(kvsieve_cache_page_key_bounds(cache, s, 0, 2, lo, hi, ROW));
    CHECK(isinf(lo[0]) && lo[0] > 0 && isinf(hi[0]) && hi[0] < 0, "unwritten page: +inf / -inf");
    EXPECT_OK(kvsieve_cache_free_sequence(cache, s));
    section_done("page key bounds", before);
}

static void empty_sequence_decode(void) {
    int before = g_failed;
    uint64_t s;
    float q[2 * HK * D], out[2 * HK * D], lse[2 * HK];
    test_tensor tq, to;
    size_t i;
    int ok = 1;
    for (i = 0; i < 2 * HK * D; i++) q[i] = 1.0f, out[i] = NAN;
    EXPECT_OK(kvsieve_cache_create_sequence(cache, &s));
    EXPECT_OK(kvsieve_cache_decode(cache, 0, &s, 1, tensor3(&tq, q, dt_f32(), 1, 2 * HK, D),
                                   tensor3(&to, out, dt_f32(), 1, 2 * HK, D), lse, NULL));
    for (i = 0; i < 2 * HK * D; i++) ok &= out[i] == 0.0f;
    for (i = 0; i < 2 * HK; i++) ok &= isinf(lse[i]) && lse[i] < 0;
    CHECK(ok, "decode over an empty sequence: zero output, -inf LSE");
    /* A batch of zero sequences is a no-op. */
    EXPECT_OK(kvsieve_cache_decode(cache, 0, NULL, 0, tensor3(&tq, NULL, dt_f32(), 0, 2 * HK, D),
                                   tensor3(&to, NULL, dt_f32(), 0, 2 * HK, D), NULL, NULL));
    EXPECT_OK(kvsieve_cache_free_sequence(cache, s));
    section_done("decode over empty sequences", before);
}

int main(void) {
    config_round_trip();
    if (!cache) return finish();
    fork_truncate_evict();
    key_bounds();
    empty_sequence_decode();
    kvsieve_cache_free(cache);
    return finish();
}
