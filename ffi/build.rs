//! Finds the installed SPDK (only with the `spdk` feature), binds the headers nvmirror uses and
//! builds the C shim. SPDK is looked up, in order, through `SPDK_DIR` (an SPDK tree built with
//! `--with-shared`: headers in `$SPDK_DIR/include`, libraries and `spdk_*.pc` in
//! `$SPDK_DIR/build/lib`) and through pkg-config (`spdk_event.pc` on `PKG_CONFIG_PATH`).
//!
//! For the binaries that link it, the crate hands its dependents (`DEP_SPDK_*`): `LIBDIR` (for
//! an rpath) and `LOAD_LIBS`, the libraries that must be loaded although nothing references
//! them (SPDK's bdev, sock and event modules register themselves from constructors and export
//! no symbols, so a linker's `--as-needed` would drop them).
use std::env;
use std::path::PathBuf;

/// Libraries loaded for their constructors: the event subsystems the nvmf target needs, the bdev
/// modules a namespace can be (malloc, NVMe, AIO) and the posix sock implementation.
const LOAD_LIBS: &[&str] = &[
    "spdk_event_nvmf",
    "spdk_event_bdev",
    "spdk_event_accel",
    "spdk_event_iobuf",
    "spdk_event_keyring",
    "spdk_event_scheduler",
    "spdk_event_sock",
    "spdk_event_vmd",
    "spdk_bdev_malloc",
    "spdk_bdev_aio",
    "spdk_bdev_nvme",
    "spdk_bdev_delay",
    "spdk_sock_posix",
    "spdk_scheduler_dynamic",
    "spdk_env_dpdk_rpc",
];

/// The SPDK functions nvmirror calls: only these are bound (with the types they need).
const FUNCTIONS: &[&str] = &[
    "spdk_app_fini",
    "spdk_app_opts_init",
    "spdk_app_parse_args",
    "spdk_app_start",
    "spdk_app_stop",
    "spdk_bdev_close",
    "spdk_bdev_desc_get_bdev",
    "spdk_bdev_flush",
    "spdk_bdev_free_io",
    "spdk_bdev_get_block_size",
    "spdk_bdev_get_by_name",
    "spdk_bdev_get_io_channel",
    "spdk_bdev_get_name",
    "spdk_bdev_get_num_blocks",
    "spdk_bdev_io_complete",
    "spdk_bdev_io_complete_nvme_status",
    "spdk_bdev_io_get_buf",
    "spdk_bdev_io_get_thread",
    "spdk_bdev_io_type_supported",
    "spdk_bdev_module_claim_bdev",
    "spdk_bdev_module_release_bdev",
    "spdk_bdev_open_ext",
    "spdk_bdev_read",
    "spdk_bdev_register",
    "spdk_bdev_unregister",
    "spdk_bdev_write",
    "spdk_bdev_write_zeroes",
    "spdk_dma_free",
    "spdk_dma_zmalloc",
    "spdk_get_io_channel",
    "spdk_get_thread",
    "spdk_io_device_register",
    "spdk_io_device_unregister",
    "spdk_json_write_val_raw",
    "spdk_jsonrpc_begin_result",
    "spdk_jsonrpc_end_result",
    "spdk_jsonrpc_send_error_response",
    "spdk_mem_register",
    "spdk_mem_unregister",
    "spdk_poller_register_named",
    "spdk_poller_unregister",
    "spdk_put_io_channel",
    "spdk_rpc_register_method",
    "spdk_sock_accept",
    "spdk_sock_close",
    "spdk_sock_connect_ext",
    "spdk_sock_get_default_opts",
    "spdk_sock_getaddr",
    "spdk_sock_listen",
    "spdk_sock_recv",
    "spdk_sock_writev",
    "spdk_thread_send_msg",
];

/// The pkg-config packages whose libraries we call.
const PACKAGES: &[&str] = &[
    "spdk_event",
    "spdk_bdev",
    "spdk_thread",
    "spdk_sock",
    "spdk_rpc",
    "spdk_jsonrpc",
    "spdk_json",
    "spdk_log",
    "spdk_util",
    "spdk_env_dpdk",
    "spdk_syslibs",
];

