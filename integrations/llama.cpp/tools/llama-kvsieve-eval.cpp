// llama-kvsieve-eval: checks and timings of llama.cpp with attention through kvsieve.
//
// The attention mode of each context comes from LLAMA_KVSIEVE (read when a context is
// created); `--mode` sets it for the run ("stock" unsets it).
//
//   top     -m MODEL -p PROMPT [-k 5] [--one-by-one]
//           next-token top-k (probabilities) after PROMPT, prefilled or decoded token by token
//   passkey -m MODEL [--context 4096] [--trials 20] [--seed 1] [--modes "dense;POLICY"]
//           passkey retrieval built as examples/llama builds it (same text, keys, depths):
//           the context is prefilled, the question decoded token by token, 7 answer tokens
//           generated greedily (llama.cpp's greedy sampler); the prefill is shared by the
//           modes (a state copy), or --mode runs one mode with its own prefill
//   bench   -m MODEL --depths 4096,8192 --modes "stock-fa;stock-nofa;dense;POLICY" [-n 32] [-r 3]
//           decode tokens/s after a context of each depth: the context (random tokens) is
//           prefilled once (stock flash attention, or KVSIEVE_BENCH_PREFILL=MODE) and copied
//           into a fresh context for each mode (llama_state_seq_get/set_data; for
//           stock-nofa with V transposed); one untimed decode step (it builds the cluster
//           indexes of clusters= policies), then r runs of n decode steps, generation going on
//   multiseq -m MODEL --text FILE --modes "REF;MODE..." [--context 1024] [-n 16] [--unified 0|1]
//           4 sequences (stretches of FILE) prefilled one by one, then decoded together one
//           token each per step (teacher forcing, rotating order in the batch; interleaved
//           cells with --unified 1, one stream each with 0); every mode's logits against REF
//   dump    -m MODEL -p PROMPT --tensor NAME --out FILE   (writes a graph tensor, f32)
//
// Common options: -t THREADS (2), --mode MODE, --fa on|off (stock only), -c N_CTX, --kv f16|f32|bf16.

#include "llama.h"
#include "ggml.h"
#include "ggml-backend.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <random>
#include <string>
#include <vector>

