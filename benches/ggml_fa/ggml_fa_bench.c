/*
 * The peer of kvsieve's dense decode: ggml's CPU flash attention (ggml_flash_attn_ext) for
 * one query token, f16 K/V, head_dim 128, 8 KV heads, 32 query heads, timed on its own.
 *
 * Two layouts of the same K/V:
 *   contiguous  K and V as [head_dim, n_kv, n_kv_heads] tensors, each head's tokens
 *               contiguous (the layout ggml's flash attention reads best), no mask;
 *   llama       K and V as llama.cpp's KV cache holds them: one [head_dim * n_kv_heads,
 *               kv_size] buffer per layer, a token's heads side by side, viewed as
 *               [head_dim, n_kv_heads, n_kv] (heads head_dim * 2 bytes apart, tokens a row
 *               apart) and permuted to [head_dim, n_kv, n_kv_heads], with an f16 mask of
 *               zeros and F32 accumulation requested, as llama.cpp's build_attn_mha passes
 *               its cache views in a decode step (llama-kv-cache.cpp get_k/get_v, V not
 *               transposed under flash attention).
 *
 * The data are those benches/report.rs writes into kvsieve's cache: an xorshift32 stream
 * (seed 0x12345678) mapped to [-1, 1), filled in slabs of 1024 tokens laid out
 * [token, kv_head, dim], the same values for K and V, rounded to f16; the query is
 * q[i] = ((i * 7919) % 1000) / 1000 - 0.5 over [query_head, dim].
 *
 * Usage: ggml_fa_bench --tokens N [--threads T] [--warmup W] [--reps R]
 *                      [--layout contiguous|llama] [--q-scale F] [--huge-pages] [--out FILE]
 * Prints one line of key=value pairs (median_ms is the median of the R timed steps); with
 * --out, writes the output of one step as f32 [query_head, dim] to FILE. --q-scale multiplies
 * the query (a sharper softmax for checking outputs; the data are otherwise near-uniform).
 */
#define _GNU_SOURCE
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#include "ggml-cpu.h"
#include "ggml.h"

enum { HEAD_DIM = 128, N_KV_HEADS = 8, N_HEADS = 32, SLAB = 1024 };

static double now_secs(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double) ts.tv_sec + (double) ts.tv_nsec * 1e-9;
}

static int cmp_double(const void * a, const void * b) {
    const double x = *(const double *) a, y = *(const double *) b;
    return (x > y) - (x < y);
}

static void usage(void) {
    fprintf(stderr, "usage: ggml_fa_bench --tokens N [--threads T] [--warmup W] [--reps R] "
                    "[--layout contiguous|llama] [--q-scale F] [--huge-pages] [--out FILE]\n");
    exit(2);
}

static long parse_long(const char * name, const char * s, long lo, long hi) {
    char * end = NULL;
    const long v = strtol(s, &end, 10);
    if (end == s || *end != '\0' || v < lo || v > hi) {
        fprintf(stderr, "ggml_fa_bench: %s: expected an integer in [%ld, %ld], got \"%s\"\n", name, lo, hi, s);
        exit(2);
    }
    return v;
}

/* Writes the K/V values of token t, KV head h, dim i at base + t*tok_stride + h*head_stride + i
 * (in elements), for tokens [0, n_kv). */
static void fill_kv(ggml_fp16_t * base, int64_t n_kv, int64_t tok_stride, int64_t head_stride) {
    uint32_t x = 0x12345678u;
    for (int64_t s = 0; s < n_kv; s += SLAB) {
        const int64_t n = n_kv - s < SLAB ? n_kv - s : SLAB;
        /* a slab's values are drawn in full even when only n tokens of it are used */
        for (int64_t j = 0; j < (int64_t) SLAB * N_KV_HEADS * HEAD_DIM; j++) {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            const float v = ((float) x / (float) UINT32_MAX) * 2.0f - 1.0f;
            const int64_t t = j / (N_KV_HEADS * HEAD_DIM);
            if (t >= n) {
                continue;
            }
            const int64_t h = (j / HEAD_DIM) % N_KV_HEADS, i = j % HEAD_DIM;
            base[(s + t) * tok_stride + h * head_stride + i] = ggml_fp32_to_fp16(v);
        }
    }
}

