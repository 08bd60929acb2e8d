/* Attention over engine-owned paged memory (no kvsieve cache): a scrambled CSR page table
 * over float32 NHD pages, float16 HND pages, K and V interleaved in one vLLM-style buffer,
 * keys stored before RoPE with per-slot positions, an empty sequence in the batch, and
 * kvsieve_merge_states / kvsieve_apply_rope checked against plain C. */
#include "common.h"

enum { HK = 2, GROUP = 2, HQ = HK * GROUP, D = 32, PS = 8, NUM_PAGES = 12, BATCH = 3 };

/* Page table: seq 0 = pages 7, 2, 9 (5 tokens in the last), seq 1 = pages 0, 11 (full),
 * seq 2 = no pages. */
static const int32_t indptr[BATCH + 1] = {0, 3, 5, 5};
static const int32_t indices[5] = {7, 2, 9, 0, 11};
static const int32_t last_page_len[BATCH] = {5, 8, 0};
static const size_t seq_lens[BATCH] = {21, 16, 0};

/* The model of the memory: element (page, slot, head, c) as float. */
static float k_model[NUM_PAGES * PS * HK * D];
static float v_model[NUM_PAGES * PS * HK * D];
static int32_t slot_positions[NUM_PAGES * PS];

static size_t model_index(size_t page, size_t slot, size_t head, size_t c) {
    return ((page * PS + slot) * HK + head) * D + c;
}

/* Stored position of token t of sequence b. */
static int32_t stored_position(size_t b, size_t t) {
    size_t page = (size_t)indices[indptr[b] + (int32_t)(t / PS)];
    return slot_positions[page * PS + t % PS];
}

/* Token-major K and V of sequence b, gathered through the page table. */
static void gather(size_t b, float *k, float *v) {
    size_t t, h, c;
    for (t = 0; t < seq_lens[b]; t++) {
        size_t page = (size_t)indices[indptr[b] + (int32_t)(t / PS)], slot = t % PS;
        for (h = 0; h < HK; h++)
            for (c = 0; c < D; c++) {
                k[(t * HK + h) * D + c] = k_model[model_index(page, slot, h, c)];
                v[(t * HK + h) * D + c] = v_model[model_index(page, slot, h, c)];
            }
    }
}

/* The reference for query token `q_token` of sequence b seeing its first `n_visible` tokens,
 * following the descriptor's key_rope and the parameters' RoPE and position mode. */
static void reference(const kvsieve_paged_kv_t *kv, const kvsieve_attention_params_t *params, size_t b, const float *q,
                      size_t q_token, size_t n_visible, float *out, float *lse) {
    float *k = (float *)malloc(32 * HK * D * sizeof(float)), *v = (float *)malloc(32 * HK * D * sizeof(float));
    double q_pos[32], k_pos[32];
    size_t t;
    gather(b, k, v);
    if (kv->key_rope == KVSIEVE_KEYS_POST_ROPE) {
        ref_attention(q, k, v, n_visible, HQ, HK, D, 0.0, 0.0, out, lse);
    } else {
        for (t = 0; t < n_visible; t++) {
            double qs = stored_position(b, q_token), ks = stored_position(b, t);
            if (params->position_mode == KVSIEVE_POSITIONS_CONTIGUOUS) {
                q_pos[t] = (double)q_token, k_pos[t] = (double)t;
            } else if (params->position_mode == KVSIEVE_POSITIONS_CAPPED && qs - ks >= params->max_distance) {
                q_pos[t] = params->max_distance, k_pos[t] = 0.0;
            } else {
                q_pos[t] = qs, k_pos[t] = ks;
            }
        }
        ref_attention_rope(q, k, v, n_visible, HQ, HK, D, q_pos, k_pos, params->rope->style, out, lse);
    }
    free(k);
    free(v);
}

static kvsieve_paged_kv_t base_desc(void) {
    kvsieve_paged_kv_t kv;
    kvsieve_paged_kv_init(&kv);
    kv.device.device_type = KVSIEVE_DEVICE_CPU;
    kv.dtype = dt_f32();
    kv.key_rope = KVSIEVE_KEYS_POST_ROPE;
    kv.num_pages = NUM_PAGES;
    kv.page_size = PS;
    kv.num_kv_heads = HK;
    kv.head_dim = D;
    kv.k_strides[0] = kv.v_strides[0] = PS * HK * D;
    kv.k_strides[1] = kv.v_strides[1] = HK * D;
    kv.k_strides[2] = kv.v_strides[2] = D;
    kv.batch = BATCH;
    kv.indptr = indptr;
    kv.indices = indices;
    kv.last_page_len = last_page_len;
    kv.positions = NULL;
    return kv;
}