namespace {

struct args {
    std::string cmd;
    std::string model;
    std::string prompt = "The capital of France is";
    std::string mode   = "";        // empty: leave LLAMA_KVSIEVE as it is
    std::string fa     = "auto";
    std::string kv_type = "f16";
    std::string tensor, out;
    std::string depths = "4096";
    std::string modes  = "stock-fa;dense";
    int threads = 2;
    int top_k = 5;
    int context = 4096;
    int trials = 20;
    uint64_t seed = 1;
    int n_gen = 32;
    int reps = 3;
    int n_ctx = 0;
    int n_batch = 2048;
    bool verbose = false;
    bool one_by_one = false;
    bool unified = true;
    std::string text;
};

[[noreturn]] void die(const char * fmt, const char * a = "") {
    std::fprintf(stderr, "llama-kvsieve-eval: ");
    std::fprintf(stderr, fmt, a);
    std::fprintf(stderr, "\n");
    std::exit(1);
}

args parse(int argc, char ** argv) {
    args a;
    if (argc < 2) {
        die("usage: llama-kvsieve-eval top|passkey|bench|dump -m MODEL [options] (see the source's header)");
    }
    a.cmd = argv[1];
    for (int i = 2; i < argc; ++i) {
        std::string k = argv[i];
        auto val = [&]() -> std::string {
            if (i + 1 >= argc) die("missing value after %s", k.c_str());
            return argv[++i];
        };
        if      (k == "-m") a.model = val();
        else if (k == "-p") a.prompt = val();
        else if (k == "-t") a.threads = std::stoi(val());
        else if (k == "-k") a.top_k = std::stoi(val());
        else if (k == "-c") a.n_ctx = std::stoi(val());
        else if (k == "-b") a.n_batch = std::stoi(val());
        else if (k == "-n") a.n_gen = std::stoi(val());
        else if (k == "-r") a.reps = std::stoi(val());
        else if (k == "--mode") a.mode = val();
        else if (k == "--fa") a.fa = val();
        else if (k == "--kv") a.kv_type = val();
        else if (k == "--tensor") a.tensor = val();
        else if (k == "--out") a.out = val();
        else if (k == "--context") a.context = std::stoi(val());
        else if (k == "--trials") a.trials = std::stoi(val());
        else if (k == "--seed") a.seed = std::stoull(val());
        else if (k == "--depths") a.depths = val();
        else if (k == "--modes") a.modes = val();
        else if (k == "-v") a.verbose = true;
        else if (k == "--one-by-one") a.one_by_one = true;
        else if (k == "--unified") a.unified = std::stoi(val()) != 0;
        else if (k == "--text") a.text = val();
        else die("unknown option %s", k.c_str());
    }
    if (a.model.empty()) die("-m MODEL is required");
    return a;
}

bool g_verbose = false;

void log_cb(ggml_log_level level, const char * text, void *) {
    if (g_verbose || level >= GGML_LOG_LEVEL_WARN) {
        std::fputs(text, stderr);
    }
}

// "stock-fa", "stock-nofa", "stock" (flash attention as --fa says), "dense", or a policy.
void set_mode(const std::string & mode) {
    if (mode.rfind("stock", 0) == 0) {
        unsetenv("LLAMA_KVSIEVE");
    } else if (!mode.empty()) {
        setenv("LLAMA_KVSIEVE", mode.c_str(), 1);
    }
}

llama_flash_attn_type fa_of(const std::string & mode, const std::string & fa) {
    if (mode == "stock-fa") return LLAMA_FLASH_ATTN_TYPE_ENABLED;
    if (mode == "stock-nofa") return LLAMA_FLASH_ATTN_TYPE_DISABLED;
    if (fa == "on") return LLAMA_FLASH_ATTN_TYPE_ENABLED;
    if (fa == "off") return LLAMA_FLASH_ATTN_TYPE_DISABLED;
    return LLAMA_FLASH_ATTN_TYPE_AUTO;
}

llama_context * make_ctx(llama_model * model, const args & a, const std::string & mode, int n_ctx,
                         ggml_backend_sched_eval_callback cb = nullptr, void * cb_data = nullptr) {
    set_mode(mode);
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx           = (uint32_t) n_ctx;
    cp.n_batch         = (uint32_t) std::min(a.n_batch, n_ctx);
    cp.n_ubatch        = std::min<uint32_t>(512, cp.n_batch);
    cp.n_threads       = a.threads;
    cp.n_threads_batch = a.threads;
    cp.flash_attn_type = fa_of(mode, a.fa);
    cp.no_perf         = true;
    cp.type_k = cp.type_v = a.kv_type == "f32" ? GGML_TYPE_F32 : a.kv_type == "bf16" ? GGML_TYPE_BF16 : GGML_TYPE_F16;
    cp.cb_eval           = cb;
    cp.cb_eval_user_data = cb_data;
    llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) die("cannot create a context for mode `%s`", mode.c_str());
    return ctx;
}

std::vector<llama_token> tokenize(const llama_vocab * vocab, const std::string & text, bool add_special) {
    int n = -llama_tokenize(vocab, text.c_str(), (int32_t) text.size(), nullptr, 0, add_special, true);
    std::vector<llama_token> out(n);
    if (llama_tokenize(vocab, text.c_str(), (int32_t) text.size(), out.data(), n, add_special, true) != n) {
        die("tokenization failed");
    }
    return out;
}

std::string piece(const llama_vocab * vocab, llama_token t) {
    char buf[256];
    int n = llama_token_to_piece(vocab, t, buf, sizeof(buf), 0, true);
    return n > 0 ? std::string(buf, n) : std::string();
}

std::string json_str(const std::string & s) {
    std::string o = "\"";
    for (char c : s) {
        if (c == '"' || c == '\\') { o += '\\'; o += c; }
        else if (c == '\n') o += "\\n";
        else if ((unsigned char) c < 0x20) { char b[8]; std::snprintf(b, sizeof b, "\\u%04x", c); o += b; }
        else o += c;
    }
    return o + "\"";
}

