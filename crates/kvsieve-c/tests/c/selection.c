/* Selections through the C API: made from CSR arrays, dense, one list for all heads, sinks +
 * window and the Λ-mask, then inspected (shape, CSR arrays, per-head lists, statistics) and
 * combined (union, intersection), each checked against lists computed here; and page-bound
 * selection on a real cache against a ranking of the cache's own page key bounds. */
#include "common.h"

/* The CSR arrays of a selection, copied out. Returns 1 if every copy succeeded. */
static int copy_csr(const kvsieve_selection_t *sel, uint32_t *indptr, size_t indptr_cap, uint32_t *indices,
                    size_t indices_cap) {
    size_t n1 = 0, n2 = 0;
    int ok = EXPECT_OK(kvsieve_selection_head_indptr(sel, indptr, indptr_cap, &n1));
    ok &= EXPECT_OK(kvsieve_selection_indices(sel, indices, indices_cap, &n2));
    return ok;
}

/* Whether KV head `h` of `sel` reads exactly `want[0..n)`. */
static int head_is(const kvsieve_selection_t *sel, size_t h, const uint32_t *want, size_t n) {
    uint32_t got[256];
    size_t len = 999, i;
    if (!EXPECT_OK(kvsieve_selection_head(sel, h, got, 256, &len))) return 0;
    if (len != n) return 0;
    for (i = 0; i < n; i++) {
        if (got[i] != want[i]) return 0;
    }
    return 1;
}

static void from_csr_round_trip(void) {
    enum { HK = 3, SEQ = 40 };
    int before = g_failed;
    uint32_t lists[HK][SEQ], indptr[HK + 1], indices[HK * SEQ], got_indptr[HK + 2], got_indices[HK * SEQ + 1];
    size_t counts[HK] = {0, 0, 0}, per_head[HK + 1], h, i, nnz = 0, value = 0;
    kvsieve_selection_t *sel = NULL;
    kvsieve_selection_stats_t st;
    size_t min_c = SEQ, max_c = 0;

    counts[0] = rand_subset(lists[0], SEQ, 0.3);
    counts[1] = 0; /* an empty head */
    counts[2] = rand_subset(lists[2], SEQ, 0.8);
    indptr[0] = 0;
    for (h = 0; h < HK; h++) {
        for (i = 0; i < counts[h]; i++) indices[nnz++] = lists[h][i];
        indptr[h + 1] = (uint32_t)nnz;
        if (counts[h] < min_c) min_c = counts[h];
        if (counts[h] > max_c) max_c = counts[h];
    }
    if (!EXPECT_OK(kvsieve_selection_from_csr(SEQ, indptr, HK + 1, indices, nnz, &sel))) return;

    EXPECT_OK(kvsieve_selection_num_kv_heads(sel, &value));
    CHECK(value == HK, "num_kv_heads %zu", value);
    EXPECT_OK(kvsieve_selection_seq_len(sel, &value));
    CHECK(value == SEQ, "seq_len %zu", value);
    EXPECT_OK(kvsieve_selection_len(sel, &value));
    CHECK(value == nnz, "len %zu, expected %zu", value, nnz);

    /* Copies into buffers of exactly the right size and larger. */
    memset(got_indptr, 0xff, sizeof got_indptr);
    memset(got_indices, 0xff, sizeof got_indices);
    copy_csr(sel, got_indptr, HK + 2, got_indices, nnz);
    CHECK(memcmp(got_indptr, indptr, sizeof indptr) == 0 && got_indptr[HK + 1] == 0xffffffffu, "head_indptr copied");
    CHECK(memcmp(got_indices, indices, nnz * sizeof(uint32_t)) == 0 && got_indices[nnz] == 0xffffffffu, "indices copied");
    for (h = 0; h < HK; h++) CHECK(head_is(sel, h, lists[h], counts[h]), "head %zu", h);

    /* Statistics. */
    kvsieve_selection_stats_init(&st);
    EXPECT_OK(kvsieve_selection_stats(sel, &st, per_head, HK + 1));
    CHECK(st.seq_len == SEQ && st.num_kv_heads == HK && st.total == nnz, "stats shape");
    CHECK(fabs(st.density - (double)nnz / (HK * SEQ)) < 1e-12, "density %g", st.density);
    CHECK(fabs(st.min_density - (double)min_c / SEQ) < 1e-12 && fabs(st.max_density - (double)max_c / SEQ) < 1e-12,
          "min/max density %g %g", st.min_density, st.max_density);
    for (h = 0; h < HK; h++) CHECK(per_head[h] == counts[h], "per_head[%zu] = %zu", h, per_head[h]);
    kvsieve_selection_stats_init(&st);
    EXPECT_OK(kvsieve_selection_stats(sel, &st, NULL, 0));
    CHECK(st.total == nnz, "stats without per_head");
    kvsieve_selection_free(sel);

    /* A selection of an empty sequence. */
    indptr[0] = indptr[1] = 0;
    if (EXPECT_OK(kvsieve_selection_from_csr(0, indptr, 2, NULL, 0, &sel))) {
        EXPECT_OK(kvsieve_selection_stats(sel, &st, NULL, 0));
        CHECK(st.total == 0 && st.density == 0.0 && st.num_kv_heads == 1, "empty selection stats");
        EXPECT_OK(kvsieve_selection_indices(sel, NULL, 0, &value));
        CHECK(value == 0, "empty indices");
        kvsieve_selection_free(sel);
    }
    section_done("selection from CSR: inspection round trip", before);
}

