//! Build script. Without the `cuda` feature it does nothing (no CUDA toolkit needed).
//!
//! With `cuda`, every `cuda/*.cu` file is compiled by nvcc into one fatbin holding cubins
//! for sm_80 and sm_90 and compute_80 PTX (JIT fallback for newer GPUs), written to
//! `OUT_DIR/<name>.fatbin`, and a table of the modules (`OUT_DIR/cuda_modules.rs`, one
//! `ModuleId` variant per file) embeds them with `include_bytes!`. Adding a `.cu` file needs
//! no change here.
//!
//! nvcc comes from `NVCC`, then `CUDA_HOME/bin/nvcc`, then `PATH`, then the repository's
//! `.venv` (where `scripts/cuda-toolchain.sh` installs NVIDIA's pinned compiler wheels).
//!
//! Register report: each file's `-Xptxas -v` output goes to `OUT_DIR/<name>.ptxas.log`
//! (all of them concatenated in `OUT_DIR/ptxas-report.txt`). A kernel that spills registers
//! gives a cargo warning; a spill in a kernel named on a `// kvsieve-hot: <prefix> ...` line
//! of its `.cu` file (kernels whose name starts with a listed prefix) fails the build.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    println!("cargo:rerun-if-changed=cuda");
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    println!("cargo:rerun-if-env-changed=KVSIEVE_NVCC_THREADS");
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let nvcc = match find_nvcc(&manifest) {
        Some(p) => p,
        None => fail(
            "the `cuda` feature needs nvcc (CUDA 13.0) and none was found in NVCC, CUDA_HOME/bin or PATH.\n\
             Install the pinned compiler into the repository's venv with `bash scripts/cuda-toolchain.sh` \
             (it prints the nvcc path; export NVCC=<that path>), or build without `--features cuda`.",
        ),
    };

    let mut sources: Vec<PathBuf> = std::fs::read_dir(manifest.join("cuda"))
        .unwrap_or_else(|e| fail(&format!("cannot read the cuda/ folder: {e}")))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    sources.sort();
    if sources.is_empty() {
        fail("cuda/ holds no .cu file");
    }

    // Compile files in parallel (each nvcc call is single-threaded).
    let threads = std::env::var("KVSIEVE_NVCC_THREADS").ok().and_then(|s| s.parse().ok()).unwrap_or(2usize).max(1);
    let results: Vec<(String, Result<String, String>)> = {
        let queue = std::sync::Mutex::new(sources.iter().collect::<Vec<_>>());
        let done = std::sync::Mutex::new(Vec::new());
        std::thread::scope(|s| {
            for _ in 0..threads.min(sources.len()) {
                s.spawn(|| loop {
                    let Some(src) = queue.lock().unwrap().pop() else { break };
                    let name = src.file_stem().unwrap().to_string_lossy().into_owned();
                    let r = compile(&nvcc, &manifest, src, &out, &name);
                    done.lock().unwrap().push((name, r));
                });
            }
        });
        let mut v = done.into_inner().unwrap();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };

    let mut report = String::new();
    let mut names = Vec::new();
    let mut hot_spills = Vec::new();
    for (name, r) in results {
        let log = match r {
            Ok(log) => log,
            Err(e) => fail(&format!("nvcc failed on cuda/{name}.cu:\n{e}")),
        };
        std::fs::write(out.join(format!("{name}.ptxas.log")), &log).unwrap();
        report.push_str(&format!("==== cuda/{name}.cu\n{log}\n"));
        let hot = hot_prefixes(&manifest.join("cuda").join(format!("{name}.cu")));
        for (kernel, arch, line) in spills(&log) {
            println!("cargo:warning=register spill in {kernel} ({arch}), cuda/{name}.cu: {line}");
            if hot.iter().any(|p| kernel.starts_with(p.as_str())) {
                hot_spills.push(format!("{kernel} ({arch}): {line}"));
            }
        }
        names.push(name);
    }
    std::fs::write(out.join("ptxas-report.txt"), &report).unwrap();
    if !hot_spills.is_empty() {
        fail(&format!(
            "hot kernels spill registers (see {}):\n{}",
            out.join("ptxas-report.txt").display(),
            hot_spills.join("\n")
        ));
    }
    write_table(&out, &names);
}

fn fail(msg: &str) -> ! {
    eprintln!("error: {msg}");
    for line in msg.lines() {
        println!("cargo:warning={line}");
    }
    std::process::exit(1);
}

fn find_nvcc(manifest: &Path) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("NVCC") {
        return Some(PathBuf::from(p));
    }
    if let Some(h) = std::env::var_os("CUDA_HOME") {
        let p = Path::new(&h).join("bin").join("nvcc");
        if p.is_file() {
            return Some(p);
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join("nvcc");
            if p.is_file() {
                return Some(p);
            }
        }
    }
    let lib = manifest.join(".venv").join("lib");
    for entry in std::fs::read_dir(lib).ok()?.flatten() {
        let p = entry.path().join("site-packages/nvidia/cu13/bin/nvcc");
        if p.is_file() {
            return Some(p);
        }
    }
    None
}