int main(int argc, char ** argv) {
    long n_kv = 0, n_threads = 2, warmup = 2, reps = 10;
    int llama_layout = 0, huge_pages = 0;
    float q_scale = 1.0f;
    const char * out_path = NULL;
    for (int a = 1; a < argc; a++) {
        const char * arg = argv[a];
        const char * val = a + 1 < argc ? argv[a + 1] : NULL;
        if (strcmp(arg, "--huge-pages") == 0) {
            huge_pages = 1;
            continue;
        }
        if (val == NULL) {
            usage();
        }
        if (strcmp(arg, "--tokens") == 0) {
            n_kv = parse_long(arg, val, 1, 1L << 22);
        } else if (strcmp(arg, "--threads") == 0) {
            n_threads = parse_long(arg, val, 1, GGML_MAX_N_THREADS);
        } else if (strcmp(arg, "--warmup") == 0) {
            warmup = parse_long(arg, val, 0, 1000);
        } else if (strcmp(arg, "--reps") == 0) {
            reps = parse_long(arg, val, 1, 1000);
        } else if (strcmp(arg, "--layout") == 0) {
            if (strcmp(val, "llama") == 0) {
                llama_layout = 1;
            } else if (strcmp(val, "contiguous") != 0) {
                fprintf(stderr, "ggml_fa_bench: --layout: expected contiguous or llama, got \"%s\"\n", val);
                return 2;
            }
        } else if (strcmp(arg, "--q-scale") == 0) {
            char * end = NULL;
            q_scale = strtof(val, &end);
            if (end == val || *end != '\0' || !isfinite(q_scale)) {
                fprintf(stderr, "ggml_fa_bench: --q-scale: expected a finite number, got \"%s\"\n", val);
                return 2;
            }
        } else if (strcmp(arg, "--out") == 0) {
            out_path = val;
        } else {
            usage();
        }
        a++;
    }
    if (n_kv == 0) {
        usage();
    }

    /* One context holds every tensor: K and V (f16), the query, the mask and the output. */
    const size_t kv_bytes = (size_t) n_kv * N_KV_HEADS * HEAD_DIM * sizeof(ggml_fp16_t);
    const size_t mem_size = 2 * kv_bytes + (size_t) n_kv * sizeof(ggml_fp16_t) +
                            2 * (size_t) N_HEADS * HEAD_DIM * sizeof(float) + 64 * ggml_tensor_overhead() +
                            ggml_graph_overhead() + (1u << 20);
    void * mem = NULL;
    if (huge_pages) {
        /* 2 MiB-aligned and advised for transparent huge pages, as kvsieve's page pool is */
        const size_t huge = 2u << 20;
        if (posix_memalign(&mem, huge, (mem_size + huge - 1) / huge * huge) != 0) {
            mem = NULL;
        } else {
            madvise(mem, (mem_size + huge - 1) / huge * huge, MADV_HUGEPAGE);
        }
    } else {
        mem = malloc(mem_size);
    }
    if (mem == NULL) {
        fprintf(stderr, "ggml_fa_bench: cannot allocate %zu bytes\n", mem_size);
        return 1;
    }
    struct ggml_init_params ip = { .mem_size = mem_size, .mem_buffer = mem, .no_alloc = false };
    struct ggml_context * ctx = ggml_init(ip);
    if (ctx == NULL) {
        fprintf(stderr, "ggml_fa_bench: ggml_init failed\n");
        return 1;
    }

    struct ggml_tensor *k, *v, *q, *mask = NULL;
    float * q_data; /* [query_head, dim] in both layouts (one token) */
    if (llama_layout) {
        /* the layer's cache tensors, [n_embd_k_gqa, kv_size] with kv_size = n_kv */
        struct ggml_tensor * k_cache = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, HEAD_DIM * N_KV_HEADS, n_kv);
        struct ggml_tensor * v_cache = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, HEAD_DIM * N_KV_HEADS, n_kv);
        fill_kv(k_cache->data, n_kv, HEAD_DIM * N_KV_HEADS, HEAD_DIM);
        fill_kv(v_cache->data, n_kv, HEAD_DIM * N_KV_HEADS, HEAD_DIM);
        const size_t head = ggml_row_size(GGML_TYPE_F16, HEAD_DIM);
        const size_t row = ggml_row_size(GGML_TYPE_F16, HEAD_DIM * N_KV_HEADS);
        /* get_k / get_v: [head_dim, n_head_kv, n_kv, n_stream = 1] */
        k = ggml_view_4d(ctx, k_cache, HEAD_DIM, N_KV_HEADS, n_kv, 1, head, row, row * n_kv, 0);
        v = ggml_view_4d(ctx, v_cache, HEAD_DIM, N_KV_HEADS, n_kv, 1, head, row, row * n_kv, 0);
        /* the query as the model's projection leaves it, [head_dim, n_head, n_tokens] */
        struct ggml_tensor * q_cur = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, HEAD_DIM, N_HEADS, 1);
        q_data = q_cur->data;
        q = ggml_view_4d(ctx, q_cur, HEAD_DIM, N_HEADS, 1, 1, q_cur->nb[1], q_cur->nb[2], q_cur->nb[2], 0);
        /* build_attn_mha: permute(0, 2, 1, 3) of q, k and v */
        q = ggml_permute(ctx, q, 0, 2, 1, 3);
        k = ggml_permute(ctx, k, 0, 2, 1, 3);
        v = ggml_permute(ctx, v, 0, 2, 1, 3);
        /* every cached token visible: a row of zeros */
        mask = ggml_new_tensor_4d(ctx, GGML_TYPE_F16, n_kv, 1, 1, 1);
        memset(mask->data, 0, ggml_nbytes(mask));
    } else {
        k = ggml_new_tensor_3d(ctx, GGML_TYPE_F16, HEAD_DIM, n_kv, N_KV_HEADS);
        v = ggml_new_tensor_3d(ctx, GGML_TYPE_F16, HEAD_DIM, n_kv, N_KV_HEADS);
        fill_kv(k->data, n_kv, HEAD_DIM, (int64_t) n_kv * HEAD_DIM);
        fill_kv(v->data, n_kv, HEAD_DIM, (int64_t) n_kv * HEAD_DIM);
        q = ggml_new_tensor_4d(ctx, GGML_TYPE_F32, HEAD_DIM, 1, N_HEADS, 1);
        q_data = q->data;
    }
    for (int i = 0; i < N_HEADS * HEAD_DIM; i++) {
        q_data[i] = ((float) ((i * 7919) % 1000) / 1000.0f - 0.5f) * q_scale;
    }

    struct ggml_tensor * out = ggml_flash_attn_ext(ctx, q, k, v, mask, 1.0f / sqrtf((float) HEAD_DIM), 0.0f, 0.0f);
    if (llama_layout) {
        ggml_prec_set_acc(out, GGML_PREC_F32);
    }
    struct ggml_cgraph * graph = ggml_new_graph(ctx);
    ggml_build_forward_expand(graph, out);

    /* a persistent thread pool and work buffer, so a step times the attention only */
    struct ggml_threadpool_params tpp = ggml_threadpool_params_default((int) n_threads);
    struct ggml_threadpool * pool = ggml_threadpool_new(&tpp);
    if (pool == NULL) {
        fprintf(stderr, "ggml_fa_bench: ggml_threadpool_new failed\n");
        return 1;
    }
    struct ggml_cplan plan = ggml_graph_plan(graph, (int) n_threads, pool);
    void * work = plan.work_size > 0 ? malloc(plan.work_size) : NULL;
    if (plan.work_size > 0 && work == NULL) {
        fprintf(stderr, "ggml_fa_bench: cannot allocate a %zu-byte work buffer\n", plan.work_size);
        return 1;
    }
    plan.work_data = work;

    double * times = calloc((size_t) reps, sizeof(double));
    if (times == NULL) {
        return 1;
    }
    for (long r = 0; r < warmup + reps; r++) {
        const double t0 = now_secs();
        if (ggml_graph_compute(graph, &plan) != GGML_STATUS_SUCCESS) {
            fprintf(stderr, "ggml_fa_bench: ggml_graph_compute failed\n");
            return 1;
        }
        const double dt = now_secs() - t0;
        if (r >= warmup) {
            times[r - warmup] = dt;
        }
    }
    qsort(times, (size_t) reps, sizeof(double), cmp_double);

    if (out_path != NULL) {
        /* the result is [head_dim, n_head, n_tokens] f32, contiguous: [query_head, dim] */
        FILE * f = fopen(out_path, "wb");
        if (f == NULL || fwrite(out->data, sizeof(float), N_HEADS * HEAD_DIM, f) != N_HEADS * HEAD_DIM ||
            fclose(f) != 0) {
            fprintf(stderr, "ggml_fa_bench: cannot write %s\n", out_path);
            return 1;
        }
    }
    printf("layout=%s tokens=%ld threads=%ld reps=%ld huge_pages=%d median_ms=%.4f min_ms=%.4f max_ms=%.4f\n",
           llama_layout ? "llama" : "contiguous", n_kv, n_threads, reps, huge_pages, times[reps / 2] * 1e3,
           times[0] * 1e3, times[reps - 1] * 1e3);

    free(times);
    free(work);
    ggml_threadpool_free(pool);
    ggml_free(ctx);
    free(mem);
    return 0;
}