static void constructors(void) {
    int before = g_failed;
    kvsieve_selection_t *sel = NULL;
    uint32_t want[64], tokens[5] = {1, 4, 9, 16, 25};
    size_t i, n, h;
    kvsieve_selection_stats_t st;

    kvsieve_selection_stats_init(&st);
    EXPECT_OK(kvsieve_selection_dense(2, 13, &sel));
    for (i = 0; i < 13; i++) want[i] = (uint32_t)i;
    CHECK(head_is(sel, 0, want, 13) && head_is(sel, 1, want, 13), "dense reads every token");
    EXPECT_OK(kvsieve_selection_stats(sel, &st, NULL, 0));
    CHECK(st.density == 1.0 && st.min_density == 1.0 && st.max_density == 1.0, "dense density 1");
    kvsieve_selection_free(sel);

    EXPECT_OK(kvsieve_selection_same_for_all_heads(3, 30, tokens, 5, &sel));
    for (h = 0; h < 3; h++) CHECK(head_is(sel, h, tokens, 5), "same list for head %zu", h);
    kvsieve_selection_free(sel);

    /* Sinks 4 + window 8 over 30 tokens: 0..3 and 22..29. */
    EXPECT_OK(kvsieve_selection_streaming(2, 30, 4, 8, &sel));
    for (n = 0, i = 0; i < 4; i++) want[n++] = (uint32_t)i;
    for (i = 22; i < 30; i++) want[n++] = (uint32_t)i;
    CHECK(head_is(sel, 0, want, n) && head_is(sel, 1, want, n), "streaming 4 + 8 of 30");
    kvsieve_selection_free(sel);

    /* Overlapping ranges merge: the whole of a 10-token sequence. */
    EXPECT_OK(kvsieve_selection_streaming(1, 10, 4, 8, &sel));
    for (i = 0; i < 10; i++) want[i] = (uint32_t)i;
    CHECK(head_is(sel, 0, want, 10), "streaming over a short sequence reads it whole");
    kvsieve_selection_free(sel);

    /* No sinks: a plain sliding window. */
    EXPECT_OK(kvsieve_selection_streaming(1, 20, 0, 3, &sel));
    want[0] = 17, want[1] = 18, want[2] = 19;
    CHECK(head_is(sel, 0, want, 3), "sliding window of 3");
    kvsieve_selection_free(sel);

    /* Λ-mask: global 2, local 5 of 50. */
    EXPECT_OK(kvsieve_selection_lambda(2, 50, 2, 5, &sel));
    for (n = 0, i = 0; i < 2; i++) want[n++] = (uint32_t)i;
    for (i = 45; i < 50; i++) want[n++] = (uint32_t)i;
    CHECK(head_is(sel, 0, want, n) && head_is(sel, 1, want, n), "lambda 2 + 5 of 50");
    kvsieve_selection_free(sel);
    section_done("dense, same-for-all-heads, streaming and lambda selections", before);
}

