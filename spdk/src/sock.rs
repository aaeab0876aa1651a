//! The replication link over SPDK's sock layer: the same wire protocol as the embedded
//! runtime's kernel sockets ([`nvmirror_runtime::link::TcpTransport`]), so an SPDK source
//! replicates to an embedded destination and the reverse. The link polls its socket from the
//! node's poller; SPDK's posix implementation sets no-delay and its socket buffers.

use std::ffi::{c_char, CString};
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::time::Duration;

use nvmirror_runtime::link::{LinkListener, LinkStream, Transport};

use crate::sys;

/// SPDK's sock layer with its default implementation (posix).
#[derive(Debug, Default, Clone, Copy)]
pub struct SockTransport;

/// One SPDK socket, closed on drop.
struct Sock {
    sock: *mut sys::spdk_sock,
    peer: Option<SocketAddr>,
}

// SAFETY: a Sock is made, used and closed on the node's SPDK thread only; `Send` is asked by
// the link's trait because embedded nodes move between threads at start, which SPDK nodes
// never do.
unsafe impl Send for Sock {}

/// Why an SPDK sock call that returned no socket failed: errno, else `kind`.
fn no_socket(kind: io::ErrorKind, call: &str) -> io::Error {
    let error = io::Error::last_os_error();
    match error.raw_os_error() {
        Some(0) | None => io::Error::new(kind, format!("{call} failed")),
        _ => error,
    }
}

/// The error of an SPDK sock call: `rc` is -1 with errno set, or a negative errno.
fn sock_error(rc: isize) -> io::Error {
    if rc == -1 {
        io::Error::last_os_error()
    } else {
        io::Error::from_raw_os_error(-rc as i32)
    }
}

fn endpoint(address: SocketAddr) -> Result<(CString, i32), io::Error> {
    let ip = CString::new(address.ip().to_string()).expect("an IP has no NUL");
    Ok((ip, i32::from(address.port())))
}

/// The local address of a socket and, when `with_peer` (a connected one), its peer's.
fn addresses(
    sock: *mut sys::spdk_sock,
    with_peer: bool,
) -> Option<(SocketAddr, Option<SocketAddr>)> {
    let mut local = [0 as c_char; 64];
    let mut peer = [0 as c_char; 64];
    let (mut local_port, mut peer_port) = (0u16, 0u16);
    let (peer_buf, peer_len, peer_port_ptr) = if with_peer {
        (
            peer.as_mut_ptr(),
            peer.len() as i32,
            &mut peer_port as *mut u16,
        )
    } else {
        (std::ptr::null_mut(), 0, std::ptr::null_mut())
    };
    // SAFETY: the buffers are as long as passed (none for a listening socket's peer, which
    // SPDK refuses to report); SPDK writes NUL-terminated strings.
    let rc = unsafe {
        sys::spdk_sock_getaddr(
            sock,
            local.as_mut_ptr(),
            local.len() as i32,
            &mut local_port,
            peer_buf,
            peer_len,
            peer_port_ptr,
        )
    };
    if rc != 0 {
        return None;
    }
    let text = |buf: &[c_char]| {
        // SAFETY: SPDK wrote a NUL-terminated string into buf.
        unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
            .to_string_lossy()
            .into_owned()
    };
    let local = format!("{}:{local_port}", text(&local)).parse().ok()?;
    let peer = if with_peer {
        Some(format!("{}:{peer_port}", text(&peer)).parse().ok()?)
    } else {
        None
    };
    Some((local, peer))
}

