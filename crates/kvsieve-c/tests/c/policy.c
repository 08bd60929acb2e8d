/* Selection policies through the C API: the text form (parse, canonical text, round trip,
 * malformed texts and their byte offsets), validation against a model, selection on a real
 * cache checked token by token, decode and prefill under a policy against sparse attention
 * over the policy's own selections and against a plain reference, and position modes. */
#include "common.h"

enum { LAYERS = 2, HK = 2, GROUP = 2, HQ = HK * GROUP, D = 16, PS = 4 };

/* The canonical text of a policy, in a buffer the caller frees (NULL on failure). */
static char *policy_text(const kvsieve_policy_t *p) {
    size_t size = 0, size2 = 0;
    char *buf;
    if (!EXPECT_OK(kvsieve_policy_to_string(p, NULL, 0, &size))) return NULL;
    buf = (char *)malloc(size);
    if (!EXPECT_OK(kvsieve_policy_to_string(p, buf, size, &size2))) {
        free(buf);
        return NULL;
    }
    CHECK(size2 == size && strlen(buf) + 1 == size, "to_string size %zu, text of %zu bytes", size, strlen(buf));
    return buf;
}

static kvsieve_policy_t *parse(const char *text) {
    kvsieve_policy_t *p = NULL;
    EXPECT_OK(kvsieve_policy_parse(text, &p));
    return p;
}

static void text_round_trip(void) {
    static const char *const cases[][2] = {
        {"", "dense"},
        {"   \n\t", "dense"},
        {"dense", "dense"},
        {"window = 512 , sinks=4", "sinks=4,window=512"},
        {"sinks=4,window=1024,pages=2048;layers=0-1:dense", "sinks=4,window=1024,pages=2048;layers=0-1:dense"},
        {"global=4,local=4096,max_distance=4096", "sinks=4,window=4096,positions=capped,max_distance=4096"},
        {"window=512;layers=30-31,0-1:dense;heads=5.1,2.0:min_pages=2,pages=4096",
         "window=512;layers=0-1,30-31:dense;heads=2.0,5.1:pages=4096,min_pages=2"},
        {"layers=2-3,0-1:dense", "dense;layers=0-3:dense"},
        {"sinks=4,window=16,positions=contiguous", "sinks=4,window=16,positions=contiguous"},
        {"span=32, topk=1024,window=256,sinks=32,positions=contiguous",
         "sinks=32,window=256,topk=1024,span=32,positions=contiguous"},
    };
    int before = g_failed;
    size_t i, n = sizeof cases / sizeof cases[0];
    for (i = 0; i < n; i++) {
        kvsieve_policy_t *p = parse(cases[i][0]), *again;
        char *text, *text2;
        if (!p) continue;
        text = policy_text(p);
        CHECK(text && strcmp(text, cases[i][1]) == 0, "\"%s\" prints as \"%s\", expected \"%s\"", cases[i][0],
              text ? text : "(null)", cases[i][1]);
        again = text ? parse(text) : NULL;
        text2 = again ? policy_text(again) : NULL;
        CHECK(text2 && strcmp(text, text2) == 0, "canonical text of \"%s\" parses back to itself", cases[i][0]);
        free(text);
        free(text2);
        kvsieve_policy_free(p);
        kvsieve_policy_free(again);
    }
    section_done("policy text: parse, canonical form, round trip", before);
}

static void malformed_texts(void) {
    static const struct {
        const char *text;
        int64_t offset;
        const char *needle;
    } cases[] = {
        {"window=x", 7, "expected a number after `window=`"},
        {"sinks=4,window=", 15, "the end of the text"},
        {"sinks=4, windw=8", 9, "unknown key `windw`"},
        {"window=8 @", 9, "unexpected character `@`"},
        {"sinks=4;sinks=8", 8, "default spec was already given"},
        {"window=8;layers=3-1:dense", 16, "a <= b"},
        {"heads=2:window=4", 7, "`.`"},
        {"window=4,window=8", 9, "once per spec"},
        {"dense,window=4", 6, "`window=`"},
        {"window=8\xff", 8, "UTF-8"},
    };
    int before = g_failed;
    size_t i;
    for (i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        kvsieve_policy_t *sentinel = (kvsieve_policy_t *)&g_passed, *p = sentinel;
        kvsieve_error_t *err = kvsieve_policy_parse(cases[i].text, &p);
        int64_t off = kvsieve_error_parse_offset(err);
        CHECK(off == cases[i].offset, "\"%s\": parse offset %lld, expected %lld (%s)", cases[i].text, (long long)off,
              (long long)cases[i].offset, kvsieve_error_message(err));
        EXPECT_ERR(err, KVSIEVE_ERROR_PARSE, cases[i].needle);
        CHECK(p == sentinel, "out untouched by a failed parse");
    }
    section_done("policy text: malformed texts fail at the expected byte offset", before);
}

