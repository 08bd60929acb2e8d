//! The C headers and the shared library agree: the functions declared by `include/kvsieve.h`
//! and the headers of `include/kvsieve/` it includes (parsed with bindgen, which follows the
//! includes), less the `static inline` functions the headers define, are exactly the symbols
//! the library exports (listed with `nm -D --defined-only`: nothing else, no Rust or
//! dependency symbols), its SONAME is `libkvsieve.so.<major>`, the headers' version macros
//! and enum values match the crate, and every versioned struct (one that begins with
//! `size_t struct_size`) has its `kvsieve_X_init()`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};

use bindgen::callbacks::{EnumVariantValue, IntKind, ParseCallbacks};
use kvsieve::ErrorCode;

mod common;

/// The C API's Rust side (its `#[repr(C)]` structs, constants and entry points), compiled
/// into this test from the crate's source: the crate builds only a cdylib and a staticlib,
/// which a Rust test cannot link against.
#[allow(dead_code, unused_imports)]
#[path = "../src/lib.rs"]
mod capi;

#[derive(Debug, Default)]
struct Seen {
    functions: BTreeSet<String>,
    ints: BTreeMap<String, i64>,
    strings: BTreeMap<String, String>,
    variants: BTreeMap<String, i64>,
}

#[derive(Debug)]
struct Collect(Arc<Mutex<Seen>>);

impl ParseCallbacks for Collect {
    fn int_macro(&self, name: &str, value: i64) -> Option<IntKind> {
        self.0.lock().unwrap().ints.insert(name.to_string(), value);
        None
    }

    fn str_macro(&self, name: &str, value: &[u8]) {
        self.0.lock().unwrap().strings.insert(name.to_string(), String::from_utf8_lossy(value).into_owned());
    }

    fn enum_variant_name(&self, _enum: Option<&str>, name: &str, value: EnumVariantValue) -> Option<String> {
        let v = match value {
            EnumVariantValue::Boolean(b) => i64::from(b),
            EnumVariantValue::Signed(v) => v,
            EnumVariantValue::Unsigned(v) => v as i64,
        };
        self.0.lock().unwrap().variants.insert(name.to_string(), v);
        None
    }
}

/// Parse the umbrella header, and through it every concept header.
fn parse_header() -> Seen {
    let header = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../include/kvsieve.h");
    let seen = Arc::new(Mutex::new(Seen::default()));
    // The functions are read from the bindings bindgen generates for kvsieve's own headers
    // only: the system headers they include (<string.h>, for the static inline initialisers)
    // declare functions of their own.
    let bindings = bindgen::Builder::default()
        .header(header.to_string_lossy())
        .allowlist_file(r".*[/\\]include[/\\]kvsieve(\.h|[/\\].*\.h)")
        .clang_args(["-x", "c", "-std=c99"])
        .parse_callbacks(Box::new(Collect(seen.clone())))
        .generate()
        .unwrap_or_else(|e| panic!("bindgen could not parse {}: {e}", header.display()))
        .to_string();
    let mut seen = std::mem::take(&mut *seen.lock().unwrap());
    seen.functions = bindings
        .split("pub fn ")
        .skip(1)
        .filter_map(|rest| rest.split('(').next())
        .map(|name| name.trim().to_string())
        .collect();
    seen
}

/// The text of the umbrella header and of every header of `include/kvsieve/`.
fn header_texts() -> Vec<(PathBuf, String)> {
    let include = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../include");
    let mut paths = vec![include.join("kvsieve.h")];
    let dir = include.join("kvsieve");
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("read {}: {e}", dir.display())) {
        let path = entry.expect("directory entry").path();
        if path.extension().is_some_and(|x| x == "h") {
            paths.push(path);
        }
    }
    paths.sort();
    paths
        .into_iter()
        .map(|p| (p.clone(), std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))))
        .collect()
}

/// The names of the `static inline` functions the headers define (`static inline` at the start
/// of a line, the name the identifier before the first `(`): compiled into each program, so
/// not exported by the library.
fn inline_functions() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for (path, text) in header_texts() {
        for (i, line) in text.lines().enumerate() {
            if let Some(rest) = line.strip_prefix("static inline ") {
                let head = rest.split('(').next().unwrap_or("");
                let name = head.rsplit(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).next().unwrap_or("");
                assert!(
                    name.starts_with("kvsieve_"),
                    "{}:{}: a static inline function not named kvsieve_*: {line}",
                    path.display(),
                    i + 1
                );
                names.insert(name.to_string());
            }
        }
    }
    names
}

