//! The C ABI from C: every program in `tests/c/` and the C example are compiled against
//! `include/kvsieve.h` (at the repository root) and the shared library this crate builds,
//! run, and their output checked; where `valgrind` is installed, each is run again under Memcheck
//! (`--leak-check=full`, suppressions in `tests/c/valgrind.supp`) and must come out clean.
//! Set `KVSIEVE_SKIP_VALGRIND=1` to skip the Memcheck runs.

use std::mem::{align_of, offset_of, size_of};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

mod common;

use capi::{
    kvsieve_attention_params_t, kvsieve_cache_config_t, kvsieve_cache_stats_t, kvsieve_cluster_config_t,
    kvsieve_device_t, kvsieve_dtype_t, kvsieve_gemfilter_config_t, kvsieve_key_bounds_entry_t, kvsieve_key_source_t,
    kvsieve_page_bounds_config_t, kvsieve_paged_kv_t, kvsieve_retrieve_config_t, kvsieve_retrieve_stats_t,
    kvsieve_rope_config_t, kvsieve_selection_stats_t, kvsieve_snapkv_config_t, kvsieve_streaming_window_t,
    kvsieve_tensor_t,
};

/// The C API's Rust side (its `#[repr(C)]` structs, constants and entry points), compiled
/// into this test from the crate's source: the crate builds only a cdylib and a staticlib,
/// which a Rust test cannot link against.
#[allow(dead_code, unused_imports)]
#[path = "../src/lib.rs"]
mod capi;

/// This crate's directory (`tests/c/` is here).
fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The repository root (`include/` and `examples/` are there).
fn repo_root() -> PathBuf {
    crate_dir().join("../..")
}

fn lib_name() -> &'static str {
    if cfg!(target_os = "macos") {
        "libkvsieve.dylib"
    } else {
        "libkvsieve.so"
    }
}

fn target_triple() -> String {
    let arch = std::env::consts::ARCH;
    match std::env::consts::OS {
        "macos" => format!("{arch}-apple-darwin"),
        _ => format!("{arch}-unknown-linux-gnu"),
    }
}

/// A private directory for this test process (the target dir is shared with other builds).
/// Directories that earlier runs left more than an hour ago are removed.
fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        let stale = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        for entry in std::fs::read_dir(&base).into_iter().flatten().flatten() {
            let old = entry.metadata().and_then(|m| m.modified()).is_ok_and(|t| t < stale);
            if old && entry.file_name().to_string_lossy().starts_with("c_abi-") {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        let dir = base.join(format!("c_abi-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the scratch directory");
        dir
    })
}

/// The library copied into the scratch directory (with a link named as its SONAME), so
/// that a concurrent `cargo build` rewriting it cannot change it under a running test.
/// Returns the directory holding it.
fn staged_library() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let src = common::built_library();
        let dir = scratch().join("lib");
        std::fs::create_dir_all(&dir).expect("create the library directory");
        let tmp = dir.join(format!("{}.tmp", lib_name()));
        std::fs::copy(src, &tmp).unwrap_or_else(|e| panic!("copy {}: {e}", src.display()));
        std::fs::rename(&tmp, dir.join(lib_name())).expect("stage the library");
        if cfg!(target_os = "linux") {
            // The programs record the library's SONAME and load the file of that name.
            let soname = dir.join(format!("libkvsieve.so.{}", env!("CARGO_PKG_VERSION_MAJOR")));
            let _ = std::fs::remove_file(&soname);
            std::os::unix::fs::symlink(lib_name(), &soname).expect("link the library under its SONAME");
        }
        println!("testing {}", src.display());
        dir
    })
}

enum Lang {
    C,
    Cxx,
}

