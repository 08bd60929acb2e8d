//! Store a prompt's K and V in a kvsieve cache, then decode one token.
//!
//! Run: `cargo run --release --example 01_store_and_decode`
//!
//! An engine does the same per layer: after computing the prompt's keys (with RoPE) and
//! values, it appends slots for the tokens, writes K/V of every layer, and at each decode
//! step appends one slot, writes that token's K/V, and calls `decode` with the query.

use kvsieve::attention::AttentionParams;
use kvsieve::{CacheConfig, DType, KvCache, TensorView, TensorViewMut};

fn main() -> kvsieve::Result<()> {
    // A small model: 2 layers, 4 KV heads, 16 query heads (GQA 4), head_dim 64.
    let (layers, kv_heads, q_heads, head_dim) = (2, 4, 16, 64);
    let cfg = CacheConfig::new(layers, kv_heads, head_dim, 16, 256).with_dtype(DType::F16);
    let mut cache = KvCache::new(cfg)?;

    // 1. The prompt: 100 tokens. Append their slots, then write K/V for every layer.
    let prompt_len = 100;
    let seq = cache.create_sequence();
    let slots = cache.append(seq, prompt_len, None)?;
    println!("prompt slots: first {} last {}", slots[0], slots[prompt_len - 1]);
    let mut x = 1u32;
    let mut rand = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| {
                x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (x >> 8) as f32 / (1 << 24) as f32 - 0.5
            })
            .collect()
    };
    let shape = [prompt_len, kv_heads, head_dim];
    for layer in 0..layers {
        let (k, v) = (rand(prompt_len * kv_heads * head_dim), rand(prompt_len * kv_heads * head_dim));
        cache.write(seq, layer, 0, &TensorView::new(&k, &shape)?, &TensorView::new(&v, &shape)?)?;
    }

    // 2. One decode step: append the new token, write its K/V, attend with its query.
    cache.append(seq, 1, None)?;
    let one = [1, kv_heads, head_dim];
    for layer in 0..layers {
        let (k, v) = (rand(kv_heads * head_dim), rand(kv_heads * head_dim));
        cache.write(seq, layer, prompt_len, &TensorView::new(&k, &one)?, &TensorView::new(&v, &one)?)?;
        let q = rand(q_heads * head_dim);
        let mut out = vec![0f32; q_heads * head_dim];
        let mut lse = vec![0f32; q_heads];
        cache.decode(
            layer,
            &[seq],
            &TensorView::new(&q, &[1, q_heads, head_dim])?,
            &mut TensorViewMut::new(&mut out, &[1, q_heads, head_dim])?,
            Some(&mut lse),
            &AttentionParams::default(),
        )?;
        println!("layer {layer}: out[0][0..4] = {:?}, lse[0] = {:.4}", &out[..4], lse[0]);
    }

    let st = cache.stats();
    println!(
        "sequence length {}, pages used {}/{}, {} bytes of K/V in use",
        cache.seq_len(seq)?,
        st.pages_used,
        st.pages_total,
        st.bytes_used
    );
    Ok(())
}
