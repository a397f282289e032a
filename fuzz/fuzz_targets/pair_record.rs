//! The state record of a pair moved by an upgrade (`migrate.rs`) and the batch framing around
//! it (`upgrade::split_records`): never panics; whatever decodes re-encodes to the same bytes
//! and decodes to the same record (nothing is accepted that the encoder would not write).
#![no_main]
use epoxy::migrate::PairRecord;
use epoxy::upgrade::split_records;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = PairRecord::decode(data) {
        let mut again = Vec::new();
        r.encode(&mut again);
        assert_eq!(again.as_slice(), data);
        assert_eq!(PairRecord::decode(&again), Ok(r));
    }
    // As a batch: the first byte says how many records the rest holds.
    if let Some((&n, rest)) = data.split_first()
        && let Ok(records) = split_records(rest, usize::from(n % 8))
    {
        assert_eq!(records.len(), usize::from(n % 8));
    }
});
