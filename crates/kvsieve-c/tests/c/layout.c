/* Layout of every public struct as the C compiler sees it (the Rust harness compares these
 * lines with the Rust definitions), the values the headers' static inline initialisers give
 * (compared with the library's twins of them), and the DLPack promise: a DLTensor, declared
 * here as dlpack.h declares it, has the same layout as kvsieve_tensor_t and can be passed as
 * is. */
#include <stddef.h>

#include "common.h"

#define ALIGNOF(T) offsetof(struct { char c; T t; }, t)
#define SIZE(T) printf("layout %s size %zu align %zu\n", #T, sizeof(T), (size_t)ALIGNOF(T))
#define FIELD(T, f) printf("layout %s.%s offset %zu\n", #T, #f, (size_t)offsetof(T, f))

/* DLPack (dlpack.h, v0.8 and later). */
typedef enum { kDLCPU = 1, kDLCUDA = 2 } DLDeviceType;
typedef struct {
    DLDeviceType device_type;
    int32_t device_id;
} DLDevice;
typedef struct {
    uint8_t code;
    uint8_t bits;
    uint16_t lanes;
} DLDataType;
typedef struct {
    void *data;
    DLDevice device;
    int32_t ndim;
    DLDataType dtype;
    int64_t *shape;
    int64_t *strides;
    uint64_t byte_offset;
} DLTensor;

