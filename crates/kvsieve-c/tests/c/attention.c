/* Store prompts' K/V in a kvsieve cache (three ways: write, write_slots, write in two parts)
 * and check decode and prefill against a plain double-precision attention computed here, on
 * random data: float32, float16 and bfloat16 caches, NHD and HND pages, grouped-query
 * attention, strided and offset query tensors, float16 queries and outputs, explicit scale,
 * soft cap and chunk size. */
#include "common.h"

#define BATCH 3
#define LAYERS 2

static const size_t lens[BATCH] = {37, 1, 70};
/* Prefill: the last qo_n[b] tokens of each sequence are queries. */
static const size_t qo_n[BATCH] = {5, 1, 10};

typedef struct {
    const char *name;
    kvsieve_dtype_t dtype;
    uint32_t layout;
    size_t hk, group, d, page_size;
    double store_tol; /* |stored - written| allowed by the storage dtype for values in [-1, 1] */
} case_t;

typedef struct {
    kvsieve_cache_t *cache;
    uint64_t ids[BATCH];
    size_t hk, hq, d;
    float *k[BATCH][LAYERS]; /* as stored (read back), [len][hk][d] */
    float *v[BATCH][LAYERS];
} fixture;

/* Write K/V of sequence b for every layer, checking what the cache stored. */
static void store(fixture *f, const case_t *c, size_t b) {
    size_t len = lens[b], n = len * f->hk * f->d, layer;
    test_tensor tk, tv;
    int64_t *slots = (int64_t *)malloc(len * sizeof(int64_t) + 1);
    float *kin[LAYERS], *vin[LAYERS];

    EXPECT_OK(kvsieve_cache_create_sequence(f->cache, &f->ids[b]));
    for (layer = 0; layer < LAYERS; layer++) {
        kin[layer] = rand_floats(n, 1.0f);
        vin[layer] = rand_floats(n, 1.0f);
    }
    if (b == 0) {
        /* Append, then write every layer from token 0. */
        EXPECT_OK(kvsieve_cache_append(f->cache, f->ids[b], len, NULL, NULL));
        for (layer = 0; layer < LAYERS; layer++) {
            EXPECT_OK(kvsieve_cache_write(f->cache, f->ids[b], layer, 0,
                                          tensor3(&tk, kin[layer], dt_f32(), (int64_t)len, (int64_t)f->hk, (int64_t)f->d),
                                          tensor3(&tv, vin[layer], dt_f32(), (int64_t)len, (int64_t)f->hk, (int64_t)f->d)));
        }
    } else if (b == 1) {
        /* Append with a slot mapping, then write through the slots. */
        EXPECT_OK(kvsieve_cache_append(f->cache, f->ids[b], len, NULL, slots));
        for (layer = 0; layer < LAYERS; layer++) {
            EXPECT_OK(kvsieve_cache_write_slots(
                f->cache, f->ids[b], layer, slots, len,
                tensor3(&tk, kin[layer], dt_f32(), (int64_t)len, (int64_t)f->hk, (int64_t)f->d),
                tensor3(&tv, vin[layer], dt_f32(), (int64_t)len, (int64_t)f->hk, (int64_t)f->d)));
        }
    } else {
        /* Two appends, each written at its start offset. */
        size_t first = 30, row = f->hk * f->d;
        EXPECT_OK(kvsieve_cache_append(f->cache, f->ids[b], first, NULL, NULL));
        for (layer = 0; layer < LAYERS; layer++) {
            EXPECT_OK(kvsieve_cache_write(f->cache, f->ids[b], layer, 0,
                                          tensor3(&tk, kin[layer], dt_f32(), (int64_t)first, (int64_t)f->hk, (int64_t)f->d),
                                          tensor3(&tv, vin[layer], dt_f32(), (int64_t)first, (int64_t)f->hk, (int64_t)f->d)));
        }
        EXPECT_OK(kvsieve_cache_append(f->cache, f->ids[b], len - first, NULL, NULL));
        for (layer = 0; layer < LAYERS; layer++) {
            EXPECT_OK(kvsieve_cache_write(
                f->cache, f->ids[b], layer, first,
                tensor3(&tk, kin[layer] + first * row, dt_f32(), (int64_t)(len - first), (int64_t)f->hk, (int64_t)f->d),
                tensor3(&tv, vin[layer] + first * row, dt_f32(), (int64_t)(len - first), (int64_t)f->hk, (int64_t)f->d)));
        }
    }
    for (layer = 0; layer < LAYERS; layer++) {
        f->k[b][layer] = nan_floats(n);
        f->v[b][layer] = nan_floats(n);
        EXPECT_OK(kvsieve_cache_read(f->cache, f->ids[b], layer, f->k[b][layer], f->v[b][layer], n));
        CHECK(max_abs_diff(f->k[b][layer], kin[layer], n) <= c->store_tol, "%s: stored keys of seq %zu layer %zu: err %g",
              c->name, b, layer, max_abs_diff(f->k[b][layer], kin[layer], n));
        CHECK(max_abs_diff(f->v[b][layer], vin[layer], n) <= c->store_tol, "%s: stored values of seq %zu layer %zu",
              c->name, b, layer);
        free(kin[layer]);
        free(vin[layer]);
    }
    free(slots);
}

