/* One cache used from several threads at once: reader threads run decode and queries on
 * the same sequences (shared lock) while a writer thread creates, fills, forks, truncates
 * and frees other sequences (exclusive lock). Every decode must give the result of a
 * single-threaded decode (to 1e-6), and the cache must end as it started. Then one policy
 * and one set of selections are shared by reader threads running decode under the policy,
 * selection and sparse decode, again beside the writer. */
#include <pthread.h>

#include "common.h"

enum { LAYERS = 2, HK = 2, HQ = 8, D = 64, PS = 16, PAGES = 96, BATCH = 3, READERS = 4, ITERS = 6 };

static const size_t lens[BATCH] = {100, 300, 50};

static kvsieve_cache_t *cache;
static uint64_t ids[BATCH];
static float q[BATCH * HQ * D];
static float expect_out[LAYERS][BATCH * HQ * D];
static float expect_lse[LAYERS][BATCH * HQ];

typedef struct {
    int index;
    int decodes, mismatches, errors;
} worker;

/* Write random K/V for every layer; returns the number of failed writes. */
static int fill(uint64_t seq, size_t n, uint64_t seed) {
    float *k, *v;
    test_tensor tk, tv;
    size_t layer, i;
    int failures = 0;
    kvsieve_error_t *err;
    k = (float *)malloc(n * HK * D * sizeof(float));
    v = (float *)malloc(n * HK * D * sizeof(float));
    for (layer = 0; layer < LAYERS; layer++) {
        /* A local generator: rng_* is not shared between threads. */
        uint64_t x = seed * 1000003u + layer;
        for (i = 0; i < n * HK * D; i++) {
            x = x * 6364136223846793005ULL + 1442695040888963407ULL;
            k[i] = (float)((x >> 40) & 0xffff) / 32768.0f - 1.0f;
            v[i] = (float)((x >> 20) & 0xffff) / 32768.0f - 1.0f;
        }
        err = kvsieve_cache_write(cache, seq, layer, 0, tensor3(&tk, k, dt_f32(), (int64_t)n, HK, D),
                                  tensor3(&tv, v, dt_f32(), (int64_t)n, HK, D));
        if (err) {
            printf("write failed: %s\n", kvsieve_error_message(err));
            kvsieve_error_free(err);
            failures++;
        }
    }
    free(k);
    free(v);
    return failures;
}

static void *reader(void *arg) {
    worker *w = (worker *)arg;
    float out[BATCH * HQ * D], lse[BATCH * HQ];
    test_tensor tq, to;
    kvsieve_cache_stats_t s;
    size_t len;
    int it;
    kvsieve_cache_stats_init(&s);
    for (it = 0; it < ITERS; it++) {
        size_t layer = (size_t)(it + w->index) % LAYERS;
        kvsieve_error_t *err = kvsieve_cache_decode(cache, layer, ids, BATCH, tensor3(&tq, q, dt_f32(), BATCH, HQ, D),
                                                    tensor3(&to, out, dt_f32(), BATCH, HQ, D), lse, NULL);
        if (err) {
            w->errors++;
            printf("reader %d: %s\n", w->index, kvsieve_error_message(err));
            kvsieve_error_free(err);
            continue;
        }
        w->decodes++;
        if (max_abs_diff(out, expect_out[layer], BATCH * HQ * D) > 1e-6 ||
            max_abs_diff(lse, expect_lse[layer], BATCH * HQ) > 1e-6)
            w->mismatches++;
        err = kvsieve_cache_stats(cache, &s);
        if (!err) err = kvsieve_cache_seq_len(cache, ids[it % BATCH], &len);
        if (!err && len != lens[it % BATCH]) w->mismatches++;
        if (err) {
            w->errors++;
            kvsieve_error_free(err);
        }
    }
    return NULL;
}