static void print_layouts(void) {
    SIZE(kvsieve_error_code_t);
    SIZE(kvsieve_device_t);
    FIELD(kvsieve_device_t, device_type);
    FIELD(kvsieve_device_t, device_id);
    SIZE(kvsieve_dtype_t);
    FIELD(kvsieve_dtype_t, code);
    FIELD(kvsieve_dtype_t, bits);
    FIELD(kvsieve_dtype_t, lanes);
    SIZE(kvsieve_tensor_t);
    FIELD(kvsieve_tensor_t, data);
    FIELD(kvsieve_tensor_t, device);
    FIELD(kvsieve_tensor_t, ndim);
    FIELD(kvsieve_tensor_t, dtype);
    FIELD(kvsieve_tensor_t, shape);
    FIELD(kvsieve_tensor_t, strides);
    FIELD(kvsieve_tensor_t, byte_offset);
    SIZE(kvsieve_rope_config_t);
    FIELD(kvsieve_rope_config_t, struct_size);
    FIELD(kvsieve_rope_config_t, theta);
    FIELD(kvsieve_rope_config_t, rotary_dim);
    FIELD(kvsieve_rope_config_t, style);
    FIELD(kvsieve_rope_config_t, position_scale);
    SIZE(kvsieve_attention_params_t);
    FIELD(kvsieve_attention_params_t, struct_size);
    FIELD(kvsieve_attention_params_t, scale);
    FIELD(kvsieve_attention_params_t, logit_soft_cap);
    FIELD(kvsieve_attention_params_t, rope);
    FIELD(kvsieve_attention_params_t, chunk_size);
    FIELD(kvsieve_attention_params_t, position_mode);
    FIELD(kvsieve_attention_params_t, max_distance);
    SIZE(kvsieve_cache_config_t);
    FIELD(kvsieve_cache_config_t, struct_size);
    FIELD(kvsieve_cache_config_t, num_layers);
    FIELD(kvsieve_cache_config_t, num_kv_heads);
    FIELD(kvsieve_cache_config_t, head_dim);
    FIELD(kvsieve_cache_config_t, page_size);
    FIELD(kvsieve_cache_config_t, capacity_pages);
    FIELD(kvsieve_cache_config_t, dtype);
    FIELD(kvsieve_cache_config_t, layout);
    FIELD(kvsieve_cache_config_t, key_rope);
    FIELD(kvsieve_cache_config_t, track_key_bounds);
    SIZE(kvsieve_cache_stats_t);
    FIELD(kvsieve_cache_stats_t, struct_size);
    FIELD(kvsieve_cache_stats_t, pages_total);
    FIELD(kvsieve_cache_stats_t, pages_used);
    FIELD(kvsieve_cache_stats_t, pages_free);
    FIELD(kvsieve_cache_stats_t, bytes_per_page);
    FIELD(kvsieve_cache_stats_t, bytes_used);
    FIELD(kvsieve_cache_stats_t, bytes_reserved);
    FIELD(kvsieve_cache_stats_t, num_sequences);
    FIELD(kvsieve_cache_stats_t, num_tokens);
    SIZE(kvsieve_paged_kv_t);
    FIELD(kvsieve_paged_kv_t, struct_size);
    FIELD(kvsieve_paged_kv_t, k);
    FIELD(kvsieve_paged_kv_t, v);
    FIELD(kvsieve_paged_kv_t, device);
    FIELD(kvsieve_paged_kv_t, dtype);
    FIELD(kvsieve_paged_kv_t, key_rope);
    FIELD(kvsieve_paged_kv_t, num_pages);
    FIELD(kvsieve_paged_kv_t, page_size);
    FIELD(kvsieve_paged_kv_t, num_kv_heads);
    FIELD(kvsieve_paged_kv_t, head_dim);
    FIELD(kvsieve_paged_kv_t, k_strides);
    FIELD(kvsieve_paged_kv_t, v_strides);
    FIELD(kvsieve_paged_kv_t, batch);
    FIELD(kvsieve_paged_kv_t, indptr);
    FIELD(kvsieve_paged_kv_t, indices);
    FIELD(kvsieve_paged_kv_t, last_page_len);
    FIELD(kvsieve_paged_kv_t, positions);
    SIZE(kvsieve_selection_stats_t);
    FIELD(kvsieve_selection_stats_t, struct_size);
    FIELD(kvsieve_selection_stats_t, seq_len);
    FIELD(kvsieve_selection_stats_t, num_kv_heads);
    FIELD(kvsieve_selection_stats_t, total);
    FIELD(kvsieve_selection_stats_t, density);
    FIELD(kvsieve_selection_stats_t, min_density);
    FIELD(kvsieve_selection_stats_t, max_density);
    SIZE(kvsieve_page_bounds_config_t);
    FIELD(kvsieve_page_bounds_config_t, struct_size);
    FIELD(kvsieve_page_bounds_config_t, budget_tokens);
    FIELD(kvsieve_page_bounds_config_t, min_pages);
    SIZE(kvsieve_key_bounds_entry_t);
    FIELD(kvsieve_key_bounds_entry_t, page);
    FIELD(kvsieve_key_bounds_entry_t, reset);
    FIELD(kvsieve_key_bounds_entry_t, slot_mask);
    SIZE(kvsieve_streaming_window_t);
    FIELD(kvsieve_streaming_window_t, struct_size);
    FIELD(kvsieve_streaming_window_t, sinks);
    FIELD(kvsieve_streaming_window_t, window);
    SIZE(kvsieve_keep_kind_t);
    SIZE(kvsieve_key_source_t);
    FIELD(kvsieve_key_source_t, struct_size);
    FIELD(kvsieve_key_source_t, tensor);
    FIELD(kvsieve_key_source_t, cache);
    FIELD(kvsieve_key_source_t, seq);
    FIELD(kvsieve_key_source_t, layer);
    SIZE(kvsieve_gemfilter_config_t);
    FIELD(kvsieve_gemfilter_config_t, struct_size);
    FIELD(kvsieve_gemfilter_config_t, k);
    FIELD(kvsieve_gemfilter_config_t, pool_kernel);
    FIELD(kvsieve_gemfilter_config_t, keep_first);
    FIELD(kvsieve_gemfilter_config_t, keep_last);
    SIZE(kvsieve_snapkv_config_t);
    FIELD(kvsieve_snapkv_config_t, struct_size);
    FIELD(kvsieve_snapkv_config_t, k);
    FIELD(kvsieve_snapkv_config_t, pool_kernel);
    FIELD(kvsieve_snapkv_config_t, scale);
    SIZE(kvsieve_cluster_config_t);
    FIELD(kvsieve_cluster_config_t, struct_size);
    FIELD(kvsieve_cluster_config_t, num_clusters);
    FIELD(kvsieve_cluster_config_t, cluster_fraction);
    FIELD(kvsieve_cluster_config_t, exclude_window);
    FIELD(kvsieve_cluster_config_t, max_iter);
    FIELD(kvsieve_cluster_config_t, seed);
    FIELD(kvsieve_cluster_config_t, num_coarse_clusters);
    FIELD(kvsieve_cluster_config_t, coarse_fraction);
    SIZE(kvsieve_retrieve_config_t);
    FIELD(kvsieve_retrieve_config_t, struct_size);
    FIELD(kvsieve_retrieve_config_t, mode);
    FIELD(kvsieve_retrieve_config_t, threshold);
    FIELD(kvsieve_retrieve_config_t, thresholds);
    FIELD(kvsieve_retrieve_config_t, num_thresholds);
    FIELD(kvsieve_retrieve_config_t, budget);
    FIELD(kvsieve_retrieve_config_t, seq_len);
    FIELD(kvsieve_retrieve_config_t, hierarchical);
    FIELD(kvsieve_retrieve_config_t, coarse_mode);
    FIELD(kvsieve_retrieve_config_t, coarse_threshold);
    FIELD(kvsieve_retrieve_config_t, coarse_budget);
    FIELD(kvsieve_retrieve_config_t, coarse_budget_multiple);
    SIZE(kvsieve_retrieve_stats_t);
    FIELD(kvsieve_retrieve_stats_t, struct_size);
    FIELD(kvsieve_retrieve_stats_t, centroid_evals);
    FIELD(kvsieve_retrieve_stats_t, coarse_evals);
    FIELD(kvsieve_retrieve_stats_t, fine_evals);
    FIELD(kvsieve_retrieve_stats_t, clusters_scored);
    FIELD(kvsieve_retrieve_stats_t, clusters_kept);
    FIELD(kvsieve_retrieve_stats_t, coarse_kept);
    FIELD(kvsieve_retrieve_stats_t, tokens_kept);
}