enum { PLAIN, PARAMS, STRIDED_F16 };

/* Decode one query per sequence at `layer` and compare with the reference. */
static void check_decode(fixture *f, const case_t *c, size_t layer, int variant) {
    size_t hq = f->hq, d = f->d, nq = BATCH * hq * d, b, i;
    float *q = rand_floats(nq, 1.0f);
    float *out = nan_floats(nq), *lse = nan_floats(BATCH * hq);
    float *ref_out = nan_floats(nq), *ref_lse = nan_floats(BATCH * hq);
    float *qbig = NULL;
    uint16_t *q16 = NULL, *out16 = NULL;
    test_tensor tq, to;
    kvsieve_attention_params_t params;
    double scale = 0.0, cap = 0.0, tol = 1e-4;
    const char *what = variant == PLAIN ? "plain" : variant == PARAMS ? "scale/soft-cap/chunk" : "strided f16 q, f16 out";

    kvsieve_attention_params_init(&params);
    tensor3(&tq, q, dt_f32(), BATCH, (int64_t)hq, (int64_t)d);
    tensor3(&to, out, dt_f32(), BATCH, (int64_t)hq, (int64_t)d);
    if (variant == PARAMS) {
        params.scale = 0.09f;
        params.logit_soft_cap = 3.0f;
        params.chunk_size = 16;
        scale = 0.09f; /* the float value, widened */
        cap = 3.0f;
    } else if (variant == STRIDED_F16) {
        /* q lives in the second half of each row of a [BATCH, hq, 2d] float16 buffer. */
        round_f16(q, nq);
        qbig = rand_floats(BATCH * hq * 2 * d, 1.0f);
        for (b = 0; b < BATCH * hq; b++) memcpy(qbig + b * 2 * d + d, q + b * d, d * sizeof(float));
        q16 = to_f16(qbig, BATCH * hq * 2 * d);
        tensor3(&tq, q16, dt_f16(), BATCH, (int64_t)hq, (int64_t)d);
        set_strides3(&tq, (int64_t)(hq * 2 * d), (int64_t)(2 * d), 1);
        tq.t.byte_offset = d * 2;
        out16 = to_f16(out, nq);
        tensor3(&to, out16, dt_f16(), BATCH, (int64_t)hq, (int64_t)d);
        tol = 2e-3;
    }
    EXPECT_OK(kvsieve_cache_decode(f->cache, layer, f->ids, BATCH, &tq.t, &to.t, lse,
                                   variant == PLAIN ? NULL : &params));
    if (out16) {
        for (i = 0; i < nq; i++) out[i] = f16_to_f32(out16[i]);
    }
    for (b = 0; b < BATCH; b++) {
        ref_attention(q + b * hq * d, f->k[b][layer], f->v[b][layer], lens[b], hq, f->hk, d, scale, cap,
                      ref_out + b * hq * d, ref_lse + b * hq);
    }
    CHECK(max_abs_diff(out, ref_out, nq) < tol, "%s: decode (%s) layer %zu: out err %g", c->name, what, layer,
          max_abs_diff(out, ref_out, nq));
    CHECK(max_abs_diff(lse, ref_lse, BATCH * hq) < 1e-4, "%s: decode (%s) layer %zu: lse err %g", c->name, what, layer,
          max_abs_diff(lse, ref_lse, BATCH * hq));
    free(q);
    free(out);
    free(lse);
    free(ref_out);
    free(ref_lse);
    free(qbig);
    free(q16);
    free(out16);
}

