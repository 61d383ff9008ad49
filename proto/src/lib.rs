//! Wire types of oxid: generated prost messages and tonic client/server code.
//!
//! # What this crate owns
//!
//! - [`workload`]: the SPIFFE Workload API (`spiffe/workload.proto`), served by
//!   the oxid agent to workloads over a Unix socket. Messages, the
//!   [`SpiffeWorkloadApi`](workload::spiffe_workload_api_server::SpiffeWorkloadApi)
//!   server trait, its
//!   [`SpiffeWorkloadApiServer`](workload::spiffe_workload_api_server::SpiffeWorkloadApiServer)
//!   wrapper, and the
//!   [`SpiffeWorkloadApiClient`](workload::spiffe_workload_api_client::SpiffeWorkloadApiClient).
//! - Later, oxid's own agent <-> server API (`oxid/` in this crate's directory,
//!   empty for now).
//!
//! It owns *only* the wire format: no behaviour, no transport, no crypto. The
//! generated code needs tonic's `codegen` feature only; whoever serves or dials
//! a socket brings the transport.
//!
//! # Invariants
//!
//! - The Workload API proto has **no `package`**, so the service is named
//!   `SpiffeWorkloadAPI` and the method paths are exactly
//!   `/SpiffeWorkloadAPI/FetchX509SVID`, `/SpiffeWorkloadAPI/FetchX509Bundles`,
//!   `/SpiffeWorkloadAPI/FetchJWTSVID`, `/SpiffeWorkloadAPI/FetchJWTBundles` and
//!   `/SpiffeWorkloadAPI/ValidateJWTSVID`. This is the contract with every SPIFFE
//!   client. `build.rs` refuses a `package` line, and `tests/service_paths.rs`
//!   routes real gRPC calls at those literal paths through the generated server.
//! - Message names, field numbers and wire types are those of the SPIFFE
//!   specification; `tests/golden.rs` pins each one against hand-written bytes.
//! - `google.protobuf.Struct` (the claims of `ValidateJWTSVIDResponse`) is
//!   [`prost_types::Struct`], not a copy generated here.
//! - Building needs no `protoc`: `build.rs` parses the `.proto` files with
//!   protox.
//!
//! # Example
//!
//! ```
//! use oxid_proto::workload::JwtsvidRequest;
//! use prost::Message as _;
//!
//! let request = JwtsvidRequest { audience: vec!["db".into()], spiffe_id: String::new() };
//! let bytes = request.encode_to_vec();
//! assert_eq!(bytes, b"\x0a\x02db"); // field 1 (audience), length-delimited, 2 bytes
//! assert_eq!(JwtsvidRequest::decode(bytes.as_slice()), Ok(request));
//! ```

#![forbid(unsafe_code)]

pub mod limit;
pub mod stream_end;

/// The SPIFFE Workload API, generated from `spiffe/workload.proto`.
///
/// The proto has no `package`, so prost writes it to `_.rs`. Prost turns the
/// spec's all-caps acronyms into camel case: `X509SVIDResponse` becomes
/// [`X509svidResponse`](workload::X509svidResponse), `JWTSVID` becomes
/// [`Jwtsvid`](workload::Jwtsvid), service `SpiffeWorkloadAPI` becomes
/// `SpiffeWorkloadApi`. Only the Rust names change; the wire names do not.
///
/// No lint is silenced here: every message and field in the proto carries a
/// comment, which prost turns into rustdoc, so `missing_docs` stays on and
/// forces new proto items to be documented. (tonic marks its own generated
/// client/server modules `#[allow(missing_docs, ...)]`.)
pub mod workload {
    include!(concat!(env!("OUT_DIR"), "/_.rs"));
}

/// The encoded `FileDescriptorSet` of the Workload API (and its imports),
/// served by gRPC reflection on the agent's socket.
pub const WORKLOAD_FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/workload_descriptor.bin"));

/// oxid's agent API (`oxid.agent.v1`): node agents to the server, over TLS.
pub mod agent {
    include!(concat!(env!("OUT_DIR"), "/oxid.agent.v1.rs"));
}

/// oxid's admin API (`oxid.admin.v1`), served on the server's Unix socket.
pub mod admin {
    include!(concat!(env!("OUT_DIR"), "/oxid.admin.v1.rs"));
}
