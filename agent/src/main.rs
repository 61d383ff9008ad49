//! The `oxid-agent` binary: parses arguments and hands over to the library.

fn main() -> std::process::ExitCode {
    oxid_agent::cli::main()
}
