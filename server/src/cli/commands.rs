//! What each command does.

// A command line reports failures on stderr; results go through `out!`.
#![allow(clippy::print_stderr)]

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser as _;
use oxid_pki::x509::{Csr, certs_to_pem};
use oxid_pki::{KeyAlgorithm, KeyPair};
use oxid_proto::admin as pb;
use rustls_pki_types::CertificateDer;
use serde_json::json;

use super::output::{agent_json, agent_pretty, out, outln, print_list, println};
use super::time::rfc3339;
use super::{
    AgentCommand, BundleCommand, BundleFormat, CaCommand, Cli, Command, Common, JwtCommand, Output,
    RunArgs, TokenCommand, X509Command, client,
};
use crate::clock::SystemClock;
use crate::config::{Config, Overrides};

/// A command failure: one line for the user.
pub(crate) type CliResult = Result<(), String>;

/// Entry point of the `oxid-server` binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::Validate { config } => validate(config.as_deref()),
        other => match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt.block_on(operator(other)),
            Err(e) => Err(format!("cannot start the runtime: {e}")),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: RunArgs) -> CliResult {
    let config = Config::load(
        args.config.as_deref(),
        Overrides {
            trust_domain: args.trust_domain,
            data_dir: args.data_dir,
            bind_address: args.bind_address,
            socket_path: args.socket_path,
            log_format: args.log_format,
            metrics_address: args.metrics_address,
            datastore_url: args.datastore_url,
            server_name: args.server_name,
        },
    )
    .map_err(|e| e.to_string())?;
    init_logging(&config.log_level, &config.log_format)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    rt.block_on(async {
        let stop = shutdown_signal();
        crate::run::run(config, Arc::new(SystemClock), stop)
            .await
            .map_err(|e| e.to_string())
    })
}

/// Completes on SIGINT or SIGTERM (handlers installed by this call).
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    let signal = oxid_telemetry::shutdown_signal();
    async move {
        match signal {
            Ok(signal) => signal.await,
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM/SIGINT");
                return std::future::pending().await;
            }
        }
        tracing::info!("shutting down");
    }
}

fn init_logging(level: &str, format: &str) -> CliResult {
    oxid_telemetry::logging::init(level, format.parse().map_err(|e| format!("{e}"))?)
        .map_err(|e| e.to_string())
}

fn validate(config: Option<&Path>) -> CliResult {
    let c = Config::load(config, Overrides::default()).map_err(|e| e.to_string())?;
    // PgConfig displays as the URL without a password (one is refused).
    let datastore = c.postgres.as_ref().map_or_else(
        || format!("sled in {}", c.data_dir.join("datastore").display()),
        ToString::to_string,
    );
    outln!(
        "configuration is valid: trust domain {}, data in {}, admin socket {}, datastore {datastore}",
        c.trust_domain,
        c.data_dir.display(),
        c.socket_path.display()
    );
    Ok(())
}

pub(crate) fn status_line(s: tonic::Status) -> String {
    let code = format!("{:?}", s.code());
    format!("{} ({code})", s.message())
}

async fn operator(command: Command) -> CliResult {
    match command {
        Command::Healthcheck(common) => {
            let mut c = client::connect(&common.socket_path).await?;
            let h = c
                .health(pb::HealthRequest {})
                .await
                .map_err(status_line)?
                .into_inner();
            if !h.ready {
                return Err(format!("server is up but not ready: {}", h.reason));
            }
            match common.output {
                Output::Json => println(&json!({"ready": true, "revision": h.revision})),
                Output::Pretty => outln!("server is healthy"),
            }
            Ok(())
        }
        Command::Entry(cmd) => super::entry::entry(cmd).await,
        Command::Agent(cmd) => agent(cmd).await,
        Command::Token(TokenCommand::Generate {
            ttl,
            spiffe_id,
            common,
        }) => {
            let mut c = client::connect(&common.socket_path).await?;
            let t = c
                .create_join_token(pb::CreateJoinTokenRequest {
                    ttl: ttl.map_or(0, |d| d.0.as_secs()),
                    spiffe_id: spiffe_id.unwrap_or_default(),
                })
                .await
                .map_err(status_line)?
                .into_inner();
            match common.output {
                Output::Json => println(&json!({
                    "token": t.token,
                    "id": t.id,
                    "agent_id": t.agent_id,
                    "expires_at": rfc3339(t.expires_at),
                })),
                // The token alone on stdout, so `token generate > token` keeps
                // working; what the operator needs next goes to the terminal.
                Output::Pretty => {
                    outln!("{}", t.token);
                    eprintln!(
                        "Token ID         : {}\nAgent SPIFFE ID  : {}\nExpires at       : {}",
                        t.id,
                        t.agent_id,
                        rfc3339(t.expires_at)
                    );
                }
            }
            Ok(())
        }
        Command::Bundle(cmd) => bundle(cmd).await,
        Command::X509(X509Command::Mint {
            spiffe_id,
            ttl,
            dns_names,
            write,
            common,
        }) => x509_mint(spiffe_id, ttl, dns_names, write, common).await,
        Command::Jwt(JwtCommand::Mint {
            spiffe_id,
            audiences,
            ttl,
            common,
        }) => {
            let mut c = client::connect(&common.socket_path).await?;
            let r = c
                .mint_jwt_svid(pb::MintJwtSvidRequest {
                    spiffe_id,
                    audience: audiences,
                    ttl: ttl.map_or(0, |d| d.0.as_secs()),
                })
                .await
                .map_err(status_line)?
                .into_inner();
            match common.output {
                Output::Json => println(&json!({
                    "token": r.token,
                    "expires_at": rfc3339(r.expires_at),
                })),
                Output::Pretty => outln!("{}", r.token),
            }
            Ok(())
        }
        Command::Ca(cmd) => ca(cmd).await,
        Command::Datastore(cmd) => super::datastore::datastore(cmd).await,
        Command::Server(cmd) => super::servers::servers(cmd).await,
        Command::Run(_) | Command::Validate { .. } => Ok(()),
    }
}

