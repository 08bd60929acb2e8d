mod common;
use common::*;
use kvsieve::attention::{reference, AttentionParams};
use kvsieve::{DType, TensorView, TensorViewMut};

#[test]
fn decode_matches_reference_smoke() {
    let mut rng = Rng(1);
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let mut cache = kvsieve::KvCache::new(config(1, 2, 64, 16, 64).with_dtype(dtype)).unwrap();
        let ids: Vec<_> = [37usize, 300, 1].iter().map(|&n| fill_sequence(&mut cache, n, &mut rng, 1.0)).collect();
        let hq = 8;
        let q = rng.vec(3 * hq * 64, 1.0);
        let qv = TensorView::new(&q, &[3, hq, 64]).unwrap();
        let mut out = vec![f32::NAN; 3 * hq * 64];
        let mut lse = vec![f32::NAN; 3 * hq];
        let p = AttentionParams { chunk_size: Some(64), ..Default::default() };
        cache.decode(0, &ids, &qv, &mut TensorViewMut::new(&mut out, &[3, hq, 64]).unwrap(), Some(&mut lse), &p).unwrap();
        let table = cache.page_table(&ids).unwrap();
        let kv = cache.layer_view(0, &table).unwrap();
        let refs = reference::decode(&kv, &qv, &p).unwrap();
        let (eo, el) = max_err(&out, &lse, &refs);
        assert!(eo < 1e-4 && el < 1e-4, "{dtype}: {eo} {el}");
    }
}
