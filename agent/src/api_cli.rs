//! `oxid-agent api ...` and `healthcheck`: the Workload API used from the
//! command line, as any workload would (with the security header).

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use oxid_proto::workload as pb;
use oxid_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use rustls_pki_types::CertificateDer;
use serde_json::json;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::AgentError;
use crate::cli::{ApiArgs, ApiCommand, FetchCommand, ValidateCommand, WatchArgs};
use crate::files::{self, Layout, Names, Notify, Writer};
use crate::workload::with_header;

/// Prints one line of command output (quietly done if the reader left).
pub(crate) fn say(line: &str) {
    oxid_telemetry::write_stdout(format_args!("{line}\n"));
}

/// The socket to call: `--socket-path`, else `SPIFFE_ENDPOINT_SOCKET`, else
/// the agent's default; either may be a path or a `unix:` URI.
fn socket_path(args: &ApiArgs) -> Result<PathBuf, AgentError> {
    let bad = |e: oxid_tls::socket::SocketError| AgentError::Config(e.to_string());
    if let Some(p) = &args.socket_path {
        // A path that is not UTF-8 cannot be a URI: it is taken as it is.
        return match p.to_str() {
            Some(s) => oxid_tls::socket::parse_socket_address(s)
                .map_err(|e| AgentError::Config(format!("--socket-path: {e}"))),
            None => Ok(p.clone()),
        };
    }
    match std::env::var("SPIFFE_ENDPOINT_SOCKET") {
        Ok(v) => oxid_tls::socket::parse_socket_address(&v)
            .map_err(|e| AgentError::Config(format!("SPIFFE_ENDPOINT_SOCKET: {e}"))),
        Err(std::env::VarError::NotPresent) => {
            Ok(PathBuf::from(crate::config::DEFAULT_SOCKET_PATH))
        }
        Err(e) => Err(bad(oxid_tls::socket::SocketError::BadAddress {
            address: "SPIFFE_ENDPOINT_SOCKET".into(),
            reason: e.to_string(),
        })),
    }
}

/// A Workload API channel, and the socket it goes to (for messages).
struct Api {
    channel: Channel,
    shown: String,
}

impl Api {
    /// The error for a refused call. A socket that does not serve the
    /// called service answers `Unimplemented` with no message at all, which
    /// says nothing to an operator who gave the wrong socket.
    fn status(&self, s: tonic::Status) -> AgentError {
        if s.code() == tonic::Code::Unimplemented && s.message().is_empty() {
            return AgentError::WorkloadApi(format!(
                "{} does not serve the Workload API (is it an oxid-server admin socket?)",
                self.shown
            ));
        }
        AgentError::WorkloadApi(format!("{} ({:?})", s.message(), s.code()))
    }
}

/// Whether connecting failed for want of permission (as opposed to no
/// agent there).
fn denied(e: &tonic::transport::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if s.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::PermissionDenied)
        {
            return true;
        }
        source = s.source();
    }
    false
}

async fn channel(args: &ApiArgs) -> Result<Api, AgentError> {
    let path = socket_path(args)?;
    let shown = path.display().to_string();
    // What a workload sends or receives here (keys, SVIDs) must not go
    // through a link or directory another user could redirect.
    if let Err(e) = oxid_tls::socket::check_socket_to_connect(&path) {
        if std::fs::metadata(&path).is_ok() {
            return Err(AgentError::WorkloadApi(e.to_string()));
        }
    }
    let channel = Endpoint::try_from("http://workload-api.invalid")
        .map_err(|e| AgentError::Internal(e.to_string()))?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
        .map_err(|e| {
            if denied(&e) {
                return AgentError::WorkloadApi(format!(
                    "cannot connect to {shown}: permission denied (the socket or its directory \
                     is not open to this user)"
                ));
            }
            AgentError::WorkloadApi(format!(
                "cannot connect to {shown}: is the agent running? (set --socket-path \
                 or SPIFFE_ENDPOINT_SOCKET)"
            ))
        })?;
    Ok(Api { channel, shown })
}

/// `healthcheck`: the agent must be ready (its Workload API's health is
/// SERVING, as `/ready` is 200), or with `shallow` only alive (answering).
pub(crate) async fn healthcheck(args: ApiArgs, shallow: bool) -> Result<(), AgentError> {
    use tonic_health::pb::health_check_response::ServingStatus;
    let api = channel(&args).await?;
    let mut health = tonic_health::pb::health_client::HealthClient::new(api.channel.clone());
    let s = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "SpiffeWorkloadAPI".into(),
        })
        .await
        .map_err(|s| api.status(s))?
        .into_inner()
        .status;
    if s != ServingStatus::Serving as i32 && !shallow {
        return Err(AgentError::WorkloadApi(
            "the agent is not ready: not synced with the server, disconnected from it, or \
             refused by it (see the agent's log; --shallow checks only that it is alive)"
                .into(),
        ));
    }
    if args.output == "json" {
        say(&json!({"serving": true}).to_string());
    } else {
        say("agent is healthy");
    }
    Ok(())
}