fn main() {
    println!("cargo:rerun-if-env-changed=SPDK_DIR");
    println!("cargo:rerun-if-env-changed=PKG_CONFIG_PATH");
    println!("cargo:rerun-if-changed=wrapper.h");
    println!("cargo:rerun-if-changed=shim.h");
    println!("cargo:rerun-if-changed=shim.c");
    if env::var_os("CARGO_FEATURE_SPDK").is_none() {
        return;
    }
    let spdk_dir = env::var_os("SPDK_DIR").map(PathBuf::from);
    if let Some(dir) = &spdk_dir {
        let pc = dir.join("build/lib/pkgconfig");
        if !dir.join("include/spdk/version.h").is_file() || !pc.join("spdk_event.pc").is_file() {
            fail(&format!(
                "SPDK_DIR={} is not a built SPDK: {} or {} is missing",
                dir.display(),
                dir.join("include/spdk/version.h").display(),
                pc.join("spdk_event.pc").display()
            ));
        }
        let path = match env::var("PKG_CONFIG_PATH") {
            Ok(old) if !old.is_empty() => format!("{}:{old}", pc.display()),
            _ => pc.display().to_string(),
        };
        // A build script is single-threaded: pkg-config below reads it.
        env::set_var("PKG_CONFIG_PATH", path);
    }
    let mut include_paths = Vec::new();
    let mut lib_dirs = Vec::new();
    let mut libs: Vec<String> = Vec::new();
    for package in PACKAGES.iter().chain(LOAD_LIBS) {
        match pkg_config::Config::new()
            .cargo_metadata(false)
            .probe(package)
        {
            Ok(library) => {
                include_paths.extend(library.include_paths);
                lib_dirs.extend(library.link_paths);
                libs.extend(library.libs);
            }
            Err(e) => fail(&format!("pkg-config found no {package}: {e}")),
        }
    }
    // SPDK's .pc files name DPDK libraries a distribution's DPDK may not have (Debian's 22.11
    // has no rte_log or rte_argparse: their code is in rte_eal): only those that exist are linked.
    let system_dirs = [
        PathBuf::from("/usr/lib/x86_64-linux-gnu"),
        PathBuf::from("/usr/lib64"),
        PathBuf::from("/usr/lib"),
    ];
    libs.retain(|lib| {
        !lib.starts_with("rte_")
            || lib_dirs
                .iter()
                .chain(system_dirs.iter())
                .any(|dir| dir.join(format!("lib{lib}.so")).exists())
    });
    let mut seen = std::collections::HashSet::new();
    libs.retain(|lib| seen.insert(lib.clone()));
    for dir in &lib_dirs {
        println!("cargo:rustc-link-search=native={}", dir.display());
    }
    for lib in &libs {
        println!("cargo:rustc-link-lib=dylib={lib}");
    }
    if let Some(dir) = &spdk_dir {
        include_paths.insert(0, dir.join("include"));
    }
    include_paths.dedup();
    lib_dirs.dedup();
    let lib_dir = lib_dirs
        .iter()
        .find(|dir| dir.join("libspdk_event.so").exists())
        .cloned()
        .unwrap_or_else(|| fail("no libspdk_event.so: SPDK must be built with --with-shared"));
    for lib in LOAD_LIBS {
        if !lib_dir.join(format!("lib{lib}.so")).exists() {
            fail(&format!("{} lacks lib{lib}.so", lib_dir.display()));
        }
    }
    println!("cargo:libdir={}", lib_dir.display());
    // Every SPDK (and DPDK) library is loaded by name from the binary too: libspdk_env_dpdk
    // does not name the DPDK libraries it uses, and SPDK's libraries carry a
    // RUNPATH of their install prefix, which hides the binary's rpath from their own
    // dependencies; loaded first, they are found by soname.
    let mut load: Vec<String> = LOAD_LIBS.iter().map(|lib| lib.to_string()).collect();
    load.extend(
        libs.iter()
            .filter(|lib| lib.starts_with("spdk_") || lib.starts_with("rte_"))
            .cloned(),
    );
    let mut loaded = std::collections::HashSet::new();
    load.retain(|lib| loaded.insert(lib.clone()));
    println!("cargo:load_libs={}", load.join(","));

    let mut shim = cc::Build::new();
    shim.file("shim.c")
        .include(".")
        .warnings(true)
        .flag_if_supported("-Wno-unused-parameter");
    for path in &include_paths {
        shim.include(path);
    }
    shim.compile("nvmirror_spdk_shim");

    let mut builder = bindgen::Builder::default()
        .header("wrapper.h")
        .clang_arg("-I.")
        .allowlist_function(FUNCTIONS.join("|"))
        .allowlist_function("nvmirror_.*")
        .allowlist_type(
            "spdk_bdev_io_status|spdk_bdev_io_type|spdk_app_parse_args_rvals|spdk_thread_poller_rc|spdk_bdev_fn_table|spdk_bdev",
        )
        .allowlist_var("SPDK_(BDEV_IO|POLLER|RPC|JSONRPC|ENV|MALLOC|SOCK)_.*|NVMIRROR_.*")
        // Packed or union-laden structs we only pass by pointer (their fields go through the shim).
        .opaque_type("spdk_bdev_ext_io_opts|spdk_bdev_io|spdk_nvme_.*|spdk_nvmf_.*")
        .default_enum_style(bindgen::EnumVariation::ModuleConsts)
        .derive_default(true)
        .layout_tests(false)
        .generate_comments(false)
        .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()));
    for path in &include_paths {
        builder = builder.clang_arg(format!("-I{}", path.display()));
    }
    let bindings = builder
        .generate()
        .unwrap_or_else(|e| fail(&format!("bindgen over SPDK's headers failed: {e}")));
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("bindings.rs");
    bindings
        .write_to_file(&out)
        .unwrap_or_else(|e| fail(&format!("cannot write {}: {e}", out.display())));
}

fn fail(reason: &str) -> ! {
    panic!(
        "\n\nnvmirror was built with --features spdk, but {reason}.\n\
         The SPDK runtime links an installed SPDK, found through SPDK_DIR (an SPDK tree built \
         with ./configure --with-shared && make: $SPDK_DIR/include/spdk/*.h, \
         $SPDK_DIR/build/lib/libspdk_*.so and $SPDK_DIR/build/lib/pkgconfig/spdk_*.pc) or, \
         without SPDK_DIR, through pkg-config (spdk_event.pc on PKG_CONFIG_PATH).\n\
         Build without --features spdk for the embedded runtime alone.\n"
    )
}
