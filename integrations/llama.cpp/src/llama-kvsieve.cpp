#include "llama-kvsieve.h"

#include "llama-arch.h"
#include "llama-batch.h"
#include "llama-cparams.h"
#include "llama-graph.h"
#include "llama-hparams.h"
#include "llama-impl.h"
#include "llama-kv-cache.h"
#include "llama-kv-cells.h"
#include "llama-model.h"

#include "ggml.h"

#include <kvsieve.h>

#include <algorithm>
#include <iterator>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <limits>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define KVS_PAUSE() _mm_pause()
#else
#define KVS_PAUSE() ((void) 0)
#endif

//
// The policy: one spec per layer
//

namespace {

struct layer_spec {
    bool     dense        = true;
    uint32_t sinks        = 0;
    uint32_t window       = 0;
    uint32_t pages        = 0;
    uint32_t min_pages    = 0;
    uint32_t clusters     = 0;
    uint32_t clusters_k   = 0;
    uint32_t cluster_size = 0;
    uint32_t hier         = 0;
    bool     rank_mixed   = false;

    bool window_only() const { return !dense && pages == 0 && clusters == 0; }
};

[[noreturn]] void fail(const std::string & msg) {
    throw std::runtime_error("LLAMA_KVSIEVE: " + msg);
}

std::string take_error(kvsieve_error_t * e) {
    std::string m = kvsieve_error_message(e);
    kvsieve_error_free(e);
    return m;
}

// Inside a graph computation nothing can be returned: a kvsieve error ends the process with
// its message.
// A host tensor of kvsieve's C API over `data` (strides in elements; null: contiguous).
kvsieve_tensor_t host_tensor(const void * data, kvsieve_dtype_t dtype, int32_t ndim, int64_t * shape, int64_t * strides = nullptr,
        uint64_t byte_offset = 0) {
    kvsieve_tensor_t t = {};
    t.data        = const_cast<void *>(data);
    t.device      = { KVSIEVE_DEVICE_CPU, 0 };
    t.ndim        = ndim;
    t.dtype       = dtype;
    t.shape       = shape;
    t.strides     = strides;
    t.byte_offset = byte_offset;
    return t;
}

void check(kvsieve_error_t * e, const char * what) {
    if (e) {
        const std::string m = take_error(e);
        GGML_ABORT("kvsieve: %s failed: %s", what, m.c_str());
    }
}

std::vector<std::string> split(const std::string & s, char sep) {
    std::vector<std::string> out;
    size_t start = 0;
    while (true) {
        const size_t p = s.find(sep, start);
        out.push_back(s.substr(start, p == std::string::npos ? std::string::npos : p - start));
        if (p == std::string::npos) {
            break;
        }
        start = p + 1;
    }
    return out;
}

uint32_t to_u32(const std::string & key, const std::string & v) {
    char * end = nullptr;
    const unsigned long long x = std::strtoull(v.c_str(), &end, 10);
    if (v.empty() || *end != '\0' || x > std::numeric_limits<uint32_t>::max()) {
        fail("`" + key + "=" + v + "`: expected a number");
    }
    return (uint32_t) x;
}

// One spec of kvsieve's canonical policy text (kvsieve_policy_to_string).
layer_spec parse_spec(const std::string & text) {
    layer_spec s;
    if (text == "dense") {
        return s;
    }
    s.dense = false;
    for (const std::string & item : split(text, ',')) {
        const size_t eq = item.find('=');
        const std::string key = item.substr(0, eq);
        const std::string val = eq == std::string::npos ? "" : item.substr(eq + 1);
        if      (key == "sinks")        { s.sinks        = to_u32(key, val); }
        else if (key == "window")       { s.window       = to_u32(key, val); }
        else if (key == "pages")        { s.pages        = to_u32(key, val); }
        else if (key == "min_pages")    { s.min_pages    = to_u32(key, val); }
        else if (key == "clusters")     { s.clusters     = to_u32(key, val); }
        else if (key == "clusters_k")   { s.clusters_k   = to_u32(key, val); }
        else if (key == "cluster_size") { s.cluster_size = to_u32(key, val); }
        else if (key == "hier")         { s.hier         = to_u32(key, val); }
        else if (key == "rank")         { s.rank_mixed   = val == "mixed"; }
        else if (key == "positions" && val == "original") { }
        else if (key == "positions" || key == "max_distance") {
            fail("`" + item + "`: llama.cpp stores keys after RoPE, so only positions=original is possible "
                 "(contiguous and capped positions, and global=/local=, need keys stored before RoPE)");
        } else {
            fail("`" + item + "`: not supported over llama.cpp's cache");
        }
    }
    return s;
}

// Half-open ranges of layers, "a-b,c" as kvsieve writes them.
std::vector<std::pair<uint32_t, uint32_t>> parse_layers(const std::string & text) {
    std::vector<std::pair<uint32_t, uint32_t>> out;
    for (const std::string & r : split(text, ',')) {
        const size_t dash = r.find('-');
        if (dash == std::string::npos) {
            const uint32_t a = to_u32("layers", r);
            out.emplace_back(a, a + 1);
        } else {
            out.emplace_back(to_u32("layers", r.substr(0, dash)), to_u32("layers", r.substr(dash + 1)) + 1);
        }
    }
    return out;
}

// Segment of a sequence's tokens whose cells lie in one bounds page.
struct segment {
    uint32_t page;
    int32_t  t0;
    int32_t  t1;
};

// Per sequence of a ubatch: its page table range and its query rows.
struct seq_plan {
    llama_seq_id seq;
    uint32_t     stream;
    int32_t      t0;     // first entry of the sequence in the CSR arrays
    int32_t      n;      // tokens of the sequence attended (the table's length)
    int32_t      r0;     // first query row (grouped order)
    int32_t      nq;     // query rows
    int32_t      first;  // first global cell if the cells are first, first+1, ...; else -1
    int32_t      seg0;   // segments [seg0, seg1) for page bounds (decode only)
    int32_t      seg1;
};

constexpr uint32_t BOUNDS_PAGE = 16; // cells per page of key bounds
constexpr uint32_t VIEW_PAGE   = 16; // cells per page of kvsieve's view where cells are consecutive
constexpr size_t ASSIGN_EVERY = 16;  // tokens past the window assigned to clusters at once

// A decode ubatch: causal, and one token per sequence.
bool is_decode(const llama_ubatch & ub, bool causal) {
    if (!causal) {
        return false;
    }
    std::vector<llama_seq_id> seen;
    for (uint32_t i = 0; i < ub.n_tokens; ++i) {
        const llama_seq_id s = ub.seq_id && ub.seq_id[i] ? ub.seq_id[i][0] : 0;
        if (std::find(seen.begin(), seen.end(), s) != seen.end()) {
            return false;
        }
        seen.push_back(s);
    }
    return true;
}

// Bounds element types: f16 for an f16 cache (min and max of f16 keys are f16 values), f32
// otherwise.
inline float bound_load(const uint16_t * p) { return ggml_fp16_to_fp32(*p); }
inline float bound_load(const float * p) { return *p; }
inline void bound_store(uint16_t * p, float x) { *p = ggml_fp32_to_fp16(x); }
inline void bound_store(float * p, float x) { *p = x; }

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
inline __m256 bound_load8(const uint16_t * p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) p)); }
inline __m256 bound_load8(const float * p) { return _mm256_loadu_ps(p); }
#endif

// Upper bound of the logits of g query heads over a page: max over r of
// sum_c max(q_rc * hi_c, q_rc * lo_c) = qp_r . hi + qn_r . lo (qp, qn: the query's positive
// and negative parts, [g][d]).
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
inline float hsum8(__m256 x) {
    __m128 v = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    v = _mm_add_ps(v, _mm_movehl_ps(v, v));
    v = _mm_add_ss(v, _mm_movehdup_ps(v));
    return _mm_cvtss_f32(v);
}

// G rows at once: 2G independent accumulator chains, each page's bounds loaded once.
template <int G, typename T>
float page_bound_g(const float * qp, const float * qn, const T * lo, const T * hi, uint32_t d) {
    __m256 a[G], b[G];
    for (int r = 0; r < G; ++r) {
        a[r] = _mm256_setzero_ps();
        b[r] = _mm256_setzero_ps();
    }
    for (uint32_t c = 0; c < d; c += 8) {
        const __m256 l = bound_load8(lo + c);
        const __m256 h = bound_load8(hi + c);
        for (int r = 0; r < G; ++r) {
            a[r] = _mm256_fmadd_ps(_mm256_loadu_ps(qp + r * d + c), h, a[r]);
            b[r] = _mm256_fmadd_ps(_mm256_loadu_ps(qn + r * d + c), l, b[r]);
        }
    }
    float best = -std::numeric_limits<float>::infinity();
    for (int r = 0; r < G; ++r) {
        best = std::max(best, hsum8(_mm256_add_ps(a[r], b[r])));
    }
    return best;
}
#endif