/// The leaf's expiry (RFC 3339, UTC) and serial (hex).
fn describe(svid: &pb::X509svid) -> (String, String) {
    let chain = oxid_pki::x509::split_der_certs(&svid.x509_svid).unwrap_or_default();
    let (expiry, serial) = chain
        .first()
        .and_then(|leaf| x509_parser::parse_x509_certificate(leaf).ok())
        .map(|(_, c)| {
            (
                rfc3339(&c.validity().not_after),
                oxid_pki::hex(c.raw_serial()),
            )
        })
        .unwrap_or_default();
    (expiry, serial)
}

/// `2026-12-02T21:04:05Z`: RFC 3339 in UTC, to the second (X.509 times
/// have no finer precision).
fn rfc3339(t: &x509_parser::time::ASN1Time) -> String {
    // X.509 times are UTC (RFC 5280 4.1.2.5), and so is this one.
    let t = t.to_datetime();
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
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

/// Refuses a `--write` directory that is missing or not a directory, before
/// anything is fetched.
fn check_write_dir(dir: &Path) -> Result<(), AgentError> {
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(AgentError::Output(format!(
            "--write {}: not a directory",
            dir.display()
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(AgentError::Output(format!(
            "--write {}: no such directory; create it first",
            dir.display()
        ))),
        Err(e) => Err(AgentError::Output(format!(
            "--write {}: {e}",
            dir.display()
        ))),
    }
}

/// Writes one file of `--write` output, 0600.
fn write_output(path: &Path, bytes: &[u8]) -> Result<(), AgentError> {
    crate::state::write_private(path, bytes).map_err(|e| match e {
        // Its message names the file; "data directory" would be wrong here.
        AgentError::State(m) => AgentError::Output(format!("--write: {m}")),
        other => other,
    })
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
            if let Some(dir) = &write {
                check_write_dir(dir)?;
            }
            let ch = channel(&api).await?;
            let mut c = SpiffeWorkloadApiClient::new(ch.channel.clone());
            let mut stream = c
                .fetch_x509svid(with_header(pb::X509svidRequest {}))
                .await
                .map_err(|s| ch.status(s))?
                .into_inner();
            let resp = stream
                .message()
                .await
                .map_err(|s| ch.status(s))?
                .ok_or_else(|| AgentError::WorkloadApi("the stream ended".into()))?;
            if let Some(dir) = write {
                let first = resp
                    .svids
                    .first()
                    .ok_or_else(|| AgentError::WorkloadApi("no SVID".into()))?;
                write_output(&dir.join("svid.pem"), to_pem(&first.x509_svid)?.as_bytes())?;
                let key = oxid_pki::x509::pem_encode("PRIVATE KEY", &first.x509_svid_key);
                write_output(&dir.join("svid.key"), key.as_bytes())?;
                write_output(&dir.join("bundle.pem"), to_pem(&first.bundle)?.as_bytes())?;
                // SPIRE's names (`spire-agent api fetch x509 -write`), in
                // trust-domain order so a name means the same bundle each run.
                let mut federated: Vec<_> = resp.federated_bundles.iter().collect();
                federated.sort();
                for (n, (_, bundle)) in federated.into_iter().enumerate() {
                    let name = format!("federated_bundle.{n}.pem");
                    write_output(&dir.join(name), to_pem(bundle)?.as_bytes())?;
                }
            }
            print_x509(&api.output, &resp);
            Ok(())
        }
        ApiCommand::Fetch(FetchCommand::Jwt {
            audiences,
            spiffe_id,
            api,
        }) => {
            let ch = channel(&api).await?;
            let mut c = SpiffeWorkloadApiClient::new(ch.channel.clone());
            let resp = c
                .fetch_jwtsvid(with_header(pb::JwtsvidRequest {
                    audience: audiences,
                    spiffe_id: spiffe_id.unwrap_or_default(),
                }))
                .await
                .map_err(|s| ch.status(s))?
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
            let ch = channel(&api).await?;
            let mut c = SpiffeWorkloadApiClient::new(ch.channel.clone());
            let resp = c
                .validate_jwtsvid(with_header(pb::ValidateJwtsvidRequest { audience, svid }))
                .await
                .map_err(|s| ch.status(s))?
                .into_inner();
            if api.output == "json" {
                say(&json!({"spiffe_id": resp.spiffe_id}).to_string());
            } else {
                say(&format!("valid JWT-SVID for {}", resp.spiffe_id));
            }
            Ok(())
        }
        ApiCommand::Watch(args) if args.write.is_some() => watch_files(*args).await,
        ApiCommand::Watch(args) => {
            let WatchArgs { api, .. } = *args;
            let ch = channel(&api).await?;
            let mut c = SpiffeWorkloadApiClient::new(ch.channel.clone());
            let mut stream = c
                .fetch_x509svid(with_header(pb::X509svidRequest {}))
                .await
                .map_err(|s| ch.status(s))?
                .into_inner();
            while let Some(resp) = stream.message().await.map_err(|s| ch.status(s))? {
                print_x509(&api.output, &resp);
            }
            Ok(())
        }
    }
}

impl files::Source for ApiArgs {
    async fn open(&self) -> Result<tonic::Streaming<pb::X509svidResponse>, AgentError> {
        let ch = channel(self).await?;
        let mut c = SpiffeWorkloadApiClient::new(ch.channel.clone());
        c.fetch_x509svid(with_header(pb::X509svidRequest {}))
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| ch.status(s))
    }

    async fn jwt_svid(&self, spiffe_id: &str, audience: &str) -> Result<String, AgentError> {
        let ch = channel(self).await?;
        let mut c = SpiffeWorkloadApiClient::new(ch.channel.clone());
        let resp = c
            .fetch_jwtsvid(with_header(pb::JwtsvidRequest {
                audience: vec![audience.to_owned()],
                spiffe_id: spiffe_id.to_owned(),
            }))
            .await
            .map_err(|s| ch.status(s))?
            .into_inner();
        resp.svids
            .into_iter()
            .next()
            .map(|s| s.svid)
            .ok_or_else(|| AgentError::WorkloadApi(format!("no JWT-SVID for {audience:?}")))
    }

    async fn jwt_bundle(&self, trust_domain: &str) -> Result<String, AgentError> {
        let ch = channel(self).await?;
        let mut c = SpiffeWorkloadApiClient::new(ch.channel.clone());
        let mut stream = c
            .fetch_jwt_bundles(with_header(pb::JwtBundlesRequest {}))
            .await
            .map_err(|s| ch.status(s))?
            .into_inner();
        let bundles = stream
            .message()
            .await
            .map_err(|s| ch.status(s))?
            .ok_or_else(|| AgentError::WorkloadApi("the JWT bundle stream ended".into()))?
            .bundles;
        let jwks = bundles
            .get(trust_domain)
            .or_else(|| bundles.get(&format!("spiffe://{trust_domain}")))
            .ok_or_else(|| AgentError::WorkloadApi(format!("no JWT bundle for {trust_domain}")))?;
        String::from_utf8(jwks.clone())
            .map_err(|_| AgentError::WorkloadApi("the JWT bundle is not UTF-8".into()))
    }
}