/// Reads a file, or stdin for `-`.
pub(crate) fn read_input(path: &Path) -> Result<String, String> {
    if path == Path::new("-") {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .map_err(|e| format!("cannot read stdin: {e}"))?;
        Ok(s)
    } else {
        std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
    }
}

async fn agent(cmd: AgentCommand) -> CliResult {
    let one = |spiffe_id: String| pb::AgentRequest { spiffe_id };
    match cmd {
        AgentCommand::List(common) => {
            let mut c = client::connect(&common.socket_path).await?;
            let agents = c
                .list_agents(pb::ListAgentsRequest {})
                .await
                .map_err(status_line)?
                .into_inner()
                .agents;
            print_list(
                common.output,
                ("agents", "agent"),
                &agents,
                agent_json,
                agent_pretty,
            );
            Ok(())
        }
        AgentCommand::Count(common) => {
            let mut c = client::connect(&common.socket_path).await?;
            let n = c
                .list_agents(pb::ListAgentsRequest {})
                .await
                .map_err(status_line)?
                .into_inner()
                .agents
                .len();
            match common.output {
                Output::Json => println(&json!({"count": n})),
                Output::Pretty => outln!("{n} attested agents"),
            }
            Ok(())
        }
        AgentCommand::Show { spiffe_id, common } => {
            let mut c = client::connect(&common.socket_path).await?;
            let a = c
                .get_agent(one(spiffe_id))
                .await
                .map_err(status_line)?
                .into_inner();
            print_one_agent(common.output, &a, "");
            Ok(())
        }
        AgentCommand::Ban { spiffe_id, common } => {
            let mut c = client::connect(&common.socket_path).await?;
            let a = c
                .ban_agent(one(spiffe_id))
                .await
                .map_err(status_line)?
                .into_inner();
            let title = format!(
                "Banned agent {}: every call it makes is refused, and it may not attest again \
                 until evicted\n",
                a.spiffe_id
            );
            print_one_agent(common.output, &a, &title);
            Ok(())
        }
        AgentCommand::Evict { spiffe_id, common } => {
            let mut c = client::connect(&common.socket_path).await?;
            let a = c
                .evict_agent(one(spiffe_id))
                .await
                .map_err(status_line)?
                .into_inner();
            let title = format!(
                "Evicted agent {}: its record is deleted; it must attest again (a join-token \
                 agent needs a new token)\n",
                a.spiffe_id
            );
            print_one_agent(common.output, &a, &title);
            Ok(())
        }
    }
}

fn print_one_agent(output: Output, a: &pb::Agent, title: &str) {
    match output {
        Output::Json => println(&agent_json(a)),
        Output::Pretty => out!("{title}{}", agent_pretty(a)),
    }
}

/// With `--format`, the file must be in that format: a PEM file given as
/// SPIFFE JSON (or the reverse) is a mistake worth one clear line, not a
/// parse error from the server.
fn check_bundle_format(text: &str, format: Option<BundleFormat>) -> CliResult {
    let text = text.trim_start();
    match format {
        Some(BundleFormat::Spiffe) if !text.starts_with('{') => Err(
            "--format spiffe: the file is not SPIFFE bundle JSON (a JSON object with \"keys\"); \
             for PEM certificates give --format pem"
                .into(),
        ),
        Some(BundleFormat::Pem) if !text.starts_with("-----BEGIN") => Err(
            "--format pem: the file is not PEM (-----BEGIN CERTIFICATE-----); for SPIFFE \
             bundle JSON give --format spiffe"
                .into(),
        ),
        _ => Ok(()),
    }
}

