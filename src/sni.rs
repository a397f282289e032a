//! The TLS ClientHello reader used for SNI routing of passed-through TLS: from the first bytes
//! a client sent, tell whether they are a TLS handshake, whether the ClientHello is complete,
//! and the server name it asks for. Handles a ClientHello split across TCP segments (call it
//! again with more bytes; it re-reads from the start and keeps no state) and across TLS
//! records (the handshake message is gathered from consecutive handshake records into a fixed
//! stack buffer). Unknown and GREASE extensions are skipped by their length; every length is
//! bounds-checked. Never decrypts, never allocates, never panics on input; bytes are only
//! read, so the caller forwards them untouched.

/// Largest ClientHello handshake message accepted (post-quantum key shares make them a few
/// KiB; anything past this is refused rather than buffered).
pub const MAX_HELLO: usize = 16 * 1024;
/// Longest server name (RFC 1035 limit, without the trailing dot).
pub const MAX_NAME: usize = 253;

/// What the bytes so far are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sni {
    /// A TLS handshake so far, but the ClientHello is not complete yet.
    Incomplete,
    /// The first bytes are not a TLS handshake record.
    NotTls,
    /// A complete ClientHello without a server_name (host_name) entry.
    NoSni,
    /// A complete ClientHello asking for the name now in `out[..len]`, lower-cased, without
    /// a trailing dot.
    Name(usize),
}

/// Why a TLS-looking preface cannot be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SniError {
    /// A length or field that does not fit the message.
    Malformed,
    /// The ClientHello is larger than `MAX_HELLO`.
    TooLarge,
    /// The server_name entry is not a valid host name.
    BadName,
}

impl SniError {
    pub fn as_str(self) -> &'static str {
        match self {
            SniError::Malformed => "malformed",
            SniError::TooLarge => "too_large",
            SniError::BadName => "bad_name",
        }
    }
}

const RECORD_HANDSHAKE: u8 = 0x16;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const EXT_SERVER_NAME: u16 = 0;
const NAME_TYPE_HOST: u8 = 0;

/// A cursor over a byte slice; every read is bounds-checked (`None` = past the end).
struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn u8(&mut self) -> Option<u8> {
        let v = *self.b.get(self.at)?;
        self.at += 1;
        Some(v)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from(self.u8()?) << 8 | u16::from(self.u8()?))
    }
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.b.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(s)
    }
    /// A vector with a one- or two-byte length prefix.
    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()? as usize;
        self.take(n)
    }
    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()? as usize;
        self.take(n)
    }
}

/// Read the ClientHello at the start of `buf` (what the client sent so far) and write the
/// server name into `out` (at least `MAX_NAME` bytes; shorter truncates nothing: a longer
/// name is `BadName`).
pub fn peek_sni(buf: &[u8], out: &mut [u8]) -> Result<Sni, SniError> {
    // Gather the handshake bytes from consecutive handshake records.
    let mut hs = [0u8; MAX_HELLO + 4];
    let mut have = 0usize;
    let mut at = 0usize;
    let mut need: Option<usize> = None;
    loop {
        if let Some(n) = need
            && have >= n
        {
            break;
        }
        let Some(hdr) = buf.get(at..at + 5) else {
            // A partial record header: check what there is of it.
            let part = &buf[at.min(buf.len())..];
            if at == 0 && !looks_like_tls(part) {
                return Ok(Sni::NotTls);
            }
            if !part.is_empty() && part[0] != RECORD_HANDSHAKE {
                return Err(SniError::Malformed);
            }
            return Ok(Sni::Incomplete);
        };
        if hdr[0] != RECORD_HANDSHAKE || hdr[1] != 3 {
            return if at == 0 {
                Ok(Sni::NotTls)
            } else {
                Err(SniError::Malformed)
            };
        }
        let len = usize::from(hdr[3]) << 8 | usize::from(hdr[4]);
        if len == 0 || len > 16384 + 2048 {
            return Err(SniError::Malformed);
        }
        let body_start = at + 5;
        let avail = buf.len().saturating_sub(body_start).min(len);
        let room = hs.len() - have;
        let copy = avail.min(room);
        hs[have..have + copy].copy_from_slice(&buf[body_start..body_start + copy]);
        have += copy;
        if need.is_none() && have >= 4 {
            if hs[0] != HANDSHAKE_CLIENT_HELLO {
                return if at == 0 {
                    Ok(Sni::NotTls)
                } else {
                    Err(SniError::Malformed)
                };
            }
            let n = usize::from(hs[1]) << 16 | usize::from(hs[2]) << 8 | usize::from(hs[3]);
            if n > MAX_HELLO {
                return Err(SniError::TooLarge);
            }
            need = Some(n + 4);
        }
        if avail < len {
            // The record is not all here: unless it already holds the whole message, wait.
            if need.is_some_and(|n| have >= n) {
                break;
            }
            return Ok(Sni::Incomplete);
        }
        at = body_start + len;
    }
    let total = need.unwrap_or(have);
    parse_hello(&hs[4..total], out)
}

