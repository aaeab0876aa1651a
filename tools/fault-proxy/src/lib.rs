//! A loopback TCP proxy for faults on nvmirror's replication link (issue 9, "a loopback fault
//! proxy"): it listens on 127.0.0.0/8, forwards every connection to the real destination (also
//! on loopback, never another address), and on command delays, stalls, drops or corrupts what
//! it forwards, then heals.
//!
//! - `stall`: a blackhole that keeps the sockets open. Nothing is read any more, so TCP's own
//!   flow control pushes back on the sender, and nothing is closed: what a SIGSTOPped peer or a
//!   dead network path looks like from a socket. New connections are accepted and stalled too.
//! - `drop`: every current connection is closed (both sockets); new ones are forwarded.
//! - `delay=D`: each forwarded chunk waits D before it goes on.
//! - `corrupt`: one byte of the next forwarded chunk is flipped (either direction).
//! - `heal`: no stall, no delay.
//!
//! Faults come from a [`Script`] of steps run in order, each when its trigger is reached (a time
//! since start, or a count of bytes forwarded both ways), or from a test through
//! [`FaultProxy::apply`]. Threads, not a reactor: this is a test tool, its cost is not measured.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Bytes one read takes at most.
pub const CHUNK_BYTES: usize = 64 * 1024;
/// How often an idle pump or a stalled one looks at the fault state again.
pub const POLL_INTERVAL: Duration = Duration::from_millis(2);
/// How long connecting to the upstream may take (it is on loopback).
pub const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// What the proxy does to the traffic from now on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Heal,
    Stall,
    Drop,
    Delay(Duration),
    Corrupt,
}

/// When a scripted step runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// This long after the proxy started.
    At(Duration),
    /// Once this many bytes were forwarded (both directions together).
    AfterBytes(u64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    pub trigger: Trigger,
    pub action: Action,
}

/// Steps run in order: each waits for its trigger after the one before it ran.
pub type Script = Vec<Step>;

/// `2s`, `1.5s`, `250ms`, `100us`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let (number, unit) = text
        .find(|c: char| c.is_ascii_alphabetic())
        .map(|at| text.split_at(at))
        .ok_or_else(|| format!("{text}: a duration needs a unit (s, ms, us)"))?;
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text}: not a number of {unit}"))?;
    let scale = match unit {
        "s" => 1.0,
        "ms" => 1e-3,
        "us" => 1e-6,
        _ => return Err(format!("{text}: unknown unit {unit} (s, ms, us)")),
    };
    if !(value.is_finite() && value >= 0.0) {
        return Err(format!("{text}: not a duration"));
    }
    Ok(Duration::from_secs_f64(value * scale))
}

/// `stall`, `heal`, `drop`, `corrupt`, `delay=50ms`.
pub fn parse_action(text: &str) -> Result<Action, String> {
    match text.split_once('=') {
        Some(("delay", duration)) => parse_duration(duration).map(Action::Delay),
        Some(_) => Err(format!("{text}: unknown action")),
        None => match text {
            "stall" => Ok(Action::Stall),
            "heal" => Ok(Action::Heal),
            "drop" => Ok(Action::Drop),
            "corrupt" => Ok(Action::Corrupt),
            _ => Err(format!(
                "{text}: unknown action (stall, heal, drop, corrupt, delay=DURATION)"
            )),
        },
    }
}

/// The script of a command line: `--at 2s stall --at 5s heal --after-bytes 1048576 drop`.
/// Other arguments are errors.
pub fn parse_script(args: &[String]) -> Result<Script, String> {
    let mut steps = Vec::new();
    let mut args = args.iter();
    while let Some(flag) = args.next() {
        let (Some(when), Some(action)) = (args.next(), args.next()) else {
            return Err(format!("{flag} needs a trigger and an action"));
        };
        let trigger = match flag.as_str() {
            "--at" => Trigger::At(parse_duration(when)?),
            "--after-bytes" => Trigger::AfterBytes(
                when.parse()
                    .map_err(|_| format!("--after-bytes {when}: not a byte count"))?,
            ),
            other => return Err(format!("{other}: unknown option (--at, --after-bytes)")),
        };
        steps.push(Step {
            trigger,
            action: parse_action(action)?,
        });
    }
    Ok(steps)
}

