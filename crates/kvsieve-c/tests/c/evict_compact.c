/* Memory under a policy through the C API. Streaming: a long stream of one-token appends
 * into a small pool, with a sinks + window policy evicting after every step, keeps the
 * sequence's pages bounded, and decode under the policy equals a plain reference over the
 * sinks and the window of the whole history (original positions on post-RoPE keys, and
 * contiguous positions on pre-RoPE keys, as StreamingLLM numbers them). Compaction: decode
 * after keeping one list, one list per layer or one per KV head equals the reference over
 * the kept tokens, whose positions survive. */
#include "common.h"

enum { LAYERS = 2, HK = 2, HQ = 4, D = 16, PS = 4 };
enum { SINKS = 4, WINDOW = 12, STEPS = 150, POOL = 6 };

static void streaming(int pre_rope) {
    int before = g_failed;
    kvsieve_cache_config_t cfg = kvsieve_cache_config_default(LAYERS, HK, D, PS, POOL);
    kvsieve_cache_t *cache = NULL;
    kvsieve_policy_t *policy = NULL, *other = NULL;
    kvsieve_rope_config_t rope;
    kvsieve_attention_params_t params;
    uint64_t seq;
    size_t row = HK * D, step, layer, max_pages = 0, evicted_total = 0, t, i;
    float *k_hist[LAYERS], *v_hist[LAYERS];
    float q[HQ * D], out[HQ * D], lse[HQ], ref_out[HQ * D], ref_lse[HQ];
    float ksel[(SINKS + WINDOW) * HK * D], vsel[(SINKS + WINDOW) * HK * D];
    double q_pos[SINKS + WINDOW], k_pos[SINKS + WINDOW];
    int32_t positions[SINKS + WINDOW + PS * 2];
    double worst = 0.0;
    int positions_ok = 1;
    test_tensor tk, tv, tq, to;

    cfg.dtype = dt_f32();
    cfg.key_rope = pre_rope ? KVSIEVE_KEYS_PRE_ROPE : KVSIEVE_KEYS_POST_ROPE;
    cfg.track_key_bounds = false;
    kvsieve_rope_config_init(&rope);
    kvsieve_attention_params_init(&params);
    rope.theta = 10000.0f;
    rope.style = KVSIEVE_ROPE_HALF_SPLIT;
    if (pre_rope) params.rope = &rope;
    EXPECT_OK(kvsieve_cache_new(&cfg, &cache));
    EXPECT_OK(kvsieve_cache_create_sequence(cache, &seq));
    EXPECT_OK(kvsieve_policy_parse(pre_rope ? "sinks=4,window=12,positions=contiguous" : "sinks=4,window=12", &policy));
    for (layer = 0; layer < LAYERS; layer++) {
        k_hist[layer] = rand_floats(STEPS * row, 1.0f);
        v_hist[layer] = rand_floats(STEPS * row, 1.0f);
    }
    for (step = 0; step < STEPS; step++) {
        size_t hist = step + 1, n = 0, len = 0, npos = 0, evicted = 99;
        kvsieve_cache_stats_t st;
        kvsieve_cache_stats_init(&st);
        /* One new token: append, write every layer, evict what the policy no longer reads. */
        if (!EXPECT_OK(kvsieve_cache_append(cache, seq, 1, NULL, NULL))) break;
        EXPECT_OK(kvsieve_cache_seq_len(cache, seq, &len));
        for (layer = 0; layer < LAYERS; layer++)
            EXPECT_OK(kvsieve_cache_write(cache, seq, layer, len - 1, tensor3(&tk, k_hist[layer] + step * row, dt_f32(), 1, HK, D),
                                          tensor3(&tv, v_hist[layer] + step * row, dt_f32(), 1, HK, D)));
        EXPECT_OK(kvsieve_cache_evict_for_policy(cache, seq, policy, &evicted));
        evicted_total += evicted;
        EXPECT_OK(kvsieve_cache_stats(cache, &st));
        if (st.pages_used > max_pages) max_pages = st.pages_used;

        /* The kept history tokens: the sinks and the window; their stored positions. */
        EXPECT_OK(kvsieve_cache_positions(cache, seq, positions, sizeof positions / sizeof positions[0], &npos));
        {
            size_t tail = hist > WINDOW ? hist - WINDOW : 0;
            uint32_t kept[SINKS + WINDOW];
            for (t = 0; t < hist; t++) {
                if (t < SINKS || t >= tail) kept[n++] = (uint32_t)t;
            }
            /* Positions start with the sinks and end with the window. */
            for (i = 0; i < SINKS && i < npos; i++) positions_ok &= positions[i] == (int32_t)i;
            for (i = 0; i < WINDOW && i < hist && i < npos; i++) positions_ok &= positions[npos - 1 - i] == (int32_t)(hist - 1 - i);
            for (layer = 0; layer < LAYERS; layer++) {
                for (i = 0; i < HQ * D; i++) q[i] = rng_uniform(1.0f);
                EXPECT_OK(kvsieve_cache_decode_with_policy(cache, layer, &seq, 1, tensor3(&tq, q, dt_f32(), 1, HQ, D), policy,
                                                           tensor3(&to, out, dt_f32(), 1, HQ, D), lse, &params, NULL));
                for (i = 0; i < n; i++) {
                    memcpy(ksel + i * row, k_hist[layer] + kept[i] * row, row * sizeof(float));
                    memcpy(vsel + i * row, v_hist[layer] + kept[i] * row, row * sizeof(float));
                    q_pos[i] = (double)(n - 1);
                    k_pos[i] = (double)i;
                }
                if (pre_rope) {
                    ref_attention_rope(q, ksel, vsel, n, HQ, HK, D, q_pos, k_pos, rope.style, ref_out, ref_lse);
                } else {
                    ref_attention(q, ksel, vsel, n, HQ, HK, D, 0.0, 0.0, ref_out, ref_lse);
                }
                if (max_abs_diff(out, ref_out, HQ * D) > worst) worst = max_abs_diff(out, ref_out, HQ * D);
                if (max_abs_diff(lse, ref_lse, HQ) > worst) worst = max_abs_diff(lse, ref_lse, HQ);
            }
        }
    }
    /* Sinks need one page, a window of 12 at most four: five pages, whatever the length. */
    CHECK(max_pages <= 5, "pages stay bounded: at most %zu in use", max_pages);
    CHECK(evicted_total >= (STEPS - SINKS - WINDOW) / PS - 1, "%zu pages evicted over %d steps", evicted_total, STEPS);
    CHECK(positions_ok, "the kept tokens keep their original positions");
    CHECK(worst < 2e-4, "%s: decode under the policy matches sinks + window of the whole history (err %g)",
          pre_rope ? "contiguous positions" : "original positions", worst);

    /* A policy that is not made of sinks and windows alone evicts nothing. */
    EXPECT_OK(kvsieve_policy_parse("sinks=4,window=12;layers=1:dense", &other));
    {
        size_t evicted = 99, before_len = 0, after_len = 0;
        EXPECT_OK(kvsieve_cache_seq_len(cache, seq, &before_len));
        EXPECT_OK(kvsieve_cache_evict_for_policy(cache, seq, other, &evicted));
        EXPECT_OK(kvsieve_cache_seq_len(cache, seq, &after_len));
        CHECK(evicted == 0 && after_len == before_len, "a dense layer keeps every page (%zu evicted)", evicted);
    }
    kvsieve_policy_free(other);
    kvsieve_policy_free(policy);
    kvsieve_cache_free(cache);
    for (layer = 0; layer < LAYERS; layer++) {
        free(k_hist[layer]);
        free(v_hist[layer]);
    }
    section_done(pre_rope ? "streaming with contiguous positions: bounded pages, attention over sinks + window"
                          : "streaming: bounded pages, attention over sinks + window",
                 before);
}

