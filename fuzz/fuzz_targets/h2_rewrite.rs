//! Fuzz target: the `h2_rewrite` invariants of `oxid_h2_authority::fuzzing`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| oxid_h2_authority::fuzzing::h2_rewrite(data));
