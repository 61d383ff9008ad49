//! Fuzz target: the `private_key` invariants of `oxid_pki::fuzzing`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| oxid_pki::fuzzing::private_key(data));