/* Decode and causal prefill through `kv`, compared with the reference over the model. */
static void check_view(const char *name, const kvsieve_paged_kv_t *kv, const kvsieve_attention_params_t *params,
                       double tol) {
    int before = g_failed;
    size_t b, i;
    float *q = rand_floats(BATCH * HQ * D, 1.0f), *out = nan_floats(BATCH * HQ * D), *lse = nan_floats(BATCH * HQ);
    float *ref_out = nan_floats(BATCH * HQ * D), *ref_lse = nan_floats(BATCH * HQ);
    test_tensor tq, to;
    /* Prefill: 4 queries for seq 0, 3 for seq 1, none for the empty seq 2. */
    const int32_t qo_indptr[BATCH + 1] = {0, 4, 7, 7};
    const size_t qo_n[BATCH] = {4, 3, 0};
    float *pq = rand_floats(7 * HQ * D, 1.0f), *pout = nan_floats(7 * HQ * D), *plse = nan_floats(7 * HQ);
    float *pref_out = nan_floats(7 * HQ * D), *pref_lse = nan_floats(7 * HQ);
    char label[160];

    EXPECT_OK(kvsieve_paged_decode(kv, tensor3(&tq, q, dt_f32(), BATCH, HQ, D), tensor3(&to, out, dt_f32(), BATCH, HQ, D),
                                   lse, params));
    EXPECT_OK(kvsieve_paged_prefill(kv, tensor3(&tq, pq, dt_f32(), 7, HQ, D), qo_indptr, true,
                                    tensor3(&to, pout, dt_f32(), 7, HQ, D), plse, params));
    for (b = 0; b < BATCH; b++) {
        size_t n = seq_lens[b];
        reference(kv, params, b, q + b * HQ * D, n ? n - 1 : 0, n, ref_out + b * HQ * D, ref_lse + b * HQ);
        for (i = 0; i < qo_n[b]; i++) {
            size_t row = (size_t)qo_indptr[b] + i, token = n - qo_n[b] + i;
            reference(kv, params, b, pq + row * HQ * D, token, token + 1, pref_out + row * HQ * D, pref_lse + row * HQ);
        }
    }
    CHECK(max_abs_diff(out, ref_out, BATCH * HQ * D) < tol, "%s: decode out err %g", name,
          max_abs_diff(out, ref_out, BATCH * HQ * D));
    CHECK(max_abs_diff(lse, ref_lse, BATCH * HQ) < tol, "%s: decode lse err %g", name, max_abs_diff(lse, ref_lse, BATCH * HQ));
    CHECK(out[2 * HQ * D] == 0.0f && isinf(lse[2 * HQ]) && lse[2 * HQ] < 0, "%s: empty sequence gives 0 and -inf", name);
    CHECK(max_abs_diff(pout, pref_out, 7 * HQ * D) < tol, "%s: prefill out err %g", name,
          max_abs_diff(pout, pref_out, 7 * HQ * D));
    CHECK(max_abs_diff(plse, pref_lse, 7 * HQ) < tol, "%s: prefill lse err %g", name, max_abs_diff(plse, pref_lse, 7 * HQ));
    free(q), free(out), free(lse), free(ref_out), free(ref_lse);
    free(pq), free(pout), free(plse), free(pref_out), free(pref_lse);
    snprintf(label, sizeof label, "view %s", name);
    section_done(label, before);
}

static void f32_nhd(void) {
    kvsieve_paged_kv_t kv = base_desc();
    kv.k = k_model;
    kv.v = v_model;
    check_view("f32 NHD, scrambled pages", &kv, NULL, 1e-4);
}

