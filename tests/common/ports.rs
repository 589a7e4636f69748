//! Loopback ports for the servers tests start, below the kernel's ephemeral
//! range and claimed for the life of the test process that got them, so that
//! neither an outgoing connection's local port nor another test process
//! running at once can take one. Std only: the Rust client's tests include
//! this file too (`#[path]`), as they share no other test code.
#![allow(dead_code)]

/// A loopback port free right now, below the kernel's ephemeral range.
///
/// A port the kernel hands out for `bind(0)` comes from the same range as the
/// local ports of outgoing connections, which the tests open by the thousand:
/// between finding it free and the server binding it (or while a server is
/// restarted on it) a connection could take it, and the server would fail to
/// start (CI saw a throwaway redis-server fail so). Below the range only a
/// server asking for that very port can take it.
pub fn free_port() -> u16 {
    free_port_below(ephemeral_start())
}

/// A free loopback port in `[10000, end)` that no other test process on this
/// machine holds (random, then claimed: see [`claim`]).
pub fn free_port_below(end: u16) -> u16 {
    free_ports_below(end, &[0])
}

/// A port `p` in `[10000, end)` with `p + offset` free and claimed for every
/// offset given (a redis cluster node needs its bus port, `p + 10000`, too).
pub fn free_ports_below(end: u16, offsets: &[u16]) -> u16 {
    const START: u16 = 10_000;
    if end <= START + 1_000 {
        // An unusual ephemeral range: take what the kernel gives.
        for _ in 0..1_000 {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            let port = l.local_addr().expect("addr").port();
            drop(l);
            if let Some(port) = free_ports_in(port..port.saturating_add(1), offsets) {
                return port;
            }
        }
        panic!("no free port from the kernel with {offsets:?} beside it");
    }
    free_ports_in(START..end, offsets).unwrap_or_else(|| panic!("no free port in {START}..{end}"))
}

/// A port `p` in `range`, tried in random order, with `p + offset` free and
/// claimed for every offset given; `None` if none is.
pub fn free_ports_in(range: std::ops::Range<u16>, offsets: &[u16]) -> Option<u16> {
    use std::hash::{BuildHasher, Hasher};
    let len = u64::from(range.end.saturating_sub(range.start));
    if len == 0 {
        return None;
    }
    let seed = std::collections::hash_map::RandomState::new();
    for attempt in 0..(len * 4).min(40_000) {
        let mut h = seed.build_hasher();
        h.write_u64(attempt);
        let port = range.start + (h.finish() % len) as u16;
        let Some(all) = offsets.iter().map(|&o| port.checked_add(o)).collect::<Option<Vec<u16>>>() else { continue };
        if all.iter().all(|&p| claim(p) && std::net::TcpListener::bind(("127.0.0.1", p)).is_ok()) {
            return Some(port);
        }
    }
    None
}

/// Claims `port` for this test process until it exits, by holding the UDP
/// socket of the same number (a namespace apart from TCP, which the servers
/// bind, and which no test uses otherwise). Finding a TCP port free is not
/// enough: two test processes running at once could both find the same one
/// free before either server binds it; the second cannot take the UDP port.
/// `false` when this or another test process holds it. The Rust client's
/// tests use this file too.
fn claim(port: u16) -> bool {
    static HELD: std::sync::Mutex<Vec<std::net::UdpSocket>> = std::sync::Mutex::new(Vec::new());
    match std::net::UdpSocket::bind(("127.0.0.1", port)) {
        Ok(socket) => {
            HELD.lock().unwrap_or_else(|p| p.into_inner()).push(socket);
            true
        }
        Err(_) => false,
    }
}

/// The first port of the kernel's ephemeral range (32768 if unreadable).
pub fn ephemeral_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}
