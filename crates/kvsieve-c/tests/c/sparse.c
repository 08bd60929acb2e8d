/* Sparse attention through the C API against a plain double-precision attention over exactly
 * the selected tokens, on random data: float32 and float16 caches, grouped-query attention,
 * a batch of ragged sequences with random per-head selections (an empty head included),
 * decode and causal prefill with and without per-head windows, on a kvsieve cache and on
 * engine-owned paged memory. */
#include "common.h"

#define BATCH 3
#define LAYERS 2
enum { HK = 2, GROUP = 3, HQ = HK * GROUP, D = 32, PS = 8, MAXLEN = 64 };

static const size_t lens[BATCH] = {37, 1, 50};
static const size_t qo_n[BATCH] = {5, 1, 12};

typedef struct {
    kvsieve_cache_t *cache;
    uint64_t ids[BATCH];
    float *k[BATCH][LAYERS]; /* as stored, [len][HK][D] */
    float *v[BATCH][LAYERS];
    /* A random selection per sequence, and its CSR arrays. */
    kvsieve_selection_t *sel[BATCH];
    uint32_t indptr[BATCH][HK + 1];
    uint32_t indices[BATCH][HK * MAXLEN];
} fixture;

static void setup(fixture *f, kvsieve_dtype_t dtype) {
    size_t b, layer, h, pages = 0;
    kvsieve_cache_config_t cfg;
    test_tensor tk, tv;

    memset(f, 0, sizeof *f);
    for (b = 0; b < BATCH; b++) pages += (lens[b] + PS - 1) / PS;
    cfg = kvsieve_cache_config_default(LAYERS, HK, D, PS, pages);
    cfg.dtype = dtype;
    EXPECT_OK(kvsieve_cache_new(&cfg, &f->cache));
    for (b = 0; b < BATCH; b++) {
        size_t n = lens[b] * HK * D, nnz = 0;
        EXPECT_OK(kvsieve_cache_create_sequence(f->cache, &f->ids[b]));
        EXPECT_OK(kvsieve_cache_append(f->cache, f->ids[b], lens[b], NULL, NULL));
        for (layer = 0; layer < LAYERS; layer++) {
            float *k = rand_floats(n, 1.0f), *v = rand_floats(n, 1.0f);
            EXPECT_OK(kvsieve_cache_write(f->cache, f->ids[b], layer, 0, tensor3(&tk, k, dt_f32(), (int64_t)lens[b], HK, D),
                                          tensor3(&tv, v, dt_f32(), (int64_t)lens[b], HK, D)));
            f->k[b][layer] = nan_floats(n);
            f->v[b][layer] = nan_floats(n);
            EXPECT_OK(kvsieve_cache_read(f->cache, f->ids[b], layer, f->k[b][layer], f->v[b][layer], n));
            free(k);
            free(v);
        }
        /* Head 0 keeps about half the tokens; head 1 a few, none for the 1-token sequence. */
        f->indptr[b][0] = 0;
        for (h = 0; h < HK; h++) {
            if (!(b == 1 && h == 1)) nnz += rand_subset(f->indices[b] + nnz, lens[b], h == 0 ? 0.5 : 0.2);
            f->indptr[b][h + 1] = (uint32_t)nnz;
        }
        EXPECT_OK(kvsieve_selection_from_csr(lens[b], f->indptr[b], HK + 1, f->indices[b], nnz, &f->sel[b]));
    }
}

static void teardown(fixture *f) {
    size_t b, layer;
    for (b = 0; b < BATCH; b++) {
        kvsieve_selection_free(f->sel[b]);
        for (layer = 0; layer < LAYERS; layer++) {
            free(f->k[b][layer]);
            free(f->v[b][layer]);
        }
    }
    kvsieve_cache_free(f->cache);
}

/* Reference decode outputs of the fixture's selections at `layer`. */
static void ref_decode(const fixture *f, size_t layer, const float *q, float *out, float *lse) {
    size_t b;
    for (b = 0; b < BATCH; b++)
        ref_attention_sel(q + b * HQ * D, f->k[b][layer], f->v[b][layer], HQ, HK, D, f->indptr[b], f->indices[b], lens[b] - 1,
                          NULL, out + b * HQ * D, lse + b * HQ);
}

/* Reference causal prefill of the last qo_n[b] tokens, with optional windows. */
static void ref_prefill(const fixture *f, size_t layer, const float *q, const int32_t *qo_indptr,
                        const kvsieve_streaming_window_t *windows, float *out, float *lse) {
    size_t b, i;
    for (b = 0; b < BATCH; b++) {
        for (i = 0; i < qo_n[b]; i++) {
            size_t row = (size_t)qo_indptr[b] + i;
            ref_attention_sel(q + row * HQ * D, f->k[b][layer], f->v[b][layer], HQ, HK, D, f->indptr[b], f->indices[b],
                              lens[b] - qo_n[b] + i, windows, out + row * HQ * D, lse + row * HQ);
        }
    }
}

