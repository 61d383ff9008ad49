//! oxid-server: the certificate authority of one trust domain.
//!
//! This crate owns the server's state and its rules: the datastore (every
//! acknowledged write durable, every multi-key write atomic, a change feed
//! that followers resume from any retained revision). The CA manager, node
//! attestation, the agent and admin APIs and the CLI build on it.

pub mod admin;
pub mod agent_api;
pub mod attest;
pub mod ca;
pub mod cli;
pub mod clock;
pub mod config;
pub mod datastore;
/// Fuzz oracles: only for `fuzz/` (feature `fuzzing`) and this crate's tests.
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod index;
pub mod metrics;
pub mod retention;
pub mod run;