// Decode `toks` (positions from pos0) in batches of n_batch; logits for the last token only.
void decode_tokens(llama_context * ctx, const std::vector<llama_token> & toks, int pos0, int n_batch) {
    llama_batch b = llama_batch_init(n_batch, 0, 1);
    for (size_t i = 0; i < toks.size(); i += n_batch) {
        const size_t n = std::min<size_t>(n_batch, toks.size() - i);
        b.n_tokens = (int32_t) n;
        for (size_t j = 0; j < n; ++j) {
            b.token[j]     = toks[i + j];
            b.pos[j]       = (llama_pos) (pos0 + i + j);
            b.n_seq_id[j]  = 1;
            b.seq_id[j][0] = 0;
            b.logits[j]    = (i + j + 1 == toks.size());
        }
        if (llama_decode(ctx, b) != 0) die("llama_decode failed");
    }
    llama_batch_free(b);
}

//
// top
//

int cmd_top(llama_model * model, const args & a) {
    const llama_vocab * vocab = llama_model_get_vocab(model);
    std::vector<llama_token> toks = tokenize(vocab, a.prompt, true);
    llama_context * ctx = make_ctx(model, a, a.mode, a.n_ctx ? a.n_ctx : 512);
    if (a.one_by_one) {
        for (size_t i = 0; i < toks.size(); ++i) {
            decode_tokens(ctx, { toks[i] }, (int) i, 1);
        }
    } else {
        decode_tokens(ctx, toks, 0, a.n_batch);
    }
    const float * logits = llama_get_logits_ith(ctx, -1);
    const int nv = llama_vocab_n_tokens(vocab);
    double mx = -1e300;
    for (int i = 0; i < nv; ++i) mx = std::max(mx, (double) logits[i]);
    double z = 0;
    for (int i = 0; i < nv; ++i) z += std::exp((double) logits[i] - mx);
    std::vector<int> idx(nv);
    for (int i = 0; i < nv; ++i) idx[i] = i;
    std::partial_sort(idx.begin(), idx.begin() + a.top_k, idx.end(), [&](int x, int y) { return logits[x] > logits[y]; });
    std::printf("{\"prompt\":%s,\"tokens\":[", json_str(a.prompt).c_str());
    for (int i = 0; i < a.top_k; ++i) std::printf("%s%s", i ? "," : "", json_str(piece(vocab, idx[i])).c_str());
    std::printf("],\"probs\":[");
    for (int i = 0; i < a.top_k; ++i) std::printf("%s%.6f", i ? "," : "", std::exp((double) logits[idx[i]] - mx) / z);
    std::printf("]}\n");
    llama_free(ctx);
    return 0;
}

//
// passkey, as examples/llama/src/tasks.rs builds it
//

struct rng {
    uint64_t s;
    uint64_t next() {
        s += 0x9e3779b97f4a7c15ULL;
        uint64_t z = s;
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
        return z ^ (z >> 31);
    }
    uint64_t range(uint64_t lo, uint64_t hi) { return lo + next() % (hi - lo); }
};

const char * PASSKEY_INTRO =
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. I will quiz you about the important information there.\n";
const char * PASSKEY_FILLER =
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n";

std::string repeat(const std::string & s, size_t n) {
    std::string o;
    o.reserve(s.size() * n);
    for (size_t i = 0; i < n; ++i) o += s;
    return o;
}

std::vector<std::string> split(const std::string & s, char sep);

