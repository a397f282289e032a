//! Source ACLs (placeholder: replaced by the prefix-structure implementation). Owns CIDR
//! parsing.

use std::net::IpAddr;

/// An address prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub len: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let (a, l) = s.split_once('/').unwrap_or((s, ""));
        let addr: IpAddr = a.parse().map_err(|_| format!("'{s}' is not a CIDR"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = if l.is_empty() {
            max
        } else {
            l.parse().map_err(|_| format!("'{s}' is not a CIDR"))?
        };
        if len > max {
            return Err(format!("'{s}': prefix length out of range"));
        }
        Ok(Cidr { addr, len })
    }
}

/// Placeholder verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    Denied,
    NotAllowed,
}

/// Placeholder ACL (linear; replaced).
#[derive(Debug, Clone)]
pub struct Acl {
    allow: Vec<Cidr>,
    deny: Vec<Cidr>,
}

fn contains(c: &Cidr, ip: IpAddr) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    };
    match (c.addr, ip) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            let m = if c.len == 0 {
                0
            } else {
                u32::MAX << (32 - c.len)
            };
            u32::from(a) & m == u32::from(b) & m
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            let m = if c.len == 0 {
                0
            } else {
                u128::MAX << (128 - c.len)
            };
            u128::from(a) & m == u128::from(b) & m
        }
        _ => false,
    }
}

impl Acl {
    pub fn new(allow: &[Cidr], deny: &[Cidr]) -> Acl {
        Acl {
            allow: allow.to_vec(),
            deny: deny.to_vec(),
        }
    }
    pub fn permits(&self, ip: IpAddr) -> Verdict {
        if self.deny.iter().any(|c| contains(c, ip)) {
            Verdict::Denied
        } else if self.allow.is_empty() || self.allow.iter().any(|c| contains(c, ip)) {
            Verdict::Allowed
        } else {
            Verdict::NotAllowed
        }
    }
}
