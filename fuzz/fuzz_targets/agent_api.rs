//! Fuzz target: the `agent_api` invariants of `oxid_server::fuzzing`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| oxid_server::fuzzing::agent_api(data));
