//! The replication link: one TCP connection between a source and its destination.
//!
//! The engine core frames and interprets messages; this part owns the socket. Sends are queued by
//! the core (headers in its own buffer, transfer data as slices of ring memory) and each poll
//! flushes them with one vectored write of up to [`SEND_IOVECS_MAX`] slices, so transfer data
//! goes from the NVRAM ring to the socket without a staging copy. Receives fill one buffer with
//! one large read; whole messages are handed to the core in place.
//!
//! The source dials and redials with a capped exponential back-off, reset by a successful
//! handshake; the destination accepts, and a new connection from the source replaces the old one
//! (a restarted source must not wait for a dead socket to time out). Any protocol error closes
//! the connection: the core forgets what it had in flight and the source resends everything
//! unacknowledged after the next handshake. Whether a silent peer is lost is the core's decision
//! (its heartbeat and ack deadlines, [`nvmirror_engine::liveness`]); the link closes the
//! connection when the core asks ([`Link::close_if_requested`]).

use std::fmt::Display;
use std::io::{self, IoSlice, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use crate::reactor::{Period, ACCEPT_POLL_PERIOD_US};

/// Slices handed to one `writev`.
pub const SEND_IOVECS_MAX: usize = 64;
/// Socket buffer size asked of the kernel, as SPDK's posix sock module does.
pub const SOCKET_BUFFER_BYTES: usize = 2 << 20;
/// How long a dial may block the reactor (loopback answers at once; a remote peer may not).
pub const DIAL_TIMEOUT_MS: u64 = 200;
/// Wait before the first redial; each failed dial (or connection that ended before a handshake)
/// doubles it up to [`REDIAL_BACKOFF_US_MAX`]; a successful handshake resets it.
pub const REDIAL_BACKOFF_US_MIN: u64 = 250_000;
/// The longest wait between dials: a destination that comes back is found within this.
pub const REDIAL_BACKOFF_US_MAX: u64 = 5_000_000;
const _: () = assert!(REDIAL_BACKOFF_US_MIN > 0 && REDIAL_BACKOFF_US_MIN <= REDIAL_BACKOFF_US_MAX);
/// A partial message that gets no further bytes for this long means a corrupted length or a
/// hung peer: the connection is closed and the source resends after the next handshake.
pub const RECV_STALL_TIMEOUT_US: u64 = 5_000_000;
/// Messages handled per poll, so a flood of acknowledgements cannot starve the rest of the reactor.
pub const RECV_BUDGET_MESSAGES: usize = 256;

/// What the link needs from an engine endpoint (the source or the destination state machine).
pub trait LinkEndpoint {
    type Error: Display;
    fn handle_connected(&mut self, now_us: u64);
    fn handle_disconnected(&mut self, now_us: u64);
    fn handle_message(&mut self, now_us: u64, message: &[u8]) -> Result<(), Self::Error>;
    /// Fills `out` with up to `max` slices from the head of the send queue; returns their total bytes.
    fn tx_iovecs<'a>(&'a self, out: &mut IoVecs<'a>, max: usize) -> usize;
    fn tx_advance(&mut self, bytes: usize);
    /// Bytes queued to send: a flush with none returns before describing any (the slices'
    /// array is 1 KiB of stores to set up, and most passes have nothing to send).
    fn tx_pending_bytes(&self) -> u64;
    /// The whole-message length once the message header is in `buf`, `None` if more bytes are needed.
    fn frame_length(buf: &[u8]) -> Result<Option<usize>, Self::Error>;
    /// The peer's bytes could not be framed: queue whatever tells the peer why (sent before the
    /// connection closes). Returns the reason to log.
    fn refuse_unframed(&mut self, error: Self::Error) -> Self::Error {
        error
    }
    /// The core wants the connection closed now (its peer is lost), and why.
    fn poll_close(&mut self) -> Option<String> {
        None
    }
    /// The handshake succeeded on this connection (a dialing link then resets its back-off).
    fn session_ready(&self) -> bool {
        false
    }
}

/// One connection of the link as a runtime provides it: a non-blocking byte stream. The
/// embedded runtime's is a kernel TCP socket ([`TcpTransport`]); the SPDK runtime's is a socket
/// of SPDK's sock layer. Reads and writes never block: `WouldBlock` when there is nothing to
/// read or no room to write.
pub trait LinkStream: Send {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    fn write_vectored(&mut self, slices: &[IoSlice<'_>]) -> io::Result<usize>;
    /// The fd a sleeping reactor waits on (none: the stream is found ready by polling alone).
    fn raw_fd(&self) -> Option<RawFd>;
    fn peer_addr(&self) -> Option<SocketAddr>;
    /// Ends the connection in both directions.
    fn shutdown(&mut self);
}

/// Where a destination's link takes connections from: `accept` answers `WouldBlock` when no
/// connection waits.
pub trait LinkListener: Send {
    fn accept(&mut self) -> io::Result<(Box<dyn LinkStream>, SocketAddr)>;
    fn local_addr(&self) -> Option<SocketAddr>;
    fn raw_fd(&self) -> Option<RawFd>;
}

/// How a link opens connections: the same wire protocol over the embedded runtime's kernel
/// sockets or SPDK's sock layer, so mixed runtimes interoperate.
pub trait Transport: Send + Sync {
    /// Dials `peer`, waiting at most `timeout`; the stream it gives is non-blocking.
    fn connect(&self, peer: SocketAddr, timeout: Duration) -> io::Result<Box<dyn LinkStream>>;
    fn listen(&self, address: SocketAddr) -> io::Result<Box<dyn LinkListener>>;
}

/// Kernel TCP sockets: the embedded runtime's transport.
#[derive(Debug, Default, Clone, Copy)]
pub struct TcpTransport;

impl TcpTransport {
    pub fn shared() -> Arc<dyn Transport> {
        Arc::new(TcpTransport)
    }

    /// A connected socket made non-blocking and tuned (no Nagle, SPDK-sized buffers). A socket
    /// that cannot be made non-blocking would stall the whole reactor: it is refused.
    fn prepare(stream: TcpStream, peer: SocketAddr) -> io::Result<Box<dyn LinkStream>> {
        stream.set_nonblocking(true).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot make the connection to {peer} non-blocking: {e}"),
            )
        })?;
        if let Err(e) = tune_socket(&stream) {
            log::warn!("link: cannot tune the socket to {peer}: {e}");
        }
        Ok(Box::new(stream))
    }
}

