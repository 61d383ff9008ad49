//! Agent scenarios with the real `spiffe` crate and real processes: rotation
//! and entry changes on an open stream, different executables and uids,
//! server outages, CA rotation across an agent restart, the `api` CLI.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::{Harness, NetMode, Proxy, WAIT, admin, eventually, my_uid};
use oxid_proto::admin as admin_pb;
use tokio_stream::StreamExt as _;

const AGENT_BIN: &str = env!("CARGO_BIN_EXE_oxid-agent");

/// SVIDs of 6 s: a rotation within seconds.
const SHORT_TTLS: &str = "[ca]\nttl = \"1m\"\nx509_svid_ttl = \"6s\"\nagent_svid_ttl = \"10s\"\njwt_svid_ttl = \"10s\"\n";

fn leaf_serial(svid: &spiffe::X509Svid) -> Vec<u8> {
    let (_, cert) = x509_parser::parse_x509_certificate(svid.leaf().as_bytes()).unwrap();
    cert.raw_serial().to_vec()
}

async fn next_update(
    stream: &mut (
             impl tokio_stream::Stream<Item = Result<spiffe::X509Svid, spiffe::WorkloadApiError>> + Unpin
         ),
) -> spiffe::X509Svid {
    tokio::time::timeout(WAIT, stream.next())
        .await
        .expect("no update in time")
        .unwrap()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_open_stream_sees_rotation_new_and_deleted_entries() {
    let h = Harness::start_with(SHORT_TTLS).await;
    let uid = format!("unix:uid:{}", my_uid());
    h.create_entry("spiffe://example.org/web", &[&uid]).await;
    let client = h.client().await;
    eventually(|| client.fetch_x509_svid()).await;
    let mut stream = client.stream_x509_svids().await.unwrap();
    let first = next_update(&mut stream).await;
    let first_serial = leaf_serial(&first);

    // Rotation at about half of 6 s, on the same stream.
    let rotated = loop {
        let next = next_update(&mut stream).await;
        if leaf_serial(&next) != first_serial {
            break next;
        }
    };
    assert_eq!(rotated.spiffe_id().to_string(), "spiffe://example.org/web");

    // A new entry created by the operator shows up without reconnecting;
    // the spiffe crate's stream yields the default (first) SVID, so look at
    // the full context for the second one.
    let mut contexts = client.stream_x509_contexts().await.unwrap();
    h.create_entry("spiffe://example.org/api", &[&uid]).await;
    let ctx = loop {
        let ctx = tokio::time::timeout(WAIT, contexts.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if ctx.svids().len() == 2 {
            break ctx;
        }
    };
    let ids: Vec<String> = ctx
        .svids()
        .iter()
        .map(|s| s.spiffe_id().to_string())
        .collect();
    assert_eq!(
        ids,
        ["spiffe://example.org/web", "spiffe://example.org/api"]
    );

    // Deleting it takes it off the stream.
    let list = admin(&h.admin_socket())
        .await
        .list_entries(admin_pb::ListEntriesRequest {
            spiffe_id: "spiffe://example.org/api".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    admin(&h.admin_socket())
        .await
        .delete_entries(admin_pb::DeleteEntriesRequest {
            ids: vec![list.entries[0].id.clone()],
        })
        .await
        .unwrap();
    loop {
        let ctx = tokio::time::timeout(WAIT, contexts.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if ctx.svids().len() == 1 {
            assert_eq!(
                ctx.svids()[0].spiffe_id().to_string(),
                "spiffe://example.org/web"
            );
            break;
        }
    }
}

fn agent_cli(h: &Harness, args: &[&str]) -> std::process::Output {
    Command::new(AGENT_BIN)
        .args(args)
        .arg("--socket-path")
        .arg(h.workload_socket())
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn executables_and_uids_get_their_own_identities() {
    let h = Harness::start().await;
    let me = std::env::current_exe().unwrap();
    h.create_entry(
        "spiffe://example.org/tests",
        &[
            &format!("unix:path:{}", me.display()),
            &format!("unix:uid:{}", my_uid()),
        ],
    )
    .await;
    // By executable alone, so it also matches under uid 65534 below.
    let agent_sha = agent_sha256();
    h.create_exe_only_entry(
        "spiffe://example.org/cli",
        &[&format!("unix:sha256:{agent_sha}")],
    )
    .await;
    h.create_entry("spiffe://example.org/nobody", &["unix:uid:65534"])
        .await;

    let client = h.client().await;
    let mine = eventually(|| client.fetch_x509_svid()).await;
    assert_eq!(mine.spiffe_id().to_string(), "spiffe://example.org/tests");

    // Another executable (the agent binary, as a workload): another identity.
    let out = eventually(|| async {
        let out = agent_cli(&h, &["api", "fetch", "x509", "--output", "json"]);
        if out.status.success() {
            Ok(out)
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    })
    .await;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["svids"][0]["spiffe_id"], "spiffe://example.org/cli");

    // The same executable under uid 65534: it also matches the uid entry.
    assert_eq!(
        my_uid(),
        0,
        "this test switches uid and must run as root (CI does)"
    );
    // (Retried: the agent may still be signing the newest entry's SVID.)
    let ids = eventually(|| async {
        let out = Command::new("setpriv")
            .args([
                "--reuid",
                "65534",
                "--regid",
                "65534",
                "--clear-groups",
                AGENT_BIN,
            ])
            .args(["api", "fetch", "x509", "--output", "json", "--socket-path"])
            .arg(h.workload_socket())
            .output()
            .expect("setpriv (util-linux) is required");
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let ids: Vec<String> = v["svids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["spiffe_id"].as_str().unwrap().to_owned())
            .collect();
        if ids.len() == 2 {
            Ok(ids)
        } else {
            Err(format!("{ids:?}"))
        }
    })
    .await;
    assert_eq!(
        ids,
        ["spiffe://example.org/cli", "spiffe://example.org/nobody"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_api_cli_works_against_the_agent() {
    let h = Harness::start().await;
    let sha = agent_sha256();
    let uid = format!("unix:uid:{}", my_uid());
    h.create_entry(
        "spiffe://example.org/cli",
        &[&format!("unix:sha256:{sha}"), &uid],
    )
    .await;
    eventually(|| async {
        let out = agent_cli(&h, &["healthcheck"]);
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    eventually(|| async {
        let out = agent_cli(
            &h,
            &[
                "api",
                "fetch",
                "x509",
                "--write",
                dir.path().to_str().unwrap(),
            ],
        );
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    })
    .await;
    let mode = {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::metadata(dir.path().join("svid.key"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode, 0o600);
    let verify = Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(dir.path().join("bundle.pem"))
        .arg(dir.path().join("svid.pem"))
        .output()
        .expect("openssl is required (apt-get install -y openssl)");
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );

    let out = agent_cli(&h, &["api", "fetch", "jwt", "--audience", "db"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let out = agent_cli(
        &h,
        &[
            "api",
            "validate",
            "jwt",
            "--audience",
            "db",
            "--svid",
            &token,
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("spiffe://example.org/cli"));
    let out = agent_cli(
        &h,
        &[
            "api",
            "validate",
            "jwt",
            "--audience",
            "other",
            "--svid",
            &token,
        ],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    // Bad input to the CLI itself.
    let out = agent_cli(&h, &["api", "fetch", "jwt", "--audience", ""]);
    assert!(!out.status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn workloads_keep_their_svids_while_the_server_is_down() {
    let mut h = Harness::start().await;
    let uid = format!("unix:uid:{}", my_uid());
    h.create_entry("spiffe://example.org/web", &[&uid]).await;
    let client = h.client().await;
    eventually(|| client.fetch_x509_svid()).await;
    let mut contexts = client.stream_x509_contexts().await.unwrap();
    let _ = tokio::time::timeout(WAIT, contexts.next()).await.unwrap();

    h.stop_server().await;
    // The agent still answers from what it has.
    let svid = client.fetch_x509_svid().await.unwrap();
    assert_eq!(svid.spiffe_id().to_string(), "spiffe://example.org/web");

    h.restart_server().await;
    // The agent reconnects on its own; an entry created now reaches the
    // stream that stayed open through the outage.
    h.create_entry("spiffe://example.org/after", &[&uid]).await;
    loop {
        let ctx = tokio::time::timeout(WAIT * 2, contexts.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if ctx
            .svids()
            .iter()
            .any(|s| s.spiffe_id().to_string() == "spiffe://example.org/after")
        {
            break;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_restart_after_ca_rotation_needs_no_token() {
    let mut h = Harness::start().await;
    let uid = format!("unix:uid:{}", my_uid());
    h.create_entry("spiffe://example.org/web", &[&uid]).await;
    {
        let client = h.client().await;
        eventually(|| client.fetch_x509_svid()).await;
    }
    h.stop_agent().await;
    let mut a = admin(&h.admin_socket()).await;
    for step in ["prepare", "activate"] {
        a.rotate_ca(admin_pb::RotateCaRequest {
            step: step.into(),
            sequence: 0,
        })
        .await
        .unwrap();
    }
    h.start_agent(None);
    let client = h.client().await;
    let svid = eventually(|| client.fetch_x509_svid()).await;
    assert_eq!(svid.spiffe_id().to_string(), "spiffe://example.org/web");
    // New SVIDs come from the new authority, and the bundle holds both.
    let bundles = eventually(|| async {
        let b = client
            .fetch_x509_bundles()
            .await
            .map_err(|e| format!("{e:?}"))?;
        let td = spiffe::TrustDomain::new("example.org").unwrap();
        let n = b.get(&td).map_or(0, |b| b.authorities().len());
        if n == 2 {
            Ok(n)
        } else {
            Err(format!("{n} authorities"))
        }
    })
    .await;
    assert_eq!(bundles, 2);
    let _ = Duration::ZERO;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn svids_beyond_the_presign_limit_are_signed_on_first_request() {
    let mut h = Harness::start().await;
    h.stop_agent().await;
    h.presign = Some(0);
    h.start_agent(None);
    let uid = format!("unix:uid:{}", my_uid());
    h.create_entry("spiffe://example.org/lazy-a", &[&uid]).await;
    h.create_entry("spiffe://example.org/lazy-b", &[&uid]).await;
    let client = h.client().await;
    // Nothing is signed ahead; the first request gets both SVIDs signed.
    let all = eventually(|| async {
        let all = client
            .fetch_all_x509_svids()
            .await
            .map_err(|e| format!("{e:?}"))?;
        if all.len() == 2 {
            Ok(all)
        } else {
            Err(format!("{} SVIDs", all.len()))
        }
    })
    .await;
    assert_eq!(
        all[0].spiffe_id().to_string(),
        "spiffe://example.org/lazy-a"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn x509_source_and_jwt_source_work_against_the_agent() {
    let h = Harness::start().await;
    let uid = format!("unix:uid:{}", my_uid());
    h.create_entry("spiffe://example.org/web", &[&uid]).await;
    let client = h.client().await;
    eventually(|| client.fetch_x509_svid()).await;
    let endpoint = format!("unix://{}", h.workload_socket().display());
    let x509 = spiffe::X509Source::builder()
        .endpoint(&endpoint)
        .build()
        .await
        .unwrap();
    assert_eq!(
        x509.svid().unwrap().spiffe_id().to_string(),
        "spiffe://example.org/web"
    );
    let jwt = spiffe::JwtSource::builder()
        .endpoint(&endpoint)
        .build()
        .await
        .unwrap();
    let token = jwt
        .fetch_jwt_svid(["spiffe://example.org/db"])
        .await
        .unwrap();
    assert_eq!(token.spiffe_id().to_string(), "spiffe://example.org/web");
    let bundles = jwt.bundle_set().unwrap();
    spiffe::JwtSvid::parse_and_validate(
        token.token(),
        bundles.as_ref(),
        &["spiffe://example.org/db"],
    )
    .unwrap();
    jwt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn api_watch_prints_updates() {
    use tokio::io::AsyncBufReadExt as _;
    let h = Harness::start().await;
    let sha = agent_sha256();
    let uid = format!("unix:uid:{}", my_uid());
    h.create_entry(
        "spiffe://example.org/cli",
        &[&format!("unix:sha256:{sha}"), &uid],
    )
    .await;
    eventually(|| async {
        let out = agent_cli(&h, &["api", "fetch", "x509"]);
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    })
    .await;
    let mut child = tokio::process::Command::new(AGENT_BIN)
        .args(["api", "watch", "--socket-path"])
        .arg(h.workload_socket())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(first.starts_with("spiffe://example.org/cli"), "{first}");
    // A second entry for the same executable: the watch prints the new state.
    h.create_entry(
        "spiffe://example.org/cli2",
        &[&format!("unix:sha256:{sha}"), &uid],
    )
    .await;
    loop {
        let line = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if line.starts_with("spiffe://example.org/cli2") {
            break;
        }
    }
    child.kill().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_whose_own_svid_expired_says_it_needs_a_new_token() {
    let mut h = Harness::start_with("[ca]\nagent_svid_ttl = \"3s\"\n").await;
    h.client().await; // attested and serving
    h.stop_agent().await;
    let data = h.dir.path().join("agent-data");
    let saved = oxid_agent::identity::load(&data).expect("a saved identity");
    // Let the saved SVID expire while the agent is down.
    let left = saved
        .not_after
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    tokio::time::sleep(left + Duration::from_millis(1100)).await;
    h.start_agent(None);
    let err = h.agent_exit().await.unwrap_err().to_string();
    assert!(
        err.contains("expired") && err.contains("needs a new join token"),
        "{err}"
    );
    // The agent record on the server is untouched; with a new token the
    // node attests again.
    let mut a = admin(&h.admin_socket()).await;
    let token = a
        .create_join_token(admin_pb::CreateJoinTokenRequest::default())
        .await
        .unwrap()
        .into_inner();
    h.start_agent(Some(token.token));
    let agents = eventually(|| {
        let mut a = a.clone();
        async move {
            let agents = a
                .list_agents(admin_pb::ListAgentsRequest {})
                .await
                .map_err(|e| e.to_string())?
                .into_inner()
                .agents;
            if agents.len() == 2 {
                Ok(agents)
            } else {
                Err(format!("{} agents", agents.len()))
            }
        }
    })
    .await;
    assert!(agents.iter().any(|x| x.spiffe_id.ends_with(&token.id)));
}

/// Hex SHA-256 of the agent binary, for `unix:sha256:` entries that match
/// the `oxid-agent api` commands.
fn agent_sha256() -> String {
    let bytes = std::fs::read(AGENT_BIN).unwrap();
    oxid_pki::hex(ring::digest::digest(&ring::digest::SHA256, &bytes).as_ref())
}

/// Waits until an open X509 stream carries `id`.
async fn stream_carries<S>(contexts: &mut S, id: &str, within: Duration)
where
    S: tokio_stream::Stream<Item = Result<spiffe::X509Context, spiffe::WorkloadApiError>> + Unpin,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let ctx = tokio::time::timeout_at(deadline, contexts.next())
            .await
            .unwrap_or_else(|_| panic!("{id} did not reach the open stream"))
            .unwrap()
            .unwrap();
        if ctx.svids().iter().any(|s| s.spiffe_id().to_string() == id) {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn network_cuts_and_silent_peers_lose_no_update() {
    let mut h = Harness::start().await;
    let uid = format!("unix:uid:{}", my_uid());
    h.create_entry("spiffe://example.org/web", &[&uid]).await;
    h.stop_agent().await;
    let proxy = Proxy::start(h.server_addr).await;
    h.agent_server_addr = Some(proxy.addr);
    h.start_agent(None);
    let client = h.client().await;
    eventually(|| client.fetch_x509_svid()).await;
    let mut contexts = Box::pin(client.stream_x509_contexts().await.unwrap());
    let _ = tokio::time::timeout(WAIT, contexts.next()).await.unwrap();

    // A cut with resets: connections close and new ones are refused. An
    // entry created meanwhile arrives once the network is back.
    proxy.set(NetMode::Cut);
    h.create_entry("spiffe://example.org/during-cut", &[&uid])
        .await;
    let svid = client.fetch_x509_svid().await.unwrap();
    assert_eq!(svid.spiffe_id().to_string(), "spiffe://example.org/web");
    proxy.set(NetMode::Open);
    stream_carries(&mut contexts, "spiffe://example.org/during-cut", WAIT * 2).await;

    // A silent peer: the agent's connection stays open but carries nothing.
    // Only the keepalive (15 s ping, 10 s timeout) can notice; then the
    // agent reconnects and resumes, and the entry created meanwhile arrives.
    proxy.set(NetMode::Blackhole);
    h.create_entry("spiffe://example.org/during-blackhole", &[&uid])
        .await;
    stream_carries(
        &mut contexts,
        "spiffe://example.org/during-blackhole",
        Duration::from_secs(60),
    )
    .await;
}

/// A node CA (written to `dir/node-ca.pem`) and one node's certificate and
/// key files for x509pop.
fn node_pki(dir: &std::path::Path) -> (PathBuf, PathBuf, PathBuf) {
    use oxid_pki::x509::{PublicKey, SvidParams, X509Ca};
    use oxid_pki::{KeyAlgorithm, KeyPair, TrustDomain};
    let now = std::time::SystemTime::now();
    let ca = X509Ca::new_root(
        TrustDomain::new("nodes.example").unwrap(),
        KeyPair::generate(KeyAlgorithm::EcdsaP256).unwrap(),
        Duration::from_secs(86_400),
        now,
    )
    .unwrap();
    let ca_file = dir.join("node-ca.pem");
    std::fs::write(&ca_file, oxid_pki::x509::certs_to_pem([ca.cert()])).unwrap();
    let key = KeyPair::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let node = ca
        .issue_x509_svid(
            &SvidParams {
                spiffe_id: &"spiffe://nodes.example/host/web-1".parse().unwrap(),
                public_key: &PublicKey::from_spki_der(key.public_key_spki()).unwrap(),
                ttl: Duration::from_secs(3600),
                dns_names: &["web-1.nodes.example".to_owned()],
            },
            now,
        )
        .unwrap();
    let cert_file = dir.join("node.pem");
    std::fs::write(&cert_file, oxid_pki::x509::certs_to_pem(node.cert_chain())).unwrap();
    let key_file = dir.join("node.key");
    key.store(&key_file).unwrap();
    (ca_file, cert_file, key_file)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_x509pop_agent_whose_own_svid_expired_attests_again() {
    let pki = tempfile::tempdir().unwrap();
    let (ca_file, cert_file, key_file) = node_pki(pki.path());
    let mut h = Harness::start_with(&format!(
        "x509pop_ca_bundle = {:?}\n[ca]\nagent_svid_ttl = \"3s\"\n",
        ca_file.display().to_string()
    ))
    .await;
    // Replace the join-token agent with an x509pop one on a fresh data dir.
    h.stop_agent().await;
    let data = h.dir.path().join("agent-data");
    std::fs::remove_dir_all(&data).unwrap();
    h.node_credentials = Some((cert_file, key_file));
    h.start_agent(None);
    h.client().await;
    let first = oxid_agent::identity::load(&data).expect("attested");
    assert!(first.spiffe_id.path().starts_with("/oxid/agent/x509pop/"));
    h.stop_agent().await;
    let saved = oxid_agent::identity::load(&data).unwrap();
    let left = saved
        .not_after
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    tokio::time::sleep(left + Duration::from_millis(1100)).await;
    // Restarted past its SVID's expiry, it attests again by itself.
    h.start_agent(None);
    h.client().await;
    let again = oxid_agent::identity::load(&data).unwrap();
    assert_eq!(
        again.spiffe_id, first.spiffe_id,
        "the same node, the same ID"
    );
    assert!(again.not_after > std::time::SystemTime::now());
}
