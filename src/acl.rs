//! Source ACLs: CIDR parsing and the structure the accept path asks. Both lists are turned at
//! load into sorted, merged, disjoint ranges over one 128-bit space (IPv4 as v4-mapped IPv6,
//! so a dual-stack listener's `::ffff:10.1.2.3` matches `10.0.0.0/8`), and a lookup is one
//! binary search per list: thousands of entries cost a dozen comparisons. Building allocates
//! (config load); `permits` never allocates.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// An address prefix, as written in `allow`/`deny`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub len: u8,
}

impl Cidr {
    /// `10.0.0.0/8`, `2001:db8::/32`, or a bare address (`/32`, `/128`). Host bits set below
    /// the prefix (`10.1.2.3/8`) are refused: they usually mean a typo.
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let t = s.trim();
        let (a, l) = match t.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (t, None),
        };
        let addr: IpAddr = a
            .parse()
            .map_err(|_| format!("'{t}' is not an address or CIDR (e.g. 10.0.0.0/8, ::1/128)"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match l {
            None => max,
            Some(l) if !l.is_empty() && l.len() <= 3 && l.bytes().all(|b| b.is_ascii_digit()) => l
                .parse::<u8>()
                .ok()
                .filter(|n| *n <= max)
                .ok_or_else(|| format!("'{t}': prefix length must be 0..={max}"))?,
            Some(_) => return Err(format!("'{t}': prefix length must be 0..={max}")),
        };
        let c = Cidr { addr, len };
        let (lo, _) = c.range();
        if lo != key(addr) {
            return Err(format!(
                "'{t}' has bits set below its /{len} prefix (did you mean {}/{len}?)",
                from_key(lo, addr.is_ipv4())
            ));
        }
        Ok(c)
    }

    /// The first and last key covered.
    fn range(&self) -> (u128, u128) {
        let bits = u32::from(self.len) + if self.addr.is_ipv4() { 96 } else { 0 };
        let host = if bits >= 128 { 0 } else { u128::MAX >> bits };
        let k = key(self.addr);
        (k & !host, k | host)
    }
}

/// One 128-bit key per address: IPv4 as its v4-mapped IPv6 form.
fn key(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(v4.to_ipv6_mapped()),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

fn from_key(k: u128, v4: bool) -> IpAddr {
    let v6 = Ipv6Addr::from(k);
    match (v4, v6.to_ipv4_mapped()) {
        (true, Some(a)) => IpAddr::V4(a),
        (true, None) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        (false, _) => IpAddr::V6(v6),
    }
}

/// The verdict for one client address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    /// In the deny list (deny wins).
    Denied,
    /// The allow list is not empty and does not contain it.
    NotAllowed,
}

/// Sorted, merged, disjoint inclusive ranges.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Ranges(Vec<(u128, u128)>);

impl Ranges {
    fn new(list: &[Cidr]) -> Ranges {
        let mut v: Vec<(u128, u128)> = list.iter().map(Cidr::range).collect();
        v.sort_unstable();
        let mut out: Vec<(u128, u128)> = Vec::with_capacity(v.len());
        for (lo, hi) in v {
            match out.last_mut() {
                Some(last) if lo <= last.1.saturating_add(1) => last.1 = last.1.max(hi),
                _ => out.push((lo, hi)),
            }
        }
        Ranges(out)
    }

    fn contains(&self, k: u128) -> bool {
        // The last range starting at or before k.
        let i = self.0.partition_point(|&(lo, _)| lo <= k);
        i > 0 && self.0[i - 1].1 >= k
    }
}

/// An app's allow and deny lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acl {
    allow: Ranges,
    deny: Ranges,
}

impl Acl {
    pub fn new(allow: &[Cidr], deny: &[Cidr]) -> Acl {
        Acl {
            allow: Ranges::new(allow),
            deny: Ranges::new(deny),
        }
    }

    pub fn permits(&self, ip: IpAddr) -> Verdict {
        let k = key(ip);
        if self.deny.contains(k) {
            Verdict::Denied
        } else if self.allow.0.is_empty() || self.allow.contains(k) {
            Verdict::Allowed
        } else {
            Verdict::NotAllowed
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> Cidr {
        Cidr::parse(s).unwrap()
    }
    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_strictly() {
        assert_eq!(c("10.0.0.0/8").len, 8);
        assert_eq!(c("::1").len, 128);
        assert_eq!(c("192.0.2.7").len, 32);
        assert_eq!(c("0.0.0.0/0").len, 0);
        for bad in [
            "10.1.2.3/8",
            "10.0.0.0/33",
            "::1/129",
            "10.0.0.0/",
            "10.0.0.0/x",
            "host",
            "",
            "10.0.0.0/08x",
        ] {
            assert!(Cidr::parse(bad).is_err(), "{bad}");
        }
        let e = Cidr::parse("10.1.2.3/8").unwrap_err();
        assert!(e.contains("10.0.0.0/8"), "{e}");
    }

    #[test]
    fn deny_wins_and_empty_allow_allows_all() {
        let acl = Acl::new(
            &[c("127.0.0.0/8"), c("::1")],
            &[c("127.0.0.3"), c("127.0.0.64/26")],
        );
        assert_eq!(acl.permits(ip("127.0.0.2")), Verdict::Allowed);
        assert_eq!(acl.permits(ip("127.0.0.3")), Verdict::Denied);
        assert_eq!(acl.permits(ip("127.0.0.64")), Verdict::Denied);
        assert_eq!(acl.permits(ip("127.0.0.127")), Verdict::Denied);
        assert_eq!(acl.permits(ip("127.0.0.128")), Verdict::Allowed);
        assert_eq!(acl.permits(ip("::1")), Verdict::Allowed);
        assert_eq!(acl.permits(ip("::2")), Verdict::NotAllowed);
        assert_eq!(acl.permits(ip("10.0.0.1")), Verdict::NotAllowed);
        // A v4-mapped client matches IPv4 entries.
        assert_eq!(acl.permits(ip("::ffff:127.0.0.3")), Verdict::Denied);
        assert_eq!(acl.permits(ip("::ffff:127.0.0.9")), Verdict::Allowed);
        let open = Acl::new(&[], &[c("0.0.0.0/0")]);
        assert_eq!(
            open.permits(ip("::1")),
            Verdict::Allowed,
            "/0 over IPv4 only"
        );
        assert_eq!(open.permits(ip("1.2.3.4")), Verdict::Denied);
    }

    #[test]
    fn ten_thousand_entries_match_like_a_linear_scan() {
        let list: Vec<Cidr> = (0..10_000u32)
            .map(|i| Cidr {
                addr: IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i * 512)),
                len: 24,
            })
            .collect();
        let acl = Acl::new(&list, &[]);
        assert!(acl.allow.0.len() <= list.len());
        for probe in (0..10_000u32 * 512).step_by(97) {
            let a = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + probe));
            let linear = list.iter().any(|c| {
                let (lo, hi) = c.range();
                (lo..=hi).contains(&key(a))
            });
            assert_eq!(acl.permits(a) == Verdict::Allowed, linear, "{a}");
        }
        // Overlapping and adjacent entries merge.
        let merged = Ranges::new(&[
            c("10.0.0.0/25"),
            c("10.0.0.128/25"),
            c("10.0.0.0/24"),
            c("10.0.2.0/24"),
        ]);
        assert_eq!(merged.0.len(), 2);
    }
}