template <typename T>
float page_bound(const float * qp, const float * qn, const T * lo, const T * hi, uint32_t g, uint32_t d) {
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
    if (d % 8 == 0) {
        float best = -std::numeric_limits<float>::infinity();
        uint32_t r = 0;
        for (; r + 4 <= g; r += 4) {
            best = std::max(best, page_bound_g<4>(qp + r * d, qn + r * d, lo, hi, d));
        }
        switch (g - r) {
            case 3: best = std::max(best, page_bound_g<3>(qp + r * d, qn + r * d, lo, hi, d)); break;
            case 2: best = std::max(best, page_bound_g<2>(qp + r * d, qn + r * d, lo, hi, d)); break;
            case 1: best = std::max(best, page_bound_g<1>(qp + r * d, qn + r * d, lo, hi, d)); break;
            default: break;
        }
        return best;
    }
#endif
    float best = -std::numeric_limits<float>::infinity();
    for (uint32_t r = 0; r < g; ++r) {
        float acc[8] = { 0 };
        for (uint32_t c = 0; c < d; ++c) {
            acc[c % 8] += qp[r * d + c] * bound_load(hi + c) + qn[r * d + c] * bound_load(lo + c);
        }
        float sum = 0.0f;
        for (float x : acc) {
            sum += x;
        }
        best = std::max(best, sum);
    }
    return best;
}

uint64_t mix(uint64_t h, uint64_t x) {
    h ^= x + 0x9e3779b97f4a7c15ULL + (h << 6) + (h >> 2);
    return h;
}

} // namespace

//
// Per-context state
//

struct llama_kvsieve {
    std::string text; // canonical policy text, or "dense"
    bool        all_dense = true;
    bool        any_pages = false;
    bool        any_clusters = false;

    std::vector<layer_spec> specs; // per layer

    uint32_t n_layer   = 0;
    uint32_t n_head    = 0;
    uint32_t n_head_kv = 0;
    uint32_t head_dim  = 0;
    float    soft_cap  = 0.0f;

    llama_kv_cache * kv = nullptr;
    uint32_t kv_size   = 0;
    uint32_t n_stream  = 1;
    kvsieve_dtype_t dtype = KVSIEVE_DTYPE_F16;

    // page key bounds, per layer using pages=: [n_bpages][n_head_kv][2][head_dim] (min, max),
    // f16 for an f16 cache, else f32; and the cell signature each page was computed for
    // (0: to compute)
    bool bounds_f16 = false;
    std::vector<std::vector<uint8_t>>  bounds;
    std::vector<std::vector<uint64_t>> bounds_sig;

    // cluster indexes, per sequence: one per layer using clusters=, and the page table they
    // were last checked against (a sequence whose old table is no longer a prefix of its
    // new one is rebuilt)
    struct seq_clusters {
        std::vector<kvsieve_cluster_index_t *> index; // per layer (nullptr: build at next decode)
        std::vector<int32_t>  cells;
        std::vector<int32_t>  pos;
        std::vector<uint64_t> probe; // content probes of the tokens written before that ubatch
        size_t built_at = 0;
    };
    std::map<llama_seq_id, seq_clusters> clusters;
    uint64_t seed = 0;

    // K rows of this layer (the last with a KV cache, whose keys depend on every earlier
    // token) tell whether a cell's key changed outside llama_decode (a state restore into the
    // same cells at the same positions)
    int probe_layer = -1;

    uint64_t probe(uint32_t cell) const {
        const ggml_tensor * k = kv->get_k_storage(probe_layer);
        uint64_t x;
        std::memcpy(&x, (const char *) k->data + (size_t) cell * k->nb[1], sizeof(x));
        return x;
    }

    // LLAMA_KVSIEVE_CHECK=1: every page-bound selection is compared with kvsieve's own
    // (kvsieve_selection_page_bounds on a kvsieve cache holding a copy of the keys)
    bool     check_pages = false;
    uint64_t n_checked = 0, n_check_diff = 0, check_tokens_diff = 0, check_tokens_total = 0;

    // statistics (LLAMA_KVSIEVE_STATS=1 prints them when the context is freed)
    bool     stats = false;
    uint64_t n_calls = 0, n_sparse = 0, tokens_read = 0, tokens_total = 0, n_builds = 0;
    double   t_build = 0.0, t_select = 0.0, t_attn = 0.0, t_plan = 0.0, t_refresh = 0.0, t_score = 0.0, t_retrieve = 0.0;

    // prefill (several queries of a sequence in a ubatch) through kvsieve, or through
    // llama.cpp's own attention (flash attention over the same cache); decode always
    // goes through kvsieve
    bool prefill_kvsieve = false;

    ~llama_kvsieve() {
        for (auto & it : clusters) {
            for (auto * ix : it.second.index) {
                kvsieve_cluster_index_free(ix);
            }
        }
        if (stats) {
            LLAMA_LOG_INFO("kvsieve: %llu attention calls, %llu sparse; tokens read %.4f of the sequences' tokens; "
                           "%llu cluster index builds in %.3f s; page tables %.3f s, selection %.3f s, attention op %.3f s (selection included)\n",
                    (unsigned long long) n_calls, (unsigned long long) n_sparse,
                    tokens_total ? (double) tokens_read / (double) tokens_total : 1.0,
                    (unsigned long long) n_builds, t_build, t_plan, t_select, t_attn);
            LLAMA_LOG_INFO("kvsieve: of the selection: page bounds refresh %.3f s, page scoring %.3f s, cluster retrieval %.3f s\n",
                    t_refresh, t_score, t_retrieve);
        }
        if (check_pages) {
            LLAMA_LOG_INFO("kvsieve: page-bound selections checked against kvsieve's own: %llu, differing: %llu "
                           "(in those, tokens in one and not the other: %llu of %llu)\n",
                    (unsigned long long) n_checked, (unsigned long long) n_check_diff,
                    (unsigned long long) check_tokens_diff, (unsigned long long) check_tokens_total);
        }
    }

    const layer_spec & spec(int il) const { return specs[il]; }

    void drop_clusters(llama_seq_id seq) {
        auto it = clusters.find(seq);
        if (it == clusters.end()) {
            return;
        }
        for (auto * ix : it->second.index) {
            kvsieve_cluster_index_free(ix);
        }
        clusters.erase(it);
    }
};

//
// The graph input: the page table of the ubatch, rebuilt for every ubatch from the cells
//

class llm_graph_input_kvsieve;

// The custom op of one layer: its input, layer and slot, and the attention scale.
struct llama_kvsieve_layer_op {
    llm_graph_input_kvsieve * input;
    int   il;
    int   slot;
    float scale;
};

class llm_graph_input_kvsieve : public llm_graph_input_i {
public:
    llm_graph_input_kvsieve(std::shared_ptr<llama_kvsieve> ks, bool causal, bool built_decode)
        : ks(std::move(ks)), causal(causal), built_decode(built_decode) {
        ops_pending.reset(new std::atomic<int>[this->ks->n_layer]);
        for (uint32_t i = 0; i < this->ks->n_layer; ++i) {
            ops_pending[i].store(0);
        }
    }

    void set_input(const llama_ubatch * ubatch) override;

    // The plan depends on the ubatch only, and is rebuilt in set_input; a graph whose
    // prefill attention is llama.cpp's own serves prefill ubatches only.
    bool can_reuse(const llm_graph_params & params) override {
        return ks->prefill_kvsieve || is_decode(params.ubatch, causal) == built_decode;
    }

    llama_kvsieve_layer_op * add_layer(int il, float scale) {
        ops.push_back(llama_kvsieve_layer_op{ this, il, (int) ops.size(), scale });
        return &ops.back();
    }

    void compute(ggml_tensor * dst, const llama_kvsieve_layer_op & op);

    // thread 0 runs kvsieve (which has its own worker threads); the other ggml threads of the
    // node sleep until it is done instead of spinning in ggml's barrier
    void finish(int slot) {
        ops_pending[slot].store(0, std::memory_order_release);
        { std::lock_guard<std::mutex> lk(mtx); }
        cv.notify_all();
    }

    void wait(int slot) {
        for (int i = 0; i < 256; ++i) {
            if (ops_pending[slot].load(std::memory_order_acquire) == 0) {
                return;
            }
            KVS_PAUSE();
        }
        std::unique_lock<std::mutex> lk(mtx);
        cv.wait(lk, [&] { return ops_pending[slot].load(std::memory_order_acquire) == 0; });
    }