/// `api watch --write DIR`: runs until stopped, or until its child exits.
async fn watch_files(args: WatchArgs) -> Result<(), AgentError> {
    // Started by the agent for a `[[files]]` table: it ends with the agent.
    files::supervise::exit_with_parent()?;
    let dir = args
        .write
        .ok_or_else(|| AgentError::Internal("watch_files without --write".into()))?;
    let group = args.group.as_deref().map(group_id).transpose()?;
    let writer = Writer::open(Layout {
        dir,
        cert_mode: args.cert_mode,
        key_mode: args.key_mode,
        names: Names {
            svid: args.svid_file_name,
            key: args.key_file_name,
            bundle: args.bundle_file_name,
        },
        group,
    })
    .map_err(|e| AgentError::Output(e.to_string()))?;
    let signal = args
        .signal
        .as_deref()
        .map(files::parse_signal)
        .transpose()
        .map_err(|e| AgentError::Config(format!("--signal: {e}")))?;
    let notify = match (signal, args.pid_file, args.reload_command) {
        _ if !args.command.is_empty() => Notify::Child {
            argv: args.command,
            signal,
        },
        (Some(signal), Some(pid_file), _) => Notify::PidFile { signal, pid_file },
        (_, _, Some(command)) => Notify::Command(command),
        (Some(_), None, None) => {
            return Err(AgentError::Config(
                "--signal needs --pid-file, or a command after `--` to signal".into(),
            ));
        }
        _ => Notify::None,
    };
    let choice = files::Choice {
        spiffe_id: args.spiffe_id,
        jwt_audiences: args.jwt_audiences,
        federated_bundles: !args.no_federated_bundles,
    };
    let code = files::watch(args.api, writer, choice, notify, say).await?;
    if code != 0 {
        std::process::exit(code);
    }
    Ok(())
}

/// `--group`: a gid, or a group name from /etc/group.
fn group_id(group: &str) -> Result<u32, AgentError> {
    let text = match group.parse::<u32>() {
        Ok(_) => String::new(),
        Err(_) => std::fs::read_to_string("/etc/group").map_err(|e| {
            AgentError::Config(format!("--group {group}: cannot read /etc/group: {e}"))
        })?,
    };
    files::config::group_id(&text, group).map_err(|e| AgentError::Config(format!("--group: {e}")))
}
