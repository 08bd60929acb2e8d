//! Shared by the tests that load the shared library (`mod common;`): the library itself.
//!
//! A Rust test cannot link a cdylib, so `cargo test` does not build it; the tests build it
//! with the same cargo, profile, features and target directory as themselves
//! (`cargo build -p kvsieve-c`, a no-op when it is current) and use the file cargo names.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// `libkvsieve.so` as built for this test run.
pub fn built_library() -> &'static Path {
    static LIB: OnceLock<PathBuf> = OnceLock::new();
    LIB.get_or_init(build_library)
}

fn build_library() -> PathBuf {
    let exe = std::env::current_exe().expect("path of the test executable");
    let deps = exe.parent().expect("target/<profile>/deps");
    let profile_dir = deps.parent().expect("target/<profile>");
    let target_dir = profile_dir.parent().expect("target");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "-p", "kvsieve-c", "--lib", "--message-format=json-render-diagnostics"])
        .arg("--target-dir")
        .arg(target_dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => {}
        Some("release") => {
            cmd.arg("--release");
        }
        Some(other) => {
            cmd.args(["--profile", other]);
        }
        None => {}
    }
    if cfg!(feature = "cuda") {
        cmd.args(["--features", "cuda"]);
    }
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    assert!(out.status.success(), "building the library failed: {cmd:?}\n{}", String::from_utf8_lossy(&out.stderr));
    // The compiler-artifact message of the cdylib lists its file among "filenames".
    let name = if cfg!(target_os = "macos") { "libkvsieve.dylib" } else { "libkvsieve.so" };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let found = stdout
        .lines()
        .filter(|l| l.contains("\"reason\":\"compiler-artifact\"") && l.contains("\"cdylib\""))
        .flat_map(|l| l.split('"'))
        .find(|s| s.ends_with(&format!("/{name}")))
        .map(PathBuf::from);
    found.unwrap_or_else(|| panic!("{cmd:?} named no {name} among its artifacts:\n{stdout}"))
}
