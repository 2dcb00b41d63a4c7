//! Which address is the client: the one home of that decision. The socket's peer is the
//! client unless it is a trusted proxy (a configured list of addresses and CIDR blocks); then
//! `X-Forwarded-For` is read from its right end, each hop that is itself a trusted proxy
//! skipped, and the first address that is not one is the client. A header from an untrusted
//! peer is ignored: anyone can send one, and believing it would let a client choose the
//! address its limits are counted against.

use std::net::IpAddr;

/// A list of trusted proxies: addresses and CIDR blocks (`10.0.0.0/8`, `::1`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrustedProxies {
    blocks: Vec<(IpAddr, u8)>,
}

/// An entry of the trusted-proxies list that is not an address or a CIDR block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadProxyEntry {
    pub entry: String,
}

impl std::fmt::Display for BadProxyEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "'{}' is not an IP address or a CIDR block (like 10.0.0.0/8 or ::1)", self.entry)
    }
}

impl std::error::Error for BadProxyEntry {}

impl TrustedProxies {
    /// Parses a comma- or space-separated list; empty trusts no one.
    pub fn parse(list: &str) -> Result<TrustedProxies, BadProxyEntry> {
        let entries = list.split([',', ' ']).map(str::trim).filter(|e| !e.is_empty());
        let blocks = entries.map(parse_block).collect::<Result<Vec<_>, _>>()?;
        Ok(TrustedProxies { blocks })
    }

    pub fn trusts(&self, addr: IpAddr) -> bool {
        let addr = addr.to_canonical();
        self.blocks.iter().any(|&(net, bits)| in_block(addr, net, bits))
    }
}

fn parse_block(entry: &str) -> Result<(IpAddr, u8), BadProxyEntry> {
    let bad = || BadProxyEntry { entry: entry.to_string() };
    let (addr, bits) = match entry.split_once('/') {
        Some((a, b)) => (a, Some(b.parse::<u8>().map_err(|_| bad())?)),
        None => (entry, None),
    };
    let addr = addr.parse::<IpAddr>().map_err(|_| bad())?.to_canonical();
    let max = if addr.is_ipv4() { 32 } else { 128 };
    match bits {
        Some(b) if b > max => Err(bad()),
        Some(b) => Ok((addr, b)),
        None => Ok((addr, max)),
    }
}

fn in_block(addr: IpAddr, net: IpAddr, bits: u8) -> bool {
    match (addr, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            prefix_eq(u128::from(u32::from(a)) << 96, u128::from(u32::from(n)) << 96, bits)
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => prefix_eq(u128::from(a), u128::from(n), bits),
        _ => false,
    }
}

/// Whether the first `bits` bits of `a` and `b` (left-aligned in 128) are the same.
fn prefix_eq(a: u128, b: u128, bits: u8) -> bool {
    let mask = u128::MAX.checked_shl(128 - u32::from(bits)).unwrap_or(0);
    a & mask == b & mask
}

/// The client's address: `peer` (the socket's), or, when `peer` is a trusted proxy, the
/// rightmost address of `forwarded_for` (the `X-Forwarded-For` values, in order) that is not a
/// trusted proxy itself. A malformed hop ends the walk at the last address known good.
pub fn client_addr(peer: IpAddr, forwarded_for: &[&str], trusted: &TrustedProxies) -> IpAddr {
    let mut client = peer.to_canonical();
    if !trusted.trusts(client) {
        return client;
    }
    let hops = forwarded_for.iter().flat_map(|h| h.split(',')).map(str::trim).collect::<Vec<_>>();
    for hop in hops.into_iter().rev() {
        let Ok(addr) = hop.parse::<IpAddr>() else { break };
        client = addr.to_canonical();
        if !trusted.trusts(client) {
            break;
        }
    }
    client
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_peer_unless_a_trusted_proxy_names_another() {
        let trusted = TrustedProxies::parse("10.0.0.0/8, 127.0.0.1 ::1").unwrap();
        // An untrusted peer's header is ignored.
        assert_eq!(client_addr(ip("203.0.113.9"), &["198.51.100.1"], &trusted), ip("203.0.113.9"));
        // A trusted proxy: the rightmost untrusted hop.
        assert_eq!(client_addr(ip("127.0.0.1"), &["198.51.100.1"], &trusted), ip("198.51.100.1"));
        assert_eq!(
            client_addr(ip("127.0.0.1"), &["6.6.6.6, 198.51.100.1", "10.1.2.3"], &trusted),
            ip("198.51.100.1"),
            "a client cannot prepend an address of its choice"
        );
        // Nothing but proxies: the leftmost one; no header: the proxy itself.
        assert_eq!(client_addr(ip("::1"), &["10.0.0.7"], &trusted), ip("10.0.0.7"));
        assert_eq!(client_addr(ip("::1"), &[], &trusted), ip("::1"));
        // A malformed hop ends the walk at the last good address.
        assert_eq!(client_addr(ip("127.0.0.1"), &["1.2.3.4, junk, 10.9.9.9"], &trusted), ip("10.9.9.9"));
        // IPv4-mapped IPv6 peers count as their IPv4 address.
        assert_eq!(client_addr(ip("::ffff:127.0.0.1"), &["198.51.100.1"], &trusted), ip("198.51.100.1"));
        // Trusting no one: always the peer.
        let none = TrustedProxies::parse("").unwrap();
        assert_eq!(client_addr(ip("127.0.0.1"), &["198.51.100.1"], &none), ip("127.0.0.1"));
    }

    #[test]
    fn blocks_parse_and_match_by_prefix() {
        let t = TrustedProxies::parse("192.168.1.0/24,2001:db8::/32,0.0.0.0/0").unwrap();
        assert!(t.trusts(ip("192.168.1.200")) && t.trusts(ip("2001:db8::5")) && t.trusts(ip("8.8.8.8")));
        assert!(!t.trusts(ip("2001:db9::5")));
        let t = TrustedProxies::parse("192.168.1.0/24").unwrap();
        assert!(!t.trusts(ip("192.168.2.1")));
        for bad in ["10.0.0.0/33", "::/129", "proxy.local", "10.0.0.0/x", "1.2.3"] {
            assert_eq!(TrustedProxies::parse(bad), Err(BadProxyEntry { entry: bad.into() }), "{bad}");
        }
    }
}
