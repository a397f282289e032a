//! ClientHello reader: never panics, and feeding a prefix first then everything gives the same
//! final answer as everything at once (the reader keeps no state between calls).
#![no_main]
use epoxy::sni::{Sni, peek_sni};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut out = [0u8; 255];
    let all = peek_sni(data, &mut out);
    if let Ok(Sni::Name(n)) = all {
        assert!(n > 0 && n <= 253);
        let name = &out[..n];
        assert!(name.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(b)));
    }
    if !data.is_empty() {
        let split = data[0] as usize % data.len();
        let mut out2 = [0u8; 255];
        let _ = peek_sni(&data[..split], &mut out2);
        let again = peek_sni(data, &mut out2);
        assert_eq!(all, again);
        if let Ok(Sni::Name(n)) = all {
            assert_eq!(out[..n], out2[..n]);
        }
    }
});