/* Prefill the last qo_n[b] tokens of each sequence at `layer`, causal or not. */
static void check_prefill(fixture *f, const case_t *c, size_t layer, int causal) {
    size_t hq = f->hq, d = f->d, total = 0, b, i;
    int32_t qo_indptr[BATCH + 1];
    float *q, *out, *lse, *ref_out, *ref_lse;
    test_tensor tq, to;

    qo_indptr[0] = 0;
    for (b = 0; b < BATCH; b++) {
        total += qo_n[b];
        qo_indptr[b + 1] = (int32_t)total;
    }
    q = rand_floats(total * hq * d, 1.0f);
    out = nan_floats(total * hq * d);
    lse = nan_floats(total * hq);
    ref_out = nan_floats(total * hq * d);
    ref_lse = nan_floats(total * hq);
    EXPECT_OK(kvsieve_cache_prefill(f->cache, layer, f->ids, BATCH,
                                    tensor3(&tq, q, dt_f32(), (int64_t)total, (int64_t)hq, (int64_t)d), qo_indptr,
                                    causal ? true : false,
                                    tensor3(&to, out, dt_f32(), (int64_t)total, (int64_t)hq, (int64_t)d), lse, NULL));
    for (b = 0; b < BATCH; b++) {
        for (i = 0; i < qo_n[b]; i++) {
            size_t row = (size_t)qo_indptr[b] + i;
            size_t visible = causal ? lens[b] - qo_n[b] + i + 1 : lens[b];
            ref_attention(q + row * hq * d, f->k[b][layer], f->v[b][layer], visible, hq, f->hk, d, 0.0, 0.0,
                          ref_out + row * hq * d, ref_lse + row * hq);
        }
    }
    CHECK(max_abs_diff(out, ref_out, total * hq * d) < 1e-4, "%s: prefill (causal %d) layer %zu: out err %g", c->name,
          causal, layer, max_abs_diff(out, ref_out, total * hq * d));
    CHECK(max_abs_diff(lse, ref_lse, total * hq) < 1e-4, "%s: prefill (causal %d) layer %zu: lse err %g", c->name, causal,
          layer, max_abs_diff(lse, ref_lse, total * hq));
    free(q);
    free(out);
    free(lse);
    free(ref_out);
    free(ref_lse);
}

static void run_case(const case_t *c) {
    int before = g_failed;
    fixture f;
    size_t pages = 2, b, layer;
    kvsieve_cache_config_t cfg;
    char name[160];

    memset(&f, 0, sizeof f);
    f.hk = c->hk;
    f.hq = c->hk * c->group;
    f.d = c->d;
    for (b = 0; b < BATCH; b++) pages += (lens[b] + c->page_size - 1) / c->page_size;
    cfg = kvsieve_cache_config_default(LAYERS, c->hk, c->d, c->page_size, pages);
    cfg.dtype = c->dtype;
    cfg.layout = c->layout;
    if (!EXPECT_OK(kvsieve_cache_new(&cfg, &f.cache))) return;
    for (b = 0; b < BATCH; b++) store(&f, c, b);
    for (layer = 0; layer < LAYERS; layer++) {
        check_decode(&f, c, layer, PLAIN);
        check_prefill(&f, c, layer, 1);
    }
    check_decode(&f, c, 1, PARAMS);
    check_decode(&f, c, 0, STRIDED_F16);
    check_prefill(&f, c, 1, 0);
    kvsieve_cache_free(f.cache);
    for (b = 0; b < BATCH; b++) {
        for (layer = 0; layer < LAYERS; layer++) {
            free(f.k[b][layer]);
            free(f.v[b][layer]);
        }
    }
    snprintf(name, sizeof name, "%s: decode and prefill match the reference", c->name);
    section_done(name, before);
}

/* Keys and queries given before RoPE, tokens appended at explicit positions: the cache
 * rotates each key by its stored position and each query by its token's. */
