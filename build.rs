//! Build script: records the git commit the binary was built from (`nvmirror version`, logs),
//! so a bug report names the exact code. Builds outside a git checkout say "unknown". With the
//! `spdk` feature it also links the SPDK runtime (see `link_spdk`).

use std::process::Command;

fn main() {
    let commit = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|output| output.status.success())
        .and_then(|output| String::from_utf8(output.stdout).ok())
        .map(|text| text.trim().to_string())
        .filter(|text| !text.is_empty())
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=NVMIRROR_GIT_COMMIT={commit}");
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/refs/heads");
    if std::env::var_os("CARGO_FEATURE_SPDK").is_some() {
        link_spdk();
    }
}

/// The SPDK runtime's binary finds SPDK's shared libraries where they were found at build time
/// (an rpath), and loads SPDK's module libraries, which register themselves from constructors
/// and export nothing: without `--no-as-needed` the linker would drop them.
fn link_spdk() {
    let lib_dir = std::env::var("DEP_SPDK_LIBDIR").expect("spdk-sys reports its libdir");
    let load = std::env::var("DEP_SPDK_LOAD_LIBS").expect("spdk-sys reports its module libs");
    // DT_RPATH (not RUNPATH): it also serves the libraries SPDK's own libraries need.
    println!("cargo:rustc-link-arg-bins=-Wl,--disable-new-dtags,-rpath,{lib_dir}");
    let libs: Vec<String> = load.split(',').map(|lib| format!("-l{lib}")).collect();
    println!(
        "cargo:rustc-link-arg-bins=-Wl,--push-state,--no-as-needed,-L{lib_dir},{},--pop-state",
        libs.join(",")
    );
}
