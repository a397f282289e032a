//! The state record of a live pair moved from an old process to a new one during an upgrade
//! (`upgrade_migrate`), and its strict binary codec. Pure: no sockets, no clock, no worker.
//! The two sockets travel beside the record as SCM_RIGHTS descriptors (see `upgrade.rs`).
//!
//! Layout (big-endian), version 1:
//! ```text
//! "EPXP" u8 version
//! u8 app_len, app; u8 target_len, target; u8 name_len, name (TLS server name, may be empty)
//! u8 family (4 | 6), 4 or 16 address bytes, u16 port          (the client address)
//! u8 state (1 open, 2 half-closed), u8 flags
//! u64 age_ms, u64 idle_ms, u64 connect_us
//! 2 x flow: u64 read, u64 written, u16 header, u32 len, len bytes   (to upstream, to client)
//! ```
//! Flags: bit 0/1 to-upstream eof/shut, bit 2/3 to-client eof/shut, bit 4/5 client/upstream
//! peer closed, bit 6 splice, bit 7 a PROXY header was sent toward the target. Every field
//! is checked (names are what the config allows, flows keep `written <= read`, a shut flow
//! is at EOF and empty, nothing trails); a bad record is an error, never a panic.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

pub const MAGIC: &[u8; 4] = b"EPXP";
pub const VERSION: u8 = 1;
/// Largest bytes a flow may carry (the largest buffer size the config allows).
pub const MAX_FLOW_BYTES: usize = 1 << 20;
/// Longest app, target or server name.
pub const MAX_NAME: usize = 255;

/// Where a moved pair is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MovedState {
    Open,
    HalfClosed,
}

/// One direction of a moved pair.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FlowRecord {
    pub read: u64,
    pub written: u64,
    /// Of `data`, the first `header` bytes are a PROXY header not yet written (not payload).
    pub header: u16,
    pub eof: bool,
    pub shut: bool,
    /// Bytes read from the source and not yet written to the destination.
    pub data: Vec<u8>,
}

/// Everything a new process needs to carry on a pair where the old one stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairRecord {
    pub app: String,
    pub target: String,
    pub server_name: String,
    pub client_addr: SocketAddr,
    pub state: MovedState,
    pub client_peer_closed: bool,
    pub upstream_peer_closed: bool,
    pub splice: bool,
    pub proxy_header_sent: bool,
    /// Since the client was accepted.
    pub age: Duration,
    /// Since the last byte moved (the idle timeout keeps counting from here).
    pub idle: Duration,
    pub connect_time: Duration,
    pub to_upstream: FlowRecord,
    pub to_client: FlowRecord,
}

/// Why a record was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordError(pub &'static str);

impl fmt::Display for RecordError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "bad pair record: {}", self.0)
    }
}

impl std::error::Error for RecordError {}

fn put_name(out: &mut Vec<u8>, s: &str) {
    let b = s.as_bytes();
    let n = b.len().min(MAX_NAME);
    out.push(n as u8);
    out.extend_from_slice(&b[..n]);
}