static void f16_hnd(void) {
    size_t n = NUM_PAGES * PS * HK * D, page, slot, h, c;
    uint16_t *k16 = (uint16_t *)malloc(n * 2), *v16 = (uint16_t *)malloc(n * 2);
    float *k_save = (float *)malloc(n * sizeof(float)), *v_save = (float *)malloc(n * sizeof(float));
    kvsieve_paged_kv_t kv = base_desc();
    memcpy(k_save, k_model, n * sizeof(float));
    memcpy(v_save, v_model, n * sizeof(float));
    round_f16(k_model, n);
    round_f16(v_model, n);
    for (page = 0; page < NUM_PAGES; page++)
        for (slot = 0; slot < PS; slot++)
            for (h = 0; h < HK; h++)
                for (c = 0; c < D; c++) {
                    size_t hnd = ((page * HK + h) * PS + slot) * D + c;
                    k16[hnd] = f32_to_f16(k_model[model_index(page, slot, h, c)]);
                    v16[hnd] = f32_to_f16(v_model[model_index(page, slot, h, c)]);
                }
    kv.k = k16;
    kv.v = v16;
    kv.dtype = dt_f16();
    kv.k_strides[1] = kv.v_strides[1] = D;
    kv.k_strides[2] = kv.v_strides[2] = PS * D;
    check_view("f16 HND", &kv, NULL, 1e-4);
    memcpy(k_model, k_save, n * sizeof(float));
    memcpy(v_model, v_save, n * sizeof(float));
    free(k16), free(v16), free(k_save), free(v_save);
}

/* vLLM-style: one buffer [num_pages][2][page_size][heads][d], K then V in each page. */
static void interleaved(void) {
    size_t page_elems = PS * HK * D, page, i;
    float *buf = (float *)malloc(NUM_PAGES * 2 * page_elems * sizeof(float));
    kvsieve_paged_kv_t kv = base_desc();
    for (page = 0; page < NUM_PAGES; page++)
        for (i = 0; i < page_elems; i++) {
            buf[page * 2 * page_elems + i] = k_model[page * page_elems + i];
            buf[page * 2 * page_elems + page_elems + i] = v_model[page * page_elems + i];
        }
    kv.k = buf;
    kv.v = buf + page_elems;
    kv.k_strides[0] = kv.v_strides[0] = (int64_t)(2 * page_elems);
    check_view("K/V interleaved in one buffer", &kv, NULL, 1e-4);
    free(buf);
}

/* Keys and queries given before RoPE, positions per slot, RoPE applied at read time under
 * each position mode. */
static void pre_rope(void) {
    kvsieve_paged_kv_t kv = base_desc();
    kvsieve_rope_config_t rope;
    kvsieve_attention_params_t params;
    kvsieve_rope_config_init(&rope);
    kvsieve_attention_params_init(&params);
    rope.theta = 10000.0f;
    rope.style = KVSIEVE_ROPE_ADJACENT_PAIRS;
    params.rope = &rope;
    kv.k = k_model;
    kv.v = v_model;
    kv.key_rope = KVSIEVE_KEYS_PRE_ROPE;
    kv.positions = slot_positions;
    check_view("pre-RoPE, original positions", &kv, &params, 2e-4);
    rope.style = KVSIEVE_ROPE_HALF_SPLIT;
    params.position_mode = KVSIEVE_POSITIONS_CONTIGUOUS;
    check_view("pre-RoPE, contiguous positions", &kv, &params, 2e-4);
    params.position_mode = KVSIEVE_POSITIONS_CAPPED;
    params.max_distance = 40;
    check_view("pre-RoPE, distances capped at 40", &kv, &params, 2e-4);
}

/* kvsieve_apply_rope on gathered keys equals the C rotation, for both styles. */
static void apply_rope(void) {
    int before = g_failed;
    uint32_t style;
    size_t n = seq_lens[0], t, h;
    float *k = (float *)malloc(n * HK * D * sizeof(float)), *v = (float *)malloc(n * HK * D * sizeof(float));
    float *expect = (float *)malloc(n * HK * D * sizeof(float));
    int32_t *pos = (int32_t *)malloc(n * sizeof(int32_t));
    test_tensor tx;
    kvsieve_rope_config_t rope;
    for (style = 0; style < 2; style++) {
        gather(0, k, v);
        gather(0, expect, v);
        for (t = 0; t < n; t++) {
            pos[t] = stored_position(0, t);
            for (h = 0; h < HK; h++) ref_rope(expect + (t * HK + h) * D, D, pos[t], 10000.0, style);
        }
        kvsieve_rope_config_init(&rope);
        rope.theta = 10000.0f;
        rope.style = style;
        EXPECT_OK(kvsieve_apply_rope(tensor3(&tx, k, dt_f32(), (int64_t)n, HK, D), pos, n, &rope));
        CHECK(max_abs_diff(k, expect, n * HK * D) < 2e-5, "apply_rope style %u: err %g", style,
              max_abs_diff(k, expect, n * HK * D));
    }
    /* Partial rotary: only the first 8 channels of each head move. */
    gather(0, k, v);
    memcpy(expect, k, n * HK * D * sizeof(float));
    rope.rotary_dim = 8;
    rope.style = KVSIEVE_ROPE_HALF_SPLIT;
    EXPECT_OK(kvsieve_apply_rope(tensor3(&tx, k, dt_f32(), (int64_t)n, HK, D), pos, n, &rope));
    for (t = 0; t < n; t++)
        for (h = 0; h < HK; h++) {
            float *e = expect + (t * HK + h) * D;
            size_t i;
            double ang[4];
            for (i = 0; i < 4; i++) {
                double a, b;
                ang[i] = pos[t] * pow(10000.0, -2.0 * (double)i / 8.0);
                a = e[i];
                b = e[i + 4];
                e[i] = (float)(a * cos(ang[i]) - b * sin(ang[i]));
                e[i + 4] = (float)(a * sin(ang[i]) + b * cos(ang[i]));
            }
        }
    CHECK(max_abs_diff(k, expect, n * HK * D) < 2e-5, "apply_rope rotary_dim 8: err %g", max_abs_diff(k, expect, n * HK * D));
    free(k), free(v), free(expect), free(pos);
    section_done("apply_rope matches the C rotation", before);
}

