//! Link settings of the shared library on Linux: its SONAME, `libkvsieve.so.<major>`
//! (`libkvsieve.so.0` for 0.x: programs record that name and load the file it points to),
//! and a version script (`exports.map`) that exports only the `kvsieve_*` symbols of the
//! C API, so the Rust standard library and the crates kvsieve uses stay internal.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=exports.map");
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() != Ok("linux") {
        return;
    }
    let manifest = std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR");
    let major = std::env::var("CARGO_PKG_VERSION_MAJOR").expect("CARGO_PKG_VERSION_MAJOR");
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libkvsieve.so.{major}");
    println!("cargo:rustc-cdylib-link-arg=-Wl,--version-script={manifest}/exports.map");
}
