//! Natural text for the tasks: the King James Bible (public domain), written to the cache
//! folder by `examples/llama/scripts/fetch-text.sh` from Debian's `bible-kjv-text`.

use std::path::PathBuf;

use crate::engine::Result;

/// Where fetch-text.sh leaves the text.
pub fn kjv_path() -> PathBuf {
    crate::default_model_path().with_file_name("kjv.txt")
}

/// The KJV, one verse per line; runs fetch-text.sh when the file is missing.
pub fn kjv() -> Result<String> {
    let path = kjv_path();
    if !path.exists() {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/fetch-text.sh");
        let status = std::process::Command::new("bash").arg(script).stdout(std::process::Stdio::null()).status()?;
        if !status.success() {
            return Err(format!("{script} failed ({status})").into());
        }
    }
    Ok(std::fs::read_to_string(&path)?)
}

/// A deterministic pseudo-random generator (SplitMix64) so every task is seeded.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo)
    }
}
