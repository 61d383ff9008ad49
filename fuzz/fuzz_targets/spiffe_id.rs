//! Fuzz target: the `spiffe_id` invariants of `oxid_pki::fuzzing`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| oxid_pki::fuzzing::spiffe_id(data));