/* Whether `n` bytes at `p` are all zero. */
static int zero_bytes(const void *p, size_t n) {
    const unsigned char *c = (const unsigned char *)p;
    size_t i;
    for (i = 0; i < n; i++) {
        if (c[i] != 0) return 0;
    }
    return 1;
}

/* Whether the bytes of a struct after its leading struct_size are all zero. */
static int zero_after_size(const void *p, size_t n) {
    return zero_bytes((const char *)p + sizeof(size_t), n - sizeof(size_t));
}

/* Every initialiser sets struct_size to the program's sizeof; the ones with defaults print
 * them ("init NAME field..."), for the harness to compare with the library's own. */
static void initialisers(void) {
    int before = g_failed;
    kvsieve_cache_config_t cc = kvsieve_cache_config_default(2, 3, 64, 16, 10), ci;
    kvsieve_cluster_config_t kc = kvsieve_cluster_config_default(12), ki;
    kvsieve_retrieve_config_t rc = kvsieve_retrieve_config_default(40), ri;
    kvsieve_gemfilter_config_t gc = kvsieve_gemfilter_config_default(9), gi;
    kvsieve_snapkv_config_t sk;
    kvsieve_rope_config_t rope;
    kvsieve_attention_params_t params;
    kvsieve_paged_kv_t kv;
    kvsieve_streaming_window_t w;
    kvsieve_key_source_t src;
    kvsieve_page_bounds_config_t pb;
    kvsieve_cache_stats_t cs;
    kvsieve_selection_stats_t ss;
    kvsieve_retrieve_stats_t rs;

    kvsieve_cache_config_init(&ci);
    kvsieve_cluster_config_init(&ki);
    kvsieve_retrieve_config_init(&ri);
    kvsieve_gemfilter_config_init(&gi);
    kvsieve_snapkv_config_init(&sk);
    kvsieve_rope_config_init(&rope);
    kvsieve_attention_params_init(&params);
    kvsieve_paged_kv_init(&kv);
    kvsieve_streaming_window_init(&w);
    kvsieve_key_source_init(&src);
    kvsieve_page_bounds_config_init(&pb);
    kvsieve_cache_stats_init(&cs);
    kvsieve_selection_stats_init(&ss);
    kvsieve_retrieve_stats_init(&rs);

    CHECK(cc.struct_size == sizeof cc && ci.struct_size == sizeof ci && kc.struct_size == sizeof kc && ki.struct_size == sizeof ki &&
              rc.struct_size == sizeof rc && ri.struct_size == sizeof ri && gc.struct_size == sizeof gc && gi.struct_size == sizeof gi &&
              sk.struct_size == sizeof sk && rope.struct_size == sizeof rope && params.struct_size == sizeof params &&
              kv.struct_size == sizeof kv && w.struct_size == sizeof w && src.struct_size == sizeof src && pb.struct_size == sizeof pb &&
              cs.struct_size == sizeof cs && ss.struct_size == sizeof ss && rs.struct_size == sizeof rs,
          "every initialiser sets struct_size to sizeof");
    CHECK(zero_after_size(&rope, sizeof rope) && zero_after_size(&params, sizeof params) && zero_after_size(&w, sizeof w) &&
              zero_after_size(&src, sizeof src) && zero_after_size(&pb, sizeof pb) && zero_after_size(&cs, sizeof cs) &&
              zero_after_size(&ss, sizeof ss) && zero_after_size(&rs, sizeof rs),
          "initialisers without defaults give zeros");

    printf("init kvsieve_cache_config_default(2, 3, 64, 16, 10) %zu %zu %zu %zu %zu %u %u %u %u %u %d\n", cc.num_layers,
           cc.num_kv_heads, cc.head_dim, cc.page_size, cc.capacity_pages, (unsigned)cc.dtype.code, (unsigned)cc.dtype.bits,
           (unsigned)cc.dtype.lanes, cc.layout, cc.key_rope, (int)cc.track_key_bounds);
    printf("init kvsieve_cache_config_init %zu %zu %zu %zu %zu %u %u %u %u %u %d\n", ci.num_layers, ci.num_kv_heads, ci.head_dim,
           ci.page_size, ci.capacity_pages, (unsigned)ci.dtype.code, (unsigned)ci.dtype.bits, (unsigned)ci.dtype.lanes, ci.layout,
           ci.key_rope, (int)ci.track_key_bounds);
    printf("init kvsieve_cluster_config_default(12) %zu %g %zu %zu %llu %zu %g\n", kc.num_clusters, kc.cluster_fraction,
           kc.exclude_window, kc.max_iter, (unsigned long long)kc.seed, kc.num_coarse_clusters, kc.coarse_fraction);
    printf("init kvsieve_cluster_config_init %zu %g %zu %zu %llu %zu %g\n", ki.num_clusters, ki.cluster_fraction, ki.exclude_window,
           ki.max_iter, (unsigned long long)ki.seed, ki.num_coarse_clusters, ki.coarse_fraction);
    printf("init kvsieve_retrieve_config_default(40) %u %g %d %zu %zu %zu %d %u %g %zu %g\n", rc.mode, rc.threshold,
           rc.thresholds == NULL, rc.num_thresholds, rc.budget, rc.seq_len, (int)rc.hierarchical, rc.coarse_mode,
           rc.coarse_threshold, rc.coarse_budget, rc.coarse_budget_multiple);
    printf("init kvsieve_retrieve_config_init %u %g %d %zu %zu %zu %d %u %g %zu %g\n", ri.mode, ri.threshold, ri.thresholds == NULL,
           ri.num_thresholds, ri.budget, ri.seq_len, (int)ri.hierarchical, ri.coarse_mode, ri.coarse_threshold, ri.coarse_budget,
           ri.coarse_budget_multiple);
    printf("init kvsieve_gemfilter_config_default(9) %zu %zu %zu %zu\n", gc.k, gc.pool_kernel, gc.keep_first, gc.keep_last);
    printf("init kvsieve_gemfilter_config_init %zu %zu %zu %zu\n", gi.k, gi.pool_kernel, gi.keep_first, gi.keep_last);
    printf("init kvsieve_snapkv_config_init %zu %zu %g\n", sk.k, sk.pool_kernel, (double)sk.scale);
    CHECK(kv.k == NULL && kv.v == NULL &&
              zero_bytes((const char *)&kv + offsetof(kvsieve_paged_kv_t, dtype), sizeof kv - offsetof(kvsieve_paged_kv_t, dtype)),
          "kvsieve_paged_kv_init: every field after `device` zero");
    printf("init kvsieve_paged_kv_init %d %d\n", (int)kv.device.device_type, (int)kv.device.device_id);
    section_done("initialisers", before);
}

