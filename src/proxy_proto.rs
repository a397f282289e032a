//! The PROXY protocol (HAProxy's `proxy-protocol.txt`), versions 1 and 2: a strict,
//! stateless decoder for the header a client (a load balancer in front of epoxy) sends
//! first, and encoders for the header epoxy sends toward a target. The decoder is given
//! everything the client sent so far and answers "incomplete", "done after N bytes" (with the
//! addresses, when the header carries any) or an error — as early as the first byte that
//! cannot start a valid header, so a client that speaks anything else is refused at once.
//! Never allocates, never panics on input, never reads past what it reports consumed.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Longest v1 header, CRLF included (the specification's limit).
pub const V1_MAX_LEN: usize = 107;
/// Longest v2 header epoxy writes (TCP over IPv6, no TLVs).
pub const V2_MAX_LEN: usize = 16 + 36;
/// Longest v2 header accepted (16-byte fixed part plus TLVs up to this bound).
pub const V2_ACCEPT_MAX: usize = 16 + 1024;
/// The v2 signature.
pub const V2_SIG: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
const V1_PREFIX: &[u8] = b"PROXY ";
const TLV_CRC32C: u8 = 0x03;

/// What the client's first bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// A valid header so far; more bytes are needed.
    Incomplete,
    /// A complete header of `header_len` bytes. `addrs` = (source, destination) for
    /// `TCP4`/`TCP6` (v1) and `PROXY` over TCP (v2); `None` for `UNKNOWN`, `LOCAL`, `UNSPEC`:
    /// the connection's own addresses apply.
    Done {
        header_len: usize,
        addrs: Option<(SocketAddr, SocketAddr)>,
    },
}

/// Why a header is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// Neither a v1 nor a v2 signature.
    NotProxy,
    /// v1 longer than 107 bytes without CRLF.
    TooLong,
    /// v1 line that does not follow the grammar (protocol, addresses, ports, spaces).
    BadV1,
    /// v2 version other than 2, or a command other than LOCAL/PROXY.
    BadVersion,
    /// v2 family/transport not TCP4, TCP6 or UNSPEC, or an address block too short for it.
    BadFamily,
    /// v2 length above `V2_ACCEPT_MAX`.
    TooLarge,
    /// v2 TLVs that run past the header.
    BadTlv,
    /// v2 CRC32C TLV that does not match.
    BadChecksum,
}

impl Error {
    pub fn as_str(self) -> &'static str {
        match self {
            Error::NotProxy => "not_proxy",
            Error::TooLong => "too_long",
            Error::BadV1 => "bad_v1",
            Error::BadVersion => "bad_version",
            Error::BadFamily => "bad_family",
            Error::TooLarge => "too_large",
            Error::BadTlv => "bad_tlv",
            Error::BadChecksum => "bad_checksum",
        }
    }
}

/// Decode the header at the start of `buf`.
pub fn parse(buf: &[u8]) -> Result<Parsed, Error> {
    let Some(&first) = buf.first() else {
        return Ok(Parsed::Incomplete);
    };
    match first {
        b'P' => parse_v1(buf),
        b'\r' => parse_v2(buf),
        _ => Err(Error::NotProxy),
    }
}

fn parse_v1(buf: &[u8]) -> Result<Parsed, Error> {
    let n = buf.len().min(V1_PREFIX.len());
    if buf[..n] != V1_PREFIX[..n] {
        return Err(Error::NotProxy);
    }
    let window = &buf[..buf.len().min(V1_MAX_LEN)];
    let Some(cr) = window.iter().position(|&b| b == b'\r') else {
        return if buf.len() >= V1_MAX_LEN {
            Err(Error::TooLong)
        } else {
            Ok(Parsed::Incomplete)
        };
    };
    if cr + 2 > V1_MAX_LEN {
        return Err(Error::TooLong);
    }
    match buf.get(cr + 1) {
        None => return Ok(Parsed::Incomplete),
        Some(b'\n') => {}
        Some(_) => return Err(Error::BadV1),
    }
    let line = &buf[V1_PREFIX.len()..cr];
    let mut fields = line.split(|&b| b == b' ');
    let proto = fields.next().ok_or(Error::BadV1)?;
    let addrs = match proto {
        b"UNKNOWN" => None, // the rest of the line is ignored, per the specification
        b"TCP4" | b"TCP6" => {
            let v6 = proto == b"TCP6";
            let mut next = || fields.next().ok_or(Error::BadV1);
            let (src, dst) = (ip(next()?, v6)?, ip(next()?, v6)?);
            let (sp, dp) = (port(next()?)?, port(next()?)?);
            if fields.next().is_some() {
                return Err(Error::BadV1);
            }
            Some((SocketAddr::new(src, sp), SocketAddr::new(dst, dp)))
        }
        _ => return Err(Error::BadV1),
    };
    Ok(Parsed::Done {
        header_len: cr + 2,
        addrs,
    })
}

