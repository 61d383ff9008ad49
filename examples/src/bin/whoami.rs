//! whoami: asks the Workload API for this process's X509-SVID and prints
//! the SPIFFE ID, or why there is none (exit code 1).
//!
//! ```sh
//! SPIFFE_ENDPOINT_SOCKET=unix:///run/oxid-agent/public/api.sock whoami
//! ```

#![allow(clippy::print_stdout, clippy::print_stderr)]

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let client = match spiffe::WorkloadApiClient::connect_env().await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("whoami: cannot reach the Workload API: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match client.fetch_x509_svid().await {
        Ok(svid) => {
            println!("whoami: {}", svid.spiffe_id());
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            println!("whoami: refused: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
