//! Selections from CSR arrays: random `head_indptr` / `indices` (well formed, slightly
//! broken and arbitrary) and sequence lengths up to the u32 limit. `Selection::from_csr`
//! must accept exactly the arrays that meet its documented rules, and an accepted
//! selection must read back as given and unite with itself and a dense selection as sets do.

use kvsieve::{ErrorCode, Selection};

use crate::rng::Rng;

/// One input: (seq_len, head_indptr, indices).
pub fn generate(r: &mut Rng) -> (usize, Vec<u32>, Vec<u32>) {
    let heads = if r.chance(0.05) { 0 } else { 1 + r.below(6) as usize };
    let seq_len = match r.below(6) {
        0 => *r.pick(&[0usize, 1, u32::MAX as usize, u32::MAX as usize + 1]),
        _ => r.below(300) as usize,
    };
    let mut indptr = vec![0u32];
    let mut indices = Vec::new();
    for _ in 0..heads {
        let n = r.below(20);
        let mut t = r.below(4) as u32;
        for _ in 0..n {
            indices.push(t);
            t = t.saturating_add(1 + r.below(5) as u32);
        }
        indptr.push(indices.len() as u32);
    }
    // Break it sometimes.
    for _ in 0..r.below(3) {
        match r.below(5) {
            0 if !indptr.is_empty() => {
                let i = r.below(indptr.len() as u64) as usize;
                indptr[i] = r.size() as u32;
            }
            1 if !indices.is_empty() => {
                let i = r.below(indices.len() as u64) as usize;
                indices[i] = r.size() as u32;
            }
            2 => {
                indices.pop();
            }
            3 => {
                indptr.pop();
            }
            _ => indices.push(r.size() as u32),
        }
    }
    (seq_len, indptr, indices)
}

/// Whether the arrays meet the documented rules.
fn valid(seq_len: usize, indptr: &[u32], indices: &[u32]) -> bool {
    seq_len <= u32::MAX as usize
        && indptr.len() >= 2
        && indptr.len() - 1 <= kvsieve::config::MAX_KV_HEADS
        && indptr[0] == 0
        && indptr.windows(2).all(|w| w[0] <= w[1])
        && *indptr.last().unwrap() as usize == indices.len()
        && indptr.windows(2).all(|w| {
            let h = &indices[w[0] as usize..w[1] as usize];
            h.windows(2).all(|p| p[0] < p[1]) && h.iter().all(|&t| (t as usize) < seq_len)
        })
}

/// Check one input (see the module docs).
pub fn check(seq_len: usize, indptr: Vec<u32>, indices: Vec<u32>) -> Result<(), String> {
    let expect = valid(seq_len, &indptr, &indices);
    match Selection::from_csr(seq_len, indptr.clone(), indices.clone()) {
        Err(e)
            if !expect && matches!(e.code(), ErrorCode::InvalidArgument | ErrorCode::Shape | ErrorCode::OutOfRange) =>
        {
            Ok(())
        }
        Err(e) => Err(format!(
            "from_csr({seq_len}, {indptr:?}, {indices:?}) refused valid arrays or with the wrong kind: {e}"
        )),
        Ok(_) if !expect => {
            Err(format!("from_csr({seq_len}, {indptr:?}, {indices:?}) accepted arrays that break the rules"))
        }
        Ok(s) => {
            if s.head_indptr() != &indptr[..] || s.indices() != &indices[..] || s.seq_len() != seq_len {
                return Err("an accepted selection does not read back as given".into());
            }
            let u = s.union(&s).map_err(|e| e.to_string())?;
            if u != s {
                return Err("a selection united with itself changed".into());
            }
            if seq_len <= 4096 {
                let dense = Selection::dense(s.num_kv_heads(), seq_len).map_err(|e| e.to_string())?;
                if s.union(&dense).map_err(|e| e.to_string())? != dense {
                    return Err("a selection united with the dense one is not the dense one".into());
                }
            }
            Ok(())
        }
    }
}