/* Build a selection of hk random heads over seq tokens; their lists go to `lists`. */
static kvsieve_selection_t *random_selection(size_t hk, size_t seq, double p, uint32_t lists[][64], size_t *counts) {
    uint32_t indptr[9], indices[8 * 64];
    size_t h, i, nnz = 0;
    kvsieve_selection_t *sel = NULL;
    indptr[0] = 0;
    for (h = 0; h < hk; h++) {
        counts[h] = rand_subset(lists[h], seq, p);
        for (i = 0; i < counts[h]; i++) indices[nnz++] = lists[h][i];
        indptr[h + 1] = (uint32_t)nnz;
    }
    EXPECT_OK(kvsieve_selection_from_csr(seq, indptr, hk + 1, indices, nnz, &sel));
    return sel;
}

static void union_and_intersection(void) {
    enum { HK = 4, SEQ = 64 };
    int before = g_failed;
    uint32_t a[HK][64], b[HK][64], want_u[64], want_i[64];
    size_t ca[HK], cb[HK], h, t, i;
    int trial;

    for (trial = 0; trial < 4; trial++) {
        kvsieve_selection_t *sa = random_selection(HK, SEQ, 0.2 + 0.2 * trial, a, ca);
        kvsieve_selection_t *sb = random_selection(HK, SEQ, 0.5, b, cb);
        kvsieve_selection_t *su = NULL, *si = NULL;
        EXPECT_OK(kvsieve_selection_union(sa, sb, &su));
        EXPECT_OK(kvsieve_selection_intersection(sa, sb, &si));
        for (h = 0; h < HK; h++) {
            char in_a[SEQ], in_b[SEQ];
            size_t nu = 0, ni = 0;
            memset(in_a, 0, SEQ);
            memset(in_b, 0, SEQ);
            for (i = 0; i < ca[h]; i++) in_a[a[h][i]] = 1;
            for (i = 0; i < cb[h]; i++) in_b[b[h][i]] = 1;
            for (t = 0; t < SEQ; t++) {
                if (in_a[t] || in_b[t]) want_u[nu++] = (uint32_t)t;
                if (in_a[t] && in_b[t]) want_i[ni++] = (uint32_t)t;
            }
            CHECK(head_is(su, h, want_u, nu), "union, trial %d head %zu", trial, h);
            CHECK(head_is(si, h, want_i, ni), "intersection, trial %d head %zu", trial, h);
        }
        kvsieve_selection_free(sa);
        kvsieve_selection_free(sb);
        kvsieve_selection_free(su);
        kvsieve_selection_free(si);
    }
    section_done("union and intersection", before);
}

/* Page-bound selection against the ranking computed here from the cache's page key bounds:
 * per KV head, score each page by the largest over the group's query heads of
 * sum_i max(q_i * max_i, q_i * min_i), take pages best first until the budget is reached. */