async fn bundle(cmd: BundleCommand) -> CliResult {
    match cmd {
        BundleCommand::Show { format, common } => {
            let mut c = client::connect(&common.socket_path).await?;
            let b = c
                .get_bundle(pb::GetBundleRequest {})
                .await
                .map_err(status_line)?
                .into_inner();
            match (common.output, format) {
                (Output::Json, _) => {
                    let bundle: serde_json::Value = serde_json::from_str(&b.spiffe_json)
                        .map_err(|e| format!("the server sent a bundle that is not JSON: {e}"))?;
                    println(&json!({"spiffe_bundle": bundle, "x509_authorities_pem": b.pem}));
                }
                (Output::Pretty, BundleFormat::Pem) => out!("{}", b.pem),
                (Output::Pretty, BundleFormat::Spiffe) => outln!("{}", b.spiffe_json),
            }
            Ok(())
        }
        BundleCommand::Set {
            id,
            format,
            path,
            common,
        } => {
            let bundle = read_input(&path)?;
            check_bundle_format(&bundle, format)?;
            // SPIRE's `bundle set -id` takes the trust domain's SPIFFE ID.
            let trust_domain = id.strip_prefix("spiffe://").unwrap_or(&id).to_owned();
            let mut c = client::connect(&common.socket_path).await?;
            let b = c
                .set_federated_bundle(pb::SetFederatedBundleRequest {
                    trust_domain,
                    bundle,
                })
                .await
                .map_err(status_line)?
                .into_inner();
            match common.output {
                Output::Json => println(&json!({"trust_domain": b.trust_domain})),
                Output::Pretty => outln!("Set the federated bundle of {}", b.trust_domain),
            }
            Ok(())
        }
        BundleCommand::List(common) => {
            let mut c = client::connect(&common.socket_path).await?;
            let list = c
                .list_federated_bundles(pb::ListFederatedBundlesRequest {})
                .await
                .map_err(status_line)?
                .into_inner()
                .bundles;
            match common.output {
                Output::Json => println(&json!({"bundles": list.iter().map(|b| json!({
                    "trust_domain": b.trust_domain,
                    "bundle": serde_json::from_str::<serde_json::Value>(&b.spiffe_json).unwrap_or_default(),
                })).collect::<Vec<_>>()})),
                Output::Pretty => {
                    outln!("Found {} federated bundles", list.len());
                    for b in &list {
                        outln!("{}", b.trust_domain);
                    }
                }
            }
            Ok(())
        }
        BundleCommand::Delete { id, common } => {
            let mut c = client::connect(&common.socket_path).await?;
            c.delete_federated_bundle(pb::DeleteFederatedBundleRequest {
                trust_domain: id.clone(),
            })
            .await
            .map_err(status_line)?;
            match common.output {
                Output::Json => println(&json!({"deleted": id})),
                Output::Pretty => outln!("Deleted the federated bundle of {id}"),
            }
            Ok(())
        }
    }
}

async fn x509_mint(
    spiffe_id: String,
    ttl: Option<crate::config::HumanDuration>,
    dns_names: Vec<String>,
    write: Option<PathBuf>,
    common: Common,
) -> CliResult {
    let key = KeyPair::generate(KeyAlgorithm::EcdsaP256).map_err(|e| e.to_string())?;
    let csr = Csr::create(&key).map_err(|e| e.to_string())?;
    let mut c = client::connect(&common.socket_path).await?;
    let r = c
        .mint_x509_svid(pb::MintX509SvidRequest {
            spiffe_id,
            csr,
            ttl: ttl.map_or(0, |d| d.0.as_secs()),
            dns_names,
        })
        .await
        .map_err(status_line)?
        .into_inner();
    let to_certs = |v: &[Vec<u8>]| -> Vec<CertificateDer<'static>> {
        v.iter().map(|c| CertificateDer::from(c.clone())).collect()
    };
    let svid_pem = certs_to_pem(&to_certs(&r.cert_chain));
    let bundle_pem = certs_to_pem(&to_certs(&r.bundle));
    match write {
        Some(dir) => {
            let w = |name: &str, text: &str| {
                std::fs::write(dir.join(name), text)
                    .map_err(|e| format!("cannot write {}: {e}", dir.join(name).display()))
            };
            w("svid.pem", &svid_pem)?;
            w("bundle.pem", &bundle_pem)?;
            key.store(&dir.join("key.pem")).map_err(|e| e.to_string())?;
            match common.output {
                Output::Json => println(&json!({
                    "written": dir,
                    "expires_at": rfc3339(r.expires_at),
                })),
                Output::Pretty => outln!(
                    "wrote svid.pem, key.pem (0600) and bundle.pem to {}",
                    dir.display()
                ),
            }
        }
        None => match common.output {
            Output::Json => println(&json!({
                "svid": svid_pem,
                "key": key.to_pkcs8_pem().as_str(),
                "bundle": bundle_pem,
                "expires_at": rfc3339(r.expires_at),
            })),
            Output::Pretty => out!("{svid_pem}{}{bundle_pem}", key.to_pkcs8_pem().as_str()),
        },
    }
    Ok(())
}