/// Only 127.0.0.0/8: the proxy never reaches or serves another address.
pub fn check_loopback(address: SocketAddr) -> io::Result<()> {
    match address {
        SocketAddr::V4(v4) if v4.ip().is_loopback() => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{address}: the fault proxy works on 127.0.0.0/8 only"),
        )),
    }
}

/// What the proxy forwarded and did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProxyStats {
    pub bytes_to_upstream: u64,
    pub bytes_to_client: u64,
    pub connections: u64,
    pub chunks_corrupted: u64,
}

#[derive(Debug, Default)]
struct Faults {
    stalled: bool,
    delay: Duration,
    corrupt_pending: u32,
    /// Bumped by every drop: pumps of an older generation close their connection.
    generation: u64,
}

#[derive(Debug, Default)]
struct Shared {
    faults: Mutex<Faults>,
    stop: AtomicBool,
    bytes_to_upstream: AtomicU64,
    bytes_to_client: AtomicU64,
    connections: AtomicU64,
    chunks_corrupted: AtomicU64,
}

impl Shared {
    fn apply(&self, action: Action) {
        let mut faults = self.faults.lock().unwrap();
        match action {
            Action::Heal => {
                faults.stalled = false;
                faults.delay = Duration::ZERO;
            }
            Action::Stall => faults.stalled = true,
            Action::Drop => faults.generation += 1,
            Action::Delay(delay) => faults.delay = delay,
            Action::Corrupt => faults.corrupt_pending += 1,
        }
    }

    fn bytes(&self) -> u64 {
        self.bytes_to_upstream.load(Ordering::Relaxed)
            + self.bytes_to_client.load(Ordering::Relaxed)
    }
}

/// A running proxy; dropping it stops it and closes every connection.
pub struct FaultProxy {
    shared: Arc<Shared>,
    local: SocketAddr,
    threads: Vec<JoinHandle<()>>,
}

