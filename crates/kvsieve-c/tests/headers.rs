//! The C headers as a C or C++ program sees them: `include/kvsieve.h` includes every header
//! of `include/kvsieve/`, each of those compiles on its own (as C99 and as C++11, with
//! `-Wall -Wextra -Werror -pedantic`), twice in a row (include guards), and includes exactly
//! the other kvsieve headers whose names it uses; the version macros match the crate's.
//!
//! Only the compiler's front end runs (`-fsyntax-only`, `-E`): no library is needed.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn include_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../include")
}

/// Every concept header, as `kvsieve/<name>.h`, sorted.
fn concept_headers() -> Vec<String> {
    let dir = include_dir().join("kvsieve");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".h"))
        .map(|n| format!("kvsieve/{n}"))
        .collect();
    names.sort();
    assert!(names.len() >= 10, "expected the concept headers in {}, found {names:?}", dir.display());
    names
}

/// The concept headers and the umbrella header.
fn all_headers() -> Vec<String> {
    let mut v = concept_headers();
    v.push("kvsieve.h".to_string());
    v
}

#[derive(Clone, Copy, Debug)]
enum Lang {
    C99,
    Cxx11,
}

/// The C or C++ compiler the `cc` crate picks (`CC` / `CXX`, else `cc` / `c++`), with the
/// language, warning flags and `-I include`.
fn compiler(lang: Lang) -> Command {
    let triple = match std::env::consts::OS {
        "macos" => format!("{}-apple-darwin", std::env::consts::ARCH),
        _ => format!("{}-unknown-linux-gnu", std::env::consts::ARCH),
    };
    let tool = cc::Build::new()
        .target(&triple)
        .host(&triple)
        .opt_level(0)
        .debug(false)
        .cargo_metadata(false)
        .cargo_warnings(false)
        .warnings(false)
        .cpp(matches!(lang, Lang::Cxx11))
        .try_get_compiler()
        .unwrap_or_else(|e| panic!("no {lang:?} compiler found: {e}"));
    let mut cmd = Command::new(tool.path());
    match lang {
        Lang::C99 => cmd.args(["-x", "c", "-std=c99"]),
        Lang::Cxx11 => cmd.args(["-x", "c++", "-std=c++11"]),
    };
    cmd.args(["-Wall", "-Wextra", "-Werror", "-pedantic"]).arg("-I").arg(include_dir());
    cmd
}

/// Run `cmd` with `source` as the translation unit on standard input (`-` as the file).
fn run_on_source(mut cmd: Command, source: &str) -> Output {
    cmd.arg("-").stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    child.stdin.take().expect("stdin").write_all(source.as_bytes()).expect("write the source");
    child.wait_with_output().expect("wait for the compiler")
}

/// Compile `source` (syntax only) in both languages; one line per failure.
fn syntax_failures(what: &str, source: &str) -> Vec<String> {
    let mut failures = Vec::new();
    for lang in [Lang::C99, Lang::Cxx11] {
        let mut cmd = compiler(lang);
        cmd.arg("-fsyntax-only");
        let out = run_on_source(cmd, source);
        if !out.status.success() {
            failures.push(format!("{what} as {lang:?}:\n{source}\n{}", String::from_utf8_lossy(&out.stderr)));
        }
    }
    failures
}

fn assert_all_compile(cases: impl IntoIterator<Item = (String, String)>) {
    let mut failures = Vec::new();
    let mut count = 0;
    for (what, source) in cases {
        failures.extend(syntax_failures(&what, &source));
        count += 1;
    }
    assert!(failures.is_empty(), "{} of {} compilations failed:\n\n{}", failures.len(), 2 * count, failures.join("\n"));
}

#[test]
fn each_header_compiles_on_its_own() {
    assert_all_compile(all_headers().into_iter().map(|h| (format!("<{h}> alone"), format!("#include <{h}>\n"))));
}

#[test]
fn each_header_can_be_included_twice() {
    assert_all_compile(
        all_headers().into_iter().map(|h| (format!("<{h}> twice"), format!("#include <{h}>\n#include <{h}>\n"))),
    );
}

#[test]
fn concept_headers_compile_together_forwards_and_backwards() {
    // Forwards (then the umbrella, whose headers have all been seen) and backwards: a header
    // included after the headers it needs, or before them, compiles the same.
    let mut forwards: String = concept_headers().iter().map(|h| format!("#include <{h}>\n")).collect();
    let backwards: String = concept_headers().iter().rev().map(|h| format!("#include <{h}>\n")).collect();
    forwards.push_str("#include <kvsieve.h>\n");
    assert_all_compile([
        ("every header, in order".to_string(), forwards),
        ("every header, in reverse order".to_string(), backwards),
    ]);
}

/// C source with comments and string literals removed (both replaced by a space).
fn strip_comments_and_strings(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '/' if chars.peek() == Some(&'*') => {
                chars.next();
                let mut prev = '\0';
                for c in chars.by_ref() {
                    if prev == '*' && c == '/' {
                        break;
                    }
                    prev = c;
                }
                out.push(' ');
            }
            '/' if chars.peek() == Some(&'/') => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        break;
                    }
                }
                out.push('\n');
            }
            '"' => {
                let mut escaped = false;
                for c in chars.by_ref() {
                    if c == '"' && !escaped {
                        break;
                    }
                    escaped = c == '\\' && !escaped;
                }
                out.push(' ');
            }
            c => out.push(c),
        }
    }
    out
}