    std::shared_ptr<llama_kvsieve> ks;
    const bool causal;
    const bool built_decode; // the ubatch the graph was built for

private:
    void plan_pages(const llama_ubatch * ubatch);
    void refresh_bounds(int il);
    template <typename T> void refresh_bounds_t(int il);
    template <typename T> void score_pages(int il, const seq_plan & sp, const float * qp, const float * qn);
    void select_pages(int il, const seq_plan & sp, const float * q, std::vector<uint32_t> & indptr, std::vector<uint32_t> & toks);
    kvsieve_selection_t * select(int il, const seq_plan & sp, const float * q, const kvsieve_paged_kv_t & kv);
    kvsieve_selection_t * retrieve(int il, const seq_plan & sp, const float * q, const kvsieve_paged_kv_t & kv);
    bool same_as_kvsieve_pages(int il, const seq_plan & sp, const float * q, const kvsieve_paged_kv_t & kv,
                               const std::vector<uint32_t> & indptr, const std::vector<uint32_t> & toks);

    std::deque<llama_kvsieve_layer_op> ops;
    std::unique_ptr<std::atomic<int>[]> ops_pending;
    std::mutex mtx;
    std::condition_variable cv;

    // plan of the current ubatch
    uint32_t n_tokens = 0;
    bool decode = false;           // one query per sequence
    bool rows_identity = true;     // grouped query order == ubatch order
    std::vector<seq_plan> seqs;
    std::vector<int32_t> indptr, indices, last_page_len, qo_indptr, tok_pos, rows;
    // the page table handed to kvsieve: `indices` itself (one cell per page), or pages of
    // VIEW_PAGE cells when every sequence's cells are consecutive from a page start
    uint32_t view_page = 1;
    std::vector<int32_t> view_indptr, view_indices, view_last;
    std::vector<segment> segs;
    std::vector<uint32_t> touched_pages;   // bounds pages holding tokens of the decode sequences
    std::vector<uint64_t> touched_sig;
    std::vector<uint32_t> written_pages;

    // scratch
    std::vector<float> q_buf, o_buf;
    std::vector<uint16_t> key_buf;
    std::vector<float> scores;
    std::vector<uint32_t> order;
};

void llm_graph_input_kvsieve::set_input(const llama_ubatch * ubatch) {
    llama_kvsieve & s = *ks;
    const llama_kv_cache & kv = *s.kv;
    const int64_t t_start = s.stats ? ggml_time_us() : 0;

    n_tokens = ubatch->n_tokens;
    seqs.clear();
    indptr.assign(1, 0);
    indices.clear();
    last_page_len.clear();
    qo_indptr.assign(1, 0);
    tok_pos.clear();
    rows.clear();
    segs.clear();

    // the sequences of the ubatch, in order of first appearance, and their query rows
    std::map<llama_seq_id, int> index_of;
    std::vector<std::vector<uint32_t>> queries;
    for (uint32_t i = 0; i < n_tokens; ++i) {
        const llama_seq_id seq = ubatch->seq_id[i][0];
        auto it = index_of.find(seq);
        if (it == index_of.end()) {
            it = index_of.emplace(seq, (int) queries.size()).first;
            queries.emplace_back();
        }
        queries[it->second].push_back(i);
    }

    decode = causal;
    for (auto & q : queries) {
        std::stable_sort(q.begin(), q.end(), [&](uint32_t a, uint32_t b) { return ubatch->pos[a] < ubatch->pos[b]; });
        decode = decode && q.size() == 1;
    }

    std::vector<std::pair<llama_pos, uint32_t>> cells;
    std::vector<llama_seq_id> seq_of(queries.size());
    for (const auto & [seq, b] : index_of) {
        seq_of[b] = seq;
    }

    for (size_t b = 0; b < queries.size(); ++b) {
        const llama_seq_id seq = seq_of[b];
        const auto & q = queries[b];
        const uint32_t stream = kv.get_stream(seq);
        const llama_kv_cells & cc = kv.get_cells(seq);
        const llama_pos p_last = ubatch->pos[q.back()];

        cells.clear();
        const uint32_t j1 = cc.used_max_p1();
        bool sorted = true;
        for (uint32_t j = cc.used_min(); j < j1; ++j) {
            if (cc.is_empty(j) || !cc.seq_has(j, seq)) {
                continue;
            }
            const llama_pos p = cc.pos_get(j);
            if (causal && p > p_last) {
                continue;
            }
            if (!cells.empty() && p < cells.back().first) {
                sorted = false;
            }
            cells.emplace_back(p, j);
        }
        if (!sorted) {
            std::stable_sort(cells.begin(), cells.end(), [](const auto & x, const auto & y) { return x.first < y.first; });
        }

        const int32_t n = (int32_t) cells.size();
        if (causal) {
            // the queries must be the sequence's last tokens, in order, as kvsieve's causal
            // prefill and decode read them (query i of m sees tokens 0 ..= n - m + i)
            bool ok = (int32_t) q.size() <= n;
            for (size_t k = 0; ok && k < q.size(); ++k) {
                ok = cells[n - q.size() + k].first == ubatch->pos[q[k]];
                ok = ok && (k == 0 || ubatch->pos[q[k]] > ubatch->pos[q[k - 1]]);
            }
            if (!ok) {
                GGML_ABORT("kvsieve: the ubatch's tokens of sequence %d are not the last positions of the sequence in the KV cache "
                           "(distinct, increasing positions after every cached one are required)", seq);
            }
        }

        seq_plan sp;
        sp.seq    = seq;
        sp.stream = stream;
        sp.t0     = (int32_t) indices.size();
        sp.n      = n;
        sp.r0     = (int32_t) rows.size();
        sp.nq     = (int32_t) q.size();
        sp.first  = -1;
        sp.seg0 = sp.seg1 = 0;

        const int32_t base = (int32_t) (stream * s.kv_size);
        bool contiguous = n > 0;
        for (int32_t t = 0; t < n; ++t) {
            const int32_t cell = base + (int32_t) cells[t].second;
            contiguous = contiguous && (t == 0 || cell == indices.back() + 1);
            indices.push_back(cell);
            tok_pos.push_back(cells[t].first);
        }
        if (contiguous) {
            sp.first = indices[sp.t0];
        }
        indptr.push_back((int32_t) indices.size());
        last_page_len.push_back(n > 0 ? 1 : 0);
        for (uint32_t i : q) {
            rows.push_back((int32_t) i);
        }
        qo_indptr.push_back((int32_t) rows.size());
        seqs.push_back(sp);
    }

    // Whole pages of VIEW_PAGE cells where they fit: the common case of a sequence whose
    // cells are consecutive from a page boundary (one sequence, or one stream each). kvsieve
    // then reads each page's rows with one lookup instead of one per token.
    view_page = (s.kv_size % VIEW_PAGE == 0) ? VIEW_PAGE : 1;
    for (const auto & sp : seqs) {
        if (sp.n > 0 && (sp.first < 0 || sp.first % VIEW_PAGE != 0)) {
            view_page = 1;
        }
    }
    if (view_page > 1) {
        view_indptr.assign(1, 0);
        view_indices.clear();
        view_last.clear();
        for (const auto & sp : seqs) {
            const int32_t np = (sp.n + (int32_t) view_page - 1) / (int32_t) view_page;
            for (int32_t j = 0; j < np; ++j) {
                view_indices.push_back(sp.first / (int32_t) view_page + j);
            }
            view_indptr.push_back((int32_t) view_indices.size());
            view_last.push_back(np > 0 ? sp.n - (np - 1) * (int32_t) view_page : 0);
        }
    }

    rows_identity = true;
    for (size_t r = 0; r < rows.size(); ++r) {
        rows_identity = rows_identity && rows[r] == (int32_t) r;
    }

    if (s.any_pages || s.any_clusters) {
        plan_pages(ubatch);
    }

    for (size_t i = 0; i < ops.size(); ++i) {
        ops_pending[i].store(1, std::memory_order_relaxed);
    }
    if (s.stats) {
        s.t_plan += (ggml_time_us() - t_start) * 1e-6;
    }
}

