//! `oxid-agent api ...` and `healthcheck`: the Workload API used from the
//! command line, as any workload would (with the security header).

use std::path::PathBuf;

use hyper_util::rt::TokioIo;
use oxid_proto::workload as pb;
use oxid_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use rustls_pki_types::CertificateDer;
use serde_json::json;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::AgentError;
use crate::cli::{ApiArgs, ApiCommand, FetchCommand, ValidateCommand};
use crate::workload::with_header;

/// Prints one line of command output (quietly done if the reader left).
pub(crate) fn say(line: &str) {
    oxid_telemetry::write_stdout(format_args!("{line}\n"));
}

fn socket_path(args: &ApiArgs) -> PathBuf {
    if let Some(p) = &args.socket_path {
        return p.clone();
    }
    match std::env::var("SPIFFE_ENDPOINT_SOCKET") {
        Ok(v) => PathBuf::from(v.strip_prefix("unix://").unwrap_or(&v)),
        Err(_) => PathBuf::from(crate::config::DEFAULT_SOCKET_PATH),
    }
}

async fn channel(args: &ApiArgs) -> Result<Channel, AgentError> {
    let path = socket_path(args);
    let shown = path.display().to_string();
    // What a workload sends or receives here (keys, SVIDs) must not go
    // through a link or directory another user could redirect.
    if let Err(e) = oxid_tls::socket::check_socket_to_connect(&path) {
        if std::fs::metadata(&path).is_ok() {
            return Err(AgentError::WorkloadApi(e.to_string()));
        }
    }
    Endpoint::try_from("http://workload-api.invalid")
        .map_err(|e| AgentError::Internal(e.to_string()))?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
        .map_err(|_| {
            AgentError::WorkloadApi(format!(
                "cannot connect to {shown}: is the agent running? (set --socket-path \
                 or SPIFFE_ENDPOINT_SOCKET)"
            ))
        })
}

fn status(s: tonic::Status) -> AgentError {
    AgentError::WorkloadApi(format!("{} ({:?})", s.message(), s.code()))
}

/// `healthcheck`: the Workload API must be SERVING.
pub(crate) async fn healthcheck(args: ApiArgs) -> Result<(), AgentError> {
    use tonic_health::pb::health_check_response::ServingStatus;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel(&args).await?);
    let s = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "SpiffeWorkloadAPI".into(),
        })
        .await
        .map_err(status)?
        .into_inner()
        .status;
    if s != ServingStatus::Serving as i32 {
        return Err(AgentError::WorkloadApi(
            "the agent has not synced with the server yet".into(),
        ));
    }
    if args.output == "json" {
        say(&json!({"serving": true}).to_string());
    } else {
        say("agent is healthy");
    }
    Ok(())
}

fn describe(svid: &pb::X509svid) -> (String, String) {
    let chain = oxid_pki::x509::split_der_certs(&svid.x509_svid).unwrap_or_default();
    let (expiry, serial) = chain
        .first()
        .and_then(|leaf| x509_parser::parse_x509_certificate(leaf).ok())
        .map(|(_, c)| {
            (
                c.validity().not_after.to_datetime().to_string(),
                oxid_pki::hex(c.raw_serial()),
            )
        })
        .unwrap_or_default();
    (expiry, serial)
}

fn print_x509(output: &str, resp: &pb::X509svidResponse) {
    if output == "json" {
        let svids: Vec<_> = resp
            .svids
            .iter()
            .map(|s| {
                let (expiry, serial) = describe(s);
                json!({"spiffe_id": s.spiffe_id, "hint": s.hint, "expires": expiry, "serial": serial})
            })
            .collect();
        say(&json!({ "svids": svids, "federated_bundles": resp.federated_bundles.keys().collect::<Vec<_>>() }).to_string());
    } else {
        for s in &resp.svids {
            let (expiry, serial) = describe(s);
            say(&format!(
                "{}  (serial {serial}, expires {expiry})",
                s.spiffe_id
            ));
        }
    }
}

fn to_pem(der: &[u8]) -> Result<String, AgentError> {
    let certs: Vec<CertificateDer<'static>> =
        oxid_pki::x509::split_der_certs(der).map_err(|e| AgentError::WorkloadApi(e.to_string()))?;
    Ok(oxid_pki::x509::certs_to_pem(&certs))
}

/// `api ...` commands.
pub(crate) async fn run(cmd: ApiCommand) -> Result<(), AgentError> {
    match cmd {
        ApiCommand::Fetch(FetchCommand::X509 { write, api }) => {
            let mut c = SpiffeWorkloadApiClient::new(channel(&api).await?);
            let mut stream = c
                .fetch_x509svid(with_header(pb::X509svidRequest {}))
                .await
                .map_err(status)?
                .into_inner();
            let resp = stream
                .message()
                .await
                .map_err(status)?
                .ok_or_else(|| AgentError::WorkloadApi("the stream ended".into()))?;
            if let Some(dir) = write {
                let first = resp
                    .svids
                    .first()
                    .ok_or_else(|| AgentError::WorkloadApi("no SVID".into()))?;
                crate::state::write_private(
                    &dir.join("svid.pem"),
                    to_pem(&first.x509_svid)?.as_bytes(),
                )?;
                let key = oxid_pki::x509::pem_encode("PRIVATE KEY", &first.x509_svid_key);
                crate::state::write_private(&dir.join("svid.key"), key.as_bytes())?;
                crate::state::write_private(
                    &dir.join("bundle.pem"),
                    to_pem(&first.bundle)?.as_bytes(),
                )?;
            }
            print_x509(&api.output, &resp);
            Ok(())
        }
        ApiCommand::Fetch(FetchCommand::Jwt {
            audiences,
            spiffe_id,
            api,
        }) => {
            let mut c = SpiffeWorkloadApiClient::new(channel(&api).await?);
            let resp = c
                .fetch_jwtsvid(with_header(pb::JwtsvidRequest {
                    audience: audiences,
                    spiffe_id: spiffe_id.unwrap_or_default(),
                }))
                .await
                .map_err(status)?
                .into_inner();
            for s in &resp.svids {
                if api.output == "json" {
                    say(&json!({"spiffe_id": s.spiffe_id, "token": s.svid}).to_string());
                } else {
                    say(&s.svid);
                }
            }
            Ok(())
        }
        ApiCommand::Validate(ValidateCommand::Jwt {
            audience,
            svid,
            api,
        }) => {
            let mut c = SpiffeWorkloadApiClient::new(channel(&api).await?);
            let resp = c
                .validate_jwtsvid(with_header(pb::ValidateJwtsvidRequest { audience, svid }))
                .await
                .map_err(status)?
                .into_inner();
            if api.output == "json" {
                say(&json!({"spiffe_id": resp.spiffe_id}).to_string());
            } else {
                say(&format!("valid JWT-SVID for {}", resp.spiffe_id));
            }
            Ok(())
        }
        ApiCommand::Watch(api) => {
            let mut c = SpiffeWorkloadApiClient::new(channel(&api).await?);
            let mut stream = c
                .fetch_x509svid(with_header(pb::X509svidRequest {}))
                .await
                .map_err(status)?
                .into_inner();
            while let Some(resp) = stream.message().await.map_err(status)? {
                print_x509(&api.output, &resp);
            }
            Ok(())
        }
    }
}
