//! Fuzz target: the `workload_request` invariants of `oxid_agent::fuzzing`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| oxid_agent::fuzzing::workload_request(data));