enum { LEN = 50, KEEP = 20 };

/* A sequence of LEN tokens at positions 100.., written for both layers. */
static uint64_t stored_sequence(kvsieve_cache_t *cache, float *k[LAYERS], float *v[LAYERS]) {
    uint64_t seq = 0;
    int32_t pos[LEN];
    size_t t, layer;
    test_tensor tk, tv;
    for (t = 0; t < LEN; t++) pos[t] = (int32_t)(100 + t);
    EXPECT_OK(kvsieve_cache_create_sequence(cache, &seq));
    EXPECT_OK(kvsieve_cache_append(cache, seq, LEN, pos, NULL));
    for (layer = 0; layer < LAYERS; layer++) {
        k[layer] = rand_floats(LEN * HK * D, 1.0f);
        v[layer] = rand_floats(LEN * HK * D, 1.0f);
        EXPECT_OK(kvsieve_cache_write(cache, seq, layer, 0, tensor3(&tk, k[layer], dt_f32(), LEN, HK, D),
                                      tensor3(&tv, v[layer], dt_f32(), LEN, HK, D)));
    }
    return seq;
}

/* Compact with `kind`, then check positions, memory and decode at every layer. */
static void compact_case(kvsieve_cache_t *cache, uint32_t kind, const char *name) {
    size_t num_lists = kind == KVSIEVE_KEEP_ALL ? 1 : kind == KVSIEVE_KEEP_PER_LAYER ? LAYERS : LAYERS * HK;
    uint32_t keep[LAYERS * HK * KEEP], keep_indptr[LAYERS * HK + 1];
    float *k[LAYERS], *v[LAYERS];
    float kc[KEEP * HK * D], vc[KEEP * HK * D], q[HQ * D], out[HQ * D], lse[HQ], ref_out[HQ * D], ref_lse[HQ];
    int32_t pos[LEN];
    size_t l, i, h, layer, len = 0, npos = 0;
    kvsieve_cache_stats_t before_st, after_st;
    test_tensor tq, to;
    uint64_t seq = stored_sequence(cache, k, v);

    /* Each list: KEEP distinct sorted tokens (list 0 always holds token 0 and the last). */
    keep_indptr[0] = 0;
    for (l = 0; l < num_lists; l++) {
        char in[LEN];
        size_t n = 0, t;
        memset(in, 0, LEN);
        in[0] = in[LEN - 1] = 1;
        for (n = 2; n < KEEP;) {
            t = (size_t)(rng_next() % LEN);
            if (!in[t]) in[t] = 1, n++;
        }
        for (n = 0, t = 0; t < LEN; t++) {
            if (in[t]) keep[l * KEEP + n++] = (uint32_t)t;
        }
        keep_indptr[l + 1] = (uint32_t)((l + 1) * KEEP);
    }
    kvsieve_cache_stats_init(&before_st);
    kvsieve_cache_stats_init(&after_st);
    EXPECT_OK(kvsieve_cache_stats(cache, &before_st));
    EXPECT_OK(kvsieve_cache_compact(cache, seq, kind, keep_indptr, num_lists, keep, num_lists * KEEP));
    EXPECT_OK(kvsieve_cache_stats(cache, &after_st));
    EXPECT_OK(kvsieve_cache_seq_len(cache, seq, &len));
    CHECK(len == KEEP, "%s: %zu tokens after compaction", name, len);
    CHECK(before_st.pages_used - after_st.pages_used == (LEN + PS - 1) / PS - (KEEP + PS - 1) / PS,
          "%s: pages in use %zu -> %zu", name, before_st.pages_used, after_st.pages_used);
    EXPECT_OK(kvsieve_cache_positions(cache, seq, pos, LEN, &npos));
    for (i = 0; i < KEEP && npos == KEEP; i++) {
        if (pos[i] != (int32_t)(100 + keep[i])) break;
    }
    CHECK(npos == KEEP && i == KEEP, "%s: positions of the first list survive", name);

    for (layer = 0; layer < LAYERS; layer++) {
        for (i = 0; i < KEEP; i++) {
            for (h = 0; h < HK; h++) {
                size_t list = kind == KVSIEVE_KEEP_ALL ? 0 : kind == KVSIEVE_KEEP_PER_LAYER ? layer : layer * HK + h;
                size_t t = keep[list * KEEP + i];
                memcpy(kc + (i * HK + h) * D, k[layer] + (t * HK + h) * D, D * sizeof(float));
                memcpy(vc + (i * HK + h) * D, v[layer] + (t * HK + h) * D, D * sizeof(float));
            }
        }
        for (i = 0; i < HQ * D; i++) q[i] = rng_uniform(1.0f);
        EXPECT_OK(kvsieve_cache_decode(cache, layer, &seq, 1, tensor3(&tq, q, dt_f32(), 1, HQ, D),
                                       tensor3(&to, out, dt_f32(), 1, HQ, D), lse, NULL));
        ref_attention(q, kc, vc, KEEP, HQ, HK, D, 0.0, 0.0, ref_out, ref_lse);
        CHECK(max_abs_diff(out, ref_out, HQ * D) < 1e-4 && max_abs_diff(lse, ref_lse, HQ) < 1e-4,
              "%s: decode at layer %zu after compaction matches the kept tokens (err %g)", name, layer,
              max_abs_diff(out, ref_out, HQ * D));
    }
    EXPECT_OK(kvsieve_cache_free_sequence(cache, seq));
    for (layer = 0; layer < LAYERS; layer++) {
        free(k[layer]);
        free(v[layer]);
    }
}

static void compaction(void) {
    int before = g_failed;
    kvsieve_cache_config_t cfg = kvsieve_cache_config_default(LAYERS, HK, D, PS, 20);
    kvsieve_cache_t *cache = NULL;
    cfg.dtype = dt_f32();
    EXPECT_OK(kvsieve_cache_new(&cfg, &cache));
    compact_case(cache, KVSIEVE_KEEP_ALL, "one list");
    compact_case(cache, KVSIEVE_KEEP_PER_LAYER, "per layer");
    compact_case(cache, KVSIEVE_KEEP_PER_HEAD, "per KV head");
    kvsieve_cache_free(cache);
    section_done("compact: decode after compaction equals the reference over the kept tokens", before);
}

int main(void) {
    rng_seed(41);
    streaming(0);
    streaming(1);
    compaction();
    return finish();
}