/// Compile and link one program against the header and the staged library.
fn compile(name: &str, source: &Path, lang: Lang) -> PathBuf {
    let lib_dir = staged_library();
    let out_dir = scratch().join(name);
    std::fs::create_dir_all(&out_dir).expect("create the build directory");
    let triple = target_triple();
    let mut build = cc::Build::new();
    build
        .target(&triple)
        .host(&triple)
        .opt_level(1)
        .debug(true)
        .out_dir(&out_dir)
        .cargo_metadata(false)
        .cargo_warnings(false)
        .warnings(false)
        .cpp(matches!(lang, Lang::Cxx));
    let compiler = build.try_get_compiler().unwrap_or_else(|e| panic!("no C compiler found: {e}"));
    let exe = out_dir.join(name);
    let mut cmd = compiler.to_command();
    match lang {
        Lang::C => cmd.arg("-std=c99"),
        Lang::Cxx => cmd.args(["-x", "c++", "-std=c++11"]),
    };
    cmd.args(["-Wall", "-Wextra", "-Werror", "-pedantic"])
        .arg("-I")
        .arg(repo_root().join("include"))
        .arg("-I")
        .arg(crate_dir().join("tests/c"))
        .arg(source)
        .arg("-o")
        .arg(&exe)
        .arg("-L")
        .arg(lib_dir)
        .arg("-lkvsieve")
        .arg(format!("-Wl,-rpath,{}", lib_dir.display()))
        .args(["-lpthread", "-lm"]);
    let out = cmd.output().unwrap_or_else(|e| panic!("run the C compiler: {e}"));
    assert!(
        out.status.success(),
        "compiling {} failed:\n{:?}\n{}{}",
        source.display(),
        cmd,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    exe
}

fn run(mut cmd: Command) -> Output {
    cmd.env("LD_LIBRARY_PATH", staged_library());
    cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"))
}

fn describe(out: &Output) -> String {
    format!(
        "exit status {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn valgrind_available() -> bool {
    if std::env::var_os("KVSIEVE_SKIP_VALGRIND").is_some_and(|v| v != "0") {
        println!("KVSIEVE_SKIP_VALGRIND is set: not running under valgrind");
        return false;
    }
    let found = Command::new("valgrind").arg("--version").output().is_ok_and(|o| o.status.success());
    if !found {
        println!("valgrind is not on PATH: not running under valgrind");
    }
    found
}

/// What a program's output must show.
struct Expect<'a> {
    /// Lines that must appear, each exactly.
    lines: &'a [&'a str],
    /// Whether the last line must be "N passed, 0 failed" (N >= 1).
    summary: bool,
}

fn check_output(name: &str, out: &Output, expect: &Expect) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{name} failed:\n{}", describe(out));
    for line in expect.lines {
        assert!(stdout.lines().any(|l| l == *line), "{name}: expected the line {line:?}:\n{}", describe(out));
    }
    if expect.summary {
        let last = stdout.lines().last().unwrap_or("");
        let passed = last.strip_suffix(" passed, 0 failed").and_then(|n| n.parse::<u32>().ok());
        assert!(
            passed.is_some_and(|n| n > 0),
            "{name}: expected a final \"N passed, 0 failed\" line:\n{}",
            describe(out)
        );
    }
    stdout
}

/// Run a built program, check its output, then do the same under valgrind.
fn run_checked(name: &str, exe: &Path, expect: &Expect) -> String {
    let stdout = check_output(name, &run(Command::new(exe)), expect);
    if valgrind_available() {
        let mut cmd = Command::new("valgrind");
        cmd.args(["--error-exitcode=99", "--leak-check=full"])
            .arg(format!("--suppressions={}", crate_dir().join("tests/c/valgrind.supp").display()))
            .arg(exe);
        let out = run(cmd);
        assert!(out.status.code() != Some(99), "{name}: valgrind reported errors:\n{}", describe(&out));
        check_output(&format!("{name} under valgrind"), &out, expect);
    }
    stdout
}

/// Compile `tests/c/<name>.c` as C99 and run it.
fn c_test(name: &str, expect: &Expect) -> String {
    let exe = compile(name, &crate_dir().join(format!("tests/c/{name}.c")), Lang::C);
    run_checked(name, &exe, expect)
}

#[test]
fn header_included_twice() {
    c_test("header_twice", &Expect { lines: &[&format!("version {}", kvsieve::VERSION)], summary: true });
}

#[test]
fn header_compiles_as_cxx() {
    let exe = compile("header_twice_cxx", &crate_dir().join("tests/c/header_twice.c"), Lang::Cxx);
    check_output("header_twice (C++)", &run(Command::new(exe)), &Expect { lines: &[], summary: true });
}

macro_rules! layout_lines {
    ($($ty:ident { $($field:ident),* $(,)? })*) => {{
        let mut v = Vec::new();
        $(
            v.push(format!("layout {} size {} align {}", stringify!($ty), size_of::<$ty>(), align_of::<$ty>()));
            $(v.push(format!("layout {}.{} offset {}", stringify!($ty), stringify!($field), offset_of!($ty, $field)));)*
        )*
        v
    }};
}

