//! Helpers shared by the integration tests.
#![allow(dead_code)]

use kvsieve::attention::reference::RefState;
use kvsieve::{CacheConfig, KvCache, SeqId, TensorView};

/// Small deterministic generator (SplitMix64) for test data.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform() * scale).collect()
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// Create a sequence of `len` random tokens, written for every layer. Returns its id.
pub fn fill_sequence(cache: &mut KvCache, len: usize, rng: &mut Rng, scale: f32) -> SeqId {
    let c = *cache.config();
    let id = cache.create_sequence();
    cache.append(id, len, None).unwrap();
    let n = len * c.num_kv_heads * c.head_dim;
    for layer in 0..c.num_layers {
        let k = rng.vec(n, scale);
        let v = rng.vec(n, 1.0);
        let shape = [len, c.num_kv_heads, c.head_dim];
        cache
            .write(id, layer, 0, &TensorView::new(&k, &shape).unwrap(), &TensorView::new(&v, &shape).unwrap())
            .unwrap();
    }
    id
}

/// Largest absolute difference between kvsieve's output/LSE and the reference's.
pub fn max_err(out: &[f32], lse: &[f32], refs: &[RefState]) -> (f64, f64) {
    let mut eo = 0f64;
    let mut el = 0f64;
    let per = refs[0].out.len();
    let heads = refs[0].lse.len();
    for (i, r) in refs.iter().enumerate() {
        for (a, b) in out[i * per..(i + 1) * per].iter().zip(&r.out) {
            eo = eo.max((*a as f64 - b).abs());
        }
        for (a, b) in lse[i * heads..(i + 1) * heads].iter().zip(&r.lse) {
            if b.is_infinite() {
                assert!(a.is_infinite(), "lse {a} where the reference has {b}");
            } else {
                el = el.max((*a as f64 - b).abs());
            }
        }
    }
    (eo, el)
}

pub fn config(layers: usize, kv_heads: usize, head_dim: usize, page_size: usize, pages: usize) -> CacheConfig {
    CacheConfig::new(layers, kv_heads, head_dim, page_size, pages)
}
