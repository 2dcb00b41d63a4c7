//! Arbitrary method, path, headers and body through request parsing and routing: never a panic.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| atelier_http::fuzz_request(data));