static void page_bounds(void) {
    enum { HK = 2, HQ = 6, D = 32, PS = 8, LEN = 75, PAGES = (LEN + PS - 1) / PS };
    int before = g_failed;
    kvsieve_cache_config_t cfg = kvsieve_cache_config_default(2, HK, D, PS, PAGES + 1);
    kvsieve_cache_t *cache = NULL;
    uint64_t seq;
    float *k = rand_floats(LEN * HK * D, 1.0f), *v = rand_floats(LEN * HK * D, 1.0f), *q = rand_floats(HQ * D, 1.0f);
    float mn[PAGES][HK * D], mx[PAGES][HK * D];
    double score[HK][PAGES];
    test_tensor tk, tv, tq;
    kvsieve_page_bounds_config_t pb;
    kvsieve_selection_t *sel = NULL;
    size_t budgets[3] = {20, 33, 1}, bi, p, h, g, c, layer = 1;

    cfg.dtype = dt_f32();
    EXPECT_OK(kvsieve_cache_new(&cfg, &cache));
    EXPECT_OK(kvsieve_cache_create_sequence(cache, &seq));
    EXPECT_OK(kvsieve_cache_append(cache, seq, LEN, NULL, NULL));
    for (c = 0; c < 2; c++)
        EXPECT_OK(kvsieve_cache_write(cache, seq, c, 0, tensor3(&tk, k, dt_f32(), LEN, HK, D),
                                      tensor3(&tv, v, dt_f32(), LEN, HK, D)));
    for (p = 0; p < PAGES; p++) EXPECT_OK(kvsieve_cache_page_key_bounds(cache, seq, layer, p, mn[p], mx[p], HK * D));
    for (h = 0; h < HK; h++) {
        for (p = 0; p < PAGES; p++) {
            double best = -INFINITY;
            for (g = 0; g < HQ / HK; g++) {
                const float *qh = q + (h * (HQ / HK) + g) * D;
                double s = 0.0;
                for (c = 0; c < D; c++) {
                    double lo = (double)qh[c] * mn[p][h * D + c], hi = (double)qh[c] * mx[p][h * D + c];
                    s += lo > hi ? lo : hi;
                }
                if (s > best) best = s;
            }
            score[h][p] = best;
        }
    }
    kvsieve_page_bounds_config_init(&pb);
    tensor3(&tq, q, dt_f32(), 1, HQ, D);
    for (bi = 0; bi < 3; bi++) {
        pb.budget_tokens = budgets[bi];
        pb.min_pages = bi == 2 ? 3 : 0;
        if (!EXPECT_OK(kvsieve_selection_page_bounds(cache, seq, layer, &tq.t, &pb, &sel))) continue;
        for (h = 0; h < HK; h++) {
            char taken[PAGES];
            uint32_t want[LEN];
            size_t kept = 0, npages = 0, n = 0, t;
            memset(taken, 0, PAGES);
            while (npages < PAGES && (kept < pb.budget_tokens || npages < pb.min_pages)) {
                size_t best = PAGES;
                for (p = 0; p < PAGES; p++) {
                    if (!taken[p] && (best == PAGES || score[h][p] > score[h][best])) best = p;
                }
                taken[best] = 1;
                kept += best == PAGES - 1 ? LEN - best * PS : PS;
                npages++;
            }
            for (t = 0; t < LEN; t++) {
                if (taken[t / PS]) want[n++] = (uint32_t)t;
            }
            CHECK(head_is(sel, h, want, n), "page bounds budget %zu min_pages %zu head %zu (%zu tokens)", pb.budget_tokens,
                  pb.min_pages, h, n);
            CHECK(n >= pb.budget_tokens && n < pb.budget_tokens + PS + (pb.min_pages ? PS * pb.min_pages : 0),
                  "kept %zu tokens for a budget of %zu", n, pb.budget_tokens);
        }
        kvsieve_selection_free(sel);
        sel = NULL;
    }

    /* A budget at least the sequence's length keeps it whole; a 2-D query is accepted. */
    pb.budget_tokens = LEN;
    pb.min_pages = 0;
    tq.shape[0] = HQ;
    tq.shape[1] = D;
    tq.t.ndim = 2;
    if (EXPECT_OK(kvsieve_selection_page_bounds(cache, seq, 0, &tq.t, &pb, &sel))) {
        kvsieve_selection_stats_t st;
        kvsieve_selection_stats_init(&st);
        EXPECT_OK(kvsieve_selection_stats(sel, &st, NULL, 0));
        CHECK(st.density == 1.0 && st.seq_len == LEN, "budget >= seq_len: dense (density %g)", st.density);
        kvsieve_selection_free(sel);
    }
    kvsieve_cache_free(cache);
    free(k), free(v), free(q);
    section_done("page bounds selection matches the ranking of the page key bounds", before);
}

