//! `kvsieve-fuzz [--seconds N] [--seed S] [DRIVER...]`: runs the seeded random drivers
//! (`policy`, `file`, `selection`, `capi`; all by default) for N seconds in all (default 60), split
//! evenly, and prints what each ran and found. Inputs that crash, hang or get a wrong answer
//! are written to `fuzz/regressions/<driver>/` (replayed by `cargo test -p kvsieve-fuzz`)
//! and make the exit status 1.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use kvsieve_fuzz::rng::Rng;
use kvsieve_fuzz::{capi, file, policy, run, selection, Outcome};

fn keep(driver: &str, name: String, bytes: &[u8]) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("regressions").join(driver);
    std::fs::create_dir_all(&dir).expect("regressions folder");
    let path = dir.join(name);
    std::fs::write(&path, bytes).expect("write regression input");
    path
}

#[derive(Default)]
struct Tally {
    cases: u64,
    bad: u64,
}

impl Tally {
    fn record(&mut self, driver: &str, seed: u64, outcome: Outcome, input: impl FnOnce() -> (String, Vec<u8>)) {
        self.cases += 1;
        if outcome != Outcome::Ok {
            self.bad += 1;
            let (name, bytes) = input();
            let path = keep(driver, name, &bytes);
            eprintln!("{driver}: seed {seed}: {outcome:?}; input kept in {}", path.display());
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut seconds = 60u64;
    let mut seed = 0x006b_7673_6965_7665_u64;
    let mut drivers = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--seconds" => seconds = it.next().and_then(|s| s.parse().ok()).expect("--seconds N"),
            "--seed" => seed = it.next().and_then(|s| s.parse().ok()).expect("--seed S"),
            d @ ("policy" | "file" | "selection" | "capi") => drivers.push(d.to_string()),
            other => panic!(
                "unknown argument {other:?}: expected --seconds N, --seed S or a driver (policy, file, selection, capi)"
            ),
        }
    }
    if drivers.is_empty() {
        drivers = vec!["policy".into(), "file".into(), "selection".into(), "capi".into()];
    }
    // Panics are expected to be caught and counted; keep their messages short.
    std::panic::set_hook(Box::new(|info| eprintln!("panic: {info}")));
    let budget = Duration::from_secs(seconds) / drivers.len() as u32;
    let mut failed = false;
    for driver in &drivers {
        let end = Instant::now() + budget;
        let mut tally = Tally::default();
        let mut s = seed;
        let calls0 = capi::CALLS.load(std::sync::atomic::Ordering::Relaxed);
        let files = if driver == "file" { file::seeds() } else { Vec::new() };
        while Instant::now() < end {
            s = s.wrapping_add(1);
            let mut r = Rng(s);
            match driver.as_str() {
                "policy" => {
                    let text = policy::generate(&mut r);
                    let (layers, heads) = policy::shape(&mut r);
                    let out = run(|| policy::check(&text, layers, heads));
                    tally.record(driver, s, out, || {
                        (format!("{s}.txt"), format!("{layers} {heads}\n{text}").into_bytes())
                    });
                }
                "file" => {
                    let (base, d) = r.pick(&files).clone();
                    let bytes = file::mutate(&base, &mut r);
                    let out = run(|| file::check(&bytes, d));
                    tally.record(driver, s, out, || (format!("{s}-d{d}.safetensors"), bytes.clone()));
                }
                "capi" => {
                    let out = run(|| capi::check(s));
                    tally.record(driver, s, out, || (format!("{s}.txt"), format!("{s}\n").into_bytes()));
                }
                _ => {
                    let (n, indptr, indices) = selection::generate(&mut r);
                    let input = format!("{n}\n{indptr:?}\n{indices:?}\n");
                    let out = run(|| selection::check(n, indptr, indices));
                    tally.record(driver, s, out, || (format!("{s}.txt"), input.into_bytes()));
                }
            }
        }
        let calls = capi::CALLS.load(std::sync::atomic::Ordering::Relaxed) - calls0;
        let calls = if driver == "capi" { format!(" ({calls} C calls)") } else { String::new() };
        println!(
            "{driver}: {} inputs{calls} in {:.0} s, {} crashes, hangs or wrong answers",
            tally.cases,
            budget.as_secs_f64(),
            tally.bad
        );
        failed |= tally.bad > 0;
    }
    std::process::exit(i32::from(failed));
}