int cmd_passkey(llama_model * model, const args & a) {
    const llama_vocab * vocab = llama_model_get_vocab(model);
    const std::vector<llama_token> question = tokenize(vocab, "What is the pass key? The pass key is", true);
    const int answer_tokens = 7;
    const size_t per = tokenize(vocab, PASSKEY_FILLER, true).size();
    const size_t intro = tokenize(vocab, PASSKEY_INTRO, true).size();
    const int n_ctx = a.n_ctx ? a.n_ctx : a.context + 256;

    // the context is prefilled once per trial (stock flash attention, as kvsieve modes
    // prefill through it unless LLAMA_KVSIEVE_PREFILL=kvsieve) and copied into each mode's
    // context; --mode runs one mode with its own prefill
    const bool shared = a.mode.empty();
    const std::vector<std::string> modes = shared ? split(a.modes, ';') : std::vector<std::string>{ a.mode };
    std::vector<llama_context *> ctxs;
    for (const auto & m : modes) {
        ctxs.push_back(make_ctx(model, a, m, n_ctx));
    }
    llama_context * pctx = shared ? make_ctx(model, a, "stock-fa", n_ctx) : nullptr;
    llama_sampler * greedy = llama_sampler_init_greedy();
    std::vector<int> correct(modes.size(), 0);
    for (int i = 0; i < a.trials; ++i) {
        const uint64_t seed = a.seed + 1000ULL * (uint64_t) a.context + (uint64_t) i;
        const double depth = (i + 0.5) / a.trials;
        rng r{ seed };
        const std::string key = std::to_string(r.range(10000, 100000));
        const std::string fact = "The pass key is " + key + ". Remember it. " + key + " is the pass key.\n";
        const size_t fixed = intro + tokenize(vocab, fact, true).size();
        const size_t reps = a.context > (int) fixed ? (a.context - fixed) / per : 0;
        const size_t at = std::min<size_t>((size_t) std::llround(reps * depth), reps);
        std::vector<llama_token> context = tokenize(vocab, std::string(PASSKEY_INTRO) + repeat(PASSKEY_FILLER, at), true);
        for (auto t : tokenize(vocab, fact, true)) context.push_back(t);
        for (auto t : tokenize(vocab, repeat(PASSKEY_FILLER, reps - at), true)) context.push_back(t);

        std::vector<uint8_t> state;
        if (shared) {
            llama_memory_clear(llama_get_memory(pctx), true);
            decode_tokens(pctx, context, 0, a.n_batch);
            state.resize(llama_state_seq_get_size(pctx, 0));
            llama_state_seq_get_data(pctx, state.data(), state.size(), 0);
        }
        for (size_t m = 0; m < modes.size(); ++m) {
            llama_context * ctx = ctxs[m];
            llama_memory_clear(llama_get_memory(ctx), true);
            if (shared) {
                if (llama_state_seq_set_data(ctx, state.data(), state.size(), 0) != state.size()) {
                    die("cannot restore the context for mode `%s`", modes[m].c_str());
                }
            } else {
                decode_tokens(ctx, context, 0, a.n_batch);
            }
            int pos = (int) context.size();
            for (llama_token t : question) {
                decode_tokens(ctx, { t }, pos++, 1);
            }
            std::string gen;
            for (int k = 0; k < answer_tokens; ++k) {
                const llama_token t = llama_sampler_sample(greedy, ctx, -1);
                gen += piece(vocab, t);
                if (k + 1 < answer_tokens) {
                    decode_tokens(ctx, { t }, pos++, 1);
                }
            }
            std::string digits;
            size_t p = 0;
            while (p < gen.size() && !std::isdigit((unsigned char) gen[p])) ++p;
            while (p < gen.size() && std::isdigit((unsigned char) gen[p])) digits += gen[p++];
            const bool ok = digits == key;
            correct[m] += ok;
            std::printf("{\"mode\":%s,\"trial\":%d,\"depth\":%.4f,\"context_tokens\":%zu,\"key\":\"%s\",\"generated\":%s,\"correct\":%s}\n",
                    json_str(modes[m]).c_str(), i, depth, context.size(), key.c_str(), json_str(gen).c_str(), ok ? "true" : "false");
            std::fflush(stdout);
        }
    }
    for (size_t m = 0; m < modes.size(); ++m) {
        std::printf("{\"mode\":%s,\"passkey\":%d,\"trials\":%d,\"context\":%d}\n", json_str(modes[m]).c_str(), correct[m], a.trials, a.context);
        llama_free(ctxs[m]);
    }
    if (pctx) llama_free(pctx);
    llama_sampler_free(greedy);
    return 0;
}

//
// bench
//

std::vector<std::string> split(const std::string & s, char sep) {
    std::vector<std::string> out;
    size_t st = 0;
    while (true) {
        size_t p = s.find(sep, st);
        std::string part = s.substr(st, p == std::string::npos ? std::string::npos : p - st);
        if (!part.empty()) out.push_back(part);
        if (p == std::string::npos) break;
        st = p + 1;
    }
    return out;
}

