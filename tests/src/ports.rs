//! Ports for the servers the tests start as processes (nats-server, PostgreSQL,
//! the pollcast binary), which bind them after the harness picks them.
//!
//! A port picked by binding port 0 comes from the kernel's ephemeral range, the
//! same range every outgoing connection's local port comes from. Between the
//! pick and the server's bind, another test's connection or listener can take
//! it: in CI a cluster node died with "address already in use". Ports here come
//! from below that range, where only explicit binds land, and this process
//! never hands out one twice.

use std::net::TcpListener;
use std::sync::atomic::{AtomicU32, Ordering};

/// The lowest port the harness hands out.
const LOWEST: u32 = 10_000;

/// A port on 127.0.0.1 that is free now, below the ephemeral range. Falls back
/// to one from the ephemeral range when the range below is too small or full.
pub fn listen_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let span = ephemeral_low().saturating_sub(LOWEST);
    if span >= 1_000 {
        // Test binaries run one after another, but a developer may run two at
        // once: start each process somewhere else in the range.
        let offset = std::process::id().wrapping_mul(7_919);
        for _ in 0..span {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let candidate = LOWEST + offset.wrapping_add(n) % span;
            let Ok(port) = u16::try_from(candidate) else {
                continue;
            };
            if TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("free port")
        .port()
}

/// The first port of the kernel's ephemeral range (Linux's default when it
/// cannot be read).
fn ephemeral_low() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_free_below_the_ephemeral_range_and_never_repeat() {
        let ports: Vec<u16> = (0..64).map(|_| listen_port()).collect();
        let mut unique = ports.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), ports.len(), "a port was handed out twice");
        let below = ephemeral_low() >= LOWEST + 1_000;
        for port in ports {
            if below {
                assert!(
                    (LOWEST..ephemeral_low()).contains(&u32::from(port)),
                    "{port}"
                );
            }
            assert!(TcpListener::bind(("127.0.0.1", port)).is_ok());
        }
    }
}
