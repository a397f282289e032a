//! The toml config format: any text gives a config or a one-line error, never a panic. (Host
//! names are not resolved in fuzz builds: see `resolve_host`.)
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = epoxy::config::load_str(text, "fuzz.toml", &Default::default()) {
        assert!(!e.to_string().contains('\n'), "multi-line error: {e}");
    }
});