static void cache_case(const char *name, kvsieve_dtype_t dtype) {
    int before = g_failed;
    fixture f;
    size_t layer, b, total = 0, nq = BATCH * HQ * D;
    int32_t qo_indptr[BATCH + 1];
    kvsieve_streaming_window_t windows[HK];
    test_tensor tq, to;
    char title[128];
    float *q, *out, *lse, *ref_out, *ref_lse;

    setup(&f, dtype);
    qo_indptr[0] = 0;
    for (b = 0; b < BATCH; b++) qo_indptr[b + 1] = (int32_t)(total += qo_n[b]);
    if (total * HQ * D > nq) nq = total * HQ * D;
    q = rand_floats(nq, 1.0f);
    out = nan_floats(nq), lse = nan_floats(nq / D);
    ref_out = nan_floats(nq), ref_lse = nan_floats(nq / D);
    init_windows(windows, HK);
    windows[0].sinks = 2;
    windows[0].window = 4; /* head 1 keeps {0, 0}: no window */

    for (layer = 0; layer < LAYERS; layer++) {
        EXPECT_OK(kvsieve_cache_decode_sparse(f.cache, layer, f.ids, BATCH, tensor3(&tq, q, dt_f32(), BATCH, HQ, D),
                                              f.sel, tensor3(&to, out, dt_f32(), BATCH, HQ, D), lse, NULL));
        ref_decode(&f, layer, q, ref_out, ref_lse);
        CHECK(max_abs_diff(out, ref_out, BATCH * HQ * D) < 1e-4 && max_abs_diff(lse, ref_lse, BATCH * HQ) < 1e-4,
              "%s: sparse decode layer %zu: out err %g lse err %g", name, layer, max_abs_diff(out, ref_out, BATCH * HQ * D),
              max_abs_diff(lse, ref_lse, BATCH * HQ));
        CHECK(isinf(lse[1 * HQ + HQ - 1]) && lse[1 * HQ + HQ - 1] < 0 && out[(1 * HQ + HQ - 1) * D] == 0.0f,
              "%s: a head that reads no token gives lse -inf and a zero output", name);

        /* Causal prefill: with windows for head 0 only, then without windows. */
        EXPECT_OK(kvsieve_cache_prefill_sparse(f.cache, layer, f.ids, BATCH, tensor3(&tq, q, dt_f32(), (int64_t)total, HQ, D),
                                               qo_indptr, f.sel, windows, HK,
                                               tensor3(&to, out, dt_f32(), (int64_t)total, HQ, D), lse, NULL));
        ref_prefill(&f, layer, q, qo_indptr, windows, ref_out, ref_lse);
        CHECK(max_abs_diff(out, ref_out, total * HQ * D) < 1e-4 && max_abs_diff(lse, ref_lse, total * HQ) < 1e-4,
              "%s: sparse prefill with windows layer %zu: out err %g lse err %g", name, layer,
              max_abs_diff(out, ref_out, total * HQ * D), max_abs_diff(lse, ref_lse, total * HQ));
        EXPECT_OK(kvsieve_cache_prefill_sparse(f.cache, layer, f.ids, BATCH, tensor3(&tq, q, dt_f32(), (int64_t)total, HQ, D),
                                               qo_indptr, f.sel, NULL, 0,
                                               tensor3(&to, out, dt_f32(), (int64_t)total, HQ, D), lse, NULL));
        ref_prefill(&f, layer, q, qo_indptr, NULL, ref_out, ref_lse);
        CHECK(max_abs_diff(out, ref_out, total * HQ * D) < 1e-4 && max_abs_diff(lse, ref_lse, total * HQ) < 1e-4,
              "%s: sparse prefill layer %zu: out err %g", name, layer, max_abs_diff(out, ref_out, total * HQ * D));
    }

    /* Dense selections give the same result as dense decode. */
    {
        kvsieve_selection_t *dense[BATCH];
        float *dense_out = nan_floats(BATCH * HQ * D), *dense_lse = nan_floats(BATCH * HQ);
        for (b = 0; b < BATCH; b++) EXPECT_OK(kvsieve_selection_dense(HK, lens[b], &dense[b]));
        EXPECT_OK(kvsieve_cache_decode_sparse(f.cache, 1, f.ids, BATCH, tensor3(&tq, q, dt_f32(), BATCH, HQ, D), dense,
                                              tensor3(&to, out, dt_f32(), BATCH, HQ, D), lse, NULL));
        EXPECT_OK(kvsieve_cache_decode(f.cache, 1, f.ids, BATCH, tensor3(&tq, q, dt_f32(), BATCH, HQ, D),
                                       tensor3(&to, dense_out, dt_f32(), BATCH, HQ, D), dense_lse, NULL));
        CHECK(max_abs_diff(out, dense_out, BATCH * HQ * D) < 1e-5 && max_abs_diff(lse, dense_lse, BATCH * HQ) < 1e-5,
              "%s: dense selections equal dense decode", name);
        for (b = 0; b < BATCH; b++) kvsieve_selection_free(dense[b]);
        free(dense_out);
        free(dense_lse);
    }
    teardown(&f);
    free(q), free(out), free(lse), free(ref_out), free(ref_lse);
    snprintf(title, sizeof title, "%s cache: sparse decode and prefill match the reference", name);
    section_done(title, before);
}