// Bookkeeping of the sparse policies for the ubatch: pages whose keys were written, the
// segments and page signatures of the decode sequences, and cluster index validity.
void llm_graph_input_kvsieve::plan_pages(const llama_ubatch * ubatch) {
    GGML_UNUSED(ubatch);
    llama_kvsieve & s = *ks;
    const llama_kv_cache & kv = *s.kv;

    written_pages.clear();
    touched_pages.clear();
    touched_sig.clear();

    for (auto & sp : seqs) {
        // the ubatch's own tokens are the sequence's last sp.nq tokens
        if (causal) {
            for (int32_t t = sp.n - sp.nq; t < sp.n; ++t) {
                written_pages.push_back((uint32_t) indices[sp.t0 + t] / BOUNDS_PAGE);
            }
        }
    }
    std::sort(written_pages.begin(), written_pages.end());
    written_pages.erase(std::unique(written_pages.begin(), written_pages.end()), written_pages.end());

    if (s.any_pages) {
        for (uint32_t il = 0; il < s.n_layer; ++il) {
            if (s.bounds_sig[il].empty()) {
                continue;
            }
            for (uint32_t p : written_pages) {
                s.bounds_sig[il][p] = 0;
            }
        }
    }

    if (s.any_clusters) {
        // tokens written at positions an index already covers (the sequence was cut back or
        // cleared and written again): its keys changed, build again
        for (const auto & sp : seqs) {
            auto it = s.clusters.find(sp.seq);
            if (causal && it != s.clusters.end() && !it->second.pos.empty() && sp.nq > 0 &&
                tok_pos[sp.t0 + sp.n - sp.nq] <= it->second.pos.back()) {
                s.drop_clusters(sp.seq);
            }
        }
    }

    if (!decode) {
        // prefill appends tokens: cluster indexes stay valid (their new tokens are read
        // through the uncovered tail until assigned)
        return;
    }

    if (s.any_pages) {
        for (auto & sp : seqs) {
            sp.seg0 = (int32_t) segs.size();
            for (int32_t t = 0; t < sp.n; ++t) {
                const uint32_t page = (uint32_t) indices[sp.t0 + t] / BOUNDS_PAGE;
                if (!segs.empty() && (int32_t) segs.size() > sp.seg0 && segs.back().page == page && segs.back().t1 == t) {
                    segs.back().t1 = t + 1;
                } else {
                    segs.push_back({ page, t, t + 1 });
                }
            }
            sp.seg1 = (int32_t) segs.size();
            for (int32_t g = sp.seg0; g < sp.seg1; ++g) {
                touched_pages.push_back(segs[g].page);
            }
        }
        std::sort(touched_pages.begin(), touched_pages.end());
        touched_pages.erase(std::unique(touched_pages.begin(), touched_pages.end()), touched_pages.end());
        // a page's signature: which of its cells hold a token, at which position, with which
        // key (the first bytes of its last layer's key); the cells of a stream are looked up
        // through a sequence of that stream
        touched_sig.resize(touched_pages.size());
        std::map<uint32_t, llama_seq_id> seq_of_stream;
        for (const auto & sp : seqs) {
            seq_of_stream.emplace(sp.stream, sp.seq);
        }
        for (size_t i = 0; i < touched_pages.size(); ++i) {
            const uint32_t page   = touched_pages[i];
            const uint32_t stream = page * BOUNDS_PAGE / s.kv_size;
            const llama_kv_cells & cc = kv.get_cells(seq_of_stream.at(stream));
            const uint32_t j0 = page * BOUNDS_PAGE - stream * s.kv_size;
            uint64_t h = 0x1234567ULL;
            for (uint32_t j = j0; j < j0 + BOUNDS_PAGE; ++j) {
                if (cc.is_empty(j)) {
                    h = mix(h, 0xffffffffULL);
                } else {
                    h = mix(mix(h, (uint64_t) (uint32_t) cc.pos_get(j)), s.probe(page * BOUNDS_PAGE + (j - j0)));
                }
            }
            touched_sig[i] = h | 1ULL; // never 0
        }
    }

    if (s.any_clusters) {
        // drop the indexes of sequences that left the cache
        for (auto it = s.clusters.begin(); it != s.clusters.end();) {
            const llama_seq_id seq = it->first;
            ++it;
            bool present = false;
            for (const auto & sp : seqs) {
                present = present || sp.seq == seq;
            }
            if (!present && kv.seq_pos_max(seq) < 0) {
                s.drop_clusters(seq);
            }
        }
        for (const auto & sp : seqs) {
            auto it = s.clusters.find(sp.seq);
            const int32_t * cells = indices.data() + sp.t0;
            const int32_t * pos   = tok_pos.data() + sp.t0;
            if (it != s.clusters.end()) {
                auto & c = it->second;
                const size_t m = c.cells.size();
                // still the same tokens, keys and cells, and not more than doubled since the
                // build: keep (and assign the new tokens); otherwise build again
                bool ok = m <= (size_t) sp.n && (size_t) sp.n <= 2 * std::max<size_t>(c.built_at, 1);
                ok = ok && std::equal(c.cells.begin(), c.cells.end(), cells) && std::equal(c.pos.begin(), c.pos.end(), pos);
                for (size_t t = 0; ok && t < c.probe.size(); ++t) {
                    ok = c.probe[t] == s.probe((uint32_t) cells[t]);
                }
                if (!ok) {
                    s.drop_clusters(sp.seq);
                    it = s.clusters.end();
                }
            }
            if (it == s.clusters.end()) {
                it = s.clusters.emplace(sp.seq, llama_kvsieve::seq_clusters{}).first;
                it->second.index.assign(s.n_layer, nullptr);
                it->second.built_at = (size_t) sp.n;
            }
            auto & c = it->second;
            c.cells.assign(cells, cells + sp.n);
            c.pos.assign(pos, pos + sp.n);
            // the ubatch's own token is written during this step: probed at the next one
            c.probe.resize((size_t) (sp.n - sp.nq));
            for (int32_t t = 0; t < sp.n - sp.nq; ++t) {
                c.probe[t] = s.probe((uint32_t) cells[t]);
            }
        }
    }
}

// Recompute the key bounds of layer il's pages that changed since they were computed.
void llm_graph_input_kvsieve::refresh_bounds(int il) {
    if (ks->bounds_f16) {
        refresh_bounds_t<uint16_t>(il);
    } else {
        refresh_bounds_t<float>(il);
    }
}

template <typename T>
void llm_graph_input_kvsieve::refresh_bounds_t(int il) {
    llama_kvsieve & s = *ks;
    const llama_kv_cache & kv = *s.kv;
    T * bounds = (T *) s.bounds[il].data();
    auto & sig = s.bounds_sig[il];
    const ggml_tensor * kt = kv.get_k_storage(il);
    const uint32_t hk = s.n_head_kv, d = s.head_dim;
    const size_t row = kt->nb[1];

    std::map<uint32_t, llama_seq_id> seq_of_stream;
    for (const auto & sp : seqs) {
        seq_of_stream.emplace(sp.stream, sp.seq);
    }

    std::vector<float> row_f(hk * d), lo(hk * d), hi(hk * d);
    for (size_t i = 0; i < touched_pages.size(); ++i) {
        const uint32_t page = touched_pages[i];
        if (sig[page] == touched_sig[i]) {
            continue;
        }
        const uint32_t stream = page * BOUNDS_PAGE / s.kv_size;
        const llama_kv_cells & cc = kv.get_cells(seq_of_stream.at(stream));
        std::fill(lo.begin(), lo.end(),  std::numeric_limits<float>::infinity());
        std::fill(hi.begin(), hi.end(), -std::numeric_limits<float>::infinity());
        const uint32_t j0 = page * BOUNDS_PAGE - stream * s.kv_size;
        for (uint32_t j = j0; j < j0 + BOUNDS_PAGE; ++j) {
            if (cc.is_empty(j)) {
                continue;
            }
            const char * src = (const char *) kt->data + (size_t) (page * BOUNDS_PAGE + (j - j0)) * row;
            if (kt->type == GGML_TYPE_F16) {
                ggml_fp16_to_fp32_row((const ggml_fp16_t *) src, row_f.data(), hk * d);
            } else if (kt->type == GGML_TYPE_BF16) {
                ggml_bf16_to_fp32_row((const ggml_bf16_t *) src, row_f.data(), hk * d);
            } else {
                std::memcpy(row_f.data(), src, sizeof(float) * hk * d);
            }
            for (uint32_t c = 0; c < hk * d; ++c) {
                lo[c] = std::min(lo[c], row_f[c]);
                hi[c] = std::max(hi[c], row_f[c]);
            }
        }
        T * b = bounds + (size_t) page * hk * 2 * d;
        for (uint32_t h = 0; h < hk; ++h) {
            for (uint32_t c = 0; c < d; ++c) {
                bound_store(b + (h * 2 + 0) * d + c, lo[h * d + c]);
                bound_store(b + (h * 2 + 1) * d + c, hi[h * d + c]);
            }
        }
        sig[page] = touched_sig[i];
    }
}

