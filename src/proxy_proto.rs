//! PROXY protocol v1/v2 (interim version; the strict, fuzzed parser replaces it).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

pub const V1_MAX_LEN: usize = 107;
pub const V2_MAX_LEN: usize = 52;
const SIG: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// What a prefix of the client's bytes is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    Incomplete,
    Done {
        header_len: usize,
        addrs: Option<(SocketAddr, SocketAddr)>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    Invalid,
}

pub fn parse(buf: &[u8]) -> Result<Parsed, Error> {
    if buf.first() == Some(&b'P') || buf.is_empty() {
        let n = buf.len().min(6);
        if buf[..n] != b"PROXY "[..n] {
            return Err(Error::Invalid);
        }
        let Some(end) = buf.windows(2).take(V1_MAX_LEN).position(|w| w == b"\r\n") else {
            return if buf.len() >= V1_MAX_LEN {
                Err(Error::Invalid)
            } else {
                Ok(Parsed::Incomplete)
            };
        };
        let line = std::str::from_utf8(&buf[6..end]).map_err(|_| Error::Invalid)?;
        let mut it = line.split(' ');
        let mut f = [""; 6];
        let mut n = 0;
        for (slot, part) in f.iter_mut().zip(&mut it) {
            *slot = part;
            n += 1;
        }
        if it.next().is_some() {
            return Err(Error::Invalid);
        }
        let addrs = match &f[..n] {
            ["UNKNOWN", ..] => None,
            [fam, s, d, sp, dp] if *fam == "TCP4" || *fam == "TCP6" => {
                let s: IpAddr = s.parse().map_err(|_| Error::Invalid)?;
                let d: IpAddr = d.parse().map_err(|_| Error::Invalid)?;
                let sp: u16 = sp.parse().map_err(|_| Error::Invalid)?;
                let dp: u16 = dp.parse().map_err(|_| Error::Invalid)?;
                Some((SocketAddr::new(s, sp), SocketAddr::new(d, dp)))
            }
            _ => return Err(Error::Invalid),
        };
        return Ok(Parsed::Done {
            header_len: end + 2,
            addrs,
        });
    }
    let n = buf.len().min(12);
    if buf[..n] != SIG[..n] {
        return Err(Error::Invalid);
    }
    if buf.len() < 16 {
        return Ok(Parsed::Incomplete);
    }
    let len = 16 + u16::from_be_bytes([buf[14], buf[15]]) as usize;
    if buf[12] >> 4 != 2 || len > 1024 {
        return Err(Error::Invalid);
    }
    if buf.len() < len {
        return Ok(Parsed::Incomplete);
    }
    let b = &buf[16..len];
    let addrs = match (buf[12] & 0xf, buf[13]) {
        (0, _) => None,
        (1, 0x11) if b.len() >= 12 => {
            let ip = |o: usize| IpAddr::V4(Ipv4Addr::new(b[o], b[o + 1], b[o + 2], b[o + 3]));
            let p = |o: usize| u16::from_be_bytes([b[o], b[o + 1]]);
            Some((SocketAddr::new(ip(0), p(8)), SocketAddr::new(ip(4), p(10))))
        }
        (1, 0x21) if b.len() >= 36 => {
            let ip = |o: usize| {
                let mut a = [0u8; 16];
                a.copy_from_slice(&b[o..o + 16]);
                IpAddr::V6(Ipv6Addr::from(a))
            };
            let p = |o: usize| u16::from_be_bytes([b[o], b[o + 1]]);
            Some((
                SocketAddr::new(ip(0), p(32)),
                SocketAddr::new(ip(16), p(34)),
            ))
        }
        (1, 0x00) => None,
        _ => return Err(Error::Invalid),
    };
    Ok(Parsed::Done {
        header_len: len,
        addrs,
    })
}

fn v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(a) => a.to_ipv6_mapped(),
        IpAddr::V6(a) => a,
    }
}

pub fn encode_v1(src: SocketAddr, dst: SocketAddr, out: &mut [u8]) -> usize {
    use std::io::Write;
    let mut c = std::io::Cursor::new(out);
    let r = if src.is_ipv4() && dst.is_ipv4() {
        write!(
            c,
            "PROXY TCP4 {} {} {} {}\r\n",
            src.ip(),
            dst.ip(),
            src.port(),
            dst.port()
        )
    } else {
        write!(
            c,
            "PROXY TCP6 {} {} {} {}\r\n",
            v6(src.ip()),
            v6(dst.ip()),
            src.port(),
            dst.port()
        )
    };
    if r.is_err() { 0 } else { c.position() as usize }
}

pub fn encode_v2(src: SocketAddr, dst: SocketAddr, out: &mut [u8]) -> usize {
    if out.len() < V2_MAX_LEN {
        return 0;
    }
    out[..12].copy_from_slice(SIG);
    out[12] = 0x21;
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out[13] = 0x11;
            out[14..16].copy_from_slice(&12u16.to_be_bytes());
            out[16..20].copy_from_slice(&s.octets());
            out[20..24].copy_from_slice(&d.octets());
            out[24..26].copy_from_slice(&src.port().to_be_bytes());
            out[26..28].copy_from_slice(&dst.port().to_be_bytes());
            28
        }
        (s, d) => {
            out[13] = 0x21;
            out[14..16].copy_from_slice(&36u16.to_be_bytes());
            out[16..32].copy_from_slice(&v6(s).octets());
            out[32..48].copy_from_slice(&v6(d).octets());
            out[48..50].copy_from_slice(&src.port().to_be_bytes());
            out[50..52].copy_from_slice(&dst.port().to_be_bytes());
            52
        }
    }
}
