/*
 * 01_store_and_decode.c: store a prompt's K/V in a kvsieve cache, then decode one token.
 *
 * The shape of a decode step in an engine that lets kvsieve own its KV pages:
 *
 *   1. create a cache once, sized for the model (layers, KV heads, head_dim) and for the
 *      memory you give it (capacity_pages);
 *   2. per request, create a sequence and append the prompt's tokens (this reserves slots);
 *   3. per layer, write the prompt's K and V (the outputs of your K/V projections, after
 *      RoPE) into those slots;
 *   4. per generated token: append one slot, write its K/V in every layer, and in every
 *      layer call kvsieve_cache_decode with that layer's query to get the attention output;
 *   5. free the sequence when the request ends, and the cache at shutdown.
 *
 * K/V and queries here are synthetic; in an engine they come from the model. Every tensor is
 * described by a kvsieve_tensor_t, laid out like DLPack's DLTensor.
 *
 * Build: install the library once (from the repository root), then compile against the
 * installed copy with pkg-config:
 *   scripts/install.sh --prefix $HOME/.local
 *   export PKG_CONFIG_PATH=$HOME/.local/lib/pkgconfig
 *   cc -std=c99 01_store_and_decode.c $(pkg-config --cflags --libs kvsieve) -lm \
 *      -Wl,-rpath,$(pkg-config --variable=libdir kvsieve) -o store_and_decode
 * or from CMake: find_package(kvsieve CONFIG REQUIRED) and target_link_libraries(... kvsieve::kvsieve).
 *
 * kvsieve.h includes the whole API. Including only the headers used would do as well:
 * kvsieve/cache.h, kvsieve/attention.h (kvsieve_cache_decode) and kvsieve/version.h.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvsieve.h"

/* A small Llama-like shape: grouped-query attention with 2 query heads per KV head. */
enum { NUM_LAYERS = 2, NUM_KV_HEADS = 2, NUM_QO_HEADS = 4, HEAD_DIM = 64, PAGE_SIZE = 16, PROMPT_LEN = 20 };

/* Report a failed call and say whether it failed. Errors are owned by the caller: free them. */
static int failed(kvsieve_error_t *err, const char *what) {
    if (err == NULL) return 0;
    fprintf(stderr, "%s failed [%s]: %s\n", what, kvsieve_error_code_name(kvsieve_error_code(err)),
            kvsieve_error_message(err));
    kvsieve_error_free(err);
    return 1;
}

/* A contiguous host float32 tensor of shape [n, heads, HEAD_DIM]. `shape` must outlive it. */
static kvsieve_tensor_t f32_tensor(float *data, int64_t shape[3], int64_t n, int64_t heads) {
    kvsieve_tensor_t t;
    memset(&t, 0, sizeof t);
    shape[0] = n;
    shape[1] = heads;
    shape[2] = HEAD_DIM;
    t.data = data;
    t.device.device_type = KVSIEVE_DEVICE_CPU;
    t.ndim = 3;
    t.dtype.code = KVSIEVE_DTYPE_CODE_FLOAT;
    t.dtype.bits = 32;
    t.dtype.lanes = 1;
    t.shape = shape;
    t.strides = NULL; /* row-major */
    return t;
}

/* Stand-in for the model: a deterministic value for (layer, token, head, channel). */
static float synthetic(int which, size_t layer, size_t token, size_t head, size_t c) {
    return (float)sin(0.37 * (double)(which + 1) * (double)(layer * 7 + token * 3 + head * 5 + c + 1));
}

static void fill(float *buf, int which, size_t layer, size_t first_token, size_t n, size_t heads) {
    size_t t, h, c;
    for (t = 0; t < n; t++)
        for (h = 0; h < heads; h++)
            for (c = 0; c < HEAD_DIM; c++)
                buf[(t * heads + h) * HEAD_DIM + c] = synthetic(which, layer, first_token + t, h, c);
}

