//! Reading keys for clustering: rows of one KV head, as f32, from a cache's pages (through
//! [`PagedKv`], no intermediate copy of the layer) or from a key tensor, refusing NaN and
//! infinite values with the token and head named.

use rayon::prelude::*;

use crate::config::{validate_head_dim, KeyRope};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::kv::PagedKv;
use crate::select::KeySource;
use crate::tensor::TensorView;
use crate::{bf16, f16};

/// Keys of one (sequence, layer): `n` tokens × `num_kv_heads` heads × `head_dim` channels.
pub(crate) struct KeyRows<'a> {
    pub n: usize,
    pub hk: usize,
    pub d: usize,
    src: Src<'a>,
}

enum Src<'a> {
    Paged(PagedKv<'a>),
    Tensor(&'a TensorView<'a>),
}

/// Run `f` over the keys of `src` (the cache's page table lives for the call).
pub(crate) fn with_keys<R>(src: KeySource<'_>, f: impl FnOnce(&KeyRows<'_>) -> Result<R>) -> Result<R> {
    match src {
        KeySource::Cache { cache, seq, layer } => {
            let table = cache.page_table(&[seq])?;
            let kv = cache.layer_view(layer, &table)?;
            if kv.key_rope() == KeyRope::PreRope {
                return Err(Error::invalid(
                    "keys",
                    "keys stored after RoPE (clusters are scored against decode queries after RoPE), but this cache stores them before RoPE",
                ));
            }
            let rows = KeyRows { n: kv.seq_len(0), hk: kv.num_kv_heads(), d: kv.head_dim(), src: Src::Paged(kv) };
            f(&rows)
        }
        KeySource::Tensor(t) => {
            if t.shape().len() != 3 {
                return Err(Error::shape("keys", "[n, num_kv_heads, head_dim]", format!("{:?}", t.shape())));
            }
            let (n, hk, d) = (t.shape()[0], t.shape()[1], t.shape()[2]);
            if hk == 0 {
                return Err(Error::shape("keys", "[n, num_kv_heads >= 1, head_dim]", format!("{:?}", t.shape())));
            }
            validate_head_dim(d)?;
            f(&KeyRows { n, hk, d, src: Src::Tensor(t) })
        }
    }
}

/// Convert one stored row to f32.
fn row_to_f32(bytes: &[u8], dtype: DType, out: &mut [f32]) {
    match dtype {
        DType::F32 => bytes
            .chunks_exact(4)
            .zip(out.iter_mut())
            .for_each(|(b, o)| *o = f32::from_ne_bytes([b[0], b[1], b[2], b[3]])),
        DType::F16 => bytes
            .chunks_exact(2)
            .zip(out.iter_mut())
            .for_each(|(b, o)| *o = f16::from_bits(u16::from_ne_bytes([b[0], b[1]])).to_f32()),
        DType::BF16 => bytes
            .chunks_exact(2)
            .zip(out.iter_mut())
            .for_each(|(b, o)| *o = bf16::from_bits(u16::from_ne_bytes([b[0], b[1]])).to_f32()),
    }
}

impl KeyRows<'_> {
    /// Keys of head `h` for tokens `range`, as f32 rows `[range.len()][d]`. Errors on the
    /// first (lowest) token holding a NaN or infinite channel, or when the rows cannot be
    /// allocated.
    pub(crate) fn read(&self, h: usize, range: std::ops::Range<usize>) -> Result<Vec<f32>> {
        let d = self.d;
        let mut out = crate::alloc::zeroed_vec(crate::alloc::mul(range.len(), d, "keys")?, "keys")?;
        const CHUNK: usize = 256;
        out.par_chunks_mut(CHUNK * d).enumerate().for_each(|(ci, rows)| {
            for (j, row) in rows.chunks_exact_mut(d).enumerate() {
                let t = range.start + ci * CHUNK + j;
                match &self.src {
                    Src::Paged(kv) => {
                        let (page, slot) = kv.locate(0, t);
                        let size = kv.dtype().size();
                        // SAFETY: `k_ptr` addresses a full key row of `d` elements of the view's
                        // dtype for any token of the table (PagedKv's contract).
                        let bytes = unsafe { std::slice::from_raw_parts(kv.k_ptr(page, slot, h), d * size) };
                        row_to_f32(bytes, kv.dtype(), row);
                    }
                    Src::Tensor(tv) => tv.read_row(&[t, h], row),
                }
            }
        });
        if let Some(bad) = out.iter().position(|x| !x.is_finite()) {
            let (t, c) = (range.start + bad / d, bad % d);
            return Err(Error::invalid(
                "keys",
                format!("finite values, but the key of token {t}, KV head {h} holds {} at channel {c}", out[bad]),
            ));
        }
        Ok(out)
    }
}