fn put_flow(out: &mut Vec<u8>, f: &FlowRecord) {
    out.extend_from_slice(&f.read.to_be_bytes());
    out.extend_from_slice(&f.written.to_be_bytes());
    out.extend_from_slice(&f.header.to_be_bytes());
    out.extend_from_slice(&(f.data.len() as u32).to_be_bytes());
    out.extend_from_slice(&f.data);
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl PairRecord {
    /// Append the encoding of this record to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        put_name(out, &self.app);
        put_name(out, &self.target);
        put_name(out, &self.server_name);
        match self.client_addr.ip() {
            IpAddr::V4(ip) => {
                out.push(4);
                out.extend_from_slice(&ip.octets());
            }
            IpAddr::V6(ip) => {
                out.push(6);
                out.extend_from_slice(&ip.octets());
            }
        }
        out.extend_from_slice(&self.client_addr.port().to_be_bytes());
        out.push(match self.state {
            MovedState::Open => 1,
            MovedState::HalfClosed => 2,
        });
        let bits = [
            self.to_upstream.eof,
            self.to_upstream.shut,
            self.to_client.eof,
            self.to_client.shut,
            self.client_peer_closed,
            self.upstream_peer_closed,
            self.splice,
            self.proxy_header_sent,
        ];
        let flags = bits
            .iter()
            .enumerate()
            .fold(0u8, |acc, (i, &b)| acc | (u8::from(b) << i));
        out.push(flags);
        out.extend_from_slice(&millis(self.age).to_be_bytes());
        out.extend_from_slice(&millis(self.idle).to_be_bytes());
        let us = u64::try_from(self.connect_time.as_micros()).unwrap_or(u64::MAX);
        out.extend_from_slice(&us.to_be_bytes());
        put_flow(out, &self.to_upstream);
        put_flow(out, &self.to_client);
    }

    /// Decode exactly one record (the whole of `b`), strictly.
    pub fn decode(b: &[u8]) -> Result<PairRecord, RecordError> {
        let mut r = Reader { b, at: 0 };
        if r.take(4)? != MAGIC {
            return Err(RecordError("magic"));
        }
        if r.u8()? != VERSION {
            return Err(RecordError("version"));
        }
        let app = r.name()?;
        let target = r.name()?;
        let server_name = r.name()?;
        if app.is_empty() || target.is_empty() {
            return Err(RecordError("empty app or target name"));
        }
        let ip = match r.u8()? {
            4 => {
                let o: [u8; 4] = r.take(4)?.try_into().map_err(|_| RecordError("address"))?;
                IpAddr::V4(Ipv4Addr::from(o))
            }
            6 => {
                let o: [u8; 16] = r.take(16)?.try_into().map_err(|_| RecordError("address"))?;
                IpAddr::V6(Ipv6Addr::from(o))
            }
            _ => return Err(RecordError("address family")),
        };
        let port = r.u16()?;
        let state = match r.u8()? {
            1 => MovedState::Open,
            2 => MovedState::HalfClosed,
            _ => return Err(RecordError("state")),
        };
        let flags = r.u8()?;
        let bit = |i: u8| flags & (1 << i) != 0;
        let age = Duration::from_millis(r.u64()?);
        let idle = Duration::from_millis(r.u64()?);
        let connect_time = Duration::from_micros(r.u64()?);
        let mut to_upstream = r.flow()?;
        let mut to_client = r.flow()?;
        if r.at != b.len() {
            return Err(RecordError("trailing bytes"));
        }
        to_upstream.eof = bit(0);
        to_upstream.shut = bit(1);
        to_client.eof = bit(2);
        to_client.shut = bit(3);
        for f in [&to_upstream, &to_client] {
            if f.shut && (!f.eof || !f.data.is_empty()) {
                return Err(RecordError("a shut flow must be at EOF and empty"));
            }
            if usize::from(f.header) > f.data.len() {
                return Err(RecordError("header longer than the bytes held"));
            }
        }
        if to_client.header != 0 {
            return Err(RecordError("a PROXY header toward the client"));
        }
        let any_shut = to_upstream.shut || to_client.shut;
        if (state == MovedState::HalfClosed) != any_shut {
            return Err(RecordError("state and shutdown flags disagree"));
        }
        if to_upstream.shut && to_client.shut {
            return Err(RecordError("both directions finished"));
        }
        if idle > age {
            return Err(RecordError("idle longer than the pair's age"));
        }
        Ok(PairRecord {
            app,
            target,
            server_name,
            client_addr: SocketAddr::new(ip, port),
            state,
            client_peer_closed: bit(4),
            upstream_peer_closed: bit(5),
            splice: bit(6),
            proxy_header_sent: bit(7),
            age,
            idle,
            connect_time,
            to_upstream,
            to_client,
        })
    }
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], RecordError> {
        let end = self.at.checked_add(n).ok_or(RecordError("length"))?;
        let s = self.b.get(self.at..end).ok_or(RecordError("truncated"))?;
        self.at = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, RecordError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, RecordError> {
        let s = self.take(2)?;
        Ok(u16::from_be_bytes([s[0], s[1]]))
    }
    fn u32(&mut self) -> Result<u32, RecordError> {
        let s = self.take(4)?;
        Ok(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self) -> Result<u64, RecordError> {
        let s = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        Ok(u64::from_be_bytes(a))
    }
    /// A name as the config allows it in labels: ASCII letters, digits and `-_.:*`.
    fn name(&mut self) -> Result<String, RecordError> {
        let n = self.u8()? as usize;
        let s = self.take(n)?;
        if !s
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || b"-_.:*[]%".contains(c))
        {
            return Err(RecordError("name characters"));
        }
        String::from_utf8(s.to_vec()).map_err(|_| RecordError("name characters"))
    }
    fn flow(&mut self) -> Result<FlowRecord, RecordError> {
        let read = self.u64()?;
        let written = self.u64()?;
        let header = self.u16()?;
        let len = self.u32()? as usize;
        if len > MAX_FLOW_BYTES {
            return Err(RecordError("flow bytes"));
        }
        if written > read {
            return Err(RecordError("more written than read"));
        }
        let data = self.take(len)?.to_vec();
        let payload = len - usize::from(header).min(len);
        if read - written != payload as u64 {
            return Err(RecordError("pending bytes disagree with the counters"));
        }
        Ok(FlowRecord {
            read,
            written,
            header,
            eof: false,
            shut: false,
            data,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub fn sample() -> PairRecord {
        PairRecord {
            app: "web".into(),
            target: "127.0.0.1:8081".into(),
            server_name: "api.example.com".into(),
            client_addr: "[::1]:40000".parse().expect("addr"),
            state: MovedState::HalfClosed,
            client_peer_closed: true,
            upstream_peer_closed: false,
            splice: false,
            proxy_header_sent: true,
            age: Duration::from_millis(12_345),
            idle: Duration::from_millis(345),
            connect_time: Duration::from_micros(777),
            to_upstream: FlowRecord {
                read: 100,
                written: 100,
                header: 0,
                eof: true,
                shut: true,
                data: vec![],
            },
            to_client: FlowRecord {
                read: 5000,
                written: 4990,
                header: 0,
                eof: false,
                shut: false,
                data: vec![7; 10],
            },
        }
    }

    #[test]
    fn round_trip() {
        let r = sample();
        let mut b = Vec::new();
        r.encode(&mut b);
        assert_eq!(PairRecord::decode(&b), Ok(r.clone()));
        let mut v4 = r;
        v4.client_addr = "10.1.2.3:5".parse().expect("addr");
        v4.state = MovedState::Open;
        v4.to_upstream = FlowRecord {
            read: 30,
            written: 10,
            header: 16,
            data: vec![1; 36],
            ..FlowRecord::default()
        };
        let mut b = Vec::new();
        v4.encode(&mut b);
        assert_eq!(PairRecord::decode(&b), Ok(v4));
    }

    #[test]
    fn every_truncation_and_corruption_is_an_error() {
        let mut b = Vec::new();
        sample().encode(&mut b);
        for n in 0..b.len() {
            assert!(PairRecord::decode(&b[..n]).is_err(), "prefix {n}");
        }
        let mut long = b.clone();
        long.push(0);
        assert_eq!(
            PairRecord::decode(&long),
            Err(RecordError("trailing bytes"))
        );
        // Flip every byte: never a panic (most are errors; some, like a counter, still decode).
        for i in 0..b.len() {
            let mut c = b.clone();
            c[i] ^= 0xff;
            let _ = PairRecord::decode(&c);
        }
        let mut bad = b.clone();
        bad[4] = 2;
        assert_eq!(PairRecord::decode(&bad), Err(RecordError("version")));
    }

    #[test]
    fn inconsistent_records_are_refused() {
        let mut r = sample();
        r.state = MovedState::Open;
        let mut b = Vec::new();
        r.encode(&mut b);
        assert!(
            PairRecord::decode(&b).is_err(),
            "half-closed flags, open state"
        );
        let mut r = sample();
        r.to_client.written = 4000;
        let mut b = Vec::new();
        r.encode(&mut b);
        assert!(PairRecord::decode(&b).is_err(), "pending bytes mismatch");
        let mut r = sample();
        r.idle = Duration::from_secs(100);
        let mut b = Vec::new();
        r.encode(&mut b);
        assert!(PairRecord::decode(&b).is_err(), "idle > age");
    }
}