impl Transport for TcpTransport {
    fn connect(&self, peer: SocketAddr, timeout: Duration) -> io::Result<Box<dyn LinkStream>> {
        Self::prepare(TcpStream::connect_timeout(&peer, timeout)?, peer)
    }

    fn listen(&self, address: SocketAddr) -> io::Result<Box<dyn LinkListener>> {
        let listener = TcpListener::bind(address)?;
        listener.set_nonblocking(true)?;
        Ok(Box::new(listener))
    }
}

impl LinkStream for TcpStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        Read::read(self, buf)
    }
    fn write_vectored(&mut self, slices: &[IoSlice<'_>]) -> io::Result<usize> {
        Write::write_vectored(self, slices)
    }
    fn raw_fd(&self) -> Option<RawFd> {
        Some(self.as_raw_fd())
    }
    fn peer_addr(&self) -> Option<SocketAddr> {
        TcpStream::peer_addr(self).ok()
    }
    fn shutdown(&mut self) {
        let _ = TcpStream::shutdown(self, std::net::Shutdown::Both);
    }
}

impl LinkListener for TcpListener {
    fn accept(&mut self) -> io::Result<(Box<dyn LinkStream>, SocketAddr)> {
        let (stream, from) = TcpListener::accept(self)?;
        Ok((TcpTransport::prepare(stream, from)?, from))
    }
    fn local_addr(&self) -> Option<SocketAddr> {
        TcpListener::local_addr(self).ok()
    }
    fn raw_fd(&self) -> Option<RawFd> {
        Some(self.as_raw_fd())
    }
}

/// The slices of one `writev`, on the stack: no allocation per flush.
pub struct IoVecs<'a> {
    slices: [IoSlice<'a>; SEND_IOVECS_MAX],
    len: usize,
}

impl<'a> IoVecs<'a> {
    pub fn new() -> Self {
        IoVecs {
            slices: [IoSlice::new(&[]); SEND_IOVECS_MAX],
            len: 0,
        }
    }
    pub fn as_slice(&self) -> &[IoSlice<'a>] {
        &self.slices[..self.len]
    }
}

impl Default for IoVecs<'_> {
    fn default() -> Self {
        Self::new()
    }
}