/* Decode seq 0 over two halves of its pages, merge by LSE, compare with the full decode. */
static void merge(void) {
    int before = g_failed;
    const int32_t indptr_a[2] = {0, 2}, indices_a[2] = {7, 2}, last_a[1] = {8};
    const int32_t indptr_b[2] = {0, 1}, indices_b[1] = {9}, last_b[1] = {5};
    const int32_t indptr_full[2] = {0, 3}, last_full[1] = {5};
    kvsieve_paged_kv_t kv = base_desc();
    float *q = rand_floats(HQ * D, 1.0f);
    float out_a[HQ * D], out_b[HQ * D], out_full[HQ * D], merged[HQ * D];
    float lse_a[HQ], lse_b[HQ], lse_full[HQ], lse_merged[HQ];
    test_tensor tq, to, ta, tb;
    kv.k = k_model;
    kv.v = v_model;
    kv.batch = 1;
    kv.indptr = indptr_a, kv.indices = indices_a, kv.last_page_len = last_a;
    EXPECT_OK(kvsieve_paged_decode(&kv, tensor3(&tq, q, dt_f32(), 1, HQ, D), tensor3(&to, out_a, dt_f32(), 1, HQ, D), lse_a, NULL));
    kv.indptr = indptr_b, kv.indices = indices_b, kv.last_page_len = last_b;
    EXPECT_OK(kvsieve_paged_decode(&kv, tensor3(&tq, q, dt_f32(), 1, HQ, D), tensor3(&to, out_b, dt_f32(), 1, HQ, D), lse_b, NULL));
    kv.indptr = indptr_full, kv.indices = indices, kv.last_page_len = last_full;
    EXPECT_OK(kvsieve_paged_decode(&kv, tensor3(&tq, q, dt_f32(), 1, HQ, D), tensor3(&to, out_full, dt_f32(), 1, HQ, D), lse_full, NULL));
    EXPECT_OK(kvsieve_merge_states(tensor3(&ta, out_a, dt_f32(), 1, HQ, D), lse_a, tensor3(&tb, out_b, dt_f32(), 1, HQ, D),
                                   lse_b, tensor3(&to, merged, dt_f32(), 1, HQ, D), lse_merged));
    CHECK(max_abs_diff(merged, out_full, HQ * D) < 1e-5, "merged out err %g", max_abs_diff(merged, out_full, HQ * D));
    CHECK(max_abs_diff(lse_merged, lse_full, HQ) < 1e-5, "merged lse err %g", max_abs_diff(lse_merged, lse_full, HQ));
    free(q);
    section_done("merge_states of two halves equals the whole", before);
}

int main(void) {
    size_t i;
    rng_seed(11);
    for (i = 0; i < NUM_PAGES * PS * HK * D; i++) {
        k_model[i] = rng_uniform(1.0f);
        v_model[i] = rng_uniform(1.0f);
    }
    for (i = 0; i < NUM_PAGES * PS; i++) slot_positions[i] = (int32_t)(1000 + 3 * i);
    f32_nhd();
    f16_hnd();
    interleaved();
    pre_rope();
    apply_rope();
    merge();
    return finish();
}
