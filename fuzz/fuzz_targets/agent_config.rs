//! Fuzz target: the `agent_config` invariants of `oxid_agent::fuzzing`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| oxid_agent::fuzzing::agent_config(data));