// Scores of the sequence's segments for every KV head, scores[h * nseg + i]: pages
// outermost (a page's bounds of every head lie together), the next page prefetched; a page
// without a written key scores -inf.
template <typename T>
void llm_graph_input_kvsieve::score_pages(int il, const seq_plan & sp, const float * qp, const float * qn) {
    const llama_kvsieve & s = *ks;
    const uint32_t hk = s.n_head_kv, d = s.head_dim, g = s.n_head / s.n_head_kv;
    const int32_t nseg = sp.seg1 - sp.seg0;
    const segment * sg = segs.data() + sp.seg0;
    const T * bounds = (const T *) s.bounds[il].data();
    const size_t page_elems = (size_t) hk * 2 * d;
    scores.resize((size_t) hk * nseg);
    for (int32_t i = 0; i < nseg; ++i) {
        const T * b = bounds + (size_t) sg[i].page * page_elems;
        if (i + 1 < nseg) {
            const char * nb = (const char *) (bounds + (size_t) sg[i + 1].page * page_elems);
            for (size_t off = 0; off < page_elems * sizeof(T); off += 64) {
                __builtin_prefetch(nb + off);
            }
        }
        for (uint32_t h = 0; h < hk; ++h) {
            const T * lo = b + (size_t) h * 2 * d;
            const T * hi = lo + d;
            scores[(size_t) h * nseg + i] = bound_load(lo) <= bound_load(hi)
                ? page_bound(qp + (size_t) h * g * d, qn + (size_t) h * g * d, lo, hi, g, d)
                : -std::numeric_limits<float>::infinity();
        }
    }
}

// Page-bound (Quest) selection of one decode sequence at layer il, as kvsieve does it on its
// own cache: per KV head, pages ranked by the largest upper bound of the group's query
// logits, whole pages taken best first (lower page first on ties) until the budget is
// reached, at least min_pages; a sequence within the budget is read whole. The sinks and
// window of the spec are added. Output: CSR over KV heads.
void llm_graph_input_kvsieve::select_pages(int il, const seq_plan & sp, const float * q,
        std::vector<uint32_t> & head_indptr, std::vector<uint32_t> & toks) {
    const llama_kvsieve & s = *ks;
    const layer_spec & spec = s.spec(il);
    const uint32_t hk = s.n_head_kv, d = s.head_dim;
    const int32_t n = sp.n;
    const int32_t nseg = sp.seg1 - sp.seg0;
    const segment * sg = segs.data() + sp.seg0;

    // q split into its positive and negative parts: the bound is q+ . max + q- . min
    std::vector<float> qp(s.n_head * d), qn(s.n_head * d);
    for (uint32_t i = 0; i < s.n_head * d; ++i) {
        qp[i] = std::max(q[i], 0.0f);
        qn[i] = std::min(q[i], 0.0f);
    }
    const int64_t t0 = ks->stats ? ggml_time_us() : 0;
    if (n > (int32_t) spec.pages) {
        if (s.bounds_f16) {
            score_pages<uint16_t>(il, sp, qp.data(), qn.data());
        } else {
            score_pages<float>(il, sp, qp.data(), qn.data());
        }
    }
    if (ks->stats) {
        ks->t_score += (ggml_time_us() - t0) * 1e-6;
    }

    head_indptr.assign(1, 0);
    toks.clear();
    std::vector<std::pair<int32_t, int32_t>> ranges;
    for (uint32_t h = 0; h < hk; ++h) {
        ranges.clear();
        if (n <= (int32_t) spec.pages) {
            ranges.emplace_back(0, n);
        } else {
            const float * sc = scores.data() + (size_t) h * nseg;
            order.resize(nseg);
            for (int32_t i = 0; i < nseg; ++i) {
                order[i] = (uint32_t) i;
            }
            auto better = [&](uint32_t a, uint32_t b) {
                return sc[a] > sc[b] || (sc[a] == sc[b] && a < b);
            };
            int32_t k = std::min<int32_t>(nseg, (int32_t) ((spec.pages + BOUNDS_PAGE - 1) / BOUNDS_PAGE));
            std::nth_element(order.begin(), order.begin() + k, order.end(), better);
            int64_t kept = 0;
            for (int32_t i = 0; i < k; ++i) {
                kept += sg[order[i]].t1 - sg[order[i]].t0;
            }
            while (kept < (int64_t) spec.pages && k < nseg) {
                auto it = std::min_element(order.begin() + k, order.end(), better);
                std::iter_swap(order.begin() + k, it);
                kept += sg[order[k]].t1 - sg[order[k]].t0;
                ++k;
            }
            const int32_t floor = std::min<int32_t>((int32_t) spec.min_pages, nseg);
            if (k < floor) {
                std::nth_element(order.begin() + k, order.begin() + floor, order.end(), better);
                k = floor;
            }
            for (int32_t i = 0; i < k; ++i) {
                ranges.emplace_back(sg[order[i]].t0, sg[order[i]].t1);
            }
            if (spec.sinks > 0) {
                ranges.emplace_back(0, std::min<int32_t>(n, (int32_t) spec.sinks));
            }
            if (spec.window > 0) {
                ranges.emplace_back(std::max<int32_t>(0, n - (int32_t) spec.window), n);
            }
            std::sort(ranges.begin(), ranges.end());
        }
        int32_t end = 0;
        for (const auto & r : ranges) {
            for (int32_t t = std::max(r.first, end); t < r.second; ++t) {
                toks.push_back((uint32_t) t);
            }
            end = std::max(end, r.second);
        }
        head_indptr.push_back((uint32_t) toks.size());
    }
}

// Centroid retrieval of one decode sequence at layer il: the index is built over the
// sequence's keys (in llama.cpp's cache) at its first decode step, the tokens that left
// the window are assigned to it at every step, and the query retrieves clusters up to the
// budget; the uncovered tail (the window) is added. Returns the selection (owned).
kvsieve_selection_t * llm_graph_input_kvsieve::retrieve(int il, const seq_plan & sp, const float * q, const kvsieve_paged_kv_t & kvd) {
    llama_kvsieve & s = *ks;
    const layer_spec & spec = s.spec(il);
    const uint32_t hk = s.n_head_kv, d = s.head_dim;
    const size_t n = (size_t) sp.n;

    // the sequence's keys as a [n, n_head_kv, head_dim] tensor: in place when its cells are
    // consecutive, else gathered
    const size_t esize = s.dtype.bits / 8;
    int64_t kshape[3]   = { (int64_t) n, (int64_t) hk, (int64_t) d };
    int64_t kstrides[3] = { kvd.k_strides[1], (int64_t) d, 1 };
    kvsieve_tensor_t keys = host_tensor(nullptr, s.dtype, 3, kshape, kstrides);
    if (sp.first >= 0) {
        keys.data        = const_cast<void *>(kvd.k);
        keys.byte_offset = (uint64_t) sp.first * (uint64_t) kvd.k_strides[1] * esize;
    } else {
        key_buf.resize(n * hk * d * esize / sizeof(uint16_t) + 1);
        const size_t rb = (size_t) hk * d * esize;
        for (size_t t = 0; t < n; ++t) {
            std::memcpy((char *) key_buf.data() + t * rb,
                    (const char *) kvd.k + (size_t) indices[sp.t0 + t] * kvd.k_strides[1] * esize, rb);
        }
        kstrides[0]  = (int64_t) hk * d;
        keys.data    = key_buf.data();
    }
    kvsieve_key_source_t src;
    kvsieve_key_source_init(&src);
    src.tensor = &keys;

    auto & entry = s.clusters.at(sp.seq);
    kvsieve_cluster_index_t *& ix = entry.index[il];
    if (ix == nullptr) {
        const int64_t t0 = ggml_time_us();
        const size_t exclude = std::min<size_t>(spec.window, n - 1);
        const size_t m = n - exclude;
        size_t k = spec.clusters_k > 0 ? std::min<size_t>(spec.clusters_k, m)
                                       : (m + (spec.cluster_size ? spec.cluster_size : 16) - 1) / (spec.cluster_size ? spec.cluster_size : 16);
        k = std::max<size_t>(k, 1);
        kvsieve_cluster_config_t cfg = kvsieve_cluster_config_default(k);
        cfg.exclude_window = exclude;
        cfg.max_iter       = 10;
        cfg.seed           = s.seed;
        if (spec.hier > 0) {
            cfg.num_coarse_clusters = std::min<size_t>(std::max<size_t>(spec.hier, 1), k);
        }
        check(kvsieve_cluster_index_build(&src, &cfg, &ix), "kvsieve_cluster_index_build");
        s.n_builds++;
        s.t_build += (ggml_time_us() - t0) * 1e-6;
    } else {
        // assign the tokens that left the window once ASSIGN_EVERY of them have gathered
        // (until then they are read as part of the uncovered tail)
        size_t clustered = 0;
        check(kvsieve_cluster_index_clustered_len(ix, &clustered), "kvsieve_cluster_index_clustered_len");
        if (n > (size_t) spec.window && n - spec.window >= clustered + ASSIGN_EVERY) {
            check(kvsieve_cluster_index_assign_new(ix, &src, nullptr), "kvsieve_cluster_index_assign_new");
        }
    }

    int64_t qshape[2] = { (int64_t) s.n_head, (int64_t) d };
    kvsieve_tensor_t qt = host_tensor(q, KVSIEVE_DTYPE_F32, 2, qshape);

    kvsieve_retrieve_config_t rc = kvsieve_retrieve_config_default(spec.clusters);
    rc.mode    = spec.rank_mixed ? KVSIEVE_RETRIEVE_BUDGET_MIXED : KVSIEVE_RETRIEVE_BUDGET;
    rc.seq_len = n;
    if (spec.hier > 0) {
        rc.hierarchical           = true;
        rc.coarse_mode            = KVSIEVE_COARSE_BUDGET_MULTIPLE;
        rc.coarse_budget_multiple = 2.0;
    }
    kvsieve_selection_t * sel = nullptr;
    const int64_t t0 = s.stats ? ggml_time_us() : 0;
    check(kvsieve_cluster_index_retrieve(ix, &qt, &rc, &sel, nullptr), "kvsieve_cluster_index_retrieve");
    if (s.stats) {
        s.t_retrieve += (ggml_time_us() - t0) * 1e-6;
    }

    size_t clustered = 0;
    check(kvsieve_cluster_index_clustered_len(ix, &clustered), "kvsieve_cluster_index_clustered_len");
    if (clustered < n) {
        kvsieve_selection_t * tail = nullptr;
        kvsieve_selection_t * both = nullptr;
        check(kvsieve_selection_streaming(hk, n, 0, n - clustered, &tail), "kvsieve_selection_streaming");
        check(kvsieve_selection_union(sel, tail, &both), "kvsieve_selection_union");
        kvsieve_selection_free(tail);
        kvsieve_selection_free(sel);
        sel = both;
    }
    return sel;
}