static void pre_rope_cache(void) {
    enum { HK = 2, HQ = 4, D = 32, PS = 8, LEN = 19, NQ = 3 };
    int before = g_failed;
    kvsieve_cache_config_t cfg = kvsieve_cache_config_default(1, HK, D, PS, 4);
    kvsieve_cache_t *cache = NULL;
    kvsieve_rope_config_t rope;
    kvsieve_attention_params_t params;
    uint64_t seq;
    int32_t pos[LEN], qo_indptr[2] = {0, NQ};
    double q_pos[LEN], k_pos[LEN];
    float *k = rand_floats(LEN * HK * D, 1.0f), *v = rand_floats(LEN * HK * D, 1.0f);
    float *q = rand_floats(NQ * HQ * D, 1.0f), out[NQ * HQ * D], lse[NQ * HQ], ref_out[NQ * HQ * D], ref_lse[NQ * HQ];
    test_tensor tk, tv, tq, to;
    size_t t, i;

    for (t = 0; t < LEN; t++) pos[t] = (int32_t)(50 + 2 * t);
    cfg.dtype = dt_f32();
    cfg.key_rope = KVSIEVE_KEYS_PRE_ROPE;
    kvsieve_rope_config_init(&rope);
    kvsieve_attention_params_init(&params);
    rope.theta = 10000.0f;
    rope.style = KVSIEVE_ROPE_HALF_SPLIT;
    params.rope = &rope;
    EXPECT_OK(kvsieve_cache_new(&cfg, &cache));
    EXPECT_OK(kvsieve_cache_create_sequence(cache, &seq));
    EXPECT_OK(kvsieve_cache_append(cache, seq, LEN, pos, NULL));
    EXPECT_OK(kvsieve_cache_write(cache, seq, 0, 0, tensor3(&tk, k, dt_f32(), LEN, HK, D), tensor3(&tv, v, dt_f32(), LEN, HK, D)));

    /* Decode: the query is the last token. */
    EXPECT_OK(kvsieve_cache_decode(cache, 0, &seq, 1, tensor3(&tq, q, dt_f32(), 1, HQ, D), tensor3(&to, out, dt_f32(), 1, HQ, D),
                                   lse, &params));
    for (t = 0; t < LEN; t++) q_pos[t] = pos[LEN - 1], k_pos[t] = pos[t];
    ref_attention_rope(q, k, v, LEN, HQ, HK, D, q_pos, k_pos, rope.style, ref_out, ref_lse);
    CHECK(max_abs_diff(out, ref_out, HQ * D) < 2e-4 && max_abs_diff(lse, ref_lse, HQ) < 2e-4, "pre-RoPE cache decode: err %g",
          max_abs_diff(out, ref_out, HQ * D));

    /* Causal prefill of the last NQ tokens. */
    EXPECT_OK(kvsieve_cache_prefill(cache, 0, &seq, 1, tensor3(&tq, q, dt_f32(), NQ, HQ, D), qo_indptr, true,
                                    tensor3(&to, out, dt_f32(), NQ, HQ, D), lse, &params));
    for (i = 0; i < NQ; i++) {
        size_t token = LEN - NQ + i;
        for (t = 0; t <= token; t++) q_pos[t] = pos[token], k_pos[t] = pos[t];
        ref_attention_rope(q + i * HQ * D, k, v, token + 1, HQ, HK, D, q_pos, k_pos, rope.style, ref_out + i * HQ * D,
                           ref_lse + i * HQ);
    }
    CHECK(max_abs_diff(out, ref_out, NQ * HQ * D) < 2e-4 && max_abs_diff(lse, ref_lse, NQ * HQ) < 2e-4,
          "pre-RoPE cache prefill: err %g", max_abs_diff(out, ref_out, NQ * HQ * D));
    kvsieve_cache_free(cache);
    free(k), free(v), free(q);
    section_done("pre-RoPE cache: decode and prefill match the reference", before);
}

int main(void) {
    case_t cases[4];
    size_t i;
    rng_seed(7);
    cases[0].name = "f32 NHD gqa3 d64";
    cases[0].dtype = dt_f32();
    cases[0].layout = KVSIEVE_LAYOUT_NHD;
    cases[0].hk = 2, cases[0].group = 3, cases[0].d = 64, cases[0].page_size = 16, cases[0].store_tol = 0.0;
    cases[1].name = "f16 NHD mha d64";
    cases[1].dtype = dt_f16();
    cases[1].layout = KVSIEVE_LAYOUT_NHD;
    cases[1].hk = 2, cases[1].group = 1, cases[1].d = 64, cases[1].page_size = 16, cases[1].store_tol = 4.9e-4;
    cases[2].name = "f16 HND gqa4 d32";
    cases[2].dtype = dt_f16();
    cases[2].layout = KVSIEVE_LAYOUT_HND;
    cases[2].hk = 2, cases[2].group = 4, cases[2].d = 32, cases[2].page_size = 8, cases[2].store_tol = 4.9e-4;
    cases[3].name = "bf16 NHD gqa2 d128";
    cases[3].dtype = dt_bf16();
    cases[3].layout = KVSIEVE_LAYOUT_NHD;
    cases[3].hk = 1, cases[3].group = 2, cases[3].d = 128, cases[3].page_size = 32, cases[3].store_tol = 3.9e-3;
    for (i = 0; i < 4; i++) run_case(&cases[i]);
    pre_rope_cache();
    return finish();
}