static void dlpack_layout(void) {
    int before = g_failed;
    CHECK(sizeof(DLTensor) == sizeof(kvsieve_tensor_t), "sizeof DLTensor");
    CHECK(ALIGNOF(DLTensor) == ALIGNOF(kvsieve_tensor_t), "alignof DLTensor");
    CHECK(offsetof(DLTensor, data) == offsetof(kvsieve_tensor_t, data), "DLTensor.data");
    CHECK(offsetof(DLTensor, device) == offsetof(kvsieve_tensor_t, device), "DLTensor.device");
    CHECK(offsetof(DLTensor, ndim) == offsetof(kvsieve_tensor_t, ndim), "DLTensor.ndim");
    CHECK(offsetof(DLTensor, dtype) == offsetof(kvsieve_tensor_t, dtype), "DLTensor.dtype");
    CHECK(offsetof(DLTensor, shape) == offsetof(kvsieve_tensor_t, shape), "DLTensor.shape");
    CHECK(offsetof(DLTensor, strides) == offsetof(kvsieve_tensor_t, strides), "DLTensor.strides");
    CHECK(offsetof(DLTensor, byte_offset) == offsetof(kvsieve_tensor_t, byte_offset), "DLTensor.byte_offset");
    CHECK(sizeof(DLDevice) == sizeof(kvsieve_device_t), "sizeof DLDevice");
    CHECK(offsetof(DLDevice, device_id) == offsetof(kvsieve_device_t, device_id), "DLDevice.device_id");
    CHECK(sizeof(DLDataType) == sizeof(kvsieve_dtype_t), "sizeof DLDataType");
    CHECK(offsetof(DLDataType, lanes) == offsetof(kvsieve_dtype_t, lanes), "DLDataType.lanes");
    section_done("dlpack layout", before);
}