// The page-bound selection kvsieve makes on its own cache (16-token pages, key bounds kept by
// kvsieve) from a copy of the sequence's keys, against ours. Only for a sequence whose cells
// are consecutive from a page start, where both have the same pages.
bool llm_graph_input_kvsieve::same_as_kvsieve_pages(int il, const seq_plan & sp, const float * q, const kvsieve_paged_kv_t & kvd,
        const std::vector<uint32_t> & indptr, const std::vector<uint32_t> & toks) {
    const llama_kvsieve & s = *ks;
    const layer_spec & spec = s.spec(il);
    const size_t n = (size_t) sp.n, hk = s.n_head_kv, d = s.head_dim;
    const size_t esize = s.dtype.bits / 8;

    kvsieve_cache_config_t cfg = kvsieve_cache_config_default(1, hk, d, BOUNDS_PAGE, n / BOUNDS_PAGE + 2);
    cfg.dtype = s.dtype;
    kvsieve_cache_t * cache = nullptr;
    uint64_t seq = 0;
    check(kvsieve_cache_new(&cfg, &cache), "kvsieve_cache_new");
    check(kvsieve_cache_create_sequence(cache, &seq), "kvsieve_cache_create_sequence");
    check(kvsieve_cache_append(cache, seq, n, nullptr, nullptr), "kvsieve_cache_append");
    int64_t shape[3]   = { (int64_t) n, (int64_t) hk, (int64_t) d };
    int64_t strides[3] = { kvd.k_strides[1], (int64_t) d, 1 };
    kvsieve_tensor_t k = host_tensor(kvd.k, s.dtype, 3, shape, strides, (uint64_t) sp.first * (uint64_t) kvd.k_strides[1] * esize);
    check(kvsieve_cache_write(cache, seq, 0, 0, &k, &k), "kvsieve_cache_write");

    int64_t qshape[2] = { (int64_t) s.n_head, (int64_t) d };
    kvsieve_tensor_t qt = host_tensor(q, KVSIEVE_DTYPE_F32, 2, qshape);
    kvsieve_page_bounds_config_t pc;
    kvsieve_page_bounds_config_init(&pc);
    pc.budget_tokens = spec.pages;
    pc.min_pages     = spec.min_pages;
    kvsieve_selection_t * pages = nullptr, * win = nullptr, * both = nullptr;
    check(kvsieve_selection_page_bounds(cache, seq, 0, &qt, &pc, &pages), "kvsieve_selection_page_bounds");
    if (spec.window > 0) {
        check(kvsieve_selection_streaming(hk, n, spec.sinks, spec.window, &win), "kvsieve_selection_streaming");
        check(kvsieve_selection_union(pages, win, &both), "kvsieve_selection_union");
    } else {
        both = pages;
        pages = nullptr;
    }
    size_t len = 0;
    check(kvsieve_selection_len(both, &len), "kvsieve_selection_len");
    std::vector<uint32_t> ref_ptr(hk + 1), ref(len);
    check(kvsieve_selection_head_indptr(both, ref_ptr.data(), ref_ptr.size(), nullptr), "kvsieve_selection_head_indptr");
    check(kvsieve_selection_indices(both, ref.data(), ref.size(), nullptr), "kvsieve_selection_indices");
    kvsieve_selection_free(pages);
    kvsieve_selection_free(win);
    kvsieve_selection_free(both);
    kvsieve_cache_free(cache);
    const bool same = ref_ptr == indptr && ref == toks;
    if (!same) {
        // how far apart: tokens in one selection and not the other, per head
        size_t diff = 0, total = 0;
        for (size_t h = 0; h < hk; ++h) {
            std::vector<uint32_t> a(ref.begin() + ref_ptr[h], ref.begin() + ref_ptr[h + 1]);
            std::vector<uint32_t> b(toks.begin() + indptr[h], toks.begin() + indptr[h + 1]);
            std::vector<uint32_t> x;
            std::set_symmetric_difference(a.begin(), a.end(), b.begin(), b.end(), std::back_inserter(x));
            diff += x.size();
            total += a.size();
        }
        ks->check_tokens_diff += diff;
        ks->check_tokens_total += total;
    }
    return same;
}

// The selection of one decode sequence at a sparse layer: sinks + window, page bounds and
// centroid retrieval as the spec asks, united.
kvsieve_selection_t * llm_graph_input_kvsieve::select(int il, const seq_plan & sp, const float * q, const kvsieve_paged_kv_t & kvd) {
    const llama_kvsieve & s = *ks;
    const layer_spec & spec = s.spec(il);
    const uint32_t hk = s.n_head_kv;
    const size_t n = (size_t) sp.n;

    kvsieve_selection_t * sel = nullptr;
    if (spec.pages > 0) {
        std::vector<uint32_t> hp, toks;
        select_pages(il, sp, q, hp, toks);
        if (ks->check_pages && sp.first >= 0 && sp.first % BOUNDS_PAGE == 0) {
            ks->n_checked++;
            ks->n_check_diff += !same_as_kvsieve_pages(il, sp, q, kvd, hp, toks);
        }
        check(kvsieve_selection_from_csr(n, hp.data(), hp.size(), toks.data(), toks.size(), &sel), "kvsieve_selection_from_csr");
    } else if (spec.window > 0) {
        check(kvsieve_selection_streaming(hk, n, spec.sinks, spec.window, &sel), "kvsieve_selection_streaming");
    } else if (spec.sinks > 0) {
        std::vector<uint32_t> first(std::min<size_t>(spec.sinks, n));
        for (size_t t = 0; t < first.size(); ++t) {
            first[t] = (uint32_t) t;
        }
        check(kvsieve_selection_same_for_all_heads(hk, n, first.data(), first.size(), &sel), "kvsieve_selection_same_for_all_heads");
    }
    if (spec.clusters > 0) {
        kvsieve_selection_t * r = retrieve(il, sp, q, kvd);
        if (sel == nullptr) {
            sel = r;
        } else {
            kvsieve_selection_t * both = nullptr;
            check(kvsieve_selection_union(sel, r, &both), "kvsieve_selection_union");
            kvsieve_selection_free(sel);
            kvsieve_selection_free(r);
            sel = both;
        }
    }
    return sel;
}

