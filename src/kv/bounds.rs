//! Per page, layer and KV head: the min and max of every key channel over the page's
//! written slots (Quest's page bounds). Stored in the cache dtype, so they are exact.

use crate::config::CacheConfig;
use crate::dtype::{load_f32, store_f32};
use crate::error::Result;
use crate::kv::storage::Buffer;

pub(crate) struct KeyBounds {
    /// Per layer: `[page][head][min|max][head_dim]` in the cache dtype.
    data: Vec<Buffer>,
    /// Per layer: written-slot bitmap, `words` u64 per page.
    written: Vec<Vec<u64>>,
    words: usize,
}

impl KeyBounds {
    /// Hash of every stored byte (tests compare states with it).
    #[cfg(test)]
    pub fn fingerprint(&self, h: &mut impl std::hash::Hasher) {
        use std::hash::Hash;
        self.data.iter().for_each(|b| b.bytes().hash(h));
        self.written.hash(h);
    }

    pub fn new(cfg: &CacheConfig) -> Result<Self> {
        let per_page = cfg.num_kv_heads * 2 * cfg.head_dim;
        let words = cfg.page_size.div_ceil(64);
        let bytes = cfg.capacity_pages * per_page * cfg.dtype.size();
        Ok(KeyBounds {
            data: (0..cfg.num_layers).map(|_| Buffer::zeroed(bytes, "key bounds")).collect::<Result<_>>()?,
            written: (0..cfg.num_layers)
                .map(|_| crate::alloc::zeroed_vec(cfg.capacity_pages * words, "key bound slot masks"))
                .collect::<Result<_>>()?,
            words,
        })
    }

    fn per_page(cfg: &CacheConfig) -> usize {
        cfg.num_kv_heads * 2 * cfg.head_dim
    }

    /// Mark every slot of `page` unwritten and its bounds empty (min = +inf, max = -inf), all layers.
    pub fn clear_page(&mut self, cfg: &CacheConfig, page: usize) {
        for layer in 0..cfg.num_layers {
            self.written[layer][page * self.words..(page + 1) * self.words].fill(0);
            self.set_empty(cfg, layer, page);
        }
    }

    fn set_empty(&mut self, cfg: &CacheConfig, layer: usize, page: usize) {
        let d = cfg.head_dim;
        let base = page * Self::per_page(cfg);
        let bytes = self.data[layer].bytes_mut();
        for h in 0..cfg.num_kv_heads {
            for c in 0..d {
                store_f32(bytes, cfg.dtype, base + h * 2 * d + c, f32::INFINITY);
                store_f32(bytes, cfg.dtype, base + h * 2 * d + d + c, f32::NEG_INFINITY);
            }
        }
    }

    /// Copy bounds and written bits of `src` to `dst`, all layers.
    pub fn copy_page(&mut self, cfg: &CacheConfig, src: usize, dst: usize) {
        let n = Self::per_page(cfg) * cfg.dtype.size();
        for layer in 0..cfg.num_layers {
            self.data[layer].bytes_mut().copy_within(src * n..(src + 1) * n, dst * n);
            self.written[layer].copy_within(src * self.words..(src + 1) * self.words, dst * self.words);
        }
    }

    pub fn is_written(&self, layer: usize, page: usize, slot: usize) -> bool {
        self.written[layer][page * self.words + slot / 64] >> (slot % 64) & 1 == 1
    }

    /// Fold the key just stored at (page, slot) into the bounds. Returns false when the slot
    /// had been written before: then the page needs [`KeyBounds::recompute`].
    pub fn note_write(
        &mut self,
        cfg: &CacheConfig,
        layer: usize,
        page: usize,
        slot: usize,
        keys: &[u8],
        key_offsets: &[usize],
    ) -> bool {
        let w = &mut self.written[layer][page * self.words + slot / 64];
        let bit = 1u64 << (slot % 64);
        if *w & bit != 0 {
            return false;
        }
        *w |= bit;
        let d = cfg.head_dim;
        let base = page * Self::per_page(cfg);
        let bytes = self.data[layer].bytes_mut();
        for (h, &off) in key_offsets.iter().enumerate() {
            for c in 0..d {
                let x = load_f32(keys, cfg.dtype, off + c);
                let mi = base + h * 2 * d + c;
                if x < load_f32(bytes, cfg.dtype, mi) {
                    store_f32(bytes, cfg.dtype, mi, x);
                }
                if x > load_f32(bytes, cfg.dtype, mi + d) {
                    store_f32(bytes, cfg.dtype, mi + d, x);
                }
            }
        }
        true
    }

    /// Forget slots `keep..` of `page` in every layer, and recompute the bounds from the keys.
    pub fn truncate_page(&mut self, cfg: &CacheConfig, page: usize, keep: usize, keys: &[Buffer]) {
        for (layer, layer_keys) in keys.iter().enumerate().take(cfg.num_layers) {
            for slot in keep..cfg.page_size {
                self.written[layer][page * self.words + slot / 64] &= !(1u64 << (slot % 64));
            }
            self.recompute(cfg, layer, page, layer_keys.bytes());
        }
    }

    /// Recompute the bounds of (layer, page) from the stored keys of its written slots.
    pub fn recompute(&mut self, cfg: &CacheConfig, layer: usize, page: usize, keys: &[u8]) {
        self.set_empty(cfg, layer, page);
        let strides = cfg.strides();
        for slot in 0..cfg.page_size {
            if !self.is_written(layer, page, slot) {
                continue;
            }
            // Clear the bit so note_write folds the slot in, then set it again.
            self.written[layer][page * self.words + slot / 64] &= !(1u64 << (slot % 64));
            let offs: Vec<usize> =
                (0..cfg.num_kv_heads).map(|h| page * strides[0] + slot * strides[1] + h * strides[2]).collect();
            self.note_write(cfg, layer, page, slot, keys, &offs);
        }
    }

    /// Bounds of (layer, page, head) as f32: (min, max), each `head_dim` long.
    pub fn get(&self, cfg: &CacheConfig, layer: usize, page: usize, head: usize) -> (Vec<f32>, Vec<f32>) {
        let d = cfg.head_dim;
        let base = page * Self::per_page(cfg) + head * 2 * d;
        let bytes = self.data[layer].bytes();
        let min = (0..d).map(|c| load_f32(bytes, cfg.dtype, base + c)).collect();
        let max = (0..d).map(|c| load_f32(bytes, cfg.dtype, base + d + c)).collect();
        (min, max)
    }

    /// Raw bounds of one layer: `[page][head][min|max][head_dim]` in the cache dtype.
    pub fn layer_bytes(&self, layer: usize) -> &[u8] {
        self.data[layer].bytes()
    }

    pub fn bytes(&self) -> usize {
        self.data.iter().map(|b| b.bytes().len()).sum::<usize>()
            + self.written.iter().map(|w| w.len() * 8).sum::<usize>()
    }
}