impl<'a> Extend<IoSlice<'a>> for IoVecs<'a> {
    fn extend<I: IntoIterator<Item = IoSlice<'a>>>(&mut self, slices: I) {
        for slice in slices {
            assert!(
                self.len < SEND_IOVECS_MAX,
                "more than {SEND_IOVECS_MAX} slices for one writev"
            );
            self.slices[self.len] = slice;
            self.len += 1;
        }
    }
}

/// Which side opens the connection.
pub enum LinkRole {
    Dial {
        peer: SocketAddr,
        next_dial_us: u64,
        /// The wait after the next failure.
        backoff_us: u64,
    },
    Accept {
        listener: Box<dyn LinkListener>,
        accept: Period,
    },
}

/// Counters of the link itself (the core counts protocol bytes).
#[derive(Debug, Default, Clone, Copy)]
pub struct LinkCounters {
    pub connects: u64,
    pub disconnects: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

pub struct Link {
    role: LinkRole,
    transport: Arc<dyn Transport>,
    stream: Option<Box<dyn LinkStream>>,
    recv_buffer: Vec<u8>,
    recv_filled: usize,
    /// Where the first unhandled byte of the receive buffer is.
    recv_start: usize,
    /// When the receive buffer last gained bytes.
    recv_progress_us: u64,
    last_error: Option<String>,
    pub counters: LinkCounters,
}

impl Link {
    /// A source's link dials `peer` from now on (the operator attached another destination):
    /// the current connection, if any, is closed and the next dial is at once.
    pub fn set_peer<E: LinkEndpoint>(&mut self, now_us: u64, endpoint: &mut E, peer: SocketAddr) {
        let LinkRole::Dial {
            peer: current,
            next_dial_us,
            backoff_us,
        } = &mut self.role
        else {
            panic!("only a source's link dials");
        };
        *current = peer;
        *next_dial_us = now_us;
        *backoff_us = REDIAL_BACKOFF_US_MIN;
        self.close(
            now_us,
            endpoint,
            format!("the destination is now {peer} (operator)"),
        );
    }

    /// A source's link: dials `peer` over `transport` now and again after every failure.
    pub fn dial(transport: Arc<dyn Transport>, peer: SocketAddr, message_bytes_max: usize) -> Self {
        Self::new(
            transport,
            LinkRole::Dial {
                peer,
                next_dial_us: 0,
                backoff_us: REDIAL_BACKOFF_US_MIN,
            },
            message_bytes_max,
        )
    }

