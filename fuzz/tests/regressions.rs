//! Every input the drivers ever kept (`fuzz/regressions/<driver>/`) runs again and must now
//! pass its driver's check.

use std::path::Path;

use kvsieve_fuzz::{capi, file, policy, run, selection, Outcome};

fn inputs(driver: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("regressions").join(driver);
    let Ok(entries) = std::fs::read_dir(&dir) else { return Vec::new() };
    let mut v: Vec<(String, Vec<u8>)> = entries
        .map(|e| e.expect("entry").path())
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap()))
        .collect();
    v.sort();
    v
}

fn parse_list(s: &str) -> Vec<u32> {
    s.trim()
        .trim_matches(|c| c == '[' || c == ']')
        .split(',')
        .filter(|x| !x.trim().is_empty())
        .map(|x| x.trim().parse().unwrap())
        .collect()
}

#[test]
fn kept_inputs_pass() {
    let mut ran = 0;
    for (name, bytes) in inputs("policy") {
        let text = String::from_utf8(bytes).unwrap();
        let (shape, policy_text) = text.split_once('\n').unwrap();
        let (l, h) = shape.split_once(' ').unwrap();
        assert_eq!(
            run(|| policy::check(policy_text, l.parse().unwrap(), h.parse().unwrap())),
            Outcome::Ok,
            "policy {name}"
        );
        ran += 1;
    }
    for (name, bytes) in inputs("file") {
        let d: usize = name.split("-d").nth(1).and_then(|s| s.split('.').next()).and_then(|s| s.parse().ok()).unwrap();
        assert_eq!(run(|| file::check(&bytes, d)), Outcome::Ok, "file {name}");
        ran += 1;
    }
    for (name, bytes) in inputs("selection") {
        let text = String::from_utf8(bytes).unwrap();
        let mut lines = text.lines();
        let n = lines.next().unwrap().parse().unwrap();
        let (indptr, indices) = (parse_list(lines.next().unwrap()), parse_list(lines.next().unwrap()));
        assert_eq!(run(|| selection::check(n, indptr, indices)), Outcome::Ok, "selection {name}");
        ran += 1;
    }
    for (name, bytes) in inputs("capi") {
        let seed = String::from_utf8(bytes).unwrap().trim().parse().unwrap();
        assert_eq!(run(|| capi::check(seed)), Outcome::Ok, "capi {name}");
        ran += 1;
    }
    println!("{ran} kept inputs replayed");
}

/// A short run of every driver finds nothing (the long runs are `scripts/fuzz.sh`'s).
#[test]
fn a_few_thousand_inputs_of_each_driver_pass() {
    let files = file::seeds();
    for s in 0..3000u64 {
        let mut r = kvsieve_fuzz::rng::Rng(s);
        let text = policy::generate(&mut r);
        let (l, h) = policy::shape(&mut r);
        assert_eq!(run(|| policy::check(&text, l, h)), Outcome::Ok, "policy seed {s}: {text:?}");
        let (n, indptr, indices) = selection::generate(&mut r);
        assert_eq!(run(|| selection::check(n, indptr, indices)), Outcome::Ok, "selection seed {s}");
        if s % 10 == 0 {
            let (base, d) = r.pick(&files).clone();
            let bytes = file::mutate(&base, &mut r);
            assert_eq!(run(|| file::check(&bytes, d)), Outcome::Ok, "file seed {s}");
        }
    }
}

/// A few hundred C ABI call sequences match the model.
#[test]
fn a_few_hundred_capi_sequences_pass() {
    for s in 0..400u64 {
        assert_eq!(run(|| capi::check(s)), Outcome::Ok, "capi seed {s}");
    }
}