void llm_graph_input_kvsieve::compute(ggml_tensor * dst, const llama_kvsieve_layer_op & op) {
    llama_kvsieve & s = *ks;
    const int il = op.il;
    const ggml_tensor * q  = dst->src[0];
    const ggml_tensor * kt = dst->src[1]->view_src ? dst->src[1]->view_src : dst->src[1];
    const ggml_tensor * vt = dst->src[2]->view_src ? dst->src[2]->view_src : dst->src[2];
    const uint32_t hq = s.n_head, hk = s.n_head_kv, d = s.head_dim;
    const size_t esize = ggml_type_size(kt->type);

    kvsieve_paged_kv_t kvd;
    kvsieve_paged_kv_init(&kvd);
    kvd.k            = kt->data;
    kvd.v            = vt->data;
    kvd.device       = { KVSIEVE_DEVICE_CPU, 0 };
    kvd.dtype        = s.dtype;
    kvd.key_rope     = KVSIEVE_KEYS_POST_ROPE;
    // [page, slot, head] strides in elements; a slot is one cell (one cache row)
    kvd.num_pages    = (size_t) s.kv_size * s.n_stream / view_page;
    kvd.page_size    = view_page;
    kvd.num_kv_heads = hk;
    kvd.head_dim     = d;
    kvd.k_strides[1] = (int64_t) (kt->nb[1] / esize);
    kvd.k_strides[0] = kvd.k_strides[1] * view_page;
    kvd.k_strides[2] = d;
    kvd.v_strides[1] = (int64_t) (vt->nb[1] / esize);
    kvd.v_strides[0] = kvd.v_strides[1] * view_page;
    kvd.v_strides[2] = d;
    kvd.batch         = seqs.size();
    kvd.indptr        = view_page > 1 ? view_indptr.data() : indptr.data();
    kvd.indices       = view_page > 1 ? view_indices.data() : indices.data();
    kvd.last_page_len = view_page > 1 ? view_last.data() : last_page_len.data();
    kvd.positions     = nullptr;

    // queries and output, [rows, n_head, head_dim] in grouped order
    const int64_t nr = (int64_t) rows.size();
    int64_t shape[3] = { nr, (int64_t) hq, (int64_t) d };
    int64_t qstr[3]  = { (int64_t) (q->nb[2] / sizeof(float)), (int64_t) (q->nb[1] / sizeof(float)), (int64_t) (q->nb[0] / sizeof(float)) };
    float * qdata = (float *) q->data;
    float * odata = (float *) dst->data;
    const size_t row_elems = (size_t) hq * d;
    if (!rows_identity || !ggml_is_contiguous(q)) {
        q_buf.resize(nr * row_elems);
        for (int64_t r = 0; r < nr; ++r) {
            const char * src = (const char *) q->data + (size_t) rows[r] * q->nb[2];
            for (uint32_t h = 0; h < hq; ++h) {
                for (uint32_t c = 0; c < d; ++c) {
                    q_buf[r * row_elems + h * d + c] = *(const float *) (src + h * q->nb[1] + c * q->nb[0]);
                }
            }
        }
        qdata = q_buf.data();
        qstr[0] = (int64_t) row_elems; qstr[1] = d; qstr[2] = 1;
    }
    if (!rows_identity) {
        o_buf.resize(nr * row_elems);
        odata = o_buf.data();
    }

    kvsieve_tensor_t qt = host_tensor(qdata, KVSIEVE_DTYPE_F32, 3, shape, qstr);
    kvsieve_tensor_t ot = qt;
    ot.data    = odata;
    ot.strides = nullptr;

    kvsieve_attention_params_t params;
    kvsieve_attention_params_init(&params);
    params.scale          = op.scale;
    params.logit_soft_cap = s.soft_cap;

    const layer_spec & spec = s.spec(il);
    s.n_calls++;
    const int64_t t_start = s.stats ? ggml_time_us() : 0;
    if (decode && !spec.dense) {
        if (spec.pages > 0) {
            refresh_bounds(il);
            if (s.stats) {
                s.t_refresh += (ggml_time_us() - t_start) * 1e-6;
            }
        }
        std::vector<kvsieve_selection_t *> sels(seqs.size(), nullptr);
        for (size_t b = 0; b < seqs.size(); ++b) {
            sels[b] = select(il, seqs[b], qdata + (size_t) seqs[b].r0 * (qstr[0]), kvd);
            if (s.stats) {
                size_t len = 0;
                kvsieve_selection_len(sels[b], &len);
                s.tokens_read  += len;
                s.tokens_total += (uint64_t) seqs[b].n * hk;
            }
        }
        s.n_sparse++;
        const int64_t t_sel = s.stats ? ggml_time_us() : 0;
        if (s.stats) {
            s.t_select += (t_sel - t_start) * 1e-6;
        }
        check(kvsieve_paged_decode_sparse(&kvd, &qt, sels.data(), &ot, nullptr, &params), "kvsieve_paged_decode_sparse");
        for (auto * sel : sels) {
            kvsieve_selection_free(sel);
        }
    } else if (decode) {
        if (s.stats) {
            for (const auto & sp : seqs) {
                s.tokens_read  += (uint64_t) sp.n * hk;
                s.tokens_total += (uint64_t) sp.n * hk;
            }
        }
        check(kvsieve_paged_decode(&kvd, &qt, &ot, nullptr, &params), "kvsieve_paged_decode");
    } else if (causal && spec.window_only()) {
        // a spec of sinks and a window alone masks every query row to the sinks and its own
        // last `window` tokens, as kvsieve's prefill under a policy does
        std::vector<kvsieve_selection_t *> sels(seqs.size(), nullptr);
        for (size_t b = 0; b < seqs.size(); ++b) {
            check(kvsieve_selection_dense(hk, (size_t) seqs[b].n, &sels[b]), "kvsieve_selection_dense");
        }
        kvsieve_streaming_window_t w;
        kvsieve_streaming_window_init(&w);
        w.sinks  = spec.sinks;
        w.window = spec.window ? spec.window : (size_t) std::numeric_limits<int32_t>::max();
        std::vector<kvsieve_streaming_window_t> win(hk, w);
        check(kvsieve_paged_prefill_sparse(&kvd, &qt, qo_indptr.data(), sels.data(), win.data(), win.size(), &ot, nullptr, &params),
                "kvsieve_paged_prefill_sparse");
        for (auto * sel : sels) {
            kvsieve_selection_free(sel);
        }
    } else {
        check(kvsieve_paged_prefill(&kvd, &qt, qo_indptr.data(), causal, &ot, nullptr, &params), "kvsieve_paged_prefill");
    }

    if (!rows_identity) {
        for (int64_t r = 0; r < nr; ++r) {
            std::memcpy((char *) dst->data + (size_t) rows[r] * dst->nb[2], odata + r * row_elems, row_elems * sizeof(float));
        }
    }
    if (s.stats) {
        s.t_attn += (ggml_time_us() - t_start) * 1e-6;
    }
}

namespace {

void kvsieve_attn_op(ggml_tensor * dst, int ith, int nth, void * userdata) {
    auto * op = static_cast<llama_kvsieve_layer_op *>(userdata);
    if (ith == 0) {
        op->input->compute(dst, *op);
        op->input->finish(op->slot);
    } else if (nth > 1) {
        op->input->wait(op->slot);
    }
}

} // namespace

//
// Entry points
//