fn exported_symbols() -> BTreeSet<String> {
    let lib = common::built_library();
    let out = Command::new("nm")
        .args(["-D", "--defined-only"])
        .arg(lib)
        .output()
        .unwrap_or_else(|e| panic!("run nm on {}: {e}", lib.display()));
    assert!(out.status.success(), "nm failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().last())
        .map(str::to_string)
        .collect()
}

#[test]
fn header_declares_exactly_the_exported_functions() {
    let inline = inline_functions();
    assert!(inline.len() >= 10, "expected the static inline initialisers, found {inline:?}");
    // bindgen may or may not list the inline functions; they are the header's, not the library's.
    let declared: BTreeSet<String> = parse_header().functions.into_iter().filter(|f| !inline.contains(f)).collect();
    let exported = exported_symbols();
    assert!(declared.len() > 10, "bindgen found only {} functions in the header: {declared:?}", declared.len());
    let exported_inline: Vec<&String> = inline.intersection(&exported).collect();
    assert!(
        exported_inline.is_empty(),
        "the library exports functions the headers define as static inline: {exported_inline:?}"
    );
    let undeclared: Vec<&String> = exported.difference(&declared).collect();
    let missing: Vec<&String> = declared.difference(&exported).collect();
    assert!(
        undeclared.is_empty() && missing.is_empty(),
        "headers and library disagree\nexported but not declared by include/kvsieve.h or the headers it includes \
         (the version script crates/kvsieve-c/exports.map exports `kvsieve_*` only): {undeclared:#?}\n\
         declared but not exported by the library: {missing:#?}"
    );
    println!("{} functions declared and exported, {} static inline in the headers", declared.len(), inline.len());
}

/// Every struct whose first member is `size_t struct_size;` has a `static inline void
/// kvsieve_X_init(kvsieve_X_t *)`, and nothing else has a `struct_size`.
#[test]
fn every_versioned_struct_has_an_init_function() {
    let inline = inline_functions();
    let mut versioned = Vec::new();
    let mut problems = Vec::new();
    for (path, text) in header_texts() {
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let Some(name) = line.strip_prefix("typedef struct ").and_then(|r| r.strip_suffix(" {")) else { continue };
            if lines.get(i + 1).map(|l| l.trim()) == Some("size_t struct_size;") {
                versioned.push(name.to_string());
                let init = format!("static inline void {name}_init({name}_t *");
                if !inline.contains(&format!("{name}_init")) || !text.contains(&init) {
                    problems
                        .push(format!("{}: {name}_t begins with struct_size but has no `{init}...)`", path.display()));
                }
            }
        }
        for (i, line) in lines.iter().enumerate() {
            if line.trim() == "size_t struct_size;" && !lines[i - 1].starts_with("typedef struct ") {
                problems.push(format!("{}:{}: struct_size is not the first member", path.display(), i + 1));
            }
        }
    }
    versioned.sort();
    let expected = [
        "kvsieve_attention_params",
        "kvsieve_cache_config",
        "kvsieve_cache_stats",
        "kvsieve_cluster_config",
        "kvsieve_gemfilter_config",
        "kvsieve_key_source",
        "kvsieve_page_bounds_config",
        "kvsieve_paged_kv",
        "kvsieve_retrieve_config",
        "kvsieve_retrieve_stats",
        "kvsieve_rope_config",
        "kvsieve_selection_stats",
        "kvsieve_snapkv_config",
        "kvsieve_streaming_window",
    ];
    assert_eq!(versioned, expected, "the versioned structs (beginning with `size_t struct_size;`)");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// The SONAME the library records (`readelf -d`), which programs linked against it load.
#[test]
#[cfg(target_os = "linux")]
fn shared_library_soname_is_the_major_version() {
    let lib = common::built_library();
    let out = Command::new("readelf")
        .arg("-d")
        .arg(lib)
        .output()
        .unwrap_or_else(|e| panic!("run readelf on {}: {e}", lib.display()));
    assert!(out.status.success(), "readelf failed: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let soname = stdout
        .lines()
        .find(|l| l.contains("(SONAME)"))
        .unwrap_or_else(|| panic!("{} has no SONAME:\n{stdout}", lib.display()));
    let want = format!("[libkvsieve.so.{}]", env!("CARGO_PKG_VERSION_MAJOR"));
    assert!(soname.trim_end().ends_with(&want), "SONAME of {}: {soname}, expected {want}", lib.display());
}

#[test]
fn header_constants_match_the_crate() {
    let seen = parse_header();
    let version: Vec<i64> = kvsieve::VERSION.split('.').map(|p| p.parse().unwrap()).collect();
    assert_eq!(seen.ints.get("KVSIEVE_VERSION_MAJOR"), Some(&version[0]));
    assert_eq!(seen.ints.get("KVSIEVE_VERSION_MINOR"), Some(&version[1]));
    assert_eq!(seen.ints.get("KVSIEVE_VERSION_PATCH"), Some(&version[2]));
    assert_eq!(seen.strings.get("KVSIEVE_VERSION").map(String::as_str), Some(kvsieve::VERSION));
    assert_eq!(seen.strings.get("KVSIEVE_VERSION_STRING").map(String::as_str), Some(kvsieve::VERSION));

    let v = &seen.variants;
    assert_eq!(v.get("KVSIEVE_OK"), Some(&0));
    for code in ErrorCode::ALL {
        let name = format!("KVSIEVE_ERROR_{}", code.name().to_ascii_uppercase());
        assert_eq!(v.get(&name), Some(&(code as i64)), "{name} must equal ErrorCode::{code:?}");
    }
    let error_variants = v.keys().filter(|k| k.starts_with("KVSIEVE_ERROR_")).count();
    assert_eq!(error_variants, ErrorCode::ALL.len(), "the header declares error codes the crate does not have");

    let expect = [
        ("KVSIEVE_DEVICE_CPU", capi::DEVICE_CPU as i64),
        ("KVSIEVE_DEVICE_CUDA", capi::DEVICE_CUDA as i64),
        ("KVSIEVE_DEVICE_CUDA_MANAGED", capi::DEVICE_CUDA_MANAGED as i64),
        ("KVSIEVE_DTYPE_CODE_FLOAT", capi::DTYPE_CODE_FLOAT as i64),
        ("KVSIEVE_DTYPE_CODE_BFLOAT", capi::DTYPE_CODE_BFLOAT as i64),
        ("KVSIEVE_LAYOUT_NHD", kvsieve::PageLayout::Nhd as i64),
        ("KVSIEVE_LAYOUT_HND", kvsieve::PageLayout::Hnd as i64),
        ("KVSIEVE_KEYS_POST_ROPE", kvsieve::KeyRope::PostRope as i64),
        ("KVSIEVE_KEYS_PRE_ROPE", kvsieve::KeyRope::PreRope as i64),
        ("KVSIEVE_ROPE_HALF_SPLIT", kvsieve::attention::RopeStyle::HalfSplit as i64),
        ("KVSIEVE_ROPE_ADJACENT_PAIRS", kvsieve::attention::RopeStyle::AdjacentPairs as i64),
        ("KVSIEVE_POSITIONS_ORIGINAL", capi::POSITIONS_ORIGINAL as i64),
        ("KVSIEVE_POSITIONS_CONTIGUOUS", capi::POSITIONS_CONTIGUOUS as i64),
        ("KVSIEVE_POSITIONS_CAPPED", capi::POSITIONS_CAPPED as i64),
        ("KVSIEVE_KEEP_ALL", capi::KEEP_ALL as i64),
        ("KVSIEVE_KEEP_PER_LAYER", capi::KEEP_PER_LAYER as i64),
        ("KVSIEVE_KEEP_PER_HEAD", capi::KEEP_PER_HEAD as i64),
        ("KVSIEVE_RETRIEVE_THRESHOLD", capi::RETRIEVE_THRESHOLD as i64),
        ("KVSIEVE_RETRIEVE_PER_HEAD_THRESHOLD", capi::RETRIEVE_PER_HEAD_THRESHOLD as i64),
        ("KVSIEVE_RETRIEVE_BUDGET", capi::RETRIEVE_BUDGET as i64),
        ("KVSIEVE_RETRIEVE_BUDGET_MIXED", capi::RETRIEVE_BUDGET_MIXED as i64),
        ("KVSIEVE_COARSE_THRESHOLD", capi::COARSE_THRESHOLD as i64),
        ("KVSIEVE_COARSE_BUDGET", capi::COARSE_BUDGET as i64),
        ("KVSIEVE_COARSE_BUDGET_MULTIPLE", capi::COARSE_BUDGET_MULTIPLE as i64),
    ];
    for (name, value) in expect {
        assert_eq!(v.get(name), Some(&value), "{name}");
    }
}
