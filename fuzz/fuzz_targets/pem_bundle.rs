//! Fuzz target: the `pem_bundle` invariants of `oxid_pki::fuzzing`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| oxid_pki::fuzzing::pem_bundle(data));
