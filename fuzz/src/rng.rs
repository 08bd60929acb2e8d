//! A small deterministic generator (SplitMix64), so every input is reproducible from its seed.

pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
    pub fn chance(&mut self, p: f64) -> bool {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
    pub fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len() as u64) as usize]
    }
    /// A size that is usually small, sometimes at a boundary, sometimes huge.
    pub fn size(&mut self) -> u64 {
        match self.below(10) {
            0 => *self.pick(&[0, 1, u32::MAX as u64, u32::MAX as u64 + 1, u64::MAX, i64::MAX as u64, 1 << 40]),
            1..=2 => self.below(1 << 20),
            _ => self.below(64),
        }
    }
}
