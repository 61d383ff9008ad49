//! Fuzz target: the `x509_chain` invariants of `oxid_pki::fuzzing`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| oxid_pki::fuzzing::x509_chain(data));
