//! Fuzz target: the `selector` invariants of `oxid_pki::fuzzing`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| oxid_pki::fuzzing::selector(data));