/// The first bytes could begin a TLS handshake record (type 22, major version 3).
fn looks_like_tls(part: &[u8]) -> bool {
    match part {
        [] => true,
        [t] => *t == RECORD_HANDSHAKE,
        [t, v, ..] => *t == RECORD_HANDSHAKE && *v == 3,
    }
}

/// The ClientHello body (after the 4-byte handshake header).
fn parse_hello(body: &[u8], out: &mut [u8]) -> Result<Sni, SniError> {
    let bad = SniError::Malformed;
    let mut c = Cursor { b: body, at: 0 };
    c.take(2 + 32).ok_or(bad)?; // legacy_version, random
    let session = c.vec8().ok_or(bad)?;
    if session.len() > 32 {
        return Err(bad);
    }
    let suites = c.vec16().ok_or(bad)?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return Err(bad);
    }
    c.vec8().ok_or(bad)?; // compression methods
    if c.at == body.len() {
        return Ok(Sni::NoSni); // no extensions at all
    }
    let exts = c.vec16().ok_or(bad)?;
    if c.at != body.len() {
        return Err(bad);
    }
    let mut e = Cursor { b: exts, at: 0 };
    while e.at < exts.len() {
        let ty = e.u16().ok_or(bad)?;
        let data = e.vec16().ok_or(bad)?;
        if ty == EXT_SERVER_NAME {
            return server_name(data, out);
        }
    }
    Ok(Sni::NoSni)
}

/// The server_name extension: a list of (type, name); the first host_name counts.
fn server_name(data: &[u8], out: &mut [u8]) -> Result<Sni, SniError> {
    let bad = SniError::Malformed;
    let mut c = Cursor { b: data, at: 0 };
    let list = c.vec16().ok_or(bad)?;
    let mut l = Cursor { b: list, at: 0 };
    while l.at < list.len() {
        let ty = l.u8().ok_or(bad)?;
        let name = l.vec16().ok_or(bad)?;
        if ty == NAME_TYPE_HOST {
            return host_name(name, out);
        }
    }
    Ok(Sni::NoSni)
}