/// The C compiler's layout of every public struct equals the Rust definitions', and the
/// headers' initialisers give the library's defaults.
#[test]
fn struct_layouts_match_rust() {
    let mut expected =
        vec![format!("layout kvsieve_error_code_t size {} align {}", size_of::<u32>(), align_of::<u32>())];
    // The `kind` parameter of kvsieve_cache_compact is a uint32_t holding a kvsieve_keep_kind_t.
    expected.push(format!("layout kvsieve_keep_kind_t size {} align {}", size_of::<u32>(), align_of::<u32>()));
    expected.extend(layout_lines! {
        kvsieve_device_t { device_type, device_id }
        kvsieve_dtype_t { code, bits, lanes }
        kvsieve_tensor_t { data, device, ndim, dtype, shape, strides, byte_offset }
        kvsieve_rope_config_t { struct_size, theta, rotary_dim, style, position_scale }
        kvsieve_attention_params_t { struct_size, scale, logit_soft_cap, rope, chunk_size, position_mode, max_distance }
        kvsieve_cache_config_t {
            struct_size, num_layers, num_kv_heads, head_dim, page_size, capacity_pages, dtype, layout, key_rope, track_key_bounds
        }
        kvsieve_cache_stats_t {
            struct_size, pages_total, pages_used, pages_free, bytes_per_page, bytes_used, bytes_reserved, num_sequences, num_tokens
        }
        kvsieve_paged_kv_t {
            struct_size, k, v, device, dtype, key_rope, num_pages, page_size, num_kv_heads, head_dim, k_strides, v_strides, batch,
            indptr, indices, last_page_len, positions
        }
        kvsieve_selection_stats_t { struct_size, seq_len, num_kv_heads, total, density, min_density, max_density }
        kvsieve_page_bounds_config_t { struct_size, budget_tokens, min_pages }
        kvsieve_key_bounds_entry_t { page, reset, slot_mask }
        kvsieve_streaming_window_t { struct_size, sinks, window }
        kvsieve_key_source_t { struct_size, tensor, cache, seq, layer }
        kvsieve_gemfilter_config_t { struct_size, k, pool_kernel, keep_first, keep_last }
        kvsieve_snapkv_config_t { struct_size, k, pool_kernel, scale }
        kvsieve_cluster_config_t {
            struct_size, num_clusters, cluster_fraction, exclude_window, max_iter, seed, num_coarse_clusters, coarse_fraction
        }
        kvsieve_retrieve_config_t {
            struct_size, mode, threshold, thresholds, num_thresholds, budget, seq_len, hierarchical, coarse_mode, coarse_threshold,
            coarse_budget, coarse_budget_multiple
        }
        kvsieve_retrieve_stats_t {
            struct_size, centroid_evals, coarse_evals, fine_evals, clusters_scored, clusters_kept, coarse_kept, tokens_kept
        }
    });
    let stdout = c_test(
        "layout",
        &Expect {
            lines: &["ok - initialisers", "ok - dlpack layout", "ok - dlpack tensor passed as is"],
            summary: true,
        },
    );
    let got: Vec<String> = stdout.lines().filter(|l| l.starts_with("layout ")).map(str::to_string).collect();
    let missing: Vec<&String> = expected.iter().filter(|l| !got.contains(l)).collect();
    let extra: Vec<&String> = got.iter().filter(|l| !expected.contains(l)).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "layouts differ\nRust, not C: {missing:#?}\nC, not Rust: {extra:#?}"
    );

    // The headers' static inline initialisers give what the library's twins of them give (the
    // defaults of fields an older caller's struct does not reach).
    let cache = |name: &str, c: kvsieve_cache_config_t| {
        format!(
            "init {name} {} {} {} {} {} {} {} {} {} {} {}",
            c.num_layers,
            c.num_kv_heads,
            c.head_dim,
            c.page_size,
            c.capacity_pages,
            c.dtype.code,
            c.dtype.bits,
            c.dtype.lanes,
            c.layout,
            c.key_rope,
            c.track_key_bounds as i32
        )
    };
    let cluster = |name: &str, c: kvsieve_cluster_config_t| {
        format!(
            "init {name} {} {} {} {} {} {} {}",
            c.num_clusters,
            c.cluster_fraction,
            c.exclude_window,
            c.max_iter,
            c.seed,
            c.num_coarse_clusters,
            c.coarse_fraction
        )
    };
    let retrieve = |name: &str, c: kvsieve_retrieve_config_t| {
        format!(
            "init {name} {} {} {} {} {} {} {} {} {} {} {}",
            c.mode,
            c.threshold,
            c.thresholds.is_null() as i32,
            c.num_thresholds,
            c.budget,
            c.seq_len,
            c.hierarchical as i32,
            c.coarse_mode,
            c.coarse_threshold,
            c.coarse_budget,
            c.coarse_budget_multiple
        )
    };
    let gemfilter = |name: &str, c: kvsieve_gemfilter_config_t| {
        format!("init {name} {} {} {} {}", c.k, c.pool_kernel, c.keep_first, c.keep_last)
    };
    let snapkv = kvsieve_snapkv_config_t::init();
    let kv = kvsieve_paged_kv_t::init();
    let expected_init = [
        cache("kvsieve_cache_config_default(2, 3, 64, 16, 10)", capi::kvsieve_cache_config_default(2, 3, 64, 16, 10)),
        cache("kvsieve_cache_config_init", capi::kvsieve_cache_config_default(0, 0, 0, 0, 0)),
        cluster("kvsieve_cluster_config_default(12)", capi::kvsieve_cluster_config_default(12)),
        cluster("kvsieve_cluster_config_init", capi::kvsieve_cluster_config_default(0)),
        retrieve("kvsieve_retrieve_config_default(40)", capi::kvsieve_retrieve_config_default(40)),
        retrieve("kvsieve_retrieve_config_init", capi::kvsieve_retrieve_config_default(0)),
        gemfilter("kvsieve_gemfilter_config_default(9)", capi::kvsieve_gemfilter_config_default(9)),
        gemfilter("kvsieve_gemfilter_config_init", capi::kvsieve_gemfilter_config_default(0)),
        format!("init kvsieve_snapkv_config_init {} {} {}", snapkv.k, snapkv.pool_kernel, snapkv.scale),
        format!("init kvsieve_paged_kv_init {} {}", kv.device.device_type, kv.device.device_id),
    ];
    let got_init: Vec<&str> = stdout.lines().filter(|l| l.starts_with("init ")).collect();
    assert_eq!(got_init, expected_init, "the headers' initialisers and the library's defaults differ");
}