static void validate(void) {
    static const struct {
        const char *text;
        kvsieve_error_code_t code;
        const char *needle;
    } bad[] = {
        {"window=8;heads=0.2:dense", KVSIEVE_ERROR_OUT_OF_RANGE, "0..2 (KV heads of layer 0)"},
        {"window=8;layers=1-2:dense", KVSIEVE_ERROR_OUT_OF_RANGE, "0..2 (the model's layers)"},
        {"window=0", KVSIEVE_ERROR_INVALID_ARGUMENT, "window=N with N >= 1"},
        {"pages=0", KVSIEVE_ERROR_INVALID_ARGUMENT, "token budget N >= 1"},
        {"window=4,min_pages=2", KVSIEVE_ERROR_INVALID_ARGUMENT, "`min_pages=` only together with `pages=`"},
        {"window=4,positions=capped", KVSIEVE_ERROR_INVALID_ARGUMENT, "`max_distance=N`"},
        {"sinks=0", KVSIEVE_ERROR_INVALID_ARGUMENT, "a spec that selects tokens"},
        {"window=4;heads=1.1:window=4,positions=contiguous", KVSIEVE_ERROR_INVALID_ARGUMENT, "one position mode"},
        {"window=4,span=8", KVSIEVE_ERROR_INVALID_ARGUMENT, "`span=` only together with a retrieval item"},
        {"window=4,topk=0", KVSIEVE_ERROR_INVALID_ARGUMENT, "topk=N with a token budget N >= 1"},
    };
    int before = g_failed;
    size_t i;
    kvsieve_policy_t *p;
    for (i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        if (!(p = parse(bad[i].text))) continue;
        EXPECT_ERR(kvsieve_policy_validate(p, LAYERS, HK), bad[i].code, bad[i].needle);
        kvsieve_policy_free(p);
    }
    if ((p = parse("sinks=4,window=8;layers=1:dense;heads=0.1:window=2"))) {
        EXPECT_OK(kvsieve_policy_validate(p, LAYERS, HK));
        EXPECT_ERR(kvsieve_policy_validate(p, 1, HK), KVSIEVE_ERROR_OUT_OF_RANGE, "layers=1:dense");
        kvsieve_policy_free(p);
    }
    section_done("policy validation against a model", before);
}

typedef struct {
    kvsieve_cache_t *cache;
    uint64_t ids[2];
    size_t lens[2];
    float *k[2][LAYERS], *v[2][LAYERS];
} fixture;

static void setup(fixture *f) {
    kvsieve_cache_config_t cfg = kvsieve_cache_config_default(LAYERS, HK, D, PS, 40);
    test_tensor tk, tv;
    size_t b, layer;
    memset(f, 0, sizeof *f);
    f->lens[0] = 45;
    f->lens[1] = 30;
    cfg.dtype = dt_f32();
    EXPECT_OK(kvsieve_cache_new(&cfg, &f->cache));
    for (b = 0; b < 2; b++) {
        size_t n = f->lens[b] * HK * D;
        EXPECT_OK(kvsieve_cache_create_sequence(f->cache, &f->ids[b]));
        EXPECT_OK(kvsieve_cache_append(f->cache, f->ids[b], f->lens[b], NULL, NULL));
        for (layer = 0; layer < LAYERS; layer++) {
            f->k[b][layer] = rand_floats(n, 1.0f);
            f->v[b][layer] = rand_floats(n, 1.0f);
            EXPECT_OK(kvsieve_cache_write(f->cache, f->ids[b], layer, 0,
                                          tensor3(&tk, f->k[b][layer], dt_f32(), (int64_t)f->lens[b], HK, D),
                                          tensor3(&tv, f->v[b][layer], dt_f32(), (int64_t)f->lens[b], HK, D)));
        }
    }
}

static void teardown(fixture *f) {
    size_t b, layer;
    for (b = 0; b < 2; b++) {
        for (layer = 0; layer < LAYERS; layer++) {
            free(f->k[b][layer]);
            free(f->v[b][layer]);
        }
    }
    kvsieve_cache_free(f->cache);
}

/* KV head h of `sel` reads exactly `want[0..n)`. */
static int head_is(const kvsieve_selection_t *sel, size_t h, const uint32_t *want, size_t n) {
    uint32_t got[128];
    size_t len = 0, i;
    if (!EXPECT_OK(kvsieve_selection_head(sel, h, got, 128, &len)) || len != n) return 0;
    for (i = 0; i < n; i++) {
        if (got[i] != want[i]) return 0;
    }
    return 1;
}

