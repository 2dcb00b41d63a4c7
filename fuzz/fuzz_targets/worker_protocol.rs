//! Arbitrary bytes as a worker's protocol stream: splitting, parsing and checking never panic.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| atelier_workers::protocol::fuzz_stream(data));