double now_s() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// A sequence's state (llama_state_seq_get_data of a single-stream llama KV cache) with V
// token-major, rewritten with V transposed: the layout of a context without flash attention.
std::vector<uint8_t> transpose_v(const std::vector<uint8_t> & in) {
    size_t off = 0;
    auto rd = [&](void * dst, size_t n) {
        if (off + n > in.size()) die("state blob too short");
        std::memcpy(dst, in.data() + off, n);
        off += n;
    };
    uint32_t magic = 0, n_stream = 0, cell_count = 0;
    int32_t seq = 0;
    rd(&magic, 4);
    rd(&seq, 4);
    rd(&n_stream, 4);
    rd(&cell_count, 4);
    if (n_stream != 1 || cell_count == 0) die("state blob: one stream with cells expected");
    for (uint32_t c = 0; c < cell_count; ++c) {
        int32_t pos; uint32_t n_seq;
        rd(&pos, 4); rd(&n_seq, 4);
        off += 4ull * n_seq;
    }
    const size_t head = off;
    uint32_t v_trans = 0, n_layer = 0;
    rd(&v_trans, 4);
    rd(&n_layer, 4);
    if (v_trans != 0) die("state blob: V already transposed");
    for (uint32_t l = 0; l < n_layer; ++l) {
        int32_t type; uint64_t row;
        rd(&type, 4); rd(&row, 8);
        off += row * cell_count;
    }
    std::vector<uint8_t> out(in.begin(), in.begin() + off);
    const uint32_t one = 1;
    std::memcpy(out.data() + head, &one, 4);
    for (uint32_t l = 0; l < n_layer; ++l) {
        int32_t type; uint64_t row;
        rd(&type, 4); rd(&row, 8);
        const uint32_t el = (uint32_t) ggml_type_size((ggml_type) type);
        const uint32_t n_embd = (uint32_t) (row / el);
        const size_t at = out.size();
        out.resize(at + 12 + (size_t) row * cell_count);
        std::memcpy(out.data() + at, &type, 4);
        std::memcpy(out.data() + at + 4, &el, 4);
        std::memcpy(out.data() + at + 8, &n_embd, 4);
        uint8_t * dst = out.data() + at + 12;
        const uint8_t * src = in.data() + off;
        for (uint32_t j = 0; j < n_embd; ++j) {
            for (uint32_t c = 0; c < cell_count; ++c) {
                std::memcpy(dst + ((size_t) j * cell_count + c) * el, src + (size_t) c * row + (size_t) j * el, el);
            }
        }
        off += row * cell_count;
    }
    if (off != in.size()) die("state blob: unexpected trailing data");
    return out;
}

