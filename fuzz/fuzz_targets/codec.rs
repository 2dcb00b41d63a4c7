//! Arbitrary bytes through the codec: never a panic; what decodes re-encodes to the same bytes.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| atelier_storage::codec::fuzz_one(data));