impl FaultProxy {
    /// Listens on `listen` (port 0: any free port) and forwards to `upstream`, running `script`.
    pub fn start(listen: SocketAddr, upstream: SocketAddr, script: Script) -> io::Result<Self> {
        check_loopback(listen)?;
        check_loopback(upstream)?;
        let listener = TcpListener::bind(listen)?;
        listener.set_nonblocking(true)?;
        let local = listener.local_addr()?;
        let shared = Arc::new(Shared::default());
        let accept_shared = shared.clone();
        let mut threads = vec![std::thread::spawn(move || {
            accept_loop(&listener, upstream, &accept_shared)
        })];
        if !script.is_empty() {
            let script_shared = shared.clone();
            threads.push(std::thread::spawn(move || {
                run_script(&script, &script_shared)
            }));
        }
        Ok(FaultProxy {
            shared,
            local,
            threads,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Applies a fault now (what a scripted step does).
    pub fn apply(&self, action: Action) {
        self.shared.apply(action);
    }

    pub fn stats(&self) -> ProxyStats {
        let shared = &self.shared;
        ProxyStats {
            bytes_to_upstream: shared.bytes_to_upstream.load(Ordering::Relaxed),
            bytes_to_client: shared.bytes_to_client.load(Ordering::Relaxed),
            connections: shared.connections.load(Ordering::Relaxed),
            chunks_corrupted: shared.chunks_corrupted.load(Ordering::Relaxed),
        }
    }

    /// Runs until the process ends (the binary's main loop).
    pub fn wait(mut self) {
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

fn run_script(script: &Script, shared: &Shared) {
    let started = Instant::now();
    for step in script {
        loop {
            if shared.stop.load(Ordering::Acquire) {
                return;
            }
            let due = match step.trigger {
                Trigger::At(at) => started.elapsed() >= at,
                Trigger::AfterBytes(bytes) => shared.bytes() >= bytes,
            };
            if due {
                break;
            }
            std::thread::sleep(POLL_INTERVAL);
        }
        eprintln!(
            "fault-proxy: {:.3} s, {} bytes forwarded: {:?}",
            started.elapsed().as_secs_f64(),
            shared.bytes(),
            step.action
        );
        shared.apply(step.action);
    }
}

fn accept_loop(listener: &TcpListener, upstream: SocketAddr, shared: &Arc<Shared>) {
    let mut pumps: Vec<JoinHandle<()>> = Vec::new();
    while !shared.stop.load(Ordering::Acquire) {
        let client = match listener.accept() {
            Ok((client, _)) => client,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(POLL_INTERVAL);
                pumps.retain(|pump| !pump.is_finished());
                continue;
            }
            Err(e) => {
                eprintln!("fault-proxy: accept failed: {e}");
                std::thread::sleep(POLL_INTERVAL);
                continue;
            }
        };
        let server = match TcpStream::connect_timeout(&upstream, UPSTREAM_CONNECT_TIMEOUT) {
            Ok(server) => server,
            Err(e) => {
                // The client sees the refusal as a closed connection, as it would directly.
                eprintln!("fault-proxy: cannot reach {upstream}: {e}");
                continue;
            }
        };
        shared.connections.fetch_add(1, Ordering::Relaxed);
        let generation = shared.faults.lock().unwrap().generation;
        for (from, to, to_upstream) in [
            (client.try_clone(), server.try_clone(), true),
            (server.try_clone(), client.try_clone(), false),
        ] {
            let (Ok(from), Ok(to)) = (from, to) else {
                eprintln!("fault-proxy: cannot clone a socket");
                continue;
            };
            let shared = shared.clone();
            pumps.push(std::thread::spawn(move || {
                pump(from, to, to_upstream, generation, &shared)
            }));
        }
    }
    for pump in pumps {
        let _ = pump.join();
    }
}

/// Forwards one direction of one connection until either side closes, a drop, or the stop.
fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    to_upstream: bool,
    generation: u64,
    shared: &Shared,
) {
    let _ = from.set_read_timeout(Some(POLL_INTERVAL));
    let _ = to.set_nodelay(true);
    let counter = if to_upstream {
        &shared.bytes_to_upstream
    } else {
        &shared.bytes_to_client
    };
    let mut chunk = vec![0u8; CHUNK_BYTES];
    // Bytes read and not yet forwarded (held while stalled).
    let mut held = 0usize;
    loop {
        if shared.stop.load(Ordering::Acquire) {
            break;
        }
        let (stalled, delay, dropped) = {
            let faults = shared.faults.lock().unwrap();
            (
                faults.stalled,
                faults.delay,
                faults.generation != generation,
            )
        };
        if dropped {
            break;
        }
        if stalled {
            // Nothing read, nothing written, nothing closed: a blackhole.
            std::thread::sleep(POLL_INTERVAL);
            continue;
        }
        if held == 0 {
            match from.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => held = n,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) =>
                {
                    continue
                }
                Err(_) => break,
            }
            if !delay.is_zero() {
                std::thread::sleep(delay);
            }
            // A stall that began meanwhile holds these bytes (checked at the top).
            continue;
        }
        {
            let mut faults = shared.faults.lock().unwrap();
            if faults.corrupt_pending > 0 {
                faults.corrupt_pending -= 1;
                chunk[held / 2] ^= 0x5A;
                shared.chunks_corrupted.fetch_add(1, Ordering::Relaxed);
            }
        }
        if to.write_all(&chunk[..held]).is_err() {
            break;
        }
        counter.fetch_add(held as u64, Ordering::Relaxed);
        held = 0;
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn echo_server() -> (SocketAddr, JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        let thread = std::thread::spawn(move || {
            if let Ok((mut stream, _)) = listener.accept() {
                let mut buffer = [0u8; 4096];
                while let Ok(n) = stream.read(&mut buffer) {
                    if n == 0 || stream.write_all(&buffer[..n]).is_err() {
                        break;
                    }
                }
            }
        });
        (address, thread)
    }

    fn round_trip(stream: &mut TcpStream, bytes: &[u8], timeout: Duration) -> io::Result<Vec<u8>> {
        stream.set_read_timeout(Some(timeout))?;
        stream.write_all(bytes)?;
        let mut back = vec![0u8; bytes.len()];
        stream.read_exact(&mut back)?;
        Ok(back)
    }

    #[test]
    fn scripts_and_actions_parse() {
        let args: Vec<String> = "--at 2s stall --at 1.5s heal --after-bytes 4096 drop --at 10ms delay=50ms --at 0s corrupt"
            .split(' ')
            .map(String::from)
            .collect();
        assert_eq!(
            parse_script(&args).unwrap(),
            vec![
                Step {
                    trigger: Trigger::At(Duration::from_secs(2)),
                    action: Action::Stall
                },
                Step {
                    trigger: Trigger::At(Duration::from_millis(1500)),
                    action: Action::Heal
                },
                Step {
                    trigger: Trigger::AfterBytes(4096),
                    action: Action::Drop
                },
                Step {
                    trigger: Trigger::At(Duration::from_millis(10)),
                    action: Action::Delay(Duration::from_millis(50))
                },
                Step {
                    trigger: Trigger::At(Duration::ZERO),
                    action: Action::Corrupt
                },
            ]
        );
        for bad in [
            "--at 2 stall",
            "--at 2s freeze",
            "--every 2s stall",
            "--at 2s",
            "--after-bytes x drop",
        ] {
            let args: Vec<String> = bad.split(' ').map(String::from).collect();
            assert!(parse_script(&args).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn only_loopback_addresses_are_accepted() {
        let loopback: SocketAddr = "127.0.0.1:1".parse().unwrap();
        for other in ["10.0.0.1:1", "0.0.0.0:1", "[::1]:1"] {
            let other: SocketAddr = other.parse().unwrap();
            assert!(
                FaultProxy::start(other, loopback, Vec::new()).is_err(),
                "{other}"
            );
            assert!(
                FaultProxy::start(loopback, other, Vec::new()).is_err(),
                "{other}"
            );
        }
        assert!(check_loopback("127.3.2.1:9".parse().unwrap()).is_ok());
    }

    #[test]
    fn forwards_stalls_without_closing_heals_corrupts_and_drops() {
        let (upstream, server) = echo_server();
        let proxy =
            FaultProxy::start("127.0.0.1:0".parse().unwrap(), upstream, Vec::new()).unwrap();
        let mut client = TcpStream::connect(proxy.local_addr()).unwrap();
        assert_eq!(
            round_trip(&mut client, b"hello", Duration::from_secs(5)).unwrap(),
            b"hello"
        );

        proxy.apply(Action::Stall);
        std::thread::sleep(Duration::from_millis(20));
        let stalled = round_trip(&mut client, b"again", Duration::from_millis(300));
        assert!(
            matches!(&stalled, Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)),
            "a stall answers nothing and closes nothing: {stalled:?}"
        );
        proxy.apply(Action::Heal);
        let mut back = [0u8; 5];
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        client.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"again", "held bytes go on after the heal");

        proxy.apply(Action::Corrupt);
        let corrupted = round_trip(&mut client, b"abcdef", Duration::from_secs(5)).unwrap();
        assert_ne!(corrupted, b"abcdef");
        assert_eq!(proxy.stats().chunks_corrupted, 1);

        proxy.apply(Action::Drop);
        let mut byte = [0u8; 1];
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        assert!(matches!(client.read(&mut byte), Ok(0) | Err(_)), "dropped");
        let stats = proxy.stats();
        assert_eq!(stats.connections, 1);
        assert!(
            stats.bytes_to_upstream >= 16 && stats.bytes_to_client >= 16,
            "{stats:?}"
        );
        drop(proxy);
        server.join().unwrap();
    }

    #[test]
    fn a_script_runs_by_time_and_by_bytes() {
        let (upstream, _server) = echo_server();
        let script = vec![
            Step {
                trigger: Trigger::AfterBytes(8),
                action: Action::Stall,
            },
            Step {
                trigger: Trigger::At(Duration::from_millis(400)),
                action: Action::Heal,
            },
        ];
        let proxy = FaultProxy::start("127.0.0.1:0".parse().unwrap(), upstream, script).unwrap();
        let started = Instant::now();
        let mut client = TcpStream::connect(proxy.local_addr()).unwrap();
        assert_eq!(
            round_trip(&mut client, b"1234", Duration::from_secs(5)).unwrap(),
            b"1234"
        );
        std::thread::sleep(Duration::from_millis(50));
        // 8 bytes forwarded: stalled now, until 400 ms.
        assert_eq!(
            round_trip(&mut client, b"5678", Duration::from_secs(5)).unwrap(),
            b"5678"
        );
        assert!(
            started.elapsed() >= Duration::from_millis(390),
            "{:?}",
            started.elapsed()
        );
    }
}