/// An address of the stated family, in its textual form.
fn ip(field: &[u8], v6: bool) -> Result<IpAddr, Error> {
    let s = std::str::from_utf8(field).map_err(|_| Error::BadV1)?;
    if v6 {
        s.parse::<Ipv6Addr>()
            .map(IpAddr::V6)
            .map_err(|_| Error::BadV1)
    } else {
        s.parse::<Ipv4Addr>()
            .map(IpAddr::V4)
            .map_err(|_| Error::BadV1)
    }
}

/// A port: 0..=65535 in decimal, no sign, no leading zero (a lone "0" is fine).
fn port(field: &[u8]) -> Result<u16, Error> {
    if field.is_empty() || field.len() > 5 || (field.len() > 1 && field[0] == b'0') {
        return Err(Error::BadV1);
    }
    let mut v: u32 = 0;
    for &b in field {
        if !b.is_ascii_digit() {
            return Err(Error::BadV1);
        }
        v = v * 10 + u32::from(b - b'0');
    }
    u16::try_from(v).map_err(|_| Error::BadV1)
}

fn parse_v2(buf: &[u8]) -> Result<Parsed, Error> {
    let n = buf.len().min(V2_SIG.len());
    if buf[..n] != V2_SIG[..n] {
        return Err(Error::NotProxy);
    }
    if let Some(&vc) = buf.get(12)
        && (vc >> 4 != 2 || vc & 0x0f > 1)
    {
        return Err(Error::BadVersion);
    }
    if let Some(&fam) = buf.get(13)
        && !matches!(fam, 0x00 | 0x11 | 0x21)
    {
        return Err(Error::BadFamily);
    }
    let Some(len) = buf
        .get(14..16)
        .map(|l| usize::from(l[0]) << 8 | usize::from(l[1]))
    else {
        return Ok(Parsed::Incomplete);
    };
    let total = 16 + len;
    if total > V2_ACCEPT_MAX {
        return Err(Error::TooLarge);
    }
    let Some(hdr) = buf.get(..total) else {
        return Ok(Parsed::Incomplete);
    };
    let (local, fam) = (hdr[12] & 0x0f == 0, hdr[13]);
    let addr_len = match fam {
        0x11 => 12,
        0x21 => 36,
        _ => 0,
    };
    if len < addr_len {
        return Err(Error::BadFamily);
    }
    let block = &hdr[16..16 + addr_len];
    check_tlvs(hdr, 16 + addr_len)?;
    let addrs = match (local, fam) {
        (true, _) | (false, 0x00) => None,
        (false, 0x11) => {
            let a = |o: usize| Ipv4Addr::new(block[o], block[o + 1], block[o + 2], block[o + 3]);
            let p = |o: usize| u16::from_be_bytes([block[o], block[o + 1]]);
            Some((
                SocketAddr::new(IpAddr::V4(a(0)), p(8)),
                SocketAddr::new(IpAddr::V4(a(4)), p(10)),
            ))
        }
        (false, _) => {
            let a = |o: usize| {
                let mut x = [0u8; 16];
                x.copy_from_slice(&block[o..o + 16]);
                Ipv6Addr::from(x)
            };
            let p = |o: usize| u16::from_be_bytes([block[o], block[o + 1]]);
            Some((
                SocketAddr::new(IpAddr::V6(a(0)), p(32)),
                SocketAddr::new(IpAddr::V6(a(16)), p(34)),
            ))
        }
    };
    Ok(Parsed::Done {
        header_len: total,
        addrs,
    })
}

/// Walk the TLVs after the address block; check a CRC32C TLV if there is one.
fn check_tlvs(hdr: &[u8], mut at: usize) -> Result<(), Error> {
    while at < hdr.len() {
        let t = hdr.get(at..at + 3).ok_or(Error::BadTlv)?;
        let len = usize::from(t[1]) << 8 | usize::from(t[2]);
        let value = at + 3..at + 3 + len;
        if value.end > hdr.len() {
            return Err(Error::BadTlv);
        }
        if t[0] == TLV_CRC32C {
            if len != 4 {
                return Err(Error::BadTlv);
            }
            let want = u32::from_be_bytes([
                hdr[value.start],
                hdr[value.start + 1],
                hdr[value.start + 2],
                hdr[value.start + 3],
            ]);
            // CRC32C over the whole header with the checksum field as zeros.
            let mut crc = crc32c_update(!0, &hdr[..value.start]);
            crc = crc32c_update(crc, &[0; 4]);
            crc = crc32c_update(crc, &hdr[value.end..]);
            if !crc != want {
                return Err(Error::BadChecksum);
            }
        }
        at = value.end;
    }
    Ok(())
}