/* The same selections over engine-owned float32 pages (NHD, page ids scrambled). */
static void view_case(void) {
    int before = g_failed;
    fixture f;
    size_t b, t, i, total = 0, num_pages = 0, layer = 1;
    int32_t indptr[BATCH + 1], indices[32], last_page_len[BATCH], qo_indptr[BATCH + 1];
    kvsieve_paged_kv_t kv;
    kvsieve_streaming_window_t windows[HK];
    float *kmem, *vmem, *q, *out, *lse, *ref_out, *ref_lse;
    test_tensor tq, to;
    size_t row = HK * D, page_elems = PS * HK * D;

    setup(&f, dt_f32());
    indptr[0] = 0;
    qo_indptr[0] = 0;
    for (b = 0; b < BATCH; b++) {
        size_t np = (lens[b] + PS - 1) / PS;
        indptr[b + 1] = indptr[b] + (int32_t)np;
        last_page_len[b] = (int32_t)(lens[b] - (np - 1) * PS);
        num_pages += np;
        qo_indptr[b + 1] = (int32_t)(total += qo_n[b]);
    }
    /* Page i of the table is memory page (7 * i + 3) mod num_pages (7 is coprime to 13). */
    for (i = 0; i < num_pages; i++) indices[i] = (int32_t)((7 * i + 3) % num_pages);
    kmem = nan_floats(num_pages * page_elems);
    vmem = nan_floats(num_pages * page_elems);
    for (b = 0; b < BATCH; b++) {
        for (t = 0; t < lens[b]; t++) {
            size_t page = (size_t)indices[indptr[b] + (int32_t)(t / PS)];
            memcpy(kmem + page * page_elems + (t % PS) * row, f.k[b][layer] + t * row, row * sizeof(float));
            memcpy(vmem + page * page_elems + (t % PS) * row, f.v[b][layer] + t * row, row * sizeof(float));
        }
    }
    kvsieve_paged_kv_init(&kv);
    kv.k = kmem;
    kv.v = vmem;
    kv.device.device_type = KVSIEVE_DEVICE_CPU;
    kv.dtype = dt_f32();
    kv.key_rope = KVSIEVE_KEYS_POST_ROPE;
    kv.num_pages = num_pages;
    kv.page_size = PS;
    kv.num_kv_heads = HK;
    kv.head_dim = D;
    kv.k_strides[0] = kv.v_strides[0] = (int64_t)page_elems;
    kv.k_strides[1] = kv.v_strides[1] = (int64_t)row;
    kv.k_strides[2] = kv.v_strides[2] = D;
    kv.batch = BATCH;
    kv.indptr = indptr;
    kv.indices = indices;
    kv.last_page_len = last_page_len;

    q = rand_floats(total * HQ * D, 1.0f);
    out = nan_floats(total * HQ * D), lse = nan_floats(total * HQ);
    ref_out = nan_floats(total * HQ * D), ref_lse = nan_floats(total * HQ);
    EXPECT_OK(kvsieve_paged_decode_sparse(&kv, tensor3(&tq, q, dt_f32(), BATCH, HQ, D), f.sel,
                                          tensor3(&to, out, dt_f32(), BATCH, HQ, D), lse, NULL));
    ref_decode(&f, layer, q, ref_out, ref_lse);
    CHECK(max_abs_diff(out, ref_out, BATCH * HQ * D) < 1e-4 && max_abs_diff(lse, ref_lse, BATCH * HQ) < 1e-4,
          "view sparse decode: out err %g", max_abs_diff(out, ref_out, BATCH * HQ * D));

    init_windows(windows, HK);
    windows[1].sinks = 1;
    windows[1].window = 3;
    EXPECT_OK(kvsieve_paged_prefill_sparse(&kv, tensor3(&tq, q, dt_f32(), (int64_t)total, HQ, D), qo_indptr, f.sel, windows,
                                           HK, tensor3(&to, out, dt_f32(), (int64_t)total, HQ, D), lse, NULL));
    ref_prefill(&f, layer, q, qo_indptr, windows, ref_out, ref_lse);
    CHECK(max_abs_diff(out, ref_out, total * HQ * D) < 1e-4 && max_abs_diff(lse, ref_lse, total * HQ) < 1e-4,
          "view sparse prefill with windows: out err %g", max_abs_diff(out, ref_out, total * HQ * D));
    teardown(&f);
    free(kmem), free(vmem), free(q), free(out), free(lse), free(ref_out), free(ref_lse);
    section_done("engine-owned pages: sparse decode and prefill match the reference", before);
}

int main(void) {
    rng_seed(23);
    cache_case("f32", dt_f32());
    cache_case("f16", dt_f16());
    view_case();
    return finish();
}