static void *writer(void *arg) {
    worker *w = (worker *)arg;
    int it;
    for (it = 0; it < ITERS; it++) {
        uint64_t s = 0, f = 0;
        kvsieve_error_t *err = kvsieve_cache_create_sequence(cache, &s);
        if (!err) err = kvsieve_cache_append(cache, s, 40, NULL, NULL);
        if (!err) w->errors += fill(s, 40, (uint64_t)it + 17);
        if (!err) err = kvsieve_cache_fork(cache, s, &f);
        if (!err) err = kvsieve_cache_append(cache, f, 3, NULL, NULL);
        if (!err) err = kvsieve_cache_truncate(cache, s, 7);
        if (!err) err = kvsieve_cache_free_sequence(cache, f);
        if (!err) err = kvsieve_cache_free_sequence(cache, s);
        if (err) {
            w->errors++;
            printf("writer: %s\n", kvsieve_error_message(err));
            kvsieve_error_free(err);
        } else {
            w->decodes++;
        }
    }
    return NULL;
}

static kvsieve_policy_t *policy;
static kvsieve_selection_t *shared[BATCH];
static uint32_t shared_indices[BATCH][HK * 300];
static size_t shared_len[BATCH];
static float expect_policy_out[BATCH * HQ * D];

/* Decode under the shared policy, then sparse decode over the shared selections. */
static void *policy_reader(void *arg) {
    worker *w = (worker *)arg;
    float out[BATCH * HQ * D], lse[BATCH * HQ];
    uint32_t got[HK * 300];
    test_tensor tq, to;
    int it;
    size_t b, n;
    for (it = 0; it < ITERS; it++) {
        kvsieve_selection_t *sels[BATCH] = {NULL, NULL, NULL};
        kvsieve_error_t *err = kvsieve_cache_decode_with_policy(cache, 0, ids, BATCH, tensor3(&tq, q, dt_f32(), BATCH, HQ, D),
                                                                policy, tensor3(&to, out, dt_f32(), BATCH, HQ, D), lse, NULL,
                                                                sels);
        if (!err && max_abs_diff(out, expect_policy_out, BATCH * HQ * D) > 1e-6) w->mismatches++;
        for (b = 0; b < BATCH && !err; b++) {
            err = kvsieve_selection_indices(sels[b], got, HK * 300, &n);
            if (!err && (n != shared_len[b] || memcmp(got, shared_indices[b], n * sizeof(uint32_t)) != 0)) w->mismatches++;
        }
        for (b = 0; b < BATCH; b++) kvsieve_selection_free(sels[b]);
        if (!err)
            err = kvsieve_cache_decode_sparse(cache, 0, ids, BATCH, tensor3(&tq, q, dt_f32(), BATCH, HQ, D), shared,
                                              tensor3(&to, out, dt_f32(), BATCH, HQ, D), lse, NULL);
        if (!err && max_abs_diff(out, expect_policy_out, BATCH * HQ * D) > 1e-6) w->mismatches++;
        if (err) {
            w->errors++;
            printf("policy reader %d: %s\n", w->index, kvsieve_error_message(err));
            kvsieve_error_free(err);
        } else {
            w->decodes++;
        }
    }
    return NULL;
}

static void shared_policy(void) {
    pthread_t threads[READERS + 1];
    worker workers[READERS + 1];
    test_tensor tq, to;
    int i, started = 0, decodes = 0, mismatches = 0, errors = 0, failed_before = g_failed;
    size_t b;

    EXPECT_OK(kvsieve_policy_parse("sinks=8,window=32,pages=64;layers=1:dense", &policy));
    EXPECT_OK(kvsieve_cache_decode_with_policy(cache, 0, ids, BATCH, tensor3(&tq, q, dt_f32(), BATCH, HQ, D), policy,
                                               tensor3(&to, expect_policy_out, dt_f32(), BATCH, HQ, D), NULL, NULL, shared));
    for (b = 0; b < BATCH; b++) EXPECT_OK(kvsieve_selection_indices(shared[b], shared_indices[b], HK * 300, &shared_len[b]));
    memset(workers, 0, sizeof workers);
    for (i = 0; i <= READERS; i++) {
        workers[i].index = i;
        if (pthread_create(&threads[i], NULL, i < READERS ? policy_reader : writer, &workers[i]) == 0) started++;
    }
    CHECK(started == READERS + 1, "started %d threads", started);
    for (i = 0; i < started; i++) pthread_join(threads[i], NULL);
    for (i = 0; i <= READERS; i++) {
        if (i < READERS) decodes += workers[i].decodes;
        mismatches += workers[i].mismatches;
        errors += workers[i].errors;
    }
    CHECK(errors == 0, "no call failed (%d errors)", errors);
    CHECK(decodes == READERS * ITERS, "%d rounds of policy and sparse decode ran", decodes);
    CHECK(mismatches == 0, "every round matches the single-threaded result (%d mismatches)", mismatches);
    for (b = 0; b < BATCH; b++) kvsieve_selection_free(shared[b]);
    kvsieve_policy_free(policy);
    section_done("policy decode and shared selections across threads", failed_before);
}