/// What `ca rotate --taint` does, in full, until taint and revocation are
/// built: said in the output so nobody believes more happened.
const TAINT_NOTE: &str = "the taint is recorded (ca show lists it) and nothing else happens: \
    the authority stays in the trust bundle, agents and workloads keep trusting it, and the \
    SVIDs it signed stay valid until they expire. Nothing is revoked or re-signed";

async fn ca(cmd: CaCommand) -> CliResult {
    let (status, common, done) = match cmd {
        CaCommand::Show(common) => {
            let mut c = client::connect(&common.socket_path).await?;
            let s = c
                .get_ca_status(pb::GetCaStatusRequest {})
                .await
                .map_err(status_line)?;
            (s.into_inner(), common, None)
        }
        CaCommand::Rotate {
            prepare,
            activate,
            taint,
            common,
        } => {
            let (step, sequence) = match (prepare, activate, taint) {
                (true, _, _) => ("prepare", 0),
                (_, true, _) => ("activate", 0),
                (_, _, Some(seq)) => ("taint", seq),
                _ => return Err("choose one of --prepare, --activate, --taint <SEQUENCE>".into()),
            };
            let mut c = client::connect(&common.socket_path).await?;
            let s = c
                .rotate_ca(pb::RotateCaRequest {
                    step: step.into(),
                    sequence,
                })
                .await
                .map_err(status_line)?
                .into_inner();
            let done = rotation_done(step, sequence, &s);
            (s, common, Some(done))
        }
    };
    match common.output {
        Output::Json => {
            let mut doc = json!({"authorities": status.authorities.iter().map(|a| json!({
                "sequence": a.sequence, "state": a.state, "tainted": a.tainted,
                "not_before": rfc3339(a.not_before), "not_after": rfc3339(a.not_after),
                "jwt_key_id": a.jwt_key_id, "can_sign": a.can_sign,
            })).collect::<Vec<_>>()});
            if let (Some((step, sequence, message)), Some(map)) = (&done, doc.as_object_mut()) {
                map.insert("step".into(), json!(step));
                map.insert("sequence".into(), json!(sequence));
                map.insert("result".into(), json!(message));
            }
            println(&doc);
        }
        Output::Pretty => {
            if let Some((_, _, message)) = &done {
                outln!("{message}");
            }
            for a in &status.authorities {
                outln!(
                    "authority {}: {}{} not_before={} not_after={} jwt_kid={}{}",
                    a.sequence,
                    a.state,
                    if a.tainted { " (tainted)" } else { "" },
                    rfc3339(a.not_before),
                    rfc3339(a.not_after),
                    a.jwt_key_id,
                    if a.can_sign { "" } else { " (keys lost)" }
                );
            }
        }
    }
    Ok(())
}

/// The step applied, the authority it concerned, and one sentence saying
/// what that did.
fn rotation_done(
    step: &'static str,
    sequence: u64,
    s: &pb::GetCaStatusResponse,
) -> (&'static str, u64, String) {
    let newest = |state: &str| {
        s.authorities
            .iter()
            .filter(|a| a.state == state)
            .map(|a| a.sequence)
            .max()
            .unwrap_or(0)
    };
    match step {
        "prepare" => {
            let seq = newest("prepared");
            let m = format!(
                "Prepared authority {seq}: it is in the bundle now and signs once activated \
                 (ca rotate --activate, or on schedule)"
            );
            (step, seq, m)
        }
        "activate" => {
            let seq = newest("active");
            let m = format!(
                "Activated authority {seq}: it signs every new SVID; the previous one stays \
                 in the bundle until it expires"
            );
            (step, seq, m)
        }
        _ => (
            step,
            sequence,
            format!("Tainted authority {sequence}: {TAINT_NOTE}"),
        ),
    }
}
