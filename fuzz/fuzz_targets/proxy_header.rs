//! PROXY v1/v2 decoder: never panics, never claims more bytes than it was given, gives the
//! same answer for any extension of a complete header, and decodes what the encoders write.
#![no_main]
use epoxy::proxy_proto::{Parsed, encode_v1, encode_v2, parse};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let r = parse(data);
    if let Ok(Parsed::Done { header_len, addrs }) = r {
        assert!(header_len <= data.len());
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
