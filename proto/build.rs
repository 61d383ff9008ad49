//! Compiles the `.proto` files of this crate into Rust with protox (pure Rust,
//! no `protoc` needed) and tonic-prost-build.

use std::error::Error;

/// Every `.proto` file this crate compiles, relative to the crate root (which
/// is also the single include directory, so imports are written as e.g.
/// `import "spiffe/workload.proto";`).
///
/// Adding a file (e.g. `oxid/agent/v1/agent.proto`) is one line here plus a
/// module in `src/lib.rs` including the `<package>.rs` that prost writes for
/// it. Well-known types (`google/protobuf/*.proto`) come built into protox and
/// map to `::prost_types`, so they are neither listed nor generated here.
const PROTOS: &[&str] = &[
    "spiffe/workload.proto",
    "oxid/admin/v1/admin.proto",
    "oxid/agent/v1/agent.proto",
];

fn main() -> Result<(), Box<dyn Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    println!("cargo:rerun-if-changed=build.rs");

    // Imports (google/protobuf/struct.proto) must be in the descriptor set:
    // prost-build looks up every referenced message while deriving traits and
    // panics on a missing one. It writes no code for them, because
    // `.google.protobuf` is an extern path (`::prost_types`) by default.
    // Source info is kept so that proto comments become rustdoc.
    let fds = protox::Compiler::new(["."])?
        .include_source_info(true)
        .include_imports(true)
        .open_files(PROTOS)?
        .file_descriptor_set();

    // Wire contract: the Workload API has no package, so its gRPC paths are
    // `/SpiffeWorkloadAPI/<Method>`. Checked here, not only in tests, because
    // with a package prost writes a differently named file and an incremental
    // build would silently keep compiling the stale `_.rs` left in OUT_DIR.
    for file in &fds.file {
        if file.name() == "spiffe/workload.proto" && !file.package().is_empty() {
            return Err(format!(
                "spiffe/workload.proto must have no `package` (found `{}`): \
                 SPIFFE clients call /SpiffeWorkloadAPI/<Method>",
                file.package()
            )
            .into());
        }
    }

    // The Workload API's own descriptor set (with its imports), for gRPC
    // reflection on the agent's socket: it describes that API and no other.
    let workload_fds = protox::Compiler::new(["."])?
        .include_imports(true)
        .open_files(["spiffe/workload.proto"])?
        .file_descriptor_set();
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("workload_descriptor.bin"),
        prost::Message::encode_to_vec(&workload_fds),
    )?;

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // No `connect()` helper on the client: it would need tonic's
        // "transport" feature, and callers dial Unix sockets themselves.
        .build_transport(false)
        // No extern_path for `.google.protobuf`: prost-build already maps it
        // to `::prost_types` (and rejects a second mapping), so Struct, Value,
        // ... are the `prost-types` ones, shared with other crates.
        .compile_fds(fds)?;
    Ok(())
}