int main(void) {
    kvsieve_cache_t *cache = NULL;
    uint64_t seq = 0;
    size_t layer, seq_len = 0, h;
    int status = 1;
    static float k[PROMPT_LEN * NUM_KV_HEADS * HEAD_DIM], v[PROMPT_LEN * NUM_KV_HEADS * HEAD_DIM];
    static float q[NUM_QO_HEADS * HEAD_DIM], out[NUM_QO_HEADS * HEAD_DIM];
    float lse[NUM_QO_HEADS];
    int64_t k_shape[3], v_shape[3], q_shape[3], out_shape[3];
    kvsieve_tensor_t kt, vt, qt, ot;
    kvsieve_cache_stats_t stats;

    /* 1. The cache: 64 pages of 16 token slots (each page spans every layer), float16 storage
     *    (the default), NHD page layout, keys stored after RoPE. Configuration structs start
     *    from kvsieve_*_default() or kvsieve_*_init(), which also set their struct_size. */
    kvsieve_cache_config_t config = kvsieve_cache_config_default(NUM_LAYERS, NUM_KV_HEADS, HEAD_DIM, PAGE_SIZE, 64);
    printf("kvsieve %s, CPU kernels: %s\n", kvsieve_version(), kvsieve_isa());
    if (failed(kvsieve_cache_new(&config, &cache), "kvsieve_cache_new")) return 1;

    /* 2. A sequence for the request, with slots for the prompt (positions 0..PROMPT_LEN-1). */
    if (failed(kvsieve_cache_create_sequence(cache, &seq), "kvsieve_cache_create_sequence")) goto done;
    if (failed(kvsieve_cache_append(cache, seq, PROMPT_LEN, NULL, NULL), "kvsieve_cache_append")) goto done;

    /* 3. Each layer's prompt K/V, [PROMPT_LEN, NUM_KV_HEADS, HEAD_DIM], written at token 0.
     *    kvsieve converts from the tensor's dtype to the cache's and copies: the buffers can
     *    be reused as soon as the call returns. */
    for (layer = 0; layer < NUM_LAYERS; layer++) {
        fill(k, 0, layer, 0, PROMPT_LEN, NUM_KV_HEADS);
        fill(v, 1, layer, 0, PROMPT_LEN, NUM_KV_HEADS);
        kt = f32_tensor(k, k_shape, PROMPT_LEN, NUM_KV_HEADS);
        vt = f32_tensor(v, v_shape, PROMPT_LEN, NUM_KV_HEADS);
        if (failed(kvsieve_cache_write(cache, seq, layer, 0, &kt, &vt), "kvsieve_cache_write")) goto done;
    }
    if (failed(kvsieve_cache_seq_len(cache, seq, &seq_len), "kvsieve_cache_seq_len")) goto done;
    printf("stored a prompt of %zu tokens in %d layers\n", seq_len, NUM_LAYERS);

    /* 4. Decode one token: one new slot, its K/V in every layer, then attention per layer. */
    if (failed(kvsieve_cache_append(cache, seq, 1, NULL, NULL), "kvsieve_cache_append")) goto done;
    for (layer = 0; layer < NUM_LAYERS; layer++) {
        fill(k, 0, layer, PROMPT_LEN, 1, NUM_KV_HEADS);
        fill(v, 1, layer, PROMPT_LEN, 1, NUM_KV_HEADS);
        kt = f32_tensor(k, k_shape, 1, NUM_KV_HEADS);
        vt = f32_tensor(v, v_shape, 1, NUM_KV_HEADS);
        if (failed(kvsieve_cache_write(cache, seq, layer, PROMPT_LEN, &kt, &vt), "kvsieve_cache_write")) goto done;

        /* The query of the new token, [batch = 1, NUM_QO_HEADS, HEAD_DIM]. Query heads 0-1 read
         * KV head 0, heads 2-3 read KV head 1. NULL params: scale 1/sqrt(HEAD_DIM), no soft cap. */
        fill(q, 2, layer, PROMPT_LEN, 1, NUM_QO_HEADS);
        qt = f32_tensor(q, q_shape, 1, NUM_QO_HEADS);
        ot = f32_tensor(out, out_shape, 1, NUM_QO_HEADS);
        if (failed(kvsieve_cache_decode(cache, layer, &seq, 1, &qt, &ot, lse, NULL), "kvsieve_cache_decode")) goto done;
        printf("layer %zu: out[head 0][0..3] = %.4f %.4f %.4f %.4f, lse =", layer, out[0], out[1], out[2], out[3]);
        for (h = 0; h < NUM_QO_HEADS; h++) printf(" %.4f", lse[h]);
        printf("\n");
        /* `out` would feed the layer's output projection here. */
    }
    if (failed(kvsieve_cache_seq_len(cache, seq, &seq_len), "kvsieve_cache_seq_len")) goto done;
    printf("decoded 1 token over %zu cached tokens\n", seq_len);

    /* Structs kvsieve fills are initialised first: struct_size says how large this program's is. */
    kvsieve_cache_stats_init(&stats);
    if (failed(kvsieve_cache_stats(cache, &stats), "kvsieve_cache_stats")) goto done;
    printf("pages used: %zu of %zu (%zu bytes of K/V)\n", stats.pages_used, stats.pages_total, stats.bytes_used);

    /* 5. The request is over: its pages return to the pool. */
    if (failed(kvsieve_cache_free_sequence(cache, seq), "kvsieve_cache_free_sequence")) goto done;
    status = 0;
done:
    kvsieve_cache_free(cache);
    return status;
}
