//! Fuzz target: the `server_config` invariants of `oxid_server::fuzzing`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| oxid_server::fuzzing::server_config(data));