/* A DLTensor built as a DLPack producer would, handed to kvsieve through a cast. */
static void dlpack_tensor_as_is(void) {
    int before = g_failed;
    enum { D = 16 };
    float x[2 * D], expect[2 * D];
    int64_t shape[3] = {2, 1, D};
    int32_t positions[2] = {3, 7};
    kvsieve_rope_config_t rope;
    DLTensor dl;
    size_t i;

    for (i = 0; i < 2 * D; i++) x[i] = expect[i] = rng_uniform(1.0f);
    ref_rope(expect, D, 3.0, 10000.0, KVSIEVE_ROPE_HALF_SPLIT);
    ref_rope(expect + D, D, 7.0, 10000.0, KVSIEVE_ROPE_HALF_SPLIT);

    memset(&dl, 0, sizeof dl);
    dl.data = x;
    dl.device.device_type = kDLCPU;
    dl.device.device_id = 0;
    dl.ndim = 3;
    dl.dtype.code = 2; /* kDLFloat */
    dl.dtype.bits = 32;
    dl.dtype.lanes = 1;
    dl.shape = shape;
    dl.strides = NULL;
    dl.byte_offset = 0;

    kvsieve_rope_config_init(&rope);
    rope.theta = 10000.0f;
    rope.style = KVSIEVE_ROPE_HALF_SPLIT;
    EXPECT_OK(kvsieve_apply_rope((const kvsieve_tensor_t *)&dl, positions, 2, &rope));
    CHECK(max_abs_diff(x, expect, 2 * D) < 1e-5, "RoPE through a DLTensor: err %g", max_abs_diff(x, expect, 2 * D));

    /* The same DLTensor on a CUDA device is refused, naming the parameter. */
    dl.device.device_type = kDLCUDA;
    EXPECT_ERR(kvsieve_apply_rope((const kvsieve_tensor_t *)&dl, positions, 2, &rope), KVSIEVE_ERROR_UNSUPPORTED,
               "`x.device`");
    section_done("dlpack tensor passed as is", before);
}

int main(void) {
    print_layouts();
    initialisers();
    dlpack_layout();
    dlpack_tensor_as_is();
    return finish();
}