/// Validate and lower-case a host name into `out`.
fn host_name(name: &[u8], out: &mut [u8]) -> Result<Sni, SniError> {
    let name = name.strip_suffix(b".").unwrap_or(name);
    if name.is_empty() || name.len() > MAX_NAME || name.len() > out.len() {
        return Err(SniError::BadName);
    }
    let labels_ok = name.split(|&b| b == b'.').all(|l| {
        !l.is_empty()
            && l.len() <= 63
            && l.iter()
                .all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    });
    if !labels_ok {
        return Err(SniError::BadName);
    }
    for (o, b) in out.iter_mut().zip(name) {
        *o = b.to_ascii_lowercase();
    }
    Ok(Sni::Name(name.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SNI_HELLO: &[u8] = include_bytes!("../tests/data/clienthello-sni.bin");
    const NO_SNI_HELLO: &[u8] = include_bytes!("../tests/data/clienthello-nosni.bin");

    fn peek(buf: &[u8]) -> Result<(Sni, String), SniError> {
        let mut out = [0u8; 255];
        let r = peek_sni(buf, &mut out)?;
        let name = match r {
            Sni::Name(n) => String::from_utf8_lossy(&out[..n]).into_owned(),
            _ => String::new(),
        };
        Ok((r, name))
    }

    /// `hello` (one record) re-framed as one record per `chunk` bytes of handshake.
    fn split_records(hello: &[u8], chunk: usize) -> Vec<u8> {
        let hs = &hello[5..];
        let mut out = Vec::new();
        for part in hs.chunks(chunk) {
            out.extend_from_slice(&[0x16, 3, 1]);
            out.extend_from_slice(&(part.len() as u16).to_be_bytes());
            out.extend_from_slice(part);
        }
        out
    }

    /// `hello` with an extra (GREASE-typed) extension of `n` bytes before the others, as a
    /// large post-quantum key share would make it.
    fn with_big_extension(hello: &[u8], n: usize) -> Vec<u8> {
        let hs = &hello[5..];
        let body = &hs[4..];
        let mut c = Cursor { b: body, at: 0 };
        c.take(34).unwrap();
        c.vec8().unwrap();
        c.vec16().unwrap();
        c.vec8().unwrap();
        let head = &body[..c.at];
        let exts = c.vec16().unwrap();
        let mut new_exts = vec![0x1a, 0x1a];
        new_exts.extend_from_slice(&(n as u16).to_be_bytes());
        new_exts.extend(std::iter::repeat_n(0xab, n));
        new_exts.extend_from_slice(exts);
        let mut new_body = head.to_vec();
        new_body.extend_from_slice(&(new_exts.len() as u16).to_be_bytes());
        new_body.extend_from_slice(&new_exts);
        let mut hs2 = vec![1];
        hs2.extend_from_slice(&(new_body.len() as u32).to_be_bytes()[1..]);
        hs2.extend_from_slice(&new_body);
        let mut rec = vec![0x16, 3, 1];
        rec.extend_from_slice(&(hs2.len() as u16).to_be_bytes());
        rec.extend_from_slice(&hs2);
        rec
    }

    #[test]
    fn reads_the_name_of_a_real_client_hello() {
        assert_eq!(
            peek(SNI_HELLO),
            Ok((Sni::Name(15), "api.example.com".into()))
        );
        assert_eq!(peek(NO_SNI_HELLO).map(|r| r.0), Ok(Sni::NoSni));
    }

    #[test]
    fn every_prefix_is_incomplete() {
        for n in 0..SNI_HELLO.len() {
            assert_eq!(
                peek(&SNI_HELLO[..n]).map(|r| r.0),
                Ok(Sni::Incomplete),
                "prefix {n}"
            );
        }
    }

    #[test]
    fn split_across_records_and_large() {
        for chunk in [1, 7, 100, 1000] {
            let split = split_records(SNI_HELLO, chunk);
            assert_eq!(
                peek(&split).map(|r| r.1),
                Ok("api.example.com".into()),
                "chunk {chunk}"
            );
            assert_eq!(
                peek(&split[..split.len() - 1]).map(|r| r.0),
                Ok(Sni::Incomplete)
            );
        }
        let big = with_big_extension(SNI_HELLO, 3000);
        assert!(big.len() > 3000);
        assert_eq!(peek(&big).map(|r| r.1), Ok("api.example.com".into()));
        let big_split = split_records(&big, 1400);
        assert_eq!(peek(&big_split).map(|r| r.1), Ok("api.example.com".into()));
        // Bytes after the ClientHello (the client's next record) do not matter.
        let mut more = SNI_HELLO.to_vec();
        more.extend_from_slice(&[0x14, 3, 3, 0, 1, 1]);
        assert_eq!(peek(&more).map(|r| r.1), Ok("api.example.com".into()));
    }

    #[test]
    fn not_tls_and_malformed() {
        for plain in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"\x16\x02",
            b"SSH-2.0",
            b"\x15\x03\x01\x00\x02\x02\x28",
        ] {
            assert_eq!(peek(plain).map(|r| r.0), Ok(Sni::NotTls), "{plain:?}");
        }
        assert_eq!(peek(b"\x16").map(|r| r.0), Ok(Sni::Incomplete));
        // A length that runs past the message.
        let mut broken = SNI_HELLO.to_vec();
        broken[5 + 4 + 34] = 200; // session id length
        assert!(peek(&broken).is_err());
        // Oversized handshake.
        let huge = [0x16, 3, 1, 0x40, 0x00, 1, 0x01, 0, 0];
        assert_eq!(peek(&huge), Err(SniError::TooLarge));
    }

    #[test]
    fn names_are_validated_and_lower_cased() {
        let mut out = [0u8; 255];
        assert_eq!(host_name(b"API.Example.COM.", &mut out), Ok(Sni::Name(15)));
        assert_eq!(&out[..15], b"api.example.com");
        for bad in [&b""[..], b".", b"a..b", b"a b", b"a\nb", &[b'a'; 254]] {
            assert_eq!(host_name(bad, &mut out), Err(SniError::BadName), "{bad:?}");
        }
    }
}