int main(void) {
    kvsieve_cache_config_t cfg = kvsieve_cache_config_default(LAYERS, HK, D, PS, PAGES);
    kvsieve_cache_stats_t before, after;
    pthread_t threads[READERS + 1];
    worker workers[READERS + 1];
    test_tensor tq, to;
    size_t b, layer;
    int i, started = 0, total_decodes = 0, mismatches = 0, errors = 0, failed_before;

    rng_seed(5);
    kvsieve_cache_stats_init(&before);
    kvsieve_cache_stats_init(&after);
    if (!EXPECT_OK(kvsieve_cache_new(&cfg, &cache))) return finish();
    for (b = 0; b < BATCH; b++) {
        EXPECT_OK(kvsieve_cache_create_sequence(cache, &ids[b]));
        EXPECT_OK(kvsieve_cache_append(cache, ids[b], lens[b], NULL, NULL));
        CHECK(fill(ids[b], lens[b], b) == 0, "fill sequence %zu", b);
    }
    for (i = 0; i < BATCH * HQ * D; i++) q[i] = rng_uniform(1.0f);
    for (layer = 0; layer < LAYERS; layer++)
        EXPECT_OK(kvsieve_cache_decode(cache, layer, ids, BATCH, tensor3(&tq, q, dt_f32(), BATCH, HQ, D),
                                       tensor3(&to, expect_out[layer], dt_f32(), BATCH, HQ, D), expect_lse[layer], NULL));
    EXPECT_OK(kvsieve_cache_stats(cache, &before));

    failed_before = g_failed;
    memset(workers, 0, sizeof workers);
    for (i = 0; i <= READERS; i++) {
        workers[i].index = i;
        if (pthread_create(&threads[i], NULL, i < READERS ? reader : writer, &workers[i]) == 0) started++;
    }
    CHECK(started == READERS + 1, "started %d threads", started);
    for (i = 0; i < started; i++) pthread_join(threads[i], NULL);
    for (i = 0; i < READERS; i++) {
        total_decodes += workers[i].decodes;
        mismatches += workers[i].mismatches;
        errors += workers[i].errors;
    }
    errors += workers[READERS].errors;
    CHECK(errors == 0, "no call failed (%d errors)", errors);
    CHECK(total_decodes == READERS * ITERS, "%d concurrent decodes ran", total_decodes);
    CHECK(mismatches == 0, "every concurrent decode matches the single-threaded one (%d mismatches)", mismatches);
    CHECK(workers[READERS].decodes == ITERS, "writer finished %d rounds", workers[READERS].decodes);
    EXPECT_OK(kvsieve_cache_stats(cache, &after));
    CHECK(after.num_sequences == before.num_sequences && after.pages_used == before.pages_used &&
              after.num_tokens == before.num_tokens,
          "cache ends as it started");
    printf("%d decodes on %d threads beside a writer\n", total_decodes, READERS);
    section_done("concurrent decode with a writer", failed_before);
    shared_policy();
    kvsieve_cache_free(cache);
    return finish();
}