int cmd_bench(llama_model * model, const args & a) {
    const llama_vocab * vocab = llama_model_get_vocab(model);
    const int nv = llama_vocab_n_tokens(vocab);
    const std::vector<std::string> modes = split(a.modes, ';');
    const std::string pmode = getenv("KVSIEVE_BENCH_PREFILL") ? getenv("KVSIEVE_BENCH_PREFILL") : "stock-fa";
    for (const std::string & ds : split(a.depths, ',')) {
        const int depth = std::stoi(ds);
        const int n_steps = 1 + a.reps * a.n_gen;
        const int n_ctx = depth + n_steps + 256;
        std::mt19937 gen(1234 + depth);
        std::vector<llama_token> ctx_toks(depth);
        for (auto & t : ctx_toks) t = (llama_token) (gen() % nv);
        std::vector<llama_token> gen_toks(n_steps);
        for (auto & t : gen_toks) t = (llama_token) (gen() % nv);

        // one prefill (token-major V), copied into a fresh context for each mode; the
        // transposed-V layout of stock without flash attention is made from it
        std::vector<uint8_t> state_tm, state_tr;
        // KVSIEVE_BENCH_STATE_DIR: keep the prefilled state in a file per depth and reuse it
        const char * sdir = getenv("KVSIEVE_BENCH_STATE_DIR");
        const std::string spath = sdir ? std::string(sdir) + "/state-" + std::to_string(depth) + ".bin" : "";
        if (sdir) {
            if (FILE * f = std::fopen(spath.c_str(), "rb")) {
                std::fseek(f, 0, SEEK_END);
                state_tm.resize(std::ftell(f));
                std::fseek(f, 0, SEEK_SET);
                if (std::fread(state_tm.data(), 1, state_tm.size(), f) != state_tm.size()) state_tm.clear();
                std::fclose(f);
            }
        }
        if (state_tm.empty()) {
            llama_context * ctx = make_ctx(model, a, pmode, n_ctx);
            const double t0 = now_s();
            decode_tokens(ctx, ctx_toks, 0, a.n_batch);
            const double dt = now_s() - t0;
            state_tm.resize(llama_state_seq_get_size(ctx, 0));
            llama_state_seq_get_data(ctx, state_tm.data(), state_tm.size(), 0);
            std::printf("{\"depth\":%d,\"prefill_mode\":%s,\"prefill_s\":%.3f,\"prefill_tok_s\":%.1f}\n",
                    depth, json_str(pmode).c_str(), dt, depth / dt);
            std::fflush(stdout);
            llama_free(ctx);
            if (sdir) {
                FILE * f = std::fopen(spath.c_str(), "wb");
                if (f) {
                    std::fwrite(state_tm.data(), 1, state_tm.size(), f);
                    std::fclose(f);
                }
            }
        }

        for (const std::string & mode : modes) {
            const bool trans = mode == "stock-nofa";
            if (trans && state_tr.empty()) {
                state_tr = transpose_v(state_tm);
            }
            llama_context * ctx = make_ctx(model, a, mode, n_ctx);
            const auto & buf = trans ? state_tr : state_tm;
            if (llama_state_seq_set_data(ctx, buf.data(), buf.size(), 0) != buf.size()) {
                die("cannot restore the prefilled state for mode `%s`", mode.c_str());
            }
            // the first step is not timed: it builds the cluster indexes of clusters= policies
            const double t0 = now_s();
            decode_tokens(ctx, { gen_toks[0] }, depth, 1);
            const double first = now_s() - t0;
            // then reps runs of n_gen steps, generation going on (positions keep growing)
            std::vector<double> tps;
            int pos = depth + 1;
            for (int r = 0; r < a.reps; ++r) {
                const double t1 = now_s();
                for (int i = 0; i < a.n_gen; ++i, ++pos) {
                    decode_tokens(ctx, { gen_toks[pos - depth] }, pos, 1);
                }
                llama_synchronize(ctx);
                tps.push_back(a.n_gen / (now_s() - t1));
            }
            double mean = 0;
            for (double x : tps) mean += x;
            mean /= tps.size();
            double sd = 0;
            for (double x : tps) sd += (x - mean) * (x - mean);
            sd = tps.size() > 1 ? std::sqrt(sd / (tps.size() - 1)) : 0.0;
            std::printf("{\"depth\":%d,\"mode\":%s,\"n_gen\":%d,\"first_step_s\":%.4f,\"tok_s\":[", depth, json_str(mode).c_str(), a.n_gen, first);
            for (size_t i = 0; i < tps.size(); ++i) std::printf("%s%.3f", i ? "," : "", tps[i]);
            std::printf("],\"mean\":%.3f,\"sd\":%.3f,\"min\":%.3f,\"max\":%.3f}\n", mean, sd,
                    *std::min_element(tps.begin(), tps.end()), *std::max_element(tps.begin(), tps.end()));
            std::fflush(stdout);
            llama_free(ctx);
        }
    }
    return 0;
}

struct dump_state {
    std::string name;
    std::vector<float> data;
    std::vector<int64_t> ne;
};

bool dump_cb(struct ggml_tensor * t, bool ask, void * ud) {
    auto * st = (dump_state *) ud;
    if (ask) {
        return st->name == ggml_get_name(t);
    }
    if (st->name == ggml_get_name(t) && t->type == GGML_TYPE_F32) {
        st->data.resize(ggml_nelements(t));
        ggml_backend_tensor_get(t, st->data.data(), 0, ggml_nbytes(t));
        st->ne.assign(t->ne, t->ne + 4);
    }
    return true;
}

//
// multiseq: several sequences decoded together, each mode against the first
//