/// CRC32C (Castagnoli, reflected 0x82F63B78) table, built at compile time.
const CRC32C_TABLE: [u32; 256] = {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0x82F6_3B78
            } else {
                c >> 1
            };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
};

fn crc32c_update(mut crc: u32, data: &[u8]) -> u32 {
    for &b in data {
        crc = CRC32C_TABLE[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    crc
}

/// CRC32C of `data` (for tests and callers that add the TLV).
pub fn crc32c(data: &[u8]) -> u32 {
    !crc32c_update(!0, data)
}

/// The pair of addresses in one family: if either is IPv6, both as IPv6 (IPv4 as v4-mapped),
/// since a header has one family. Most peers see v4-mapped addresses as the IPv4 client.
fn same_family(src: SocketAddr, dst: SocketAddr) -> (SocketAddr, SocketAddr) {
    let v6 = |a: SocketAddr| match a.ip() {
        IpAddr::V4(v4) => SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), a.port()),
        IpAddr::V6(_) => a,
    };
    if src.is_ipv4() && dst.is_ipv4() {
        (src, dst)
    } else {
        (v6(src), v6(dst))
    }
}

/// Write a v1 header for a TCP connection from `src` to `dst` into `out` (at least
/// `V1_MAX_LEN` bytes); returns its length (0 if `out` is too small).
pub fn encode_v1(src: SocketAddr, dst: SocketAddr, out: &mut [u8]) -> usize {
    use std::io::Write;
    let (src, dst) = same_family(src, dst);
    let proto = if src.is_ipv4() { "TCP4" } else { "TCP6" };
    let mut c = std::io::Cursor::new(out);
    let r = write!(
        c,
        "PROXY {proto} {} {} {} {}\r\n",
        src.ip(),
        dst.ip(),
        src.port(),
        dst.port()
    );
    if r.is_err() { 0 } else { c.position() as usize }
}

