//! Replays the committed fuzz seed corpus (`fuzz/corpus/<target>/`) through the same parsers
//! the fuzz targets drive, so `make test` covers them without a fuzzer: no input may panic,
//! and every config error is one line.

use std::path::Path;

fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let p = e.expect("dir entry").path();
            let bytes = std::fs::read(&p).expect("read corpus file");
            (p.display().to_string(), bytes)
        })
        .collect();
    out.sort();
    assert!(!out.is_empty(), "empty corpus {}", dir.display());
    out
}

#[test]
fn proxy_header_corpus() {
    use epoxy::proxy_proto::{Parsed, parse};
    let mut done = 0;
    for (name, data) in corpus("proxy_header") {
        if let Ok(Parsed::Done { header_len, .. }) = parse(&data) {
            assert!(header_len <= data.len(), "{name}");
            done += 1;
        }
    }
    assert!(done >= 5, "the valid seeds must decode");
}

#[test]
fn client_hello_corpus() {
    use epoxy::sni::{Sni, peek_sni};
    let mut names = 0;
    for (_, data) in corpus("client_hello") {
        let mut out = [0u8; 255];
        if let Ok(Sni::Name(_)) = peek_sni(&data, &mut out) {
            names += 1;
        }
    }
    assert!(names >= 1, "the seed with SNI must give a name");
}

#[test]
fn config_corpora() {
    for (target, ext) in [
        ("config_toml", "toml"),
        ("config_json", "json"),
        ("config_pipe", "conf"),
    ] {
        for (name, data) in corpus(target) {
            let Ok(text) = std::str::from_utf8(&data) else {
                continue;
            };
            if let Err(e) = epoxy::config::load_str(text, &format!("x.{ext}"), &Default::default())
            {
                assert!(
                    !e.to_string().contains('\n'),
                    "{name}: multi-line error {e}"
                );
            }
        }
    }
}

#[test]
fn pair_record_corpus() {
    use epoxy::migrate::PairRecord;
    let mut valid = 0;
    for (name, data) in corpus("pair_record") {
        if let Ok(r) = PairRecord::decode(&data) {
            let mut again = Vec::new();
            r.encode(&mut again);
            assert_eq!(again, data, "{name} re-encodes differently");
            valid += 1;
        }
        if let Some((&n, rest)) = data.split_first() {
            let _ = epoxy::upgrade::split_records(rest, usize::from(n % 8));
        }
    }
    assert!(valid >= 5, "the valid seeds must decode ({valid})");
}
