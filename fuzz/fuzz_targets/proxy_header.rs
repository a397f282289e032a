//! PROXY v1/v2 decoder: never panics, never claims more bytes than it was given, gives the
//! same answer for any extension of a complete header, and decodes what the encoders write.
//! Oracle: every v2 header epoxy accepts must be accepted by the `ppp` crate with the same
//! length and, for PROXY over TCP, the same addresses (epoxy is stricter, never looser).
#![no_main]
use epoxy::proxy_proto::{Parsed, encode_v1, encode_v2, parse};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let r = parse(data);
    if let Ok(Parsed::Done { header_len, addrs }) = r {
        assert!(header_len <= data.len());
        if data[0] == b'\r' {
            oracle_v2(&data[..header_len], addrs);
        }
        // The header decodes the same alone, and every strict prefix is incomplete or the
        // same kind of error-free prefix.
        assert_eq!(parse(&data[..header_len]), r);
        for n in 0..header_len {
            assert_eq!(parse(&data[..n]), Ok(Parsed::Incomplete), "prefix {n}");
        }
        if let Some((src, dst)) = addrs {
            let mut out = [0u8; 108];
            for n in [encode_v1(src, dst, &mut out), encode_v2(src, dst, &mut out)] {
                assert!(n > 0);
            }
            let n = encode_v2(src, dst, &mut out);
            assert!(matches!(parse(&out[..n]), Ok(Parsed::Done { header_len, .. }) if header_len == n));
        }
    }
    if let Ok(Parsed::Incomplete) = r {
        // An incomplete header is a prefix of something: it stays incomplete or decides with
        // more bytes, never panics.
        let mut more = data.to_vec();
        more.extend_from_slice(b"\r\n");
        let _ = parse(&more);
    }
});

fn oracle_v2(hdr: &[u8], ours: Option<(std::net::SocketAddr, std::net::SocketAddr)>) {
    use ppp::v2::{Addresses, Command, Header, Protocol};
    use std::net::{IpAddr, SocketAddr};
    let theirs = match Header::try_from(hdr) {
        Ok(h) => h,
        Err(e) => panic!("epoxy accepted a v2 header ppp refuses ({e:?}): {hdr:?}"),
    };
    assert_eq!(theirs.len(), hdr.len(), "header length");
    if theirs.command != Command::Proxy || theirs.protocol != Protocol::Stream {
        assert_eq!(ours, None, "LOCAL or UNSPEC carries no addresses");
        return;
    }
    let expect = match theirs.addresses {
        Addresses::IPv4(a) => Some((
            SocketAddr::new(IpAddr::V4(a.source_address), a.source_port),
            SocketAddr::new(IpAddr::V4(a.destination_address), a.destination_port),
        )),
        Addresses::IPv6(a) => Some((
            SocketAddr::new(IpAddr::V6(a.source_address), a.source_port),
            SocketAddr::new(IpAddr::V6(a.destination_address), a.destination_port),
        )),
        _ => None,
    };
    assert_eq!(ours, expect, "addresses differ from ppp's");
}