/// Write a v2 `PROXY` header (no TLVs) into `out` (at least `V2_MAX_LEN` bytes); returns its
/// length (0 if `out` is too small).
pub fn encode_v2(src: SocketAddr, dst: SocketAddr, out: &mut [u8]) -> usize {
    if out.len() < V2_MAX_LEN {
        return 0;
    }
    let (src, dst) = same_family(src, dst);
    out[..12].copy_from_slice(V2_SIG);
    out[12] = 0x21; // version 2, PROXY
    let len = match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out[13] = 0x11;
            out[16..20].copy_from_slice(&s.octets());
            out[20..24].copy_from_slice(&d.octets());
            out[24..26].copy_from_slice(&src.port().to_be_bytes());
            out[26..28].copy_from_slice(&dst.port().to_be_bytes());
            12
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            out[13] = 0x21;
            out[16..32].copy_from_slice(&s.octets());
            out[32..48].copy_from_slice(&d.octets());
            out[48..50].copy_from_slice(&src.port().to_be_bytes());
            out[50..52].copy_from_slice(&dst.port().to_be_bytes());
            36
        }
        _ => return 0, // cannot happen after same_family
    };
    out[14..16].copy_from_slice(&(len as u16).to_be_bytes());
    16 + len as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn done(buf: &[u8]) -> (usize, Option<(SocketAddr, SocketAddr)>) {
        match parse(buf) {
            Ok(Parsed::Done { header_len, addrs }) => (header_len, addrs),
            other => panic!("{:?}: {other:?}", String::from_utf8_lossy(buf)),
        }
    }

    /// Every strict prefix of a valid header is `Incomplete`.
    fn prefixes_incomplete(h: &[u8]) {
        for n in 0..h.len() {
            assert_eq!(
                parse(&h[..n]),
                Ok(Parsed::Incomplete),
                "prefix {n} of {h:?}"
            );
        }
    }

    #[test]
    fn v1_tcp4_tcp6_unknown() {
        let h = b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\nGET";
        assert_eq!(
            done(h),
            (45, Some((sa("192.0.2.1:56324"), sa("198.51.100.2:443"))))
        );
        prefixes_incomplete(&h[..45]);
        let h = b"PROXY TCP6 2001:db8::1 ::1 1 0\r\n";
        assert_eq!(done(h).1, Some((sa("[2001:db8::1]:1"), sa("[::1]:0"))));
        assert_eq!(done(b"PROXY UNKNOWN\r\n"), (15, None));
        assert_eq!(done(b"PROXY UNKNOWN ffff::1 ::1 1 2\r\n").1, None);
    }

    #[test]
    fn v1_strictness() {
        for bad in [
            &b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n"[..], // leading zero
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n",   // port range
            b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n",           // family
            b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n",
            b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n", // double space
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", // trailing space
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 +2\r\n",
            b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
        ] {
            assert!(parse(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Err(Error::NotProxy));
        assert_eq!(parse(b"PROXZ"), Err(Error::NotProxy));
        assert_eq!(parse(b"X"), Err(Error::NotProxy));
        let long = [b"PROXY UNKNOWN ".as_slice(), &[b'a'; 100]].concat();
        assert_eq!(parse(&long), Err(Error::TooLong));
    }

    fn v2(cmd: u8, fam: u8, body: &[u8]) -> Vec<u8> {
        let mut h = V2_SIG.to_vec();
        h.push(0x20 | cmd);
        h.push(fam);
        h.extend_from_slice(&(body.len() as u16).to_be_bytes());
        h.extend_from_slice(body);
        h
    }

    #[test]
    fn v2_families_commands_and_tlvs() {
        let mut body = vec![192, 0, 2, 1, 198, 51, 100, 2, 0xdc, 0x04, 0x01, 0xbb];
        let h = v2(1, 0x11, &body);
        assert_eq!(
            done(&h),
            (28, Some((sa("192.0.2.1:56324"), sa("198.51.100.2:443"))))
        );
        prefixes_incomplete(&h);
        // LOCAL: addresses ignored; UNSPEC: none.
        assert_eq!(done(&v2(0, 0x11, &body)).1, None);
        assert_eq!(done(&v2(1, 0x00, &[])).1, None);
        // TCP6.
        let mut b6 = vec![0u8; 36];
        b6[15] = 1;
        b6[31] = 2;
        b6[35] = 80;
        assert_eq!(
            done(&v2(1, 0x21, &b6)).1,
            Some((sa("[::1]:0"), sa("[::2]:80")))
        );
        // TLVs skipped; bytes after the header kept.
        body.extend_from_slice(&[0x01, 0, 2, b'h', b'2', 0x04, 0, 0]);
        let mut h = v2(1, 0x11, &body);
        let len = h.len();
        h.extend_from_slice(b"payload");
        assert_eq!(done(&h).0, len);
        // A TLV running past the header.
        body.extend_from_slice(&[0x05, 0, 9, 1]);
        assert_eq!(parse(&v2(1, 0x11, &body)), Err(Error::BadTlv));
        // UDP, UNIX, version 1, command 2, short address block, oversized.
        assert_eq!(parse(&v2(1, 0x12, &[0; 12])), Err(Error::BadFamily));
        assert_eq!(parse(&v2(1, 0x31, &[0; 216])), Err(Error::BadFamily));
        assert_eq!(parse(&v2(1, 0x21, &[0; 12])), Err(Error::BadFamily));
        let mut h = v2(1, 0x11, &[0; 12]);
        h[12] = 0x11;
        assert_eq!(parse(&h), Err(Error::BadVersion));
        h[12] = 0x22;
        assert_eq!(parse(&h), Err(Error::BadVersion));
        assert_eq!(parse(&v2(1, 0x11, &[0; 2000])), Err(Error::TooLarge));
        assert_eq!(parse(b"\r\n\r\n\0\r\nQUIX"), Err(Error::NotProxy));
    }

    #[test]
    fn v2_crc32c_is_checked() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283, "CRC32C check value");
        let mut body = vec![127, 0, 0, 1, 127, 0, 0, 1, 0, 1, 0, 2];
        body.extend_from_slice(&[TLV_CRC32C, 0, 4, 0, 0, 0, 0]);
        let mut h = v2(1, 0x11, &body);
        let crc = crc32c(&h);
        let at = h.len() - 4;
        h[at..].copy_from_slice(&crc.to_be_bytes());
        assert!(matches!(parse(&h), Ok(Parsed::Done { .. })));
        h[at] ^= 1;
        assert_eq!(parse(&h), Err(Error::BadChecksum));
    }

    #[test]
    fn encode_round_trips_and_one_byte_at_a_time() {
        let cases = [
            (sa("10.1.2.3:40000"), sa("127.0.0.1:80")),
            (sa("[2001:db8::7]:1"), sa("[::1]:65535")),
            (sa("10.1.2.3:5"), sa("[::1]:6")), // mixed: both as IPv6
        ];
        for (src, dst) in cases {
            let (s, d) = same_family(src, dst);
            for v in [1, 2] {
                let mut out = [0u8; 108];
                let n = if v == 1 {
                    encode_v1(src, dst, &mut out)
                } else {
                    encode_v2(src, dst, &mut out)
                };
                assert!(n > 0 && n <= if v == 1 { V1_MAX_LEN } else { V2_MAX_LEN });
                assert_eq!(done(&out[..n]), (n, Some((s, d))), "v{v} {src} {dst}");
                prefixes_incomplete(&out[..n]);
            }
        }
        let mut small = [0u8; 10];
        assert_eq!(encode_v2(cases[0].0, cases[0].1, &mut small), 0);
        assert_eq!(encode_v1(cases[1].0, cases[1].1, &mut small), 0);
    }
}
