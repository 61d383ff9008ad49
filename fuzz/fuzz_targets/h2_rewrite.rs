//! Fuzz target: the `h2_rewrite` invariants of `oxid_agent::fuzzing`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| oxid_agent::fuzzing::h2_rewrite(data));