#[test]
fn attention_matches_reference() {
    c_test(
        "attention",
        &Expect {
            lines: &[
                "ok - f32 NHD gqa3 d64: decode and prefill match the reference",
                "ok - f16 NHD mha d64: decode and prefill match the reference",
                "ok - f16 HND gqa4 d32: decode and prefill match the reference",
                "ok - bf16 NHD gqa2 d128: decode and prefill match the reference",
                "ok - pre-RoPE cache: decode and prefill match the reference",
            ],
            summary: true,
        },
    );
}

#[test]
fn engine_owned_views() {
    c_test(
        "view",
        &Expect {
            lines: &[
                "ok - view f32 NHD, scrambled pages",
                "ok - view f16 HND",
                "ok - view K/V interleaved in one buffer",
                "ok - view pre-RoPE, original positions",
                "ok - view pre-RoPE, contiguous positions",
                "ok - view pre-RoPE, distances capped at 40",
                "ok - apply_rope matches the C rotation",
                "ok - merge_states of two halves equals the whole",
            ],
            summary: true,
        },
    );
}

#[test]
fn bad_input_is_reported() {
    c_test(
        "errors",
        &Expect {
            lines: &[
                "ok - cache configuration errors",
                "ok - handle and out-parameter errors",
                "ok - append errors and exhausted capacity",
                "ok - write errors",
                "ok - query and eviction errors",
                "ok - attention errors",
                "ok - view errors",
                "ok - rope and merge errors",
            ],
            summary: true,
        },
    );
}

#[test]
fn bad_selection_input_is_reported() {
    c_test(
        "select_errors",
        &Expect {
            lines: &[
                "ok - selection construction errors",
                "ok - selection inspection errors",
                "ok - policy errors",
                "ok - selection on a cache errors",
                "ok - sparse attention errors",
                "ok - view sparse attention errors",
                "ok - eviction and compaction errors",
            ],
            summary: true,
        },
    );
}

#[test]
fn sequence_lifecycle() {
    c_test(
        "lifecycle",
        &Expect {
            lines: &[
                "ok - configuration round trip",
                "ok - fork, truncate, evict, page table export, stats",
                "ok - page key bounds",
                "ok - decode over empty sequences",
            ],
            summary: true,
        },
    );
}

#[test]
fn selections() {
    c_test(
        "selection",
        &Expect {
            lines: &[
                "ok - expand_spans follows the span rule",
                "ok - selection from CSR: inspection round trip",
                "ok - dense, same-for-all-heads, streaming and lambda selections",
                "ok - union and intersection",
                "ok - page bounds selection matches the ranking of the page key bounds",
            ],
            summary: true,
        },
    );
}