/// Compile one file into `out/<name>.fatbin`; returns nvcc's (ptxas) report.
fn compile(nvcc: &Path, manifest: &Path, src: &Path, out: &Path, name: &str) -> Result<String, String> {
    let target = out.join(format!("{name}.fatbin"));
    let mut cmd = Command::new(nvcc);
    cmd.arg("-fatbin")
        .args(["-std=c++17", "-O3", "-Xptxas", "-v"])
        .args(["-gencode", "arch=compute_80,code=sm_80"])
        .args(["-gencode", "arch=compute_90,code=sm_90"])
        .args(["-gencode", "arch=compute_80,code=compute_80"])
        .arg("-I")
        .arg(manifest.join("cuda"))
        .arg("-o")
        .arg(&target)
        .arg(src);
    let o = cmd.output().map_err(|e| format!("cannot run {}: {e}", nvcc.display()))?;
    let log = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    if !o.status.success() {
        return Err(log);
    }
    Ok(log)
}

/// Kernel-name prefixes listed on `// kvsieve-hot:` lines of a source file.
fn hot_prefixes(src: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(src).unwrap_or_default();
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("// kvsieve-hot:"))
        .flat_map(|l| l.split_whitespace().map(str::to_string).collect::<Vec<_>>())
        .collect()
}

/// (kernel, arch, report line) for every function whose ptxas report shows spill bytes.
fn spills(log: &str) -> Vec<(String, String, String)> {
    let mut cur = (String::new(), String::new());
    let mut found = Vec::new();
    for line in log.lines() {
        // ptxas info    : Compiling entry function 'name' for 'sm_80'
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let kernel = rest.split('\'').next().unwrap_or("").to_string();
            let arch = rest.split("for '").nth(1).and_then(|a| a.split('\'').next()).unwrap_or("").to_string();
            cur = (kernel, arch);
        } else if line.contains("Function properties for") {
            if let Some(rest) = line.split("Function properties for ").nth(1) {
                cur.0 = rest.trim().to_string();
            }
        } else if line.contains("spill stores") {
            let n = |key: &str| -> u64 {
                line.split(key)
                    .next()
                    .and_then(|s| s.split_whitespace().last())
                    .and_then(|x| x.parse().ok())
                    .unwrap_or(0)
            };
            if n("bytes spill stores") > 0 || n("bytes spill loads") > 0 {
                found.push((cur.0.clone(), cur.1.clone(), line.trim().to_string()));
            }
        }
    }
    found
}

fn camel(name: &str) -> String {
    name.split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|s| !s.is_empty())
        .map(|s| {
            let mut c = s.chars();
            c.next().map(|f| f.to_ascii_uppercase().to_string() + c.as_str()).unwrap_or_default()
        })
        .collect()
}

fn write_table(out: &Path, names: &[String]) {
    let mut s = String::from(
        "// Generated by build.rs: one variant per cuda/*.cu file.\n\n\
         /// A kernel module compiled from one `cuda/<name>.cu` file and embedded in the library.\n\
         #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]\n\
         pub enum ModuleId {\n",
    );
    for n in names {
        s.push_str(&format!("    /// `cuda/{n}.cu`\n    {},\n", camel(n)));
    }
    s.push_str(
        "}\n\nimpl ModuleId {\n    /// Every module, in file-name order.\n    pub const ALL: &'static [ModuleId] = &[",
    );
    for n in names {
        s.push_str(&format!("ModuleId::{}, ", camel(n)));
    }
    s.push_str("];\n\n    /// The source file's stem (`cuda/<name>.cu`).\n    pub fn name(self) -> &'static str {\n        match self {\n");
    for n in names {
        s.push_str(&format!("            ModuleId::{} => {:?},\n", camel(n), n));
    }
    s.push_str("        }\n    }\n\n    /// The embedded fatbin (sm_80 and sm_90 cubins, compute_80 PTX).\n    pub(crate) fn image(self) -> &'static [u8] {\n        match self {\n");
    for n in names {
        s.push_str(&format!(
            "            ModuleId::{} => include_bytes!(concat!(env!(\"OUT_DIR\"), \"/{n}.fatbin\")),\n",
            camel(n)
        ));
    }
    s.push_str("        }\n    }\n\n    /// nvcc's `-Xptxas -v` report for the module's kernels (registers, spills, shared memory).\n    pub fn ptxas_report(self) -> &'static str {\n        match self {\n");
    for n in names {
        s.push_str(&format!(
            "            ModuleId::{} => include_str!(concat!(env!(\"OUT_DIR\"), \"/{n}.ptxas.log\")),\n",
            camel(n)
        ));
    }
    s.push_str("        }\n    }\n}\n");
    std::fs::write(out.join("cuda_modules.rs"), s).unwrap();
}