/* `a` and `b` have the same shape and tokens. */
static int same_selection(const kvsieve_selection_t *a, const kvsieve_selection_t *b) {
    uint32_t ia[HK * 128], ib[HK * 128], pa[HK + 1], pb[HK + 1];
    size_t na = 0, nb = 0, sa = 0, sb = 0;
    if (!a || !b) return 0;
    EXPECT_OK(kvsieve_selection_seq_len(a, &sa));
    EXPECT_OK(kvsieve_selection_seq_len(b, &sb));
    EXPECT_OK(kvsieve_selection_head_indptr(a, pa, HK + 1, NULL));
    EXPECT_OK(kvsieve_selection_head_indptr(b, pb, HK + 1, NULL));
    EXPECT_OK(kvsieve_selection_indices(a, ia, HK * 128, &na));
    EXPECT_OK(kvsieve_selection_indices(b, ib, HK * 128, &nb));
    return sa == sb && na == nb && memcmp(pa, pb, sizeof pa) == 0 && memcmp(ia, ib, na * sizeof(uint32_t)) == 0;
}

static void select_on_cache(void) {
    int before = g_failed;
    fixture f;
    float *q = rand_floats(HQ * D, 1.0f);
    test_tensor tq;
    kvsieve_policy_t *p;
    kvsieve_selection_t *sel = NULL, *pages = NULL, *window = NULL, *both = NULL;
    uint32_t want[64];
    size_t i, n = 0, len;
    kvsieve_page_bounds_config_t pb;

    setup(&f);
    len = f.lens[0];
    tensor3(&tq, q, dt_f32(), 1, HQ, D);

    /* Sinks 4 + window 8 in layer 0, head 1 of layer 0 only the last 3, layer 1 dense. */
    p = parse("sinks=4,window=8;layers=1:dense;heads=0.1:window=3");
    if (EXPECT_OK(kvsieve_policy_select(p, f.cache, f.ids[0], 0, &tq.t, &sel))) {
        for (i = 0; i < 4; i++) want[n++] = (uint32_t)i;
        for (i = len - 8; i < len; i++) want[n++] = (uint32_t)i;
        CHECK(head_is(sel, 0, want, n), "layer 0 head 0: sinks 4 + window 8");
        for (n = 0, i = len - 3; i < len; i++) want[n++] = (uint32_t)i;
        CHECK(head_is(sel, 1, want, n), "layer 0 head 1: the last 3 tokens");
        kvsieve_selection_free(sel);
        sel = NULL;
    }
    if (EXPECT_OK(kvsieve_policy_select(p, f.cache, f.ids[0], 1, &tq.t, &sel))) {
        kvsieve_selection_stats_t st;
        kvsieve_selection_stats_init(&st);
        EXPECT_OK(kvsieve_selection_stats(sel, &st, NULL, 0));
        CHECK(st.density == 1.0 && st.seq_len == len && st.num_kv_heads == HK, "layer 1: dense");
        kvsieve_selection_free(sel);
        sel = NULL;
    }
    kvsieve_policy_free(p);

    /* Page bounds plus a window: the union of the two methods' selections. */
    p = parse("pages=12,window=5");
    kvsieve_page_bounds_config_init(&pb);
    pb.budget_tokens = 12;
    EXPECT_OK(kvsieve_policy_select(p, f.cache, f.ids[0], 1, &tq.t, &sel));
    EXPECT_OK(kvsieve_selection_page_bounds(f.cache, f.ids[0], 1, &tq.t, &pb, &pages));
    EXPECT_OK(kvsieve_selection_streaming(HK, len, 0, 5, &window));
    EXPECT_OK(kvsieve_selection_union(pages, window, &both));
    CHECK(same_selection(sel, both), "pages=12,window=5 equals page bounds to 12 tokens joined with the last 5");
    kvsieve_selection_free(sel);
    kvsieve_selection_free(pages);
    kvsieve_selection_free(window);
    kvsieve_selection_free(both);
    kvsieve_policy_free(p);
    teardown(&f);
    free(q);
    section_done("policy select on a cache: sinks + window, head overrides, page bounds, dense layers", before);
}