int cmd_multiseq(llama_model * model, const args & a, const std::string & text_path) {
    const llama_vocab * vocab = llama_model_get_vocab(model);
    const int nv = llama_vocab_n_tokens(vocab);
    const int n_seq = 4, steps = a.n_gen;
    // prompts: stretches of a text of different lengths, and their continuations (teacher forcing)
    std::string text;
    {
        FILE * f = std::fopen(text_path.c_str(), "rb");
        if (!f) die("cannot read %s", text_path.c_str());
        char buf[1 << 16];
        size_t n;
        while ((n = std::fread(buf, 1, sizeof buf, f)) > 0 && text.size() < (1u << 20)) text.append(buf, n);
        std::fclose(f);
    }
    const std::vector<llama_token> all = tokenize(vocab, text, false);
    std::vector<std::vector<llama_token>> prompt(n_seq), cont(n_seq);
    for (int q = 0; q < n_seq; ++q) {
        const size_t off = 2000 * (size_t) q, len = (size_t) (a.context / 4) * (q + 1) / 2 + 37 * q;
        if (off + len + steps > all.size()) die("text too short");
        prompt[q].assign(all.begin() + off, all.begin() + off + len);
        cont[q].assign(all.begin() + off + len, all.begin() + off + len + steps);
    }
    const std::vector<std::string> modes = split(a.modes, ';');
    std::vector<std::vector<float>> logits(modes.size());
    std::vector<dump_state> attn0(modes.size());
    for (size_t m = 0; m < modes.size(); ++m) {
        attn0[m].name = "kqv_out-0";
        set_mode(modes[m]);
        llama_context_params cp = llama_context_default_params();
        cp.n_ctx = (uint32_t) (a.context * 2 + 1024);
        cp.n_batch = cp.n_ubatch = 512;
        cp.n_seq_max = n_seq;
        cp.kv_unified = a.unified;
        cp.n_threads = cp.n_threads_batch = a.threads;
        cp.flash_attn_type = fa_of(modes[m], a.fa);
        cp.type_k = cp.type_v = a.kv_type == "f32" ? GGML_TYPE_F32 : GGML_TYPE_F16;
        cp.cb_eval = dump_cb;
        cp.cb_eval_user_data = &attn0[m];
        llama_context * ctx = llama_init_from_model(model, cp);
        if (!ctx) die("cannot create a context for `%s`", modes[m].c_str());
        llama_batch b = llama_batch_init(512, 0, n_seq);
        for (int q = 0; q < n_seq; ++q) {
            for (size_t i = 0; i < prompt[q].size(); i += 512) {
                b.n_tokens = 0;
                for (size_t j = i; j < std::min(prompt[q].size(), i + 512); ++j) {
                    const int k = b.n_tokens++;
                    b.token[k] = prompt[q][j]; b.pos[k] = (llama_pos) j; b.n_seq_id[k] = 1; b.seq_id[k][0] = q; b.logits[k] = 0;
                }
                if (llama_decode(ctx, b) != 0) die("llama_decode failed");
            }
        }
        // decode steps: one token of every sequence per batch, in a rotating order
        for (int s = 0; s < steps; ++s) {
            b.n_tokens = 0;
            for (int k = 0; k < n_seq; ++k) {
                const int q = (k + s) % n_seq;
                const llama_token t = s == 0 ? prompt[q].back() : cont[q][s - 1];
                const llama_pos p = (llama_pos) (prompt[q].size() + s - 1);
                if (s == 0) {
                    // the prompt's last token again, at its own position: remove it first
                    llama_memory_seq_rm(llama_get_memory(ctx), q, p, -1);
                }
                b.token[k] = t; b.pos[k] = p; b.n_seq_id[k] = 1; b.seq_id[k][0] = q; b.logits[k] = 1;
                b.n_tokens++;
            }
            if (llama_decode(ctx, b) != 0) die("llama_decode failed");
            for (int q = 0; q < n_seq; ++q) {
                const int k = ((q - s) % n_seq + n_seq) % n_seq;
                const float * l = llama_get_logits_ith(ctx, k);
                logits[m].insert(logits[m].end(), l, l + nv);
            }
        }
        llama_batch_free(b);
        llama_free(ctx);
    }
    // each mode against the first: largest logit difference, argmax agreement, mean KL
    for (size_t m = 1; m < modes.size(); ++m) {
        double max_diff = 0, kl_sum = 0;
        int agree = 0, total = 0;
        for (size_t r = 0; r < logits[0].size() / nv; ++r) {
            const float * x = logits[0].data() + r * nv;
            const float * y = logits[m].data() + r * nv;
            double mx = -1e300, my = -1e300;
            int ax = 0, ay = 0;
            for (int i = 0; i < nv; ++i) {
                max_diff = std::max(max_diff, (double) std::fabs(x[i] - y[i]));
                if (x[i] > mx) { mx = x[i]; ax = i; }
                if (y[i] > my) { my = y[i]; ay = i; }
            }
            double zx = 0, zy = 0;
            for (int i = 0; i < nv; ++i) { zx += std::exp(x[i] - mx); zy += std::exp(y[i] - my); }
            double kl = 0;
            for (int i = 0; i < nv; ++i) {
                const double px = std::exp(x[i] - mx) / zx;
                const double lx = x[i] - mx - std::log(zx), ly = y[i] - my - std::log(zy);
                kl += px * (lx - ly);
            }
            kl_sum += kl;
            agree += ax == ay;
            total++;
        }
        // layer 0's attention output at the last step: same inputs in every mode
        double attn_diff = 0;
        for (size_t i = 0; i < attn0[0].data.size() && i < attn0[m].data.size(); ++i) {
            attn_diff = std::max(attn_diff, (double) std::fabs(attn0[0].data[i] - attn0[m].data[i]));
        }
        std::printf("{\"reference\":%s,\"mode\":%s,\"kv\":%s,\"unified\":%s,\"sequences\":%d,\"steps\":%d,"
                    "\"layer0_attn_max_diff\":%.3g,\"max_logit_diff\":%.5f,\"argmax_agree\":%d,\"of\":%d,\"mean_kl\":%.3g}\n",
                json_str(modes[0]).c_str(), json_str(modes[m]).c_str(), json_str(a.kv_type).c_str(), a.unified ? "true" : "false",
                n_seq, steps, attn_diff, max_diff, agree, total, kl_sum / total);
    }
    return 0;
}

