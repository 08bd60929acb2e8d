/* One cache used from several threads at once: reader threads run decode and queries on
 * the same sequences (shared lock) while a writer thread creates, fills, forks, truncates
 * and frees other sequences (exclusive lock). Every decode must give the result of a
 * single-threaded decode (to 1e-6), and the cache must end as it started. Then one policy
 * and one set of selections are shared by reader threads running decode under the policy,
 * selection and sparse decode, again beside the writer. Then a shared cluster set and
 * cluster index serve decode with clusters and retrieval on eight threads beside the
 * writer, and eight threads each make and use their own cache and index (separate
 * handles); these results must equal the single-threaded ones bit for bit. */
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

/* Write random K/V for every layer of `seq` in `c`; returns the number of failed writes. */
static int fill_in(kvsieve_cache_t *c, uint64_t seq, size_t n, uint64_t seed) {
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
        err = kvsieve_cache_write(c, seq, layer, 0, tensor3(&tk, k, dt_f32(), (int64_t)n, HK, D),
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

static int fill(uint64_t seq, size_t n, uint64_t seed) { return fill_in(cache, seq, n, seed); }

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

enum { CL_THREADS = 8, CL_ITERS = 3, SEP_LEN = 260, RET_CAP = HK * 300 };

static kvsieve_policy_t *cluster_policy;
static kvsieve_cluster_set_t *cluster_set;
static kvsieve_cluster_index_t *cluster_index;
static float expect_cl_out[BATCH * HQ * D], expect_cl_lse[BATCH * HQ];
static uint32_t expect_ret[RET_CAP];
static size_t expect_ret_len;

/* Retrieve for sequence 1's query from `ix` (a 120-token budget per head) into `got`;
 * returns the number of failed calls. */
static int retrieve_once(const kvsieve_cluster_index_t *ix, size_t seq_len, uint32_t *got, size_t *n) {
    test_tensor tq;
    kvsieve_retrieve_config_t rc = kvsieve_retrieve_config_default(120);
    kvsieve_selection_t *sel = NULL;
    kvsieve_error_t *err;
    rc.seq_len = seq_len;
    err = kvsieve_cluster_index_retrieve(ix, tensor3(&tq, q + HQ * D, dt_f32(), 1, HQ, D), &rc, &sel, NULL);
    if (!err) err = kvsieve_selection_indices(sel, got, RET_CAP, n);
    kvsieve_selection_free(sel);
    if (err) {
        printf("retrieve: %s\n", kvsieve_error_message(err));
        kvsieve_error_free(err);
        return 1;
    }
    return 0;
}

static void *cluster_reader(void *arg) {
    worker *w = (worker *)arg;
    float out[BATCH * HQ * D], lse[BATCH * HQ];
    uint32_t got[RET_CAP];
    size_t n = 0;
    test_tensor tq, to;
    int it;
    for (it = 0; it < CL_ITERS; it++) {
        kvsieve_error_t *err =
            kvsieve_cache_decode_with_clusters(cache, 1, ids, BATCH, tensor3(&tq, q, dt_f32(), BATCH, HQ, D), cluster_policy,
                                               cluster_set, tensor3(&to, out, dt_f32(), BATCH, HQ, D), lse, NULL, NULL, NULL, NULL);
        if (err) {
            w->errors++;
            printf("cluster reader %d: %s\n", w->index, kvsieve_error_message(err));
            kvsieve_error_free(err);
            continue;
        }
        if (memcmp(out, expect_cl_out, sizeof out) != 0 || memcmp(lse, expect_cl_lse, sizeof lse) != 0) w->mismatches++;
        w->errors += retrieve_once(cluster_index, lens[1], got, &n);
        if (n != expect_ret_len || memcmp(got, expect_ret, n * sizeof(uint32_t)) != 0) w->mismatches++;
        w->decodes++;
    }
    return NULL;
}

/* One shared cluster set and one shared index, read by CL_THREADS threads beside the writer. */
static void shared_clusters(void) {
    pthread_t threads[CL_THREADS + 1];
    worker workers[CL_THREADS + 1];
    test_tensor tq, to;
    kvsieve_cluster_config_t cfg = kvsieve_cluster_config_default(16);
    kvsieve_key_source_t src;
    int i, started = 0, decodes = 0, mismatches = 0, errors = 0, failed_before = g_failed;
    size_t b;

    EXPECT_OK(kvsieve_policy_parse("sinks=4,window=16,clusters=64,clusters_k=12,hier=3", &cluster_policy));
    EXPECT_OK(kvsieve_cluster_set_new(11, &cluster_set));
    for (b = 0; b < BATCH; b++) EXPECT_OK(kvsieve_cluster_set_build(cluster_set, cache, ids[b], cluster_policy, NULL));
    kvsieve_key_source_init(&src);
    src.cache = cache;
    src.seq = ids[1];
    src.layer = 1;
    cfg.num_coarse_clusters = 4;
    EXPECT_OK(kvsieve_cluster_index_build(&src, &cfg, &cluster_index));
    EXPECT_OK(kvsieve_cache_decode_with_clusters(cache, 1, ids, BATCH, tensor3(&tq, q, dt_f32(), BATCH, HQ, D), cluster_policy,
                                                 cluster_set, tensor3(&to, expect_cl_out, dt_f32(), BATCH, HQ, D),
                                                 expect_cl_lse, NULL, NULL, NULL, NULL));
    CHECK(retrieve_once(cluster_index, lens[1], expect_ret, &expect_ret_len) == 0 && expect_ret_len == HK * 120,
          "single-threaded retrieval keeps %zu tokens", expect_ret_len);
    memset(workers, 0, sizeof workers);
    for (i = 0; i <= CL_THREADS; i++) {
        workers[i].index = i;
        if (pthread_create(&threads[i], NULL, i < CL_THREADS ? cluster_reader : writer, &workers[i]) == 0) started++;
    }
    CHECK(started == CL_THREADS + 1, "started %d threads", started);
    for (i = 0; i < started; i++) pthread_join(threads[i], NULL);
    for (i = 0; i <= CL_THREADS; i++) {
        if (i < CL_THREADS) decodes += workers[i].decodes;
        mismatches += workers[i].mismatches;
        errors += workers[i].errors;
    }
    CHECK(errors == 0, "no call failed (%d errors)", errors);
    CHECK(decodes == CL_THREADS * CL_ITERS, "%d rounds of decode with clusters and retrieval ran", decodes);
    CHECK(mismatches == 0, "every round equals the single-threaded one bit for bit (%d mismatches)", mismatches);
    kvsieve_cluster_index_free(cluster_index);
    kvsieve_cluster_set_free(cluster_set);
    kvsieve_policy_free(cluster_policy);
    section_done("shared cluster set and index across threads", failed_before);
}

typedef struct {
    float out[HQ * D], lse[HQ];
    uint32_t ret[RET_CAP];
    size_t ret_len;
} private_result;

static private_result expect_private;

/* A cache and an index of this thread's own: one sequence of SEP_LEN tokens, decoded and
 * retrieved from. Returns the number of failed calls. */
static int private_run(private_result *r) {
    kvsieve_cache_config_t cfg = kvsieve_cache_config_default(LAYERS, HK, D, PS, 32);
    kvsieve_cluster_config_t ccfg = kvsieve_cluster_config_default(20);
    kvsieve_cache_t *own = NULL;
    kvsieve_cluster_index_t *ix = NULL;
    kvsieve_key_source_t src;
    test_tensor tq, to;
    uint64_t seq = 0;
    int failures = 0;
    kvsieve_error_t *err = kvsieve_cache_new(&cfg, &own);
    if (!err) err = kvsieve_cache_create_sequence(own, &seq);
    if (!err) err = kvsieve_cache_append(own, seq, SEP_LEN, NULL, NULL);
    if (!err) failures += fill_in(own, seq, SEP_LEN, 123);
    if (!err)
        err = kvsieve_cache_decode(own, 1, &seq, 1, tensor3(&tq, q, dt_f32(), 1, HQ, D), tensor3(&to, r->out, dt_f32(), 1, HQ, D),
                                   r->lse, NULL);
    if (!err) {
        kvsieve_key_source_init(&src);
        src.cache = own;
        src.seq = seq;
        src.layer = 0;
        err = kvsieve_cluster_index_build(&src, &ccfg, &ix);
    }
    if (!err) failures += retrieve_once(ix, SEP_LEN, r->ret, &r->ret_len);
    if (err) {
        printf("private handles: %s\n", kvsieve_error_message(err));
        kvsieve_error_free(err);
        failures++;
    }
    kvsieve_cluster_index_free(ix);
    kvsieve_cache_free(own);
    return failures;
}

static void *private_worker(void *arg) {
    worker *w = (worker *)arg;
    private_result *r = (private_result *)malloc(sizeof(private_result));
    int it;
    for (it = 0; it < 2; it++) {
        memset(r, 0xff, sizeof *r);
        w->errors += private_run(r);
        if (memcmp(r->out, expect_private.out, sizeof r->out) != 0 || memcmp(r->lse, expect_private.lse, sizeof r->lse) != 0 ||
            r->ret_len != expect_private.ret_len || memcmp(r->ret, expect_private.ret, r->ret_len * sizeof(uint32_t)) != 0)
            w->mismatches++;
        w->decodes++;
    }
    free(r);
    return NULL;
}

/* Separate handles: CL_THREADS threads each make, fill, decode, cluster and free a cache
 * and an index of their own at the same time. */
static void separate_handles(void) {
    pthread_t threads[CL_THREADS];
    worker workers[CL_THREADS];
    int i, started = 0, runs = 0, mismatches = 0, errors = 0, failed_before = g_failed;
    CHECK(private_run(&expect_private) == 0 && expect_private.ret_len == HK * 120, "single-threaded private run");
    memset(workers, 0, sizeof workers);
    for (i = 0; i < CL_THREADS; i++) {
        workers[i].index = i;
        if (pthread_create(&threads[i], NULL, private_worker, &workers[i]) == 0) started++;
    }
    CHECK(started == CL_THREADS, "started %d threads", started);
    for (i = 0; i < started; i++) pthread_join(threads[i], NULL);
    for (i = 0; i < CL_THREADS; i++) {
        runs += workers[i].decodes;
        mismatches += workers[i].mismatches;
        errors += workers[i].errors;
    }
    CHECK(errors == 0, "no call failed (%d errors)", errors);
    CHECK(runs == CL_THREADS * 2, "%d private runs", runs);
    CHECK(mismatches == 0, "every thread's own cache and index give the single-threaded result bit for bit (%d mismatches)",
          mismatches);
    section_done("separate caches and indexes on separate threads", failed_before);
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
    shared_clusters();
    separate_handles();
    kvsieve_cache_free(cache);
    return finish();
}
