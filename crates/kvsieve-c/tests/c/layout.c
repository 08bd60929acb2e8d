/* Layout of every public struct as the C compiler sees it (the Rust harness compares these
 * lines with the Rust definitions), and the DLPack promise: a DLTensor, declared here as
 * dlpack.h declares it, has the same layout as kvsieve_tensor_t and can be passed as is. */
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
    FIELD(kvsieve_rope_config_t, theta);
    FIELD(kvsieve_rope_config_t, rotary_dim);
    FIELD(kvsieve_rope_config_t, style);
    FIELD(kvsieve_rope_config_t, position_scale);
    SIZE(kvsieve_attention_params_t);
    FIELD(kvsieve_attention_params_t, scale);
    FIELD(kvsieve_attention_params_t, logit_soft_cap);
    FIELD(kvsieve_attention_params_t, rope);
    FIELD(kvsieve_attention_params_t, chunk_size);
    FIELD(kvsieve_attention_params_t, position_mode);
    FIELD(kvsieve_attention_params_t, max_distance);
    SIZE(kvsieve_cache_config_t);
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
    FIELD(kvsieve_cache_stats_t, pages_total);
    FIELD(kvsieve_cache_stats_t, pages_used);
    FIELD(kvsieve_cache_stats_t, pages_free);
    FIELD(kvsieve_cache_stats_t, bytes_per_page);
    FIELD(kvsieve_cache_stats_t, bytes_used);
    FIELD(kvsieve_cache_stats_t, bytes_reserved);
    FIELD(kvsieve_cache_stats_t, num_sequences);
    FIELD(kvsieve_cache_stats_t, num_tokens);
    SIZE(kvsieve_paged_kv_t);
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
    FIELD(kvsieve_selection_stats_t, seq_len);
    FIELD(kvsieve_selection_stats_t, num_kv_heads);
    FIELD(kvsieve_selection_stats_t, total);
    FIELD(kvsieve_selection_stats_t, density);
    FIELD(kvsieve_selection_stats_t, min_density);
    FIELD(kvsieve_selection_stats_t, max_density);
    SIZE(kvsieve_page_bounds_config_t);
    FIELD(kvsieve_page_bounds_config_t, budget_tokens);
    FIELD(kvsieve_page_bounds_config_t, min_pages);
    SIZE(kvsieve_key_bounds_entry_t);
    FIELD(kvsieve_key_bounds_entry_t, page);
    FIELD(kvsieve_key_bounds_entry_t, reset);
    FIELD(kvsieve_key_bounds_entry_t, slot_mask);
    SIZE(kvsieve_streaming_window_t);
    FIELD(kvsieve_streaming_window_t, sinks);
    FIELD(kvsieve_streaming_window_t, window);
    SIZE(kvsieve_keep_kind_t);
    SIZE(kvsieve_key_source_t);
    FIELD(kvsieve_key_source_t, tensor);
    FIELD(kvsieve_key_source_t, cache);
    FIELD(kvsieve_key_source_t, seq);
    FIELD(kvsieve_key_source_t, layer);
    SIZE(kvsieve_gemfilter_config_t);
    FIELD(kvsieve_gemfilter_config_t, k);
    FIELD(kvsieve_gemfilter_config_t, pool_kernel);
    FIELD(kvsieve_gemfilter_config_t, keep_first);
    FIELD(kvsieve_gemfilter_config_t, keep_last);
    SIZE(kvsieve_snapkv_config_t);
    FIELD(kvsieve_snapkv_config_t, k);
    FIELD(kvsieve_snapkv_config_t, pool_kernel);
    FIELD(kvsieve_snapkv_config_t, scale);
    SIZE(kvsieve_cluster_config_t);
    FIELD(kvsieve_cluster_config_t, num_clusters);
    FIELD(kvsieve_cluster_config_t, cluster_fraction);
    FIELD(kvsieve_cluster_config_t, exclude_window);
    FIELD(kvsieve_cluster_config_t, max_iter);
    FIELD(kvsieve_cluster_config_t, seed);
    FIELD(kvsieve_cluster_config_t, num_coarse_clusters);
    FIELD(kvsieve_cluster_config_t, coarse_fraction);
    SIZE(kvsieve_retrieve_config_t);
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
    FIELD(kvsieve_retrieve_stats_t, centroid_evals);
    FIELD(kvsieve_retrieve_stats_t, coarse_evals);
    FIELD(kvsieve_retrieve_stats_t, fine_evals);
    FIELD(kvsieve_retrieve_stats_t, clusters_scored);
    FIELD(kvsieve_retrieve_stats_t, clusters_kept);
    FIELD(kvsieve_retrieve_stats_t, coarse_kept);
    FIELD(kvsieve_retrieve_stats_t, tokens_kept);
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

    memset(&rope, 0, sizeof rope);
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
    dlpack_layout();
    dlpack_tensor_as_is();
    return finish();
}
