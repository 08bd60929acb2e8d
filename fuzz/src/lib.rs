//! Seeded random drivers for kvsieve's untrusted-input paths: the policy text parser, the
//! cluster index file loader, selections built from CSR arrays, and the C ABI's cache calls
//! checked against a model of the cache. Each driver generates
//! inputs from a seed, runs them, and checks that the library answers with a value or an
//! error of the documented kind: never a panic, never a hang, and with round trips that hold.
//!
//! `check_*` functions take one input and return `Err(description)` when the library
//! misbehaves; a panic inside is caught by the caller and counted as a crash. The binary
//! (`src/main.rs`) runs them for a time budget; `tests/regressions.rs` replays every input
//! kept under `fuzz/regressions/`.

pub mod capi;
pub mod file;
pub mod policy;
pub mod rng;
pub mod selection;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

/// What running one input gave.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// The library answered wrongly (a broken round trip, an error of the wrong kind).
    Wrong(String),
    /// It panicked.
    Crash(String),
    /// It took longer than [`SLOW`].
    Hang(Duration),
}

/// An input taking longer than this counts as a hang.
pub const SLOW: Duration = Duration::from_secs(2);

/// Run `check` on one input, catching panics and timing it.
pub fn run(check: impl FnOnce() -> Result<(), String>) -> Outcome {
    let t = Instant::now();
    let r = catch_unwind(AssertUnwindSafe(check));
    let dt = t.elapsed();
    match r {
        Err(p) => Outcome::Crash(
            p.downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default(),
        ),
        Ok(Err(m)) => Outcome::Wrong(m),
        Ok(Ok(())) if dt > SLOW => Outcome::Hang(dt),
        Ok(Ok(())) => Outcome::Ok,
    }
}
