//! Bindings to the installed SPDK: bindgen over its headers (`wrapper.h`), limited to what
//! nvmirror calls, and a small C shim (`shim.c`) for what bindgen cannot express. Empty without
//! the `spdk` feature. Everything here is unsafe FFI; the safe layer is the `nvmirror-spdk` crate.
#![cfg(feature = "spdk")]
#![allow(
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    dead_code
)]
#![allow(clippy::all, clippy::undocumented_unsafe_blocks)]
#![allow(unknown_lints, unnecessary_transmutes)]

include!(concat!(env!("OUT_DIR"), "/bindings.rs"));