std::shared_ptr<llama_kvsieve> llama_kvsieve_from_env(const llama_model & model, llama_cparams & cparams) {
    const char * env = std::getenv("LLAMA_KVSIEVE");
    if (env == nullptr) {
        return nullptr;
    }
    std::string text = env;
    if (text.empty() || text == "0" || text == "off") {
        return nullptr;
    }
    if (text == "1" || text == "on") {
        text = "dense";
    }

    const llama_hparams & hp = model.hparams;
    if (model.arch == LLM_ARCH_GROK) {
        fail("Grok's attention (output multiplier and tanh before softmax) is not supported");
    }
    if (hp.swa_type != LLAMA_SWA_TYPE_NONE || hp.is_swa_any()) {
        fail("models with sliding-window attention are not supported");
    }
    if (hp.use_alibi || hp.f_max_alibi_bias > 0.0f) {
        fail("ALiBi position biases are not supported");
    }
    if (hp.n_pos_per_embd() > 1) {
        fail("multi-dimensional positions (M-RoPE) are not supported");
    }
    if (hp.is_mla()) {
        fail("multi-head latent attention (MLA) is not supported");
    }
    if (!cparams.causal_attn) {
        LLAMA_LOG_WARN("%s: non-causal attention: every query reads every token of its sequence\n", __func__);
    }

    auto ks = std::make_shared<llama_kvsieve>();
    ks->n_layer = hp.n_layer_all;
    bool first = true;
    for (uint32_t il = 0; il < ks->n_layer; ++il) {
        if (!hp.has_kv(il)) {
            continue;
        }
        const uint32_t dk = hp.n_embd_head_k(il), dv = hp.n_embd_head_v(il);
        const uint32_t h = hp.n_head(il), hk = hp.n_head_kv(il);
        if (dk != dv) {
            fail("layer " + std::to_string(il) + ": key and value head sizes differ (" + std::to_string(dk) + ", " + std::to_string(dv) + ")");
        }
        if (dk % 8 != 0 || dk > 512) {
            fail("layer " + std::to_string(il) + ": head size " + std::to_string(dk) + " (kvsieve needs a multiple of 8 up to 512)");
        }
        if (hk == 0 || h % hk != 0) {
            fail("layer " + std::to_string(il) + ": query heads not a multiple of KV heads");
        }
        ks->probe_layer = (int) il;
        if (first) {
            ks->n_head = h; ks->n_head_kv = hk; ks->head_dim = dk;
            first = false;
        } else if (ks->n_head != h || ks->n_head_kv != hk || ks->head_dim != dk) {
            fail("layers with different head counts or head sizes are not supported");
        }
    }
    if (first) {
        fail("the model has no layer with a KV cache");
    }
    ks->soft_cap = hp.attn_soft_cap ? hp.f_attn_logit_softcapping : 0.0f;

    // the policy, checked by kvsieve, then read back in its canonical form
    kvsieve_policy_t * pol = nullptr;
    if (kvsieve_error_t * e = kvsieve_policy_parse(text.c_str(), &pol)) {
        fail(take_error(e));
    }
    if (kvsieve_error_t * e = kvsieve_policy_validate(pol, ks->n_layer, ks->n_head_kv)) {
        kvsieve_policy_free(pol);
        fail(take_error(e));
    }
    size_t size = 0;
    kvsieve_error_t * e = kvsieve_policy_to_string(pol, nullptr, 0, &size);
    std::string canon(size, '\0');
    if (!e) {
        e = kvsieve_policy_to_string(pol, canon.data(), canon.size(), nullptr);
    }
    kvsieve_policy_free(pol);
    if (e) {
        fail(take_error(e));
    }
    canon.resize(std::strlen(canon.c_str()));
    ks->text = canon;

    const std::vector<std::string> clauses = split(canon, ';');
    ks->specs.assign(ks->n_layer, parse_spec(clauses[0]));
    for (size_t i = 1; i < clauses.size(); ++i) {
        const std::string & c = clauses[i];
        const size_t colon = c.find(':');
        if (c.rfind("heads=", 0) == 0) {
            fail("`" + c + "`: per-head clauses are not supported here (one spec per layer)");
        }
        if (c.rfind("layers=", 0) != 0 || colon == std::string::npos) {
            fail("`" + c + "`: expected `layers=...:spec`");
        }
        const layer_spec sp = parse_spec(c.substr(colon + 1));
        for (const auto & [a, b] : parse_layers(c.substr(7, colon - 7))) {
            for (uint32_t il = a; il < b && il < ks->n_layer; ++il) {
                ks->specs[il] = sp;
            }
        }
    }
    for (const auto & sp : ks->specs) {
        ks->all_dense    = ks->all_dense && sp.dense;
        ks->any_pages    = ks->any_pages || (!sp.dense && sp.pages > 0);
        ks->any_clusters = ks->any_clusters || (!sp.dense && sp.clusters > 0);
    }
    if (const char * seed = std::getenv("LLAMA_KVSIEVE_SEED")) {
        ks->seed = std::strtoull(seed, nullptr, 10);
    }
    if (const char * st = std::getenv("LLAMA_KVSIEVE_STATS")) {
        ks->stats = std::atoi(st) != 0;
    }
    if (const char * ck = std::getenv("LLAMA_KVSIEVE_CHECK")) {
        ks->check_pages = std::atoi(ck) != 0;
    }
    if (const char * pf = std::getenv("LLAMA_KVSIEVE_PREFILL")) {
        const std::string v = pf;
        if (v != "kvsieve" && v != "llama") {
            fail("LLAMA_KVSIEVE_PREFILL=" + v + ": expected `kvsieve` or `llama`");
        }
        ks->prefill_kvsieve = v == "kvsieve";
    }

    // kvsieve reads V rows token-major: keep the V cache as flash attention does
    cparams.flash_attn = true;
    cparams.auto_fa    = false;

    // kvsieve's worker threads follow the context's thread count unless set explicitly
    // (read when kvsieve first runs, once per process)
    if (std::getenv("RAYON_NUM_THREADS") == nullptr && cparams.n_threads > 0) {
        setenv("RAYON_NUM_THREADS", std::to_string(cparams.n_threads).c_str(), 0);
    }

    LLAMA_LOG_INFO("%s: attention through kvsieve %s (isa %s), policy `%s`, prefill through %s\n", __func__,
            kvsieve_version(), kvsieve_isa(), ks->text.c_str(), ks->prefill_kvsieve ? "kvsieve" : "llama.cpp (flash attention)");
    return ks;
}

void llama_kvsieve_attach(llama_kvsieve & ks, llama_memory_i * memory) {
    auto * kv = dynamic_cast<llama_kv_cache *>(memory);
    if (kv == nullptr) {
        fail("the context's memory is not a single KV cache (sliding-window, hybrid and recurrent memories are not supported)");
    }
    if (kv->type_k() != kv->type_v()) {
        fail("K and V caches of different types are not supported");
    }
    switch (kv->type_k()) {
        case GGML_TYPE_F16:  ks.dtype = KVSIEVE_DTYPE_F16;  break;
        case GGML_TYPE_BF16: ks.dtype = KVSIEVE_DTYPE_BF16; break;
        case GGML_TYPE_F32:  ks.dtype = KVSIEVE_DTYPE_F32;  break;
        default:
            fail(std::string("cache type ") + ggml_type_name(kv->type_k()) + " is not supported (f16, bf16 or f32)");
    }
    ks.kv       = kv;
    ks.kv_size  = kv->get_size();
    ks.n_stream = kv->get_n_stream();
    if (ks.kv_size % BOUNDS_PAGE != 0) {
        fail("KV cache size not a multiple of " + std::to_string(BOUNDS_PAGE));
    }
    if (ks.any_pages) {
        const size_t n_pages = (size_t) ks.kv_size * ks.n_stream / BOUNDS_PAGE;
        ks.bounds_f16 = kv->type_k() == GGML_TYPE_F16;
        const size_t esize = ks.bounds_f16 ? sizeof(uint16_t) : sizeof(float);
        ks.bounds.resize(ks.n_layer);
        ks.bounds_sig.resize(ks.n_layer);
        for (uint32_t il = 0; il < ks.n_layer; ++il) {
            if (!ks.specs[il].dense && ks.specs[il].pages > 0) {
                ks.bounds[il].assign(n_pages * ks.n_head_kv * 2 * ks.head_dim * esize, 0);
                ks.bounds_sig[il].assign(n_pages, 0);
            }
        }
    }
}

ggml_tensor * llama_kvsieve_build_attn(
        const llm_graph_context & g,
        const llm_graph_input_attn_kv * inp,
        ggml_tensor * q,
        ggml_tensor * k,
        ggml_tensor * v,
        ggml_tensor * kq_b,
        ggml_tensor * sinks,
        ggml_tensor * v_mla,
        float kq_scale,
        int il) {
    const auto & ks = g.cparams.kvsieve;
    if (kq_b || sinks || v_mla) {
        throw std::runtime_error("LLAMA_KVSIEVE: attention with a KQ bias, attention sinks or MLA is not supported");
    }
    if (g.cparams.training) {
        throw std::runtime_error("LLAMA_KVSIEVE: training is not supported");
    }
    GGML_ASSERT(ks && ks->kv && "llama_kvsieve_attach not called");
    GGML_ASSERT(q->type == GGML_TYPE_F32);
    GGML_ASSERT(q->ne[0] == ks->head_dim && q->ne[1] == ks->n_head);
    GGML_ASSERT(k->ne[0] == ks->head_dim && k->ne[1] == ks->n_head_kv);
    GGML_ASSERT(v->nb[1] <= v->nb[2] && "kvsieve needs the V cache token-major");

    const bool decode = is_decode(g.ubatch, g.cparams.causal_attn);

    // one input per graph: the layers are built in order, so a layer not above the last one
    // seen starts a new graph
    static thread_local const void * last_res = nullptr;
    static thread_local int last_il = -1;
    static thread_local llm_graph_input_kvsieve * cur = nullptr;
    if (g.res != last_res || il <= last_il || cur == nullptr) {
        auto input = std::make_unique<llm_graph_input_kvsieve>(ks, g.cparams.causal_attn, decode);
        cur = input.get();
        g.res->add_input(std::move(input));
        last_res = g.res;
    }
    last_il = il;

    if (!decode && !ks->prefill_kvsieve) {
        // prefill through llama.cpp's attention (flash attention over the token-major V cache);
        // the input above still tracks which cells the ubatch writes
        return g.build_attn_mha(q, k, v, kq_b, inp->get_kq_mask(), sinks, v_mla, 0, kq_scale, il);
    }

    llama_kvsieve_layer_op * op = cur->add_layer(il, kq_scale);

    ggml_tensor * args[3] = { q, k, v };
    ggml_tensor * out = ggml_custom_4d(g.ctx0, GGML_TYPE_F32, q->ne[0], q->ne[1], q->ne[2], 1, args, 3,
            kvsieve_attn_op, GGML_N_TASKS_MAX, op);
    ggml_format_name(out, "kvsieve_attn-%d", il);

    out = ggml_reshape_2d(g.ctx0, out, out->ne[0] * out->ne[1], out->ne[2]);
    ggml_build_forward_expand(g.gf, out);
    return out;
}
