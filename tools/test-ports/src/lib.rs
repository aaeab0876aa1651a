//! Loopback ports for tests that hand a port to a process which binds it later.
//!
//! Binding port 0 and closing the socket is a race twice over: the port comes from the kernel's
//! ephemeral range, so any `connect` of a test running beside it (a source dialling its
//! destination, a host its target) may take it as its local port before the process under test
//! binds it (`EADDRINUSE`, the process exits); and once closed, the kernel may hand the same port
//! to the next `bind(0)` of another test thread, so two tests listen on, or probe, one port. Ports
//! here come from below the ephemeral range, which the kernel never picks on its own, each at most
//! once per test binary, starting at an offset of the process id so two binaries run side by side
//! rarely meet; each is checked free by binding it before it is handed out.

use std::net::{Ipv4Addr, TcpListener};
use std::sync::atomic::{AtomicU32, Ordering};

/// The lowest port handed out: above the registered services a test machine may run.
const LOWEST: u32 = 10_000;

/// Ports handed out so far by this process.
static HANDED_OUT: AtomicU32 = AtomicU32::new(0);

/// A loopback port nothing listens on, that no other call in this process returned and that the
/// kernel does not pick for a `connect` or a `bind(0)`.
pub fn free_port() -> u16 {
    let (low, high) = unpicked_range(ephemeral_range());
    let offset = std::process::id().wrapping_mul(2_654_435_761) % (high - low + 1);
    claim((low, high), offset, &HANDED_OUT)
}

/// The first port of `low..=high`, counting on from `offset` by `counter`, that nothing listens on.
fn claim((low, high): (u32, u32), offset: u32, counter: &AtomicU32) -> u16 {
    let span = high - low + 1;
    for _ in 0..span {
        let n = counter.fetch_add(1, Ordering::Relaxed);
        let port = low + (offset + n) % span;
        let port = u16::try_from(port).expect("the range lies within u16");
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {low}..={high}");
}

/// The kernel's ephemeral range; Linux's default where it cannot be read.
fn ephemeral_range() -> (u32, u32) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| parse_range(&text))
        .unwrap_or((32_768, 60_999))
}

fn parse_range(text: &str) -> Option<(u32, u32)> {
    let mut fields = text.split_whitespace().map(str::parse::<u32>);
    match (fields.next(), fields.next()) {
        (Some(Ok(low)), Some(Ok(high))) if low <= high && high <= 65_535 => Some((low, high)),
        _ => None,
    }
}

/// The larger of the spans below and above `ephemeral` (from `LOWEST`); a machine whose
/// ephemeral range leaves fewer than a thousand ports outside it has no span the kernel never
/// picks, and there the tests share the upper end of the range with it.
fn unpicked_range((ephemeral_low, ephemeral_high): (u32, u32)) -> (u32, u32) {
    let below = (LOWEST, ephemeral_low.saturating_sub(1));
    let above = (ephemeral_high + 1, 65_535);
    let size = |(low, high): (u32, u32)| (high + 1).saturating_sub(low);
    let best = if size(below) >= size(above) {
        below
    } else {
        above
    };
    if size(best) >= 1_000 {
        best
    } else {
        (65_535 - 4_999, 65_535)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_lie_outside_the_ephemeral_range_and_are_never_handed_out_twice() {
        let (low, high) = ephemeral_range();
        let ports: Vec<u16> = (0..200).map(|_| free_port()).collect();
        let mut unique = ports.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), ports.len(), "{ports:?}");
        if unpicked_range((low, high)).1 < low || unpicked_range((low, high)).0 > high {
            let inside: Vec<_> = ports
                .iter()
                .filter(|&&port| (low..=high).contains(&u32::from(port)))
                .collect();
            assert!(inside.is_empty(), "inside {low}..={high}: {inside:?}");
        }
    }

    #[test]
    fn a_port_someone_listens_on_is_skipped() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let taken = u32::from(listener.local_addr().unwrap().port());
        let counter = AtomicU32::new(0);
        // The range starts at the port listened on: the first candidate is skipped, the next
        // (nothing listens there unless a test beside this one just took it) handed out.
        let port = claim((taken, taken + 1), 0, &counter);
        assert_ne!(u32::from(port), taken);
        assert_eq!(counter.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn ranges_are_read_and_chosen_around_the_ephemeral_one() {
        assert_eq!(parse_range("32768\t60999\n"), Some((32_768, 60_999)));
        assert_eq!(parse_range("60999 32768"), None);
        assert_eq!(parse_range(""), None);
        assert_eq!(unpicked_range((32_768, 60_999)), (10_000, 32_767));
        assert_eq!(unpicked_range((1_024, 40_000)), (40_001, 65_535));
        assert_eq!(unpicked_range((1_024, 65_535)), (60_536, 65_535));
    }
}