static void decode_with_policy(void) {
    int before = g_failed;
    fixture f;
    float *q = rand_floats(2 * HQ * D, 1.0f);
    float out[2 * HQ * D], lse[2 * HQ], out2[2 * HQ * D], lse2[2 * HQ], ref_out[2 * HQ * D], ref_lse[2 * HQ];
    test_tensor tq, to, tq1;
    kvsieve_policy_t *p;
    kvsieve_selection_t *got[2] = {NULL, NULL}, *picked[2] = {NULL, NULL};
    uint32_t indptr[HK + 1], indices[HK * 64];
    size_t b, layer;

    setup(&f);
    p = parse("sinks=2,pages=8,window=4;layers=1:dense");
    /* Layer 0: sparse. The selections returned equal policy_select's, and so does attention. */
    layer = 0;
    EXPECT_OK(kvsieve_cache_decode_with_policy(f.cache, layer, f.ids, 2, tensor3(&tq, q, dt_f32(), 2, HQ, D), p,
                                               tensor3(&to, out, dt_f32(), 2, HQ, D), lse, NULL, got));
    for (b = 0; b < 2; b++) {
        tensor3(&tq1, q + b * HQ * D, dt_f32(), 1, HQ, D);
        EXPECT_OK(kvsieve_policy_select(p, f.cache, f.ids[b], layer, &tq1.t, &picked[b]));
        CHECK(same_selection(got[b], picked[b]), "decode_with_policy's selection %zu equals policy_select's", b);
    }
    EXPECT_OK(kvsieve_cache_decode_sparse(f.cache, layer, f.ids, 2, tensor3(&tq, q, dt_f32(), 2, HQ, D), picked,
                                          tensor3(&to, out2, dt_f32(), 2, HQ, D), lse2, NULL));
    CHECK(max_abs_diff(out, out2, 2 * HQ * D) == 0.0 && max_abs_diff(lse, lse2, 2 * HQ) == 0.0,
          "decode_with_policy equals decode_sparse over policy_select's selections (err %g)",
          max_abs_diff(out, out2, 2 * HQ * D));
    for (b = 0; b < 2; b++) {
        size_t nnz = 0;
        EXPECT_OK(kvsieve_selection_head_indptr(picked[b], indptr, HK + 1, NULL));
        EXPECT_OK(kvsieve_selection_indices(picked[b], indices, HK * 64, &nnz));
        ref_attention_sel(q + b * HQ * D, f.k[b][layer], f.v[b][layer], HQ, HK, D, indptr, indices, f.lens[b] - 1, NULL,
                          ref_out + b * HQ * D, ref_lse + b * HQ);
        kvsieve_selection_free(got[b]);
        kvsieve_selection_free(picked[b]);
    }
    CHECK(max_abs_diff(out, ref_out, 2 * HQ * D) < 1e-4 && max_abs_diff(lse, ref_lse, 2 * HQ) < 1e-4,
          "decode_with_policy matches the reference over the selected tokens (err %g)", max_abs_diff(out, ref_out, 2 * HQ * D));

    /* Layer 1 is dense: NULL selections, dense decode; without out_selections too. */
    got[0] = got[1] = (kvsieve_selection_t *)&g_passed;
    EXPECT_OK(kvsieve_cache_decode_with_policy(f.cache, 1, f.ids, 2, tensor3(&tq, q, dt_f32(), 2, HQ, D), p,
                                               tensor3(&to, out, dt_f32(), 2, HQ, D), lse, NULL, got));
    CHECK(got[0] == NULL && got[1] == NULL, "a dense layer gives NULL selections");
    EXPECT_OK(kvsieve_cache_decode(f.cache, 1, f.ids, 2, tensor3(&tq, q, dt_f32(), 2, HQ, D),
                                   tensor3(&to, out2, dt_f32(), 2, HQ, D), lse2, NULL));
    CHECK(max_abs_diff(out, out2, 2 * HQ * D) == 0.0, "a dense layer runs dense decode");
    EXPECT_OK(kvsieve_cache_decode_with_policy(f.cache, 0, f.ids, 2, tensor3(&tq, q, dt_f32(), 2, HQ, D), p,
                                               tensor3(&to, out2, dt_f32(), 2, HQ, D), lse2, NULL, NULL));
    kvsieve_policy_free(p);
    teardown(&f);
    free(q);
    section_done("decode_with_policy equals decode_sparse over policy_select's selections", before);
}

