//! Dequantisation of GGML tensor blocks to f32.
//!
//! Block layouts (little endian, 32 values per quantised block):
//! - Q4_0: f16 `d`, 16 bytes of nibbles; value = `d * (q - 8)`.
//! - Q4_1: f16 `d`, f16 `m`, 16 bytes of nibbles; value = `d * q + m`.
//! - Q8_0: f16 `d`, 32 × i8; value = `d * q`.
//!
//! In the 4-bit types byte `j` holds element `j` in its low nibble and element `j + 16`
//! in its high nibble.

use half::f16;
use rayon::prelude::*;

use crate::gguf::GgmlType;

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

fn q4_0_block(b: &[u8], out: &mut [f32]) {
    let d = f16_at(b, 0);
    for j in 0..16 {
        let q = b[2 + j];
        out[j] = d * ((q & 0x0f) as f32 - 8.0);
        out[j + 16] = d * ((q >> 4) as f32 - 8.0);
    }
}

fn q4_1_block(b: &[u8], out: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    for j in 0..16 {
        let q = b[4 + j];
        out[j] = d * (q & 0x0f) as f32 + m;
        out[j + 16] = d * (q >> 4) as f32 + m;
    }
}

fn q8_0_block(b: &[u8], out: &mut [f32]) {
    let d = f16_at(b, 0);
    for j in 0..32 {
        out[j] = d * (b[2 + j] as i8) as f32;
    }
}

/// Dequantise `bytes` of type `ty` into `out` (its length is the element count).
pub fn dequantize(ty: GgmlType, bytes: &[u8], out: &mut [f32]) -> Result<(), String> {
    let (be, bb) = ty.block().ok_or_else(|| format!("GGML type {ty:?} is not supported"))?;
    if !out.len().is_multiple_of(be) || bytes.len() != out.len() / be * bb {
        return Err(format!(
            "{} elements of {ty:?} need {} bytes, got {}",
            out.len(),
            out.len() / be * bb,
            bytes.len()
        ));
    }
    match ty {
        GgmlType::F32 => out
            .par_iter_mut()
            .zip(bytes.par_chunks_exact(4))
            .for_each(|(o, b)| *o = f32::from_le_bytes(b.try_into().unwrap())),
        GgmlType::F16 => out.par_iter_mut().zip(bytes.par_chunks_exact(2)).for_each(|(o, b)| *o = f16_at(b, 0)),
        GgmlType::Q4_0 => {
            out.par_chunks_exact_mut(32).zip(bytes.par_chunks_exact(bb)).for_each(|(o, b)| q4_0_block(b, o))
        }
        GgmlType::Q4_1 => {
            out.par_chunks_exact_mut(32).zip(bytes.par_chunks_exact(bb)).for_each(|(o, b)| q4_1_block(b, o))
        }
        GgmlType::Q8_0 => {
            out.par_chunks_exact_mut(32).zip(bytes.par_chunks_exact(bb)).for_each(|(o, b)| q8_0_block(b, o))
        }
        GgmlType::Other(_) => unreachable!("block() is None for other types"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(x: f32) -> [u8; 2] {
        f16::from_f32(x).to_le_bytes()
    }

    #[test]
    fn q4_1_layout() {
        let mut b = Vec::new();
        b.extend(h(0.5));
        b.extend(h(-1.0));
        b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let mut out = [0f32; 32];
        dequantize(GgmlType::Q4_1, &b, &mut out).unwrap();
        for j in 0..16 {
            assert_eq!(out[j], 0.5 * j as f32 - 1.0);
            assert_eq!(out[j + 16], 0.5 * (15 - j) as f32 - 1.0);
        }
    }

    #[test]
    fn q8_0_layout() {
        let mut b = Vec::new();
        b.extend(h(0.25));
        b.extend((0..32).map(|j| (j as i8 - 16) as u8));
        let mut out = [0f32; 32];
        dequantize(GgmlType::Q8_0, &b, &mut out).unwrap();
        for (j, &o) in out.iter().enumerate() {
            assert_eq!(o, 0.25 * (j as f32 - 16.0));
        }
    }

    #[test]
    fn q4_0_layout() {
        let mut b = Vec::new();
        b.extend(h(2.0));
        b.extend((0..16u8).map(|j| j | (3 << 4)));
        let mut out = [0f32; 32];
        dequantize(GgmlType::Q4_0, &b, &mut out).unwrap();
        for j in 0..16 {
            assert_eq!(out[j], 2.0 * (j as f32 - 8.0));
            assert_eq!(out[j + 16], 2.0 * -5.0);
        }
    }

    #[test]
    fn wrong_length_is_an_error() {
        let mut out = [0f32; 32];
        assert!(dequantize(GgmlType::Q4_1, &[0u8; 19], &mut out).is_err());
    }
}
