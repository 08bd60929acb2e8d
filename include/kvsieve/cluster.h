/**
 * \file kvsieve/cluster.h
 *
 * \brief Clusters: K-means indexes of the keys of one (sequence, layer) and centroid
 * retrieval over them (Squeezed Attention), and cluster sets, the indexes a policy with
 * `clusters=` reads during decode.
 * Building, loading, updating (assign_new, cluster-set build and update) and retrieval
 * allocate their arrays fallibly: when memory runs out the call fails with
 * #KVSIEVE_ERROR_OUT_OF_MEMORY and the index or set is unchanged.
 * kvsieve.h includes this header; the conventions stated there apply to it.
 */

#ifndef KVSIEVE_CLUSTER_H
#define KVSIEVE_CLUSTER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "error.h"
#include "tensor.h"
#include "cache.h"
#include "selection.h"
#include "attention.h"
#include "policy.h"

#ifdef __cplusplus
extern "C" {
#endif

/**
 * \brief The K-means clusters of the keys of one (sequence, layer), every KV head, for
 * centroid retrieval.
 *
 * Per KV head, the keys of tokens `0 .. clustered_len` are clustered in normalised space
 * (cosine) by k-means++ and Lloyd iterations; each cluster keeps the mean of its members'
 * raw keys (its centroid), its size and its member list. Optionally a coarse K-means over
 * the fine centroids lets a lookup score only the children of promising coarse clusters.
 * Tokens from `clustered_len` on (the excluded window, or tokens that arrived after the last
 * update) are in no cluster and never retrieved: union a streaming selection
 * (kvsieve_selection_streaming()) to read them.
 *
 * Made by kvsieve_cluster_index_build(), kvsieve_cluster_index_load() or
 * kvsieve_cluster_index_load_for(); released with kvsieve_cluster_index_free().
 *
 * Thread safety: the handle holds a reader-writer lock. Inspection, retrieval, estimates,
 * calibration and saving take the shared lock and run concurrently;
 * kvsieve_cluster_index_assign_new() and kvsieve_cluster_index_rebuild() take the exclusive
 * lock. kvsieve_cluster_index_free() must run alone.
 */
typedef struct kvsieve_cluster_index kvsieve_cluster_index_t;

/**
 * \brief Options of kvsieve_cluster_index_build(). Initialise with
 * kvsieve_cluster_config_default() (or kvsieve_cluster_config_init()), then change fields.
 *
 * - `struct_size`: set by the initialisers (a versioned struct: see the conventions in
 *   kvsieve.h). Also set it before kvsieve_cluster_index_get_config() fills the struct.
 * - `num_clusters`: fine clusters per KV head, 1 ..= the tokens clustered; or 0 to give
 *   `cluster_fraction` instead. Errors (#KVSIEVE_ERROR_INVALID_ARGUMENT naming
 *   `num_clusters`): 0 with `cluster_fraction` 0, more clusters than tokens clustered.
 * - `cluster_fraction`: with `num_clusters` 0, `round(f * tokens clustered)` clusters,
 *   `0 < f <= 1`, at least 1 cluster (#KVSIEVE_ERROR_INVALID_ARGUMENT naming
 *   `cluster_fraction` otherwise, or when both it and `num_clusters` are set).
 * - `exclude_window`: the last `exclude_window` tokens are left out (the observation window
 *   a local window selection reads anyway); fewer than the context's tokens
 *   (#KVSIEVE_ERROR_INVALID_ARGUMENT naming `exclude_window`). The same trailing window stays
 *   out after kvsieve_cluster_index_assign_new().
 * - `max_iter`: Lloyd iterations at most (fine and coarse); default 20.
 * - `seed`: k-means++ seed; every head uses it (the coarse level a fixed variation of it).
 * - `num_coarse_clusters`, `coarse_fraction`: the coarse level, a count (1 ..= the fine
 *   clusters) or a fraction of the fine clusters, as for the fine level (errors name these
 *   fields); both 0: no coarse level.
 */
typedef struct kvsieve_cluster_config {
    size_t struct_size;
    size_t num_clusters;
    double cluster_fraction;
    size_t exclude_window;
    size_t max_iter;
    uint64_t seed;
    size_t num_coarse_clusters;
    double coarse_fraction;
} kvsieve_cluster_config_t;

/** \brief Which fine clusters kvsieve_cluster_index_retrieve() keeps. */
typedef enum kvsieve_retrieve_mode {
    /** Clusters whose estimate `s_c` exceeds `threshold` (negative keeps every cluster). */
    KVSIEVE_RETRIEVE_THRESHOLD = 0,
    /** As #KVSIEVE_RETRIEVE_THRESHOLD with `thresholds[h]` for KV head h (as
     *  kvsieve_cluster_index_calibrate() returns them). */
    KVSIEVE_RETRIEVE_PER_HEAD_THRESHOLD = 1,
    /** Exactly `min(budget, clustered_len)` tokens per head: clusters in rank order (higher
     *  `s_c` first, lower cluster index on ties), whole, the first that does not fit in full
     *  giving its lowest token indices. */
    KVSIEVE_RETRIEVE_BUDGET = 2,
    /** As #KVSIEVE_RETRIEVE_BUDGET, with clusters taken alternately from the estimate ranking
     *  and from the ranking by `b_c = max_j (q_j · C_c + |q_j| r_c) / sqrt(d)`, an upper bound
     *  of the best member's logit (r_c: the cluster's radius, the largest distance of a
     *  member's raw key to C_c), each cluster once, ties to the lower index. It finds a key
     *  that matches the query far better than its cluster-mates, which the mean hides. Needs
     *  an index with radii: any build (host or kvsieve_cuda_cluster_index_build()), or one
     *  loaded from a version 2 file (#KVSIEVE_ERROR_INVALID_ARGUMENT for a version 1 file's).
     *  kvsieve_cuda_cluster_index_retrieve() runs it on the GPU. */
    KVSIEVE_RETRIEVE_BUDGET_MIXED = 3
} kvsieve_retrieve_mode_t;

/** \brief Which coarse clusters a hierarchical retrieval opens. */
typedef enum kvsieve_coarse_mode {
    /** Coarse clusters whose estimate exceeds `coarse_threshold` (negative opens all, and
     *  then the result equals the flat retrieval's). */
    KVSIEVE_COARSE_THRESHOLD = 0,
    /** The best coarse clusters (rank order as for #KVSIEVE_RETRIEVE_BUDGET) until the
     *  tokens beneath them reach `coarse_budget` (the last may overshoot). */
    KVSIEVE_COARSE_BUDGET = 1,
    /** A coarse budget of `ceil(coarse_budget_multiple * budget)`; needs
     *  #KVSIEVE_RETRIEVE_BUDGET or #KVSIEVE_RETRIEVE_BUDGET_MIXED. */
    KVSIEVE_COARSE_BUDGET_MULTIPLE = 2
} kvsieve_coarse_mode_t;

/**
 * \brief Options of kvsieve_cluster_index_retrieve(). Initialise with
 * kvsieve_retrieve_config_default() (or kvsieve_retrieve_config_init()), then change fields.
 *
 * For KV head h and each query head j of its group (the `num_qo_heads / num_kv_heads` query
 * heads reading h), the estimated attention one key of cluster c receives is
 * `s_jc = exp(q_j · C_c / sqrt(d)) / sum_i N_i exp(q_j · C_i / sqrt(d))` (C the raw-mean
 * centroids, N the sizes); `s_c` is its mean over the group. `N_c * s_c` is the share of
 * attention cluster c is expected to take, so they sum to 1 over the clusters.
 *
 * - `struct_size`: set by the initialisers (a versioned struct: see the conventions in
 *   kvsieve.h).
 * - `mode`: a ::kvsieve_retrieve_mode_t value (#KVSIEVE_ERROR_INVALID_ARGUMENT naming `mode`
 *   otherwise).
 * - `threshold`: for #KVSIEVE_RETRIEVE_THRESHOLD; not NaN (#KVSIEVE_ERROR_INVALID_ARGUMENT
 *   naming `threshold`).
 * - `thresholds`, `num_thresholds`: for #KVSIEVE_RETRIEVE_PER_HEAD_THRESHOLD, one per KV head
 *   (#KVSIEVE_ERROR_NULL_POINTER, or #KVSIEVE_ERROR_SHAPE for another count, or
 *   #KVSIEVE_ERROR_INVALID_ARGUMENT for a NaN, naming `thresholds`); read during the call only.
 * - `budget`: for the budget modes, at least 1 (#KVSIEVE_ERROR_INVALID_ARGUMENT naming
 *   `budget`).
 * - `seq_len`: the length of the sequence the selection is for, at least the index's
 *   kvsieve_cluster_index_seq_len() (#KVSIEVE_ERROR_OUT_OF_RANGE naming `seq_len`); 0 means
 *   that length.
 * - `hierarchical`: score the coarse centroids first and only the children of the coarse
 *   clusters `coarse_mode` opens. The denominator then uses the fine terms of the children
 *   scored plus the coarse terms of the coarse clusters left closed. Needs an index with a
 *   coarse level (#KVSIEVE_ERROR_INVALID_ARGUMENT naming `hierarchical`).
 * - `coarse_mode`: a ::kvsieve_coarse_mode_t value (#KVSIEVE_ERROR_INVALID_ARGUMENT naming
 *   `coarse_mode`, also for #KVSIEVE_COARSE_BUDGET_MULTIPLE without a fine budget); read
 *   only with `hierarchical`, as are the three fields below.
 * - `coarse_threshold`: not NaN (errors name `coarse_threshold`).
 * - `coarse_budget`: at least 1 (errors name `coarse_budget`).
 * - `coarse_budget_multiple`: positive and finite (errors name `coarse_budget_multiple`).
 */
typedef struct kvsieve_retrieve_config {
    size_t struct_size;
    uint32_t mode;
    double threshold;
    const double *thresholds;
    size_t num_thresholds;
    size_t budget;
    size_t seq_len;
    bool hierarchical;
    uint32_t coarse_mode;
    double coarse_threshold;
    size_t coarse_budget;
    double coarse_budget_multiple;
} kvsieve_retrieve_config_t;

/**
 * \brief What a retrieval cost and kept, summed over KV heads. Initialise with
 * kvsieve_retrieve_stats_init() before the call: `struct_size` tells kvsieve how many bytes
 * the program's struct has (a versioned struct: see the conventions in kvsieve.h).
 *
 * - `centroid_evals`: query-centroid dot products computed (each query head of a group
 *   against each centroid it scored): `coarse_evals + fine_evals`.
 * - `coarse_evals`: of which against coarse centroids (0 for a flat retrieval).
 * - `fine_evals`: of which against fine centroids.
 * - `clusters_scored`: fine clusters scored.
 * - `clusters_kept`: fine clusters kept (a partly kept cluster counts).
 * - `coarse_kept`: coarse clusters opened (0 for a flat retrieval).
 * - `tokens_kept`: tokens kept (the selection's length).
 */
typedef struct kvsieve_retrieve_stats {
    size_t struct_size;
    size_t centroid_evals;
    size_t coarse_evals;
    size_t fine_evals;
    size_t clusters_scored;
    size_t clusters_kept;
    size_t coarse_kept;
    size_t tokens_kept;
} kvsieve_retrieve_stats_t;

/**
 * \brief Initialise a build configuration: no fine cluster count (set `num_clusters` or
 * `cluster_fraction`), `exclude_window` 0, `max_iter` 20, `seed` 0, no coarse level,
 * `struct_size` set. Use it before kvsieve_cluster_index_get_config().
 *
 * Ownership: writes `*config` (required); nothing to free. Thread safety: thread-safe.
 * Defined here (`static inline`), so `struct_size` is the size this program was compiled with.
 */
static inline void kvsieve_cluster_config_init(kvsieve_cluster_config_t *config) {
    memset(config, 0, sizeof(*config));
    config->struct_size = sizeof(*config);
    config->max_iter = 20;
}

/**
 * \brief A build configuration with `num_clusters` fine clusters per KV head:
 * `cluster_fraction` 0, `exclude_window` 0, `max_iter` 20, `seed` 0, no coarse level.
 * Nothing is validated here; kvsieve_cluster_index_build() validates it.
 *
 * Ownership: returns a struct by value; nothing to free. Thread safety: thread-safe.
 * Defined here (`static inline`), so `struct_size` is the size this program was compiled with.
 */
static inline kvsieve_cluster_config_t kvsieve_cluster_config_default(size_t num_clusters) {
    kvsieve_cluster_config_t config;
    kvsieve_cluster_config_init(&config);
    config.num_clusters = num_clusters;
    return config;
}

/**
 * \brief Initialise a retrieval configuration: #KVSIEVE_RETRIEVE_BUDGET with `budget` 0 (set
 * it), flat, for the index's sequence length (`seq_len` 0); `threshold` 0, no `thresholds`;
 * coarse settings (used only once `hierarchical` is set) #KVSIEVE_COARSE_THRESHOLD with
 * `coarse_threshold` -1, which opens every coarse cluster; `struct_size` set.
 *
 * Ownership: writes `*config` (required); nothing to free. Thread safety: thread-safe.
 * Defined here (`static inline`), so `struct_size` is the size this program was compiled with.
 */
static inline void kvsieve_retrieve_config_init(kvsieve_retrieve_config_t *config) {
    memset(config, 0, sizeof(*config));
    config->struct_size = sizeof(*config);
    config->mode = KVSIEVE_RETRIEVE_BUDGET;
    config->thresholds = NULL;
    config->hierarchical = false;
    config->coarse_mode = KVSIEVE_COARSE_THRESHOLD;
    config->coarse_threshold = -1.0;
}

/**
 * \brief A retrieval configuration keeping `budget` tokens per KV head
 * (kvsieve_retrieve_config_init() and the budget). Nothing is validated here.
 *
 * Ownership: returns a struct by value; nothing to free. Thread safety: thread-safe.
 * Defined here (`static inline`), so `struct_size` is the size this program was compiled with.
 */
static inline kvsieve_retrieve_config_t kvsieve_retrieve_config_default(size_t budget) {
    kvsieve_retrieve_config_t config;
    kvsieve_retrieve_config_init(&config);
    config.budget = budget;
    return config;
}

/**
 * \brief Initialise retrieval statistics before kvsieve_cluster_index_retrieve(): all zero,
 * `struct_size` set.
 *
 * Ownership: writes `*stats` (required); nothing to free. Thread safety: thread-safe.
 * Defined here (`static inline`), so `struct_size` is the size this program was compiled with.
 */
static inline void kvsieve_retrieve_stats_init(kvsieve_retrieve_stats_t *stats) {
    memset(stats, 0, sizeof(*stats));
    stats->struct_size = sizeof(*stats);
}

/**
 * \brief Cluster every KV head of the keys in `keys` into a new index.
 *
 * \param keys The key source (required); see ::kvsieve_key_source_t. A tensor source gives
 *        an index of n tokens; a cache source the sequence's current tokens. Errors naming
 *        `keys`: an empty context (#KVSIEVE_ERROR_INVALID_ARGUMENT), a NaN or infinite key
 *        (#KVSIEVE_ERROR_INVALID_ARGUMENT; the message names the token and head), a cache
 *        storing keys before RoPE.
 * \param config The options (required); copied. See ::kvsieve_cluster_config_t for the
 *        errors it can give.
 * \param out Receives the new index (required); untouched on failure.
 * \return NULL on success, or an error (owned by the caller).
 *
 * Ownership: the caller owns `*out` (release with kvsieve_cluster_index_free()); the index
 * copies what it needs and keeps no reference to the keys.
 *
 * Thread safety: thread-safe (a cache source takes the cache's shared lock).
 */
kvsieve_error_t *kvsieve_cluster_index_build(const kvsieve_key_source_t *keys, const kvsieve_cluster_config_t *config,
                                             kvsieve_cluster_index_t **out);

/**
 * \brief Free an index. NULL is ignored.
 *
 * Ownership: releases `index`. Thread safety: no other call on this index may be running
 * or start afterwards.
 */
void kvsieve_cluster_index_free(kvsieve_cluster_index_t *index);

/**
 * \brief The configuration the index was built with (for a loaded index, the one saved).
 *
 * \param index The index (required).
 * \param out Receives the configuration (required), initialised by the caller with
 *        kvsieve_cluster_config_init(): kvsieve writes the fields its `struct_size` covers
 *        and leaves `struct_size` as it is. Untouched on failure.
 *
 * Ownership: nothing is retained. Thread safety: thread-safe (shared lock).
 */
kvsieve_error_t *kvsieve_cluster_index_get_config(const kvsieve_cluster_index_t *index, kvsieve_cluster_config_t *out);

/**
 * \brief Number of KV heads of the index.
 *
 * \param index The index (required). \param out Receives the value (required); untouched on
 * failure. Ownership: nothing is retained. Thread safety: thread-safe (shared lock).
 */
kvsieve_error_t *kvsieve_cluster_index_num_kv_heads(const kvsieve_cluster_index_t *index, size_t *out);

/**
 * \brief Channels per key (`head_dim`) of the index.
 *
 * \param index The index (required). \param out Receives the value (required); untouched on
 * failure. Ownership: nothing is retained. Thread safety: thread-safe (shared lock).
 */
kvsieve_error_t *kvsieve_cluster_index_head_dim(const kvsieve_cluster_index_t *index, size_t *out);

/**
 * \brief Fine clusters per KV head.
 *
 * \param index The index (required). \param out Receives the value (required); untouched on
 * failure. Ownership: nothing is retained. Thread safety: thread-safe (shared lock).
 */
kvsieve_error_t *kvsieve_cluster_index_num_clusters(const kvsieve_cluster_index_t *index, size_t *out);

/**
 * \brief Coarse clusters per KV head (0 without a coarse level).
 *
 * \param index The index (required). \param out Receives the value (required); untouched on
 * failure. Ownership: nothing is retained. Thread safety: thread-safe (shared lock).
 */
kvsieve_error_t *kvsieve_cluster_index_num_coarse_clusters(const kvsieve_cluster_index_t *index, size_t *out);

/**
 * \brief The sequence's length when the index was built.
 *
 * \param index The index (required). \param out Receives the value (required); untouched on
 * failure. Ownership: nothing is retained. Thread safety: thread-safe (shared lock).
 */
kvsieve_error_t *kvsieve_cluster_index_seq_len_at_build(const kvsieve_cluster_index_t *index, size_t *out);

/**
 * \brief The sequence's length when the index was built or last updated by
 * kvsieve_cluster_index_assign_new().
 *
 * \param index The index (required). \param out Receives the value (required); untouched on
 * failure. Ownership: nothing is retained. Thread safety: thread-safe (shared lock).
 */
kvsieve_error_t *kvsieve_cluster_index_seq_len(const kvsieve_cluster_index_t *index, size_t *out);

/**
 * \brief Tokens `0 .. clustered_len` are in clusters (every KV head the same).
 *
 * \param index The index (required). \param out Receives the value (required); untouched on
 * failure. Ownership: nothing is retained. Thread safety: thread-safe (shared lock).
 */
kvsieve_error_t *kvsieve_cluster_index_clustered_len(const kvsieve_cluster_index_t *index, size_t *out);

/**
 * \brief Per-head arrays of an index, copied into a caller buffer. This function and the
 * ones declared after it take:
 *
 * - `index`: the index (required);
 * - `head`: the KV head, below num_kv_heads (#KVSIEVE_ERROR_OUT_OF_RANGE naming `head`);
 * - the buffer: `capacity` values (NULL only if `capacity` is 0; errors name it after the
 *   parameter, e.g. `sizes`);
 * - `capacity`: its length; fewer than the array's length gives
 *   #KVSIEVE_ERROR_INVALID_ARGUMENT naming `capacity` (nothing is written);
 * - `out_len`: optional, receives the number of values written; untouched on failure.
 *
 * The arrays:
 * - kvsieve_cluster_index_sizes(): `num_clusters` cluster sizes (members per cluster).
 * - kvsieve_cluster_index_centroids(): `num_clusters * head_dim` floats, cluster-major: the
 *   mean of each cluster's raw keys as of the last build (after
 *   kvsieve_cluster_index_assign_new() they no longer move). Retrieval scores these.
 * - kvsieve_cluster_index_centroids_normalized(): likewise, the unit-norm centroids keys are
 *   assigned by (each key belongs to the cluster whose unit centroid has the largest cosine
 *   with it).
 * - kvsieve_cluster_index_radii(): `num_clusters` floats, each cluster's radius: the largest
 *   distance of a member's raw key to its raw centroid (grown by
 *   kvsieve_cluster_index_assign_new()), which #KVSIEVE_RETRIEVE_BUDGET_MIXED ranks by; none
 *   (`out_len` 0) for an index without radii (loaded from a version 1 file).
 * - kvsieve_cluster_index_member_offsets(): `num_clusters + 1` CSR offsets into the members.
 * - kvsieve_cluster_index_members(): `clustered_len` token indices, cluster c's members
 *   (ascending) at `members[offsets[c] .. offsets[c + 1]]`.
 * - kvsieve_cluster_index_coarse_sizes(), _coarse_centroids(), _coarse_child_offsets(),
 *   _coarse_children(): the coarse level (`num_coarse_clusters` sizes, i.e. tokens beneath;
 *   centroids that are the size-weighted means of their children's centroids;
 *   `num_coarse_clusters + 1` offsets; `num_clusters` fine cluster ids, ascending per coarse
 *   cluster). An index without a coarse level gives #KVSIEVE_ERROR_INVALID_ARGUMENT naming
 *   `index`.
 *
 * Ownership: the values are copied; nothing is retained. Thread safety: thread-safe (shared
 * lock).
 */
kvsieve_error_t *kvsieve_cluster_index_sizes(const kvsieve_cluster_index_t *index, size_t head, uint32_t *sizes,
                                             size_t capacity, size_t *out_len);
/** \brief Raw-mean centroids of one KV head; see kvsieve_cluster_index_sizes(). */
kvsieve_error_t *kvsieve_cluster_index_centroids(const kvsieve_cluster_index_t *index, size_t head, float *centroids,
                                                 size_t capacity, size_t *out_len);
/** \brief Unit-norm centroids of one KV head; see kvsieve_cluster_index_sizes(). */
kvsieve_error_t *kvsieve_cluster_index_centroids_normalized(const kvsieve_cluster_index_t *index, size_t head,
                                                            float *centroids, size_t capacity, size_t *out_len);
/** \brief Cluster radii of one KV head; see kvsieve_cluster_index_sizes(). */
kvsieve_error_t *kvsieve_cluster_index_radii(const kvsieve_cluster_index_t *index, size_t head, float *radii,
                                             size_t capacity, size_t *out_len);
/** \brief CSR offsets of the member lists of one KV head; see kvsieve_cluster_index_sizes(). */
kvsieve_error_t *kvsieve_cluster_index_member_offsets(const kvsieve_cluster_index_t *index, size_t head, uint32_t *offsets,
                                                      size_t capacity, size_t *out_len);
/** \brief Member lists of one KV head; see kvsieve_cluster_index_sizes(). */
kvsieve_error_t *kvsieve_cluster_index_members(const kvsieve_cluster_index_t *index, size_t head, uint32_t *members,
                                               size_t capacity, size_t *out_len);
/** \brief Coarse cluster sizes of one KV head; see kvsieve_cluster_index_sizes(). */
kvsieve_error_t *kvsieve_cluster_index_coarse_sizes(const kvsieve_cluster_index_t *index, size_t head, uint32_t *sizes,
                                                    size_t capacity, size_t *out_len);
/** \brief Coarse centroids of one KV head; see kvsieve_cluster_index_sizes(). */
kvsieve_error_t *kvsieve_cluster_index_coarse_centroids(const kvsieve_cluster_index_t *index, size_t head,
                                                        float *centroids, size_t capacity, size_t *out_len);
/** \brief CSR offsets of the coarse clusters' children; see kvsieve_cluster_index_sizes(). */
kvsieve_error_t *kvsieve_cluster_index_coarse_child_offsets(const kvsieve_cluster_index_t *index, size_t head,
                                                            uint32_t *offsets, size_t capacity, size_t *out_len);
/** \brief Children of the coarse clusters of one KV head; see kvsieve_cluster_index_sizes(). */
kvsieve_error_t *kvsieve_cluster_index_coarse_children(const kvsieve_cluster_index_t *index, size_t head,
                                                       uint32_t *children, size_t capacity, size_t *out_len);

/* Retrieval ---------------------------------------------------------------------------- */

/**
 * \brief The estimates `s_c` of every fine cluster for the decode query `q` (flat scoring;
 * see ::kvsieve_retrieve_config_t for the formula), head-major: entry
 * `h * num_clusters + c`.
 *
 * \param index The index (required).
 * \param q The decode query, after RoPE: `[num_qo_heads, head_dim]` or
 *        `[1, num_qo_heads, head_dim]`, any accepted dtype and strides; head_dim that of the
 *        index and num_qo_heads a positive multiple of its KV heads (#KVSIEVE_ERROR_SHAPE
 *        naming `q`), finite (#KVSIEVE_ERROR_INVALID_ARGUMENT naming `q`).
 * \param estimates Caller buffer of `capacity` doubles (NULL only if `capacity` is 0); must
 *        not overlap `q`.
 * \param capacity Its length; fewer than `num_kv_heads * num_clusters` gives
 *        #KVSIEVE_ERROR_INVALID_ARGUMENT naming `capacity` (nothing is written).
 * \param out_len Optional: receives the number of values written; untouched on failure.
 * \return NULL on success, or an error (owned by the caller); nothing is written on failure.
 *
 * Ownership: nothing is retained. Thread safety: thread-safe (shared lock).
 */
kvsieve_error_t *kvsieve_cluster_index_estimates(const kvsieve_cluster_index_t *index, const kvsieve_tensor_t *q,
                                                 double *estimates, size_t capacity, size_t *out_len);

/**
 * \brief Centroid retrieval: the tokens of the clusters the decode query `q` needs, per KV
 * head, as a new selection over `config->seq_len` tokens. Only clustered tokens
 * (`0 .. clustered_len`) are ever selected: union a streaming selection for the rest
 * (kvsieve_selection_union()) before sparse attention.
 *
 * \param index The index (required).
 * \param q The decode query, as in kvsieve_cluster_index_estimates().
 * \param config The options (required); copied. See ::kvsieve_retrieve_config_t for the
 *        errors it can give.
 * \param out Receives the new selection (required); untouched on failure.
 * \param stats Optional: receives the cost and counts, initialised by the caller with
 *        kvsieve_retrieve_stats_init() (kvsieve writes the fields its `struct_size` covers);
 *        untouched on failure.
 * \return NULL on success, or an error (owned by the caller); nothing is written on failure.
 *
 * Ownership: the caller owns `*out` (release with kvsieve_selection_free()); the selection
 * is independent of the index.
 *
 * Thread safety: thread-safe (shared lock).
 */
kvsieve_error_t *kvsieve_cluster_index_retrieve(const kvsieve_cluster_index_t *index, const kvsieve_tensor_t *q,
                                                const kvsieve_retrieve_config_t *config, kvsieve_selection_t **out,
                                                kvsieve_retrieve_stats_t *stats);

/**
 * \brief Thresholds that make #KVSIEVE_RETRIEVE_THRESHOLD keep on average `target_fraction`
 * of the clustered keys on the calibration queries `queries`.
 *
 * Every (query, head, cluster) gives an estimate `s` and a weight
 * `N_c / (clustered_len * m)`; the cut is placed between two distinct values of `s` where
 * the kept weight is closest to the target (fewer kept on a tie), τ the midpoint of the two
 * values (the largest `s` when nothing is kept, -1 when everything is). With `per_head`
 * each KV head gets its own cut; otherwise one cut over all heads, repeated per head.
 *
 * \param index The index (required).
 * \param queries Calibration queries after RoPE, `[m, num_qo_heads, head_dim]`, m >= 1
 *        (#KVSIEVE_ERROR_SHAPE naming `queries`), finite.
 * \param target_fraction In (0, 1] (#KVSIEVE_ERROR_INVALID_ARGUMENT naming
 *        `target_fraction`).
 * \param per_head Calibrate each KV head on its own.
 * \param thresholds Caller buffer of `capacity` doubles (NULL only if `capacity` is 0);
 *        receives τ per KV head, ready for #KVSIEVE_RETRIEVE_PER_HEAD_THRESHOLD.
 * \param capacity Length of `thresholds` (and of `kept_fractions`); fewer than num_kv_heads
 *        gives #KVSIEVE_ERROR_INVALID_ARGUMENT naming `capacity`.
 * \param kept_fractions Optional: receives per KV head the mean fraction of clustered keys
 *        its τ keeps on the calibration queries.
 * \return NULL on success, or an error (owned by the caller); nothing is written on failure.
 *
 * Ownership: nothing is retained. Thread safety: thread-safe (shared lock).
 */
kvsieve_error_t *kvsieve_cluster_index_calibrate(const kvsieve_cluster_index_t *index, const kvsieve_tensor_t *queries,
                                                 double target_fraction, bool per_head, double *thresholds,
                                                 size_t capacity, double *kept_fractions);

/* Updating, saving and loading --------------------------------------------------------- */

/**
 * \brief Assign the keys that arrived since the index was built or last updated (tokens
 * `clustered_len .. n - exclude_window`) to their nearest unit centroid, updating sizes,
 * member lists and the coarse level's sizes and centroids. Centroids do not move: call
 * kvsieve_cluster_index_rebuild() once many tokens have arrived.
 *
 * \param index The index (required).
 * \param keys The key source (required), the same sequence's keys: the same num_kv_heads and
 *        head_dim (#KVSIEVE_ERROR_SHAPE naming `keys`), at least kvsieve_cluster_index_seq_len()
 *        tokens (#KVSIEVE_ERROR_INVALID_ARGUMENT naming `keys`: it was truncated or
 *        compacted, rebuild), finite.
 * \param out_added Optional: receives the number of tokens assigned per head; must not
 *        overlap the key tensor; untouched on failure.
 * \return NULL on success, or an error (owned by the caller); the index is unchanged on
 *         failure.
 *
 * Ownership: nothing is retained. Thread safety: thread-safe (exclusive lock on the index;
 * a cache source takes the cache's shared lock).
 */
kvsieve_error_t *kvsieve_cluster_index_assign_new(kvsieve_cluster_index_t *index, const kvsieve_key_source_t *keys,
                                                  size_t *out_added);

/**
 * \brief Cluster again from scratch, with the configuration the index was built with, over
 * the source's current keys. The index is replaced only on success.
 *
 * \param index The index (required).
 * \param keys The key source (required); the same num_kv_heads and head_dim
 *        (#KVSIEVE_ERROR_SHAPE naming `keys`) and at least kvsieve_cluster_index_seq_len()
 *        tokens; otherwise as for kvsieve_cluster_index_build().
 * \return NULL on success, or an error (owned by the caller); the index is unchanged on
 *         failure.
 *
 * Ownership: nothing is retained. Thread safety: thread-safe (exclusive lock on the index;
 * a cache source takes the cache's shared lock).
 */
kvsieve_error_t *kvsieve_cluster_index_rebuild(kvsieve_cluster_index_t *index, const kvsieve_key_source_t *keys);

/**
 * \brief Write the index to a file: safetensors (little-endian tensors of centroids, sizes,
 * member lists, cluster radii and the coarse level) with versioned, checksummed metadata
 * (format version 2).
 *
 * \param index The index (required).
 * \param path File path (required), NUL-terminated, non-empty (#KVSIEVE_ERROR_INVALID_ARGUMENT
 *        naming `path`); the file is created or replaced. A failure to write gives
 *        #KVSIEVE_ERROR_IO.
 * \return NULL on success, or an error (owned by the caller).
 *
 * Ownership: nothing is retained. Thread safety: thread-safe (shared lock).
 */
kvsieve_error_t *kvsieve_cluster_index_save(const kvsieve_cluster_index_t *index, const char *path);

/**
 * \brief Read an index written by kvsieve_cluster_index_save(), verifying the container,
 * format and version, every field and tensor shape, the checksum and the index's invariants.
 * Version 1 files (without radii) load too; their index refuses
 * #KVSIEVE_RETRIEVE_BUDGET_MIXED until rebuilt.
 * A missing, truncated, corrupted or foreign file gives #KVSIEVE_ERROR_IO naming the file
 * and what is wrong.
 *
 * \param path File path (required), NUL-terminated.
 * \param out Receives the new index (required); untouched on failure.
 * \return NULL on success, or an error (owned by the caller).
 *
 * Ownership: the caller owns `*out` (release with kvsieve_cluster_index_free()).
 *
 * Thread safety: thread-safe.
 */
kvsieve_error_t *kvsieve_cluster_index_load(const char *path, kvsieve_cluster_index_t **out);

/**
 * \brief kvsieve_cluster_index_load(), then check that the index fits the keys of `keys`:
 * the same num_kv_heads and head_dim, and a sequence at least as long as the index covers.
 * A mismatch is #KVSIEVE_ERROR_IO too (the file is for another cache or sequence).
 *
 * \param path File path (required), NUL-terminated.
 * \param keys The key source (required); see ::kvsieve_key_source_t.
 * \param out Receives the new index (required); untouched on failure.
 * \return NULL on success, or an error (owned by the caller).
 *
 * Ownership: the caller owns `*out` (release with kvsieve_cluster_index_free()).
 *
 * Thread safety: thread-safe (a cache source takes the cache's shared lock).
 */
kvsieve_error_t *kvsieve_cluster_index_load_for(const char *path, const kvsieve_key_source_t *keys,
                                                kvsieve_cluster_index_t **out);

/* Centroid retrieval in policies ------------------------------------------------------- */

/**
 * \brief The cluster indexes that a policy with `clusters=` reads: one
 * ::kvsieve_cluster_index_t per (sequence, layer), owned by the engine.
 *
 * Policy text: `clusters=N` keeps, per KV head, the best clusters of the layer's index up to
 * N tokens (by estimated attention), united with the head's sinks and window and with every
 * token the index does not cover yet. Options, only with `clusters=`: `clusters_k=K` fine
 * clusters per head, or `cluster_size=S` one cluster per S tokens clustered (default 16);
 * `hier=C` hierarchical lookup through C coarse clusters per head, opening the best coarse
 * clusters until they hold twice the budget; `rank=estimate` (default) or `rank=mixed`
 * (clusters taken as #KVSIEVE_RETRIEVE_BUDGET or #KVSIEVE_RETRIEVE_BUDGET_MIXED). Example:
 * `sinks=4,window=64,clusters=512,cluster_size=16,hier=16,rank=mixed;layers=0-1:dense`.
 *
 * Lifecycle and staleness rule: after a sequence's prefill, kvsieve_cluster_set_build()
 * clusters the keys of every layer whose policy uses `clusters=`, leaving out the smallest
 * `window=` of that layer's cluster heads. Tokens appended afterwards are in no cluster and
 * are always read (so nothing new is missed); kvsieve_cluster_set_update() assigns those
 * that have left the window to their nearest centroid, so the uncovered tail stays the
 * window. After a truncation or compaction decoding fails naming the index: build again.
 * An index built from a cache of post-RoPE keys clusters them as stored, and decode scores
 * the query after RoPE at its real position. One built from a cache of pre-RoPE keys
 * clusters the raw keys, and decode under `positions=capped,max_distance=M` scores the query
 * rotated to position M: exactly the logit attention gives a token at the capped distance
 * (every token at least M back; LM-Infinite sets the window to M). For other position
 * modes on a pre-RoPE cache, build the set from a twin cache of post-RoPE keys (same
 * sequence ids and tokens).
 *
 * Made by kvsieve_cluster_set_new(), released by kvsieve_cluster_set_free().
 *
 * Thread safety: the handle holds a reader-writer lock. kvsieve_cache_decode_with_clusters()
 * and kvsieve_cluster_set_info() take the shared lock; build, update and remove take the
 * exclusive lock. kvsieve_cluster_set_free() must run alone.
 */
typedef struct kvsieve_cluster_set kvsieve_cluster_set_t;

/**
 * \brief A new, empty cluster index set.
 *
 * \param seed k-means++ seed of the indexes it builds.
 * \param out Receives the set (required); untouched on failure.
 *
 * Ownership: the caller owns `*out` (release with kvsieve_cluster_set_free()).
 * Thread safety: thread-safe.
 */
kvsieve_error_t *kvsieve_cluster_set_new(uint64_t seed, kvsieve_cluster_set_t **out);

/**
 * \brief Release a set and its indexes.
 *
 * \param set A set, or NULL (ignored). Ownership: taken.
 *
 * Thread safety: no other call on `set` may run concurrently or after.
 */
void kvsieve_cluster_set_free(kvsieve_cluster_set_t *set);

/**
 * \brief (Re)build the indexes of sequence `seq` for every layer where `policy` uses
 * `clusters=`, from the keys in `cache`. The sequence's indexes are replaced only when every
 * layer succeeds.
 *
 * \param set The set (required).
 * \param cache The cache holding the keys (required): post-RoPE keys are clustered as stored,
 *        pre-RoPE keys raw (see ::kvsieve_cluster_set_t).
 * \param seq The sequence (#KVSIEVE_ERROR_INVALID_ARGUMENT naming `seq` when it is empty).
 * \param policy The policy (required); validated against the cache's shape.
 * \param out_layers Optional: receives the number of layers indexed (0 for a policy without
 *        `clusters=`).
 * \return NULL on success, or an error (owned by the caller); the set is unchanged on failure.
 *
 * Ownership: nothing is retained; the indexes copy what they need.
 * Thread safety: exclusive lock on `set`, shared lock on `cache`.
 */
kvsieve_error_t *kvsieve_cluster_set_build(kvsieve_cluster_set_t *set, const kvsieve_cache_t *cache, uint64_t seq,
                                           const kvsieve_policy_t *policy, size_t *out_layers);

/**
 * \brief Assign the tokens of `seq` appended since its indexes were built or updated, and
 * that have left the excluded window, to their nearest centroids, in every layer (centroids
 * do not move). All layers or none.
 *
 * \param set The set (required).
 * \param cache The cache the indexes were built from (required).
 * \param seq The sequence; a sequence shorter than its indexes cover (truncated or compacted)
 *        fails with #KVSIEVE_ERROR_INVALID_ARGUMENT naming `keys`.
 * \param out_assigned Optional: tokens assigned per head, summed over layers.
 * \return NULL on success, or an error (owned by the caller); the set is unchanged on failure.
 *
 * Thread safety: exclusive lock on `set`, shared lock on `cache`.
 */
kvsieve_error_t *kvsieve_cluster_set_update(kvsieve_cluster_set_t *set, const kvsieve_cache_t *cache, uint64_t seq,
                                            size_t *out_assigned);

/**
 * \brief Drop every index of `seq` (for a freed sequence).
 *
 * \param set The set (required).
 * \param seq The sequence (unknown sequences hold no index: 0 removed).
 * \param out_removed Optional: receives the number of indexes dropped.
 *
 * Thread safety: exclusive lock on `set`.
 */
kvsieve_error_t *kvsieve_cluster_set_remove_sequence(kvsieve_cluster_set_t *set, uint64_t seq, size_t *out_removed);

/**
 * \brief What a set holds: the number of indexes, and for (`seq`, `layer`) the tokens its
 * index covers (`0 .. clustered_len`) and its fine clusters per head, both 0 without one.
 *
 * \param set The set (required).
 * \param seq A sequence.
 * \param layer A layer.
 * \param out_len Optional: indexes held over all sequences and layers.
 * \param out_clustered_len Optional.
 * \param out_num_clusters Optional.
 *
 * Thread safety: shared lock on `set`.
 */
kvsieve_error_t *kvsieve_cluster_set_info(const kvsieve_cluster_set_t *set, uint64_t seq, size_t layer, size_t *out_len,
                                          size_t *out_clustered_len, size_t *out_num_clusters);

/**
 * \brief Decode under a policy with centroid retrieval: as kvsieve_cache_decode_with_policy(),
 * and heads with `clusters=` also read what their (sequence, layer) index in `set`
 * retrieves for the query, plus the tokens the index does not cover yet. The result equals
 * dense attention over exactly retrieved ∪ sinks ∪ window ∪ uncovered tokens.
 *
 * With a cache storing keys after RoPE, `q` is after RoPE. With one storing them before RoPE
 * (remapped positions: `positions=capped` or `contiguous`), `q` is before RoPE,
 * `params->rope` is required (#KVSIEVE_ERROR_INVALID_ARGUMENT naming `params.rope`), and a
 * copy of `q` is rotated for scoring: to position `max_distance` against an index of this
 * cache's raw keys under capped positions (not rotated under contiguous positions: the raw
 * query, position-free), or to its original position against an index
 * built from a twin cache of post-RoPE keys. A mismatch (raw keys under original positions,
 * or with a post-RoPE cache; `span=` with a twin-cache index) fails naming `clusters`.
 *
 * \param cache The cache (required).
 * \param layer Layer index.
 * \param seq_ids `batch` sequence ids.
 * \param batch Number of sequences.
 * \param q Queries `[batch, num_qo_heads, head_dim]`.
 * \param policy The policy (required); validated against the cache's shape.
 * \param set The index set (required). A sequence with no index at a `clusters=` layer
 *        fails with #KVSIEVE_ERROR_INVALID_ARGUMENT naming `clusters` (call
 *        kvsieve_cluster_set_build()); so does an index covering more tokens than the
 *        sequence holds.
 * \param out Output, same shape as `q`.
 * \param lse Optional: `batch * num_qo_heads` LSEs.
 * \param params Optional (NULL = defaults).
 * \param out_selections Optional: `batch` slots receiving a new selection handle per sequence
 *        (NULL in every slot when the layer is dense).
 * \param out_centroids_scored Optional: `batch` slots receiving the centroid rows scored per
 *        sequence (fine clusters scored plus every coarse centroid under `hier=`, summed over
 *        the KV heads that retrieve; each row is head_dim floats).
 * \param out_radii_read Optional: `batch` slots receiving the cluster radii read per sequence
 *        (`rank=mixed`: one float per fine cluster scored; 0 otherwise).
 * \return NULL on success, or an error (owned by the caller); `out`, `lse` and the optional
 *         outputs untouched on failure.
 *
 * Ownership: the caller owns every handle written to `out_selections`.
 * Thread safety: shared locks on `set` and `cache`.
 */
kvsieve_error_t *kvsieve_cache_decode_with_clusters(const kvsieve_cache_t *cache, size_t layer, const uint64_t *seq_ids,
                                                    size_t batch, const kvsieve_tensor_t *q,
                                                    const kvsieve_policy_t *policy, const kvsieve_cluster_set_t *set,
                                                    const kvsieve_tensor_t *out, float *lse,
                                                    const kvsieve_attention_params_t *params,
                                                    kvsieve_selection_t **out_selections, size_t *out_centroids_scored,
                                                    size_t *out_radii_read);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* KVSIEVE_CLUSTER_H */