static void prefill_with_policy(void) {
    enum { NQ0 = 9, NQ1 = 4, TOTAL = NQ0 + NQ1 };
    int before = g_failed;
    fixture f;
    float *q = rand_floats(TOTAL * HQ * D, 1.0f);
    float out[TOTAL * HQ * D], lse[TOTAL * HQ], ref_out[TOTAL * HQ * D], ref_lse[TOTAL * HQ];
    float out2[TOTAL * HQ * D], lse2[TOTAL * HQ];
    int32_t qo_indptr[3] = {0, NQ0, TOTAL};
    size_t qo_n[2] = {NQ0, NQ1}, b, i, t;
    test_tensor tq, to;
    kvsieve_policy_t *p;
    kvsieve_streaming_window_t windows[HK];
    kvsieve_selection_t *dense[2];

    setup(&f);
    /* Head 0: sinks 2 + window 5 per query row; head 1 (override): every earlier token. */
    p = parse("sinks=2,window=5;heads=0.1:dense");
    init_windows(windows, HK);
    windows[0].sinks = 2;
    windows[0].window = 5;
    EXPECT_OK(kvsieve_cache_prefill_with_policy(f.cache, 0, f.ids, 2, tensor3(&tq, q, dt_f32(), TOTAL, HQ, D), qo_indptr, p,
                                                tensor3(&to, out, dt_f32(), TOTAL, HQ, D), lse, NULL));
    for (b = 0; b < 2; b++) {
        uint32_t indptr[HK + 1], indices[HK * 64];
        size_t n = 0, h;
        indptr[0] = 0;
        for (h = 0; h < HK; h++) {
            for (t = 0; t < f.lens[b]; t++) indices[n++] = (uint32_t)t;
            indptr[h + 1] = (uint32_t)n;
        }
        for (i = 0; i < qo_n[b]; i++) {
            size_t row = (size_t)qo_indptr[b] + i;
            ref_attention_sel(q + row * HQ * D, f.k[b][0], f.v[b][0], HQ, HK, D, indptr, indices, f.lens[b] - qo_n[b] + i,
                              windows, ref_out + row * HQ * D, ref_lse + row * HQ);
        }
        EXPECT_OK(kvsieve_selection_dense(HK, f.lens[b], &dense[b]));
    }
    CHECK(max_abs_diff(out, ref_out, TOTAL * HQ * D) < 1e-4 && max_abs_diff(lse, ref_lse, TOTAL * HQ) < 1e-4,
          "prefill_with_policy matches the windowed reference (err %g)", max_abs_diff(out, ref_out, TOTAL * HQ * D));
    EXPECT_OK(kvsieve_cache_prefill_sparse(f.cache, 0, f.ids, 2, tensor3(&tq, q, dt_f32(), TOTAL, HQ, D), qo_indptr, dense,
                                           windows, HK, tensor3(&to, out2, dt_f32(), TOTAL, HQ, D), lse2, NULL));
    /* Equal to rounding: windowed heads read only the tokens their queries can see, so
     * the sums run over fewer (all masked-out) keys. */
    CHECK(max_abs_diff(out, out2, TOTAL * HQ * D) < 1e-5 && max_abs_diff(lse, lse2, TOTAL * HQ) < 1e-5,
          "prefill_with_policy equals prefill_sparse with dense selections and the policy's windows (err %g)",
          max_abs_diff(out, out2, TOTAL * HQ * D));
    kvsieve_selection_free(dense[0]);
    kvsieve_selection_free(dense[1]);
    kvsieve_policy_free(p);
    teardown(&f);
    free(q);
    section_done("prefill_with_policy matches the windowed reference", before);
}

static void position_modes(void) {
    int before = g_failed;
    kvsieve_policy_t *p = parse("global=4,local=64,max_distance=48;layers=1:dense");
    uint32_t mode = 99, cap = 99;
    if (p) {
        EXPECT_OK(kvsieve_policy_position_mode(p, 0, &mode, &cap));
        CHECK(mode == KVSIEVE_POSITIONS_CAPPED && cap == 48, "layer 0: capped at 48 (got %u, %u)", mode, cap);
        EXPECT_OK(kvsieve_policy_position_mode(p, 1, &mode, &cap));
        CHECK(mode == KVSIEVE_POSITIONS_ORIGINAL && cap == 0, "layer 1: original (got %u, %u)", mode, cap);
        kvsieve_policy_free(p);
    }
    p = parse("sinks=4,window=16,positions=contiguous");
    if (p) {
        mode = 99;
        EXPECT_OK(kvsieve_policy_position_mode(p, 7, &mode, NULL));
        CHECK(mode == KVSIEVE_POSITIONS_CONTIGUOUS, "contiguous (got %u)", mode);
        kvsieve_policy_free(p);
    }
    section_done("position modes of a policy", before);
}

int main(void) {
    rng_seed(31);
    text_round_trip();
    malformed_texts();
    validate();
    select_on_cache();
    decode_with_policy();
    prefill_with_policy();
    position_modes();
    return finish();
}
