//! nvmirror's SPDK runtime: the same engine core as the embedded runtime, driven by SPDK.
//!
//! - [`app`]: `spdk_app_start` with SPDK's own options (core mask, hugepage memory, JSON config,
//!   RPC socket), and a clean stop on a signal.
//! - [`thread`]: pollers on the current `spdk_thread`, messages to other threads, the clock.
//! - [`rpc`]: JSON-RPC methods registered with SPDK's RPC server, in Rust.
//! - [`bdev`]: any SPDK bdev (malloc, NVMe, AIO) as a namespace, behind the engine's
//!   completion-based device interface.
//! - [`sock`]: the replication link over SPDK's sock layer (same wire protocol as the embedded
//!   runtime's kernel sockets, so mixed runtimes interoperate).
//! - [`vbdev`]: the `bdev_nvmirror` module: a replicated virtual bdev whose writes go through the
//!   engine (ring, transfer, synchronous ack, CP); SPDK's nvmf target exports it.
//! - [`runner`]: a node (source or destination) polled by an SPDK poller.
//! - [`module`]: the `nvmirror` module's events (`save_config`, bdevs as they are registered).
//!
//! Unsafe code lives here and in `spdk-sys` only, each block with the reason it is sound. The
//! whole crate is empty without the `spdk` feature.
#![cfg(feature = "spdk")]

pub mod app;
pub mod bdev;
pub mod dma;
pub mod json;
pub mod module;
pub mod rpc;
pub mod runner;
pub mod sock;
pub mod thread;
pub mod vbdev;

pub use spdk_sys as sys;

/// The SPDK version this binary was built against ("SPDK v26.09-pre").
pub fn spdk_version() -> String {
    // SAFETY: returns a pointer to a static NUL-terminated string (SPDK_VERSION_STRING).
    unsafe { std::ffi::CStr::from_ptr(sys::nvmirror_spdk_version()) }
        .to_string_lossy()
        .into_owned()
}