/* The span rule restated plainly: per hit, the span's free tokens by distance, then index. */
static size_t spans_reference(const uint32_t *hits, size_t nh, size_t span, size_t budget, size_t len,
                              const uint8_t *anyway, uint32_t *out) {
    uint8_t taken[256] = {0};
    size_t n = 0, i, d, k;
    for (i = 0; i < nh && n < budget; i++) {
        long t = (long)hits[i], lo = t - (long)((span - 1) / 2), hi = t + (long)(span / 2);
        if (hits[i] >= len) continue;
        for (d = 0; d <= span && n < budget; d++) {
            long c[2] = {t - (long)d, t + (long)d};
            for (k = 0; k < (d ? 2u : 1u) && n < budget; k++) {
                if (c[k] < lo || c[k] > hi || c[k] < 0 || c[k] >= (long)len || taken[c[k]] || anyway[c[k]]) continue;
                taken[c[k]] = 1;
                n++;
            }
        }
    }
    for (i = 0, k = 0; i < len; i++)
        if (taken[i]) out[k++] = (uint32_t)i;
    return n;
}

static void spans(void) {
    int before = g_failed, trial;
    for (trial = 0; trial < 200; trial++) {
        size_t len = 1 + (size_t)(rng_next() % (200)), nh = (size_t)(rng_next() % (10)), span = 1 + (size_t)(rng_next() % (15)), budget = (size_t)(rng_next() % (60));
        uint32_t hits[10], anyway[256], got[256], want[256];
        uint8_t is_anyway[256] = {0};
        size_t na = 0, i, n = 0, nw;
        for (i = 0; i < nh; i++) hits[i] = (uint32_t)(size_t)(rng_next() % (210));
        for (i = 0; i < len; i++)
            if ((size_t)(rng_next() % (8)) == 0) is_anyway[i] = 1, anyway[na++] = (uint32_t)i;
        nw = spans_reference(hits, nh, span, budget, len, is_anyway, want);
        EXPECT_OK(kvsieve_expand_spans(hits, nh, span, budget, len, anyway, na, got, 256, &n));
        CHECK(n == nw && memcmp(got, want, n * sizeof *got) == 0, "expand_spans trial %d: %zu tokens, expected %zu",
              trial, n, nw);
    }
    {
        uint32_t h[2] = {10, 30}, out[8], want[7] = {8, 9, 10, 11, 12, 29, 30}, unsorted[2] = {5, 3};
        size_t n = 99;
        EXPECT_OK(kvsieve_expand_spans(h, 2, 5, 7, 100, NULL, 0, out, 8, &n));
        CHECK(n == 7 && memcmp(out, want, sizeof want) == 0, "two hits, span 5, budget 7");
        n = 99;
        EXPECT_ERR(kvsieve_expand_spans(h, 2, 0, 7, 100, NULL, 0, out, 8, &n), KVSIEVE_ERROR_INVALID_ARGUMENT, "span");
        EXPECT_ERR(kvsieve_expand_spans(h, 2, 5, 7, 100, NULL, 0, out, 6, &n), KVSIEVE_ERROR_INVALID_ARGUMENT,
                   "capacity");
        EXPECT_ERR(kvsieve_expand_spans(h, 2, 5, 7, 100, unsorted, 2, out, 8, &n), KVSIEVE_ERROR_INVALID_ARGUMENT,
                   "read_anyway");
        EXPECT_ERR(kvsieve_expand_spans(NULL, 2, 5, 7, 100, NULL, 0, out, 8, &n), KVSIEVE_ERROR_NULL_POINTER, "`hits`");
        CHECK(n == 99, "out_len untouched by failed calls");
    }
    section_done("expand_spans follows the span rule", before);
}

int main(void) {
    rng_seed(11);
    spans();
    from_csr_round_trip();
    constructors();
    union_and_intersection();
    page_bounds();
    return finish();
}
