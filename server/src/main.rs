//! The `oxid-server` binary: parses arguments and hands over to the library.

fn main() -> std::process::ExitCode {
    oxid_server::cli::main()
}
