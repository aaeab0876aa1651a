//! NVMe over TCP for nvmirror.
