//! oxid-pki: the identity primitives of oxid.
//!
//! This crate owns everything that decides whether an identity is valid:
//! SPIFFE ID syntax ([`SpiffeId`], [`TrustDomain`]), selectors ([`Selector`]),
//! key pairs ([`KeyPair`]),
//! the X.509 CA and X509-SVID issuance and verification ([`x509`]),
//! JWT-SVIDs ([`jwt`]), trust bundles ([`bundle`]) and both halves of x509pop
//! node attestation ([`x509pop`]).
//!
//! Invariants:
//! - It does no I/O beyond reading and writing key files, and never uses tokio:
//!   the server and agent call it from whatever runtime they have.
//! - Crypto is `ring` only; keys generated here are ECDSA (P-256 default,
//!   P-384). RSA keys are accepted on import (≥ 2048 bits), never generated.
//! - Time is always a parameter (`now`), never read inside a check, so the
//!   callers' rotation logic can be tested at its edges without sleeping.
//! - Everything issued is re-parsed and checked against the SPIFFE rules
//!   before it is returned: a bug in a template cannot leak a bad SVID.

pub mod bundle;
pub mod id;
mod json;
pub mod jwt;
pub mod key;
pub mod policy;
pub mod selector;
pub mod x509;
pub mod x509pop;

/// Invariant checks for the fuzz targets; compiled only for them (feature
/// `fuzzing`) and for this crate's tests, never into what oxid ships.
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;

pub use id::{IdError, RESERVED_PATH, SpiffeId, TrustDomain};
pub use key::{KeyAlgorithm, KeyError, KeyPair, Pkcs8Key, hex};
pub use selector::{Selector, SelectorError};