#[test]
fn sparse_attention_matches_reference() {
    c_test(
        "sparse",
        &Expect {
            lines: &[
                "ok - f32 cache: sparse decode and prefill match the reference",
                "ok - f16 cache: sparse decode and prefill match the reference",
                "ok - engine-owned pages: sparse decode and prefill match the reference",
            ],
            summary: true,
        },
    );
}

#[test]
fn policies() {
    c_test(
        "policy",
        &Expect {
            lines: &[
                "ok - policy text: parse, canonical form, round trip",
                "ok - policy text: malformed texts fail at the expected byte offset",
                "ok - policy validation against a model",
                "ok - policy select on a cache: sinks + window, head overrides, page bounds, dense layers",
                "ok - decode_with_policy equals decode_sparse over policy_select's selections",
                "ok - prefill_with_policy matches the windowed reference",
                "ok - position modes of a policy",
            ],
            summary: true,
        },
    );
}

#[test]
fn eviction_and_compaction() {
    c_test(
        "evict_compact",
        &Expect {
            lines: &[
                "ok - streaming: bounded pages, attention over sinks + window",
                "ok - streaming with contiguous positions: bounded pages, attention over sinks + window",
                "ok - compact: decode after compaction equals the reference over the kept tokens",
            ],
            summary: true,
        },
    );
}

#[test]
fn gemfilter_and_snapkv() {
    c_test(
        "gemfilter",
        &Expect {
            lines: &[
                "ok - gemfilter scores and avg_pool match the C reference",
                "ok - gemfilter selection keeps the forced tokens and the best-scoring ones",
                "ok - snapkv matches the C reference of its definition",
                "ok - calibration finds the layer holding the needle",
                "ok - snapkv selection compacts the cache per head; decode equals the reference over the kept tokens",
                "ok - gemfilter and snapkv bad input: right codes, parameter named, nothing written",
            ],
            summary: true,
        },
    );
}

#[test]
fn cluster_index() {
    c_test(
        "cluster",
        &Expect {
            lines: &[
                "ok - build: shape, every key in the cluster of its nearest centroid, centroids the mean of their members",
                "ok - estimates match the C formula; threshold and budget selections match a C ranking",
                "ok - hierarchical retrieval: all coarse clusters open equals flat, budgets and evaluation counts",
                "ok - calibration keeps close to the target fraction",
                "ok - assign_new and rebuild from a cache",
                "ok - save and load round trip; truncated and corrupted files are io errors",
                "ok - float16, bfloat16 and cache keys give the index of their float32 values",
                "ok - retrieval unioned with a streaming window drives sparse decode",
                "ok - readers share one index beside a writer assigning new tokens",
                "ok - cluster bad input: right codes, parameter named, nothing written",
                "ok - a clusters= policy through a cluster set: selection, decode, update, staleness and bad input",
            ],
            summary: true,
        },
    );
}

#[test]
fn versioned_structs() {
    c_test(
        "versioned",
        &Expect {
            lines: &[
                "ok - input structs of an unknown struct_size are refused by name, nothing changed",
                "ok - output structs: another struct_size refused untouched, their own written and no byte past it",
            ],
            summary: true,
        },
    );
}

/// Requests too large to allocate are `KVSIEVE_ERROR_OUT_OF_MEMORY`, not an abort: the
/// program runs under a 4 GiB address-space limit (`ulimit -v`), and not under valgrind,
/// whose own allocator would be the one to run out.
#[test]
#[cfg(target_os = "linux")]
fn huge_requests_under_a_memory_limit() {
    let exe = compile("oom", &crate_dir().join("tests/c/oom.c"), Lang::C);
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg("ulimit -v 4194304 && exec \"$0\"").arg(&exe);
    check_output(
        "oom",
        &run(cmd),
        &Expect {
            lines: &["ok - huge requests are out-of-memory errors", "ok - the process goes on after them"],
            summary: true,
        },
    );
}

#[test]
fn threads_share_a_cache() {
    c_test(
        "threads",
        &Expect {
            lines: &[
                "ok - concurrent decode with a writer",
                "ok - policy decode and shared selections across threads",
                "ok - shared cluster set and index across threads",
                "ok - separate caches and indexes on separate threads",
            ],
            summary: true,
        },
    );
}

#[test]
fn example_store_and_decode() {
    let exe = compile("01_store_and_decode", &repo_root().join("examples/c/01_store_and_decode.c"), Lang::C);
    run_checked(
        "examples/c/01_store_and_decode",
        &exe,
        &Expect {
            lines: &["stored a prompt of 20 tokens in 2 layers", "decoded 1 token over 21 cached tokens"],
            summary: false,
        },
    );
}