impl Transport for SockTransport {
    fn connect(&self, peer: SocketAddr, timeout: Duration) -> io::Result<Box<dyn LinkStream>> {
        let (ip, port) = endpoint(peer)?;
        let mut opts = sys::spdk_sock_opts {
            opts_size: std::mem::size_of::<sys::spdk_sock_opts>(),
            ..Default::default()
        };
        // SAFETY: opts is sized as passed; SPDK fills in its defaults.
        unsafe { sys::spdk_sock_get_default_opts(&mut opts) };
        opts.connect_timeout = timeout.as_millis().max(1) as u32;
        // SAFETY: ip is a NUL-terminated string alive for the call; no impl name (default).
        let sock =
            unsafe { sys::spdk_sock_connect_ext(ip.as_ptr(), port, std::ptr::null(), &mut opts) };
        if sock.is_null() {
            return Err(no_socket(
                io::ErrorKind::ConnectionRefused,
                "spdk_sock_connect",
            ));
        }
        Ok(Box::new(Sock {
            sock,
            peer: Some(peer),
        }))
    }

    fn listen(&self, address: SocketAddr) -> io::Result<Box<dyn LinkListener>> {
        let (ip, port) = endpoint(address)?;
        // SAFETY: ip is a NUL-terminated string alive for the call; no impl name (default).
        let sock = unsafe { sys::spdk_sock_listen(ip.as_ptr(), port, std::ptr::null()) };
        if sock.is_null() {
            return Err(no_socket(io::ErrorKind::AddrInUse, "spdk_sock_listen"));
        }
        let local = addresses(sock, false)
            .map(|(local, _)| local)
            .or(Some(address));
        Ok(Box::new(Listener {
            sock: Sock { sock, peer: None },
            local,
        }))
    }
}

impl LinkStream for Sock {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: buf is writable for its length; the socket is open.
        let rc = unsafe { sys::spdk_sock_recv(self.sock, buf.as_mut_ptr().cast(), buf.len()) };
        if rc < 0 {
            return Err(sock_error(rc));
        }
        Ok(rc as usize)
    }

    fn write_vectored(&mut self, slices: &[IoSlice<'_>]) -> io::Result<usize> {
        // IoSlice is ABI-compatible with struct iovec (std guarantees it on Unix).
        let iov = slices.as_ptr() as *mut sys::iovec;
        // SAFETY: iov points at slices.len() iovecs of live buffers; SPDK only reads them.
        let rc = unsafe { sys::spdk_sock_writev(self.sock, iov, slices.len() as i32) };
        if rc < 0 {
            return Err(sock_error(rc));
        }
        Ok(rc as usize)
    }

    fn raw_fd(&self) -> Option<RawFd> {
        None
    }

    fn peer_addr(&self) -> Option<SocketAddr> {
        self.peer
            .or_else(|| addresses(self.sock, true).and_then(|(_, peer)| peer))
    }

    fn shutdown(&mut self) {
        self.close();
    }
}

impl Sock {
    fn close(&mut self) {
        if !self.sock.is_null() {
            // SAFETY: open until now; spdk_sock_close nulls the pointer.
            unsafe { sys::spdk_sock_close(&mut self.sock) };
            self.sock = std::ptr::null_mut();
        }
    }
}

impl Drop for Sock {
    fn drop(&mut self) {
        self.close();
    }
}

struct Listener {
    sock: Sock,
    local: Option<SocketAddr>,
}

impl LinkListener for Listener {
    fn accept(&mut self) -> io::Result<(Box<dyn LinkStream>, SocketAddr)> {
        // SAFETY: the listening socket is open; accept does not block.
        let sock = unsafe { sys::spdk_sock_accept(self.sock.sock) };
        if sock.is_null() {
            let error = io::Error::last_os_error();
            return Err(match error.raw_os_error() {
                Some(libc::EAGAIN) | Some(0) | None => io::ErrorKind::WouldBlock.into(),
                _ => error,
            });
        }
        let peer = addresses(sock, true).and_then(|(_, peer)| peer);
        let from = peer.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
        Ok((Box::new(Sock { sock, peer }), from))
    }

    fn local_addr(&self) -> Option<SocketAddr> {
        self.local
    }

    fn raw_fd(&self) -> Option<RawFd> {
        None
    }
}