    /// A destination's link: accepts on `listen` over `transport`.
    pub fn accept(
        transport: Arc<dyn Transport>,
        listen: SocketAddr,
        message_bytes_max: usize,
    ) -> io::Result<Self> {
        let listener = transport.listen(listen).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot listen for the source on {listen}: {e}"),
            )
        })?;
        Ok(Self::new(
            transport,
            LinkRole::Accept {
                listener,
                accept: Period::new(ACCEPT_POLL_PERIOD_US),
            },
            message_bytes_max,
        ))
    }

    fn new(transport: Arc<dyn Transport>, role: LinkRole, message_bytes_max: usize) -> Self {
        Link {
            role,
            transport,
            stream: None,
            // Twice the largest message: a whole one plus the start of the next always fit.
            recv_buffer: vec![0; 2 * message_bytes_max],
            recv_filled: 0,
            recv_start: 0,
            recv_progress_us: 0,
            last_error: None,
            counters: LinkCounters::default(),
        }
    }

    pub fn is_connected(&self) -> bool {
        self.stream.is_some()
    }

    /// The address the destination listens on (useful with port 0).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match &self.role {
            LinkRole::Accept { listener, .. } => listener.local_addr(),
            LinkRole::Dial { .. } => None,
        }
    }

    pub fn wait_fds(&self, out: &mut Vec<RawFd>) {
        out.extend(self.stream.as_ref().and_then(|stream| stream.raw_fd()));
        if let LinkRole::Accept { listener, .. } = &self.role {
            out.extend(listener.raw_fd());
        }
    }

    /// When the link wants to be polled again without I/O: the next dial, or the stall check.
    pub fn next_deadline_us(&self) -> Option<u64> {
        match (&self.role, &self.stream) {
            (LinkRole::Dial { next_dial_us, .. }, None) => Some(*next_dial_us),
            (_, Some(_)) if self.recv_filled > self.recv_start => {
                Some(self.recv_progress_us + RECV_STALL_TIMEOUT_US + 1)
            }
            _ => None,
        }
    }

    /// One bounded pass: (re)connect, receive and dispatch, flush the send queue. Returns work done.
    pub fn poll<E: LinkEndpoint>(&mut self, now_us: u64, endpoint: &mut E) -> usize {
        let mut work = self.poll_connect(now_us, endpoint);
        if self.stream.is_none() {
            return work;
        }
        match self.poll_receive(now_us, endpoint) {
            Ok(n) => {
                work += n;
                if let LinkRole::Dial { backoff_us, .. } = &mut self.role {
                    if endpoint.session_ready() {
                        *backoff_us = REDIAL_BACKOFF_US_MIN;
                    }
                }
            }
            Err(reason) => {
                // The core may have queued its reason for the peer (a Reject): send what fits first.
                let _ = self.flush(endpoint);
                self.close(now_us, endpoint, reason);
                return work + 1;
            }
        }
        work + self.send(now_us, endpoint)
    }

    /// Closes the connection if the core asks (its peer is lost: [`LinkEndpoint::poll_close`]).
    /// Call after the core's tick. Returns work done.
    pub fn close_if_requested<E: LinkEndpoint>(&mut self, now_us: u64, endpoint: &mut E) -> usize {
        match endpoint.poll_close() {
            Some(reason) if self.stream.is_some() => {
                self.close(now_us, endpoint, format!("peer lost: {reason}"));
                1
            }
            _ => 0,
        }
    }

    /// Sends what the core queued since the last poll, without reading: for a core that queued
    /// transfers after its receive pass (one receive syscall per loop is enough).
    pub fn send<E: LinkEndpoint>(&mut self, now_us: u64, endpoint: &mut E) -> usize {
        if self.stream.is_none() {
            return 0;
        }
        match self.flush(endpoint) {
            Ok(n) => n,
            Err(reason) => {
                self.close(now_us, endpoint, reason);
                1
            }
        }
    }

    /// The connection's upkeep without reading it: accepts or dials when due. Returns work done.
    pub fn poll_connect<E: LinkEndpoint>(&mut self, now_us: u64, endpoint: &mut E) -> usize {
        match &mut self.role {
            LinkRole::Accept { listener, accept } => {
                // An accept attempt per loop would be a wasted syscall per loop.
                if !accept.due(now_us) {
                    return 0;
                }
                match listener.accept() {
                    Ok((stream, from)) => {
                        if self.stream.is_some() {
                            log::warn!("link: new connection from {from} replaces the current one");
                            self.close(now_us, endpoint, "replaced by a new connection".into());
                        }
                        self.attach(now_us, stream, from, endpoint);
                        1
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                    Err(e) => {
                        log::warn!("link: accept failed: {e}");
                        0
                    }
                }
            }
            LinkRole::Dial {
                peer,
                next_dial_us,
                backoff_us,
            } => {
                if self.stream.is_some() || now_us < *next_dial_us {
                    return 0;
                }
                let peer = *peer;
                // The next dial waits the current back-off whether this one fails now or its
                // connection ends before a handshake; a handshake resets it.
                let wait_us = *backoff_us;
                *next_dial_us = now_us + wait_us;
                *backoff_us = (wait_us * 2).min(REDIAL_BACKOFF_US_MAX);
                match self
                    .transport
                    .connect(peer, Duration::from_millis(DIAL_TIMEOUT_MS))
                {
                    Ok(stream) => {
                        self.attach(now_us, stream, peer, endpoint);
                        1
                    }
                    Err(e) => {
                        let message = format!("cannot reach destination {peer}: {e}");
                        if self.last_error.as_deref() != Some(message.as_str()) {
                            log::warn!(
                                "link: {message}; retrying with a back-off from {} ms doubling \
                                 to {} ms",
                                REDIAL_BACKOFF_US_MIN / 1000,
                                REDIAL_BACKOFF_US_MAX / 1000
                            );
                            self.last_error = Some(message);
                        }
                        1
                    }
                }
            }
        }
    }

    fn attach<E: LinkEndpoint>(
        &mut self,
        now_us: u64,
        stream: Box<dyn LinkStream>,
        peer: SocketAddr,
        endpoint: &mut E,
    ) {
        log::info!("link: connected to {peer}");
        self.last_error = None;
        self.stream = Some(stream);
        self.recv_filled = 0;
        self.recv_start = 0;
        self.recv_progress_us = now_us;
        self.counters.connects += 1;
        endpoint.handle_connected(now_us);
    }

    /// Closes the connection after an error, says why once, and lets the core forget its in-flight state.
    pub fn close<E: LinkEndpoint>(&mut self, now_us: u64, endpoint: &mut E, reason: String) {
        if let Some(mut stream) = self.stream.take() {
            log::warn!(
                "link: closing connection to {:?}: {reason}",
                stream.peer_addr()
            );
            stream.shutdown();
            self.counters.disconnects += 1;
            self.recv_filled = 0;
            self.recv_start = 0;
            endpoint.handle_disconnected(now_us);
        }
    }

    fn poll_receive<E: LinkEndpoint>(
        &mut self,
        now_us: u64,
        endpoint: &mut E,
    ) -> Result<usize, String> {
        let stream = self.stream.as_mut().expect("receive without a connection");
        let mut work = 0;
        // A full buffer holds only whole messages left over by the budget: handle them first.
        let room = &mut self.recv_buffer[self.recv_filled..];
        match if room.is_empty() {
            Err(io::ErrorKind::WouldBlock.into())
        } else {
            stream.read(room)
        } {
            Ok(0) => return Err("peer closed the connection".into()),
            Ok(n) => {
                self.recv_filled += n;
                self.recv_progress_us = now_us;
                self.counters.bytes_received += n as u64;
                work += 1;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("receive failed: {e}")),
        }
        for _ in 0..RECV_BUDGET_MESSAGES {
            let pending = &self.recv_buffer[self.recv_start..self.recv_filled];
            let length = match E::frame_length(pending) {
                Ok(Some(length)) if length <= pending.len() => length,
                Ok(_) => break,
                Err(e) => {
                    let reason = endpoint.refuse_unframed(e);
                    return Err(format!("bad message framing: {reason}"));
                }
            };
            endpoint
                .handle_message(now_us, &pending[..length])
                .map_err(|e| format!("protocol error: {e}"))?;
            self.recv_start += length;
            work += 1;
        }
        // Move a partial message to the front only once it starts in the second half: the
        // buffer holds two largest messages, so the rest of this one always fits behind it, and
        // a large transfer arriving over many reads is not copied again at every read.
        if self.recv_start == self.recv_filled {
            self.recv_start = 0;
            self.recv_filled = 0;
        } else if self.recv_start >= self.recv_buffer.len() / 2 {
            self.recv_buffer
                .copy_within(self.recv_start..self.recv_filled, 0);
            self.recv_filled -= self.recv_start;
            self.recv_start = 0;
        }
        if self.recv_filled > self.recv_start
            && now_us.saturating_sub(self.recv_progress_us) > RECV_STALL_TIMEOUT_US
        {
            return Err(format!(
                "a partial message of {} bytes got no more bytes for {} ms",
                self.recv_filled - self.recv_start,
                RECV_STALL_TIMEOUT_US / 1000
            ));
        }
        Ok(work)
    }

    fn flush<E: LinkEndpoint>(&mut self, endpoint: &mut E) -> Result<usize, String> {
        let stream = self.stream.as_mut().expect("flush without a connection");
        let mut work = 0;
        while endpoint.tx_pending_bytes() > 0 {
            let mut slices = IoVecs::new();
            let described = endpoint.tx_iovecs(&mut slices, SEND_IOVECS_MAX);
            if described == 0 {
                return Ok(work);
            }
            match stream.write_vectored(slices.as_slice()) {
                Ok(0) => return Err("socket accepted no bytes".into()),
                Ok(n) => {
                    endpoint.tx_advance(n);
                    self.counters.bytes_sent += n as u64;
                    work += 1;
                    if n < described {
                        return Ok(work);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(work),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("send failed: {e}")),
            }
        }
        Ok(work)
    }
}

/// Best effort: no Nagle delay, SPDK-sized socket buffers.
fn tune_socket(stream: &TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let socket = socket2::SockRef::from(stream);
    socket.set_send_buffer_size(SOCKET_BUFFER_BYTES)?;
    socket.set_recv_buffer_size(SOCKET_BUFFER_BYTES)?;
    Ok(())
}
