//! nvmirror's embedded runtime: what drives the engine core on real threads, memory and sockets.
pub mod bdev;
pub mod hugepages;
pub mod link;
pub mod management;
pub mod metadata_file;
pub mod node;
pub mod reactor;
pub mod remote;
pub mod ring_memory;
pub mod stream;
pub mod target;
pub mod volume;
pub mod workload;