/// Identifiers and single punctuation characters, in order.
fn tokens(code: &str) -> Vec<String> {
    let mut toks = Vec::new();
    let mut cur = String::new();
    for c in code.chars() {
        if c.is_ascii_alphanumeric() || c == '_' {
            cur.push(c);
        } else {
            if !cur.is_empty() {
                toks.push(std::mem::take(&mut cur));
            }
            if !c.is_whitespace() {
                toks.push(c.to_string());
            }
        }
    }
    if !cur.is_empty() {
        toks.push(cur);
    }
    toks
}

fn is_kvsieve_name(t: &str) -> bool {
    (t.starts_with("kvsieve_") && t.ends_with("_t")) || t.starts_with("KVSIEVE_")
}

#[derive(Debug, Default)]
struct HeaderNames {
    /// The kvsieve headers it includes (`"error.h"` as `kvsieve/error.h`).
    includes: BTreeSet<String>,
    /// Types, enumerators and macros it defines.
    defines: BTreeSet<String>,
    /// kvsieve types, enumerators and macros its declarations use.
    uses: BTreeSet<String>,
}

fn header_names(header: &str) -> HeaderNames {
    let path = include_dir().join(header);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let dir = Path::new(header).parent().expect("header directory");
    let mut names = HeaderNames::default();
    for line in text.lines() {
        if let Some(rest) = line.trim().strip_prefix("#include \"") {
            let target = rest.split('"').next().expect("closing quote");
            names.includes.insert(dir.join(target).to_string_lossy().into_owned());
        }
    }
    let toks = tokens(&strip_comments_and_strings(&text));
    let mut i = 0;
    while i < toks.len() {
        let t = toks[i].as_str();
        if t == "#" && toks.get(i + 1).is_some_and(|d| d == "define") {
            if let Some(name) = toks.get(i + 2) {
                names.defines.insert(name.clone());
            }
        } else if t == "typedef" {
            // The typedef name is the identifier before the `;` that closes it; in an enum, the
            // enumerators are the identifiers that follow `{` or `,` at depth 1.
            let is_enum = toks.get(i + 1).is_some_and(|k| k == "enum");
            let mut depth = 0;
            let mut j = i + 1;
            while j < toks.len() && !(depth == 0 && toks[j] == ";") {
                match toks[j].as_str() {
                    "{" => depth += 1,
                    "}" => depth -= 1,
                    name if is_enum && depth == 1 && matches!(toks[j - 1].as_str(), "{" | ",") => {
                        names.defines.insert(name.to_string());
                    }
                    _ => {}
                }
                j += 1;
            }
            names.defines.insert(toks[j - 1].clone());
        }
        if is_kvsieve_name(t) {
            names.uses.insert(t.to_string());
        }
        i += 1;
    }
    names.uses.retain(|n| !names.defines.contains(n));
    names
}

#[test]
fn headers_include_exactly_what_they_use() {
    let headers = concept_headers();
    let parsed: BTreeMap<String, HeaderNames> = headers.iter().map(|h| (h.clone(), header_names(h))).collect();
    let mut owner: BTreeMap<&str, &str> = BTreeMap::new();
    let mut problems = Vec::new();
    for (h, names) in &parsed {
        for d in &names.defines {
            if let Some(other) = owner.insert(d, h) {
                problems.push(format!("{d} is defined by both {other} and {h}"));
            }
        }
    }
    for (h, names) in &parsed {
        let mut needed = BTreeSet::new();
        for used in &names.uses {
            match owner.get(used.as_str()) {
                Some(o) => {
                    needed.insert(o.to_string());
                }
                None => problems.push(format!("{h} uses {used}, which no kvsieve header defines")),
            }
        }
        for missing in needed.difference(&names.includes) {
            let what: Vec<&String> =
                names.uses.iter().filter(|u| owner.get(u.as_str()) == Some(&missing.as_str())).collect();
            problems.push(format!("{h} uses {what:?} of {missing} without including it"));
        }
        for extra in names.includes.difference(&needed) {
            problems.push(format!("{h} includes {extra} but uses nothing it defines"));
        }
    }
    assert!(problems.is_empty(), "include problems:\n{}", problems.join("\n"));
}

#[test]
fn umbrella_includes_every_concept_header() {
    let umbrella = header_names("kvsieve.h");
    let expected: BTreeSet<String> = concept_headers().into_iter().collect();
    assert_eq!(umbrella.includes, expected, "include/kvsieve.h must include exactly the headers of include/kvsieve/");
}

#[test]
fn version_macros_match_the_crate() {
    // Preprocess a use of each macro; the expansions are the last lines of the output.
    let source = "#include <kvsieve/version.h>\n\
                  KVSIEVE_VERSION_MAJOR KVSIEVE_VERSION_MINOR KVSIEVE_VERSION_PATCH\n\
                  KVSIEVE_VERSION_STRING\n\
                  KVSIEVE_VERSION\n";
    for lang in [Lang::C99, Lang::Cxx11] {
        let mut cmd = compiler(lang);
        cmd.args(["-E", "-P"]);
        let out = run_on_source(cmd, source);
        assert!(out.status.success(), "preprocessing as {lang:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
        let stdout = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<&str> = stdout.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
        let expanded = &lines[lines.len().saturating_sub(3)..];
        let numbers = format!(
            "{} {} {}",
            env!("CARGO_PKG_VERSION_MAJOR"),
            env!("CARGO_PKG_VERSION_MINOR"),
            env!("CARGO_PKG_VERSION_PATCH")
        );
        let string = format!("\"{}\"", env!("CARGO_PKG_VERSION"));
        assert_eq!(
            expanded,
            [numbers.as_str(), string.as_str(), string.as_str()],
            "{lang:?}: version macros of kvsieve/version.h"
        );
    }
}