//
// dump
//

int cmd_dump(llama_model * model, const args & a) {
    const llama_vocab * vocab = llama_model_get_vocab(model);
    std::vector<llama_token> toks = tokenize(vocab, a.prompt, true);
    dump_state st{ a.tensor, {}, {} };
    llama_context * ctx = make_ctx(model, a, a.mode, a.n_ctx ? a.n_ctx : 512, dump_cb, &st);
    decode_tokens(ctx, toks, 0, a.n_batch);
    if (st.data.empty()) die("tensor %s not seen (or not f32)", a.tensor.c_str());
    FILE * f = std::fopen(a.out.c_str(), "wb");
    std::fwrite(st.data.data(), sizeof(float), st.data.size(), f);
    std::fclose(f);
    std::printf("{\"tensor\":%s,\"ne\":[%lld,%lld,%lld,%lld]}\n", json_str(a.tensor).c_str(),
            (long long) st.ne[0], (long long) st.ne[1], (long long) st.ne[2], (long long) st.ne[3]);
    llama_free(ctx);
    return 0;
}

} // namespace

int main(int argc, char ** argv) {
    args a = parse(argc, argv);
    g_verbose = a.verbose;
    llama_log_set(log_cb, nullptr);
    llama_backend_init();
    llama_model_params mp = llama_model_default_params();
    mp.progress_callback = [](float, void *) { return true; };
    llama_model * model = llama_model_load_from_file(a.model.c_str(), mp);
    if (!model) die("cannot load %s", a.model.c_str());
    int rc = 1;
    if      (a.cmd == "top")     rc = cmd_top(model, a);
    else if (a.cmd == "passkey") rc = cmd_passkey(model, a);
    else if (a.cmd == "bench")   rc = cmd_bench(model, a);
    else if (a.cmd == "dump")    rc = cmd_dump(model, a);
    else if (a.cmd == "multiseq") rc = cmd_multiseq(model, a, a.text);
    else die("unknown command %s", a.cmd.c_str());
    llama_model_free(model);
    llama_backend_free();
    return rc;
}
