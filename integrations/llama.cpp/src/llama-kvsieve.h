#pragma once

// Attention through kvsieve (a paged KV and sparse attention library; see
// integrations/llama.cpp/README.md in kvsieve) over llama.cpp's own KV cache memory.
//
// Enabled per context by the environment variable LLAMA_KVSIEVE, read when the context is
// created:
//   unset, "", "0", "off"   llama.cpp is unchanged
//   "dense" (or "1", "on")  every layer's decode attention is computed by kvsieve over the
//                           K/V cache tensors, through a page table built from the cache's
//                           cells (no copy of the cache)
//   a kvsieve policy text   e.g. "sinks=4,window=1024,pages=2048;layers=0-1:dense": decode
//                           reads only the tokens the policy selects per KV head
// LLAMA_KVSIEVE_PREFILL=kvsieve also computes prefill attention (several tokens of a sequence
// in a ubatch) through kvsieve; by default it is llama.cpp's flash attention over the same
// cache. LLAMA_KVSIEVE_STATS=1 logs counts and times when the context is freed;
// LLAMA_KVSIEVE_CHECK=1 compares page-bound selections with kvsieve's own.
//
// The V cache is kept token-major (as with flash attention) so that kvsieve reads V rows
// in place; the context therefore runs with flash_attn enabled whatever was asked.

#include <memory>

struct ggml_tensor;
struct llama_model;
struct llama_cparams;
struct llama_memory_i;
struct llm_graph_context;
class llm_graph_input_attn_kv;

struct llama_kvsieve;

// Parses LLAMA_KVSIEVE. Returns nullptr when it is unset or off. Otherwise checks that the
// model is one kvsieve can serve and sets the context parameters it needs (token-major V).
// Throws std::runtime_error with the reason when the value or the model is refused.
std::shared_ptr<llama_kvsieve> llama_kvsieve_from_env(const llama_model & model, llama_cparams & cparams);

// Binds the context's memory, once created. Throws std::runtime_error when it is not a
// single llama_kv_cache of f32/f16/bf16 K and V of one type.
void llama_kvsieve_attach(llama_kvsieve & ks, llama_memory_i * memory);

// The attention of layer il: a custom ggml op computing softmax(q k^T * kq_scale) v through
// kvsieve over the layer's K/V cache tensors (k and v are the views llama.cpp's cache
// returns for the layer). Returns [n_embd_head_v * n_head, n_tokens], like build_attn_mha.
ggml_tensor * llama_kvsieve_build_attn(
        const llm_graph_context & gctx,
        const llm_graph_input_attn_kv * inp,
        ggml_tensor * q,
        ggml_tensor * k,
        ggml_tensor * v,
        ggml_tensor * kq_b,
        ggml_tensor * sinks,
        ggml_tensor * v_mla,
        float kq_scale,
        int il);
