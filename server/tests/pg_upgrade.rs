//! A rolling upgrade (issue 15 item 2): a server of the previous schema
//! version (2, played by `PgConfig::schema_version`: it migrates only that
//! far and writes no heartbeats) keeps serving while a server of the
//! current version migrates the database to 3 under it; both then serve
//! one agent, and entries created on either reach the agent's sync stream
//! on the other. Needs the cluster `./scripts/test` starts.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/pg.rs"]
mod pg_cluster;
mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use hyper_util::rt::TokioIo;
use oxid_pki::TrustDomain;
use oxid_pki::bundle::Bundle;
use oxid_pki::x509::{ExtendedKeyUsage, verify_x509_svid};
use oxid_proto::admin as admin_pb;
use oxid_proto::admin::admin_client::AdminClient;
use oxid_proto::agent as pb;
use oxid_server::config::{Config, Overrides};
use oxid_server::datastore::PgConfig;
use oxid_tls::SvidResolver;
use tonic::transport::{Channel, Endpoint, Uri};

const WAIT: Duration = Duration::from_secs(30);

fn td() -> TrustDomain {
    TrustDomain::new("example.org").unwrap()
}

/// An in-process server named `name` on `db`, speaking schema `version`.
struct Server {
    dir: tempfile::TempDir,
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), oxid_server::run::RunError>>,
}

impl Server {
    async fn start(name: &str, db: &PgConfig, version: i32) -> Result<Self, String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("server.toml");
        std::fs::write(&path, format!("server_name = {name:?}\n")).unwrap();
        let mut config = Config::load(
            Some(&path),
            Overrides {
                data_dir: Some(dir.path().join("data")),
                socket_path: Some(dir.path().join("run/admin.sock")),
                datastore_url: Some(db.to_string()),
                ..Default::default()
            },
        )
        .unwrap();
        config.postgres.as_mut().unwrap().schema_version = version;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(oxid_server::run::run_with(
            config,
            Arc::new(oxid_server::clock::SystemClock),
            oxid_server::run::Listeners {
                agent_api: listener,
                metrics: None,
            },
            async {
                let _ = stopped.await;
            },
        ));
        let s = Self {
            dir,
            addr,
            stop: Some(stop),
            task,
        };
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Ok(mut admin) = s.admin().await {
                if admin.health(admin_pb::HealthRequest {}).await.is_ok() {
                    return Ok(s);
                }
            }
            if s.task.is_finished() {
                let r = s.task.await.unwrap();
                return Err(r.err().map(|e| e.to_string()).unwrap_or_default());
            }
            assert!(tokio::time::Instant::now() < deadline, "{name} not ready");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn admin(&self) -> Result<AdminClient<Channel>, tonic::transport::Error> {
        let path = self.dir.path().join("run/admin.sock");
        let channel = Endpoint::try_from("http://admin.invalid")
            .unwrap()
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move {
                    Ok::<_, std::io::Error>(TokioIo::new(
                        tokio::net::UnixStream::connect(path).await?,
                    ))
                }
            }))
            .await?;
        Ok(AdminClient::new(channel))
    }

    async fn bundle(&self) -> Bundle {
        let b = self
            .admin()
            .await
            .unwrap()
            .get_bundle(admin_pb::GetBundleRequest {})
            .await
            .unwrap()
            .into_inner();
        Bundle::from_spiffe_json(td(), b.spiffe_json.as_bytes()).unwrap()
    }

    async fn token(&self) -> String {
        self.admin()
            .await
            .unwrap()
            .create_join_token(admin_pb::CreateJoinTokenRequest::default())
            .await
            .unwrap()
            .into_inner()
            .token
    }

    async fn entry(&self, name: &str, parent: &str) -> String {
        let r = self
            .admin()
            .await
            .unwrap()
            .create_entries(admin_pb::CreateEntriesRequest {
                entries: vec![admin_pb::Entry {
                    spiffe_id: format!("spiffe://example.org/{name}"),
                    parent_id: parent.into(),
                    selectors: vec!["unix:uid:1000".into()],
                    ..Default::default()
                }],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(r.results[0].error.is_empty(), "{}", r.results[0].error);
        r.results[0].id.clone()
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap().unwrap();
    }
}

/// The agent's sync stream from `s`, trusting `trusted`.
async fn sync_from(
    s: &Server,
    trusted: Bundle,
    certs: Arc<SvidResolver>,
) -> tonic::Streaming<pb::SyncResponse> {
    let mut client = support::agent_api_client(s.addr, trusted, support::SERVER_ID, Some(certs))
        .await
        .unwrap();
    client
        .sync(pb::SyncRequest::default())
        .await
        .unwrap()
        .into_inner()
}

/// Reads `stream` until an upsert of `entry_id` arrives.
async fn until_entry(stream: &mut tonic::Streaming<pb::SyncResponse>, entry_id: &str) {
    let found = tokio::time::timeout(WAIT, async {
        loop {
            let message = stream.message().await.unwrap().unwrap();
            if message.upserts.iter().any(|e| e.id == entry_id) {
                return;
            }
        }
    })
    .await;
    assert!(found.is_ok(), "entry {entry_id} never reached the agent");
}

/// An X509-SVID for `entry_id` from `s`, verified with `bundle`.
async fn signs(s: &Server, trusted: Bundle, certs: Arc<SvidResolver>, entry_id: &str) {
    let mut client =
        support::agent_api_client(s.addr, trusted.clone(), support::SERVER_ID, Some(certs))
            .await
            .unwrap();
    let signed = support::inproc::sign_on(&mut client, entry_id)
        .await
        .unwrap();
    assert!(signed.error.is_empty(), "{}", signed.error);
    let chain = support::chain_of(signed.cert_chain);
    verify_x509_svid(
        &chain,
        &trusted,
        ExtendedKeyUsage::ServerAuth,
        SystemTime::now(),
    )
    .unwrap();
}

async fn schema(raw: &tokio_postgres::Client) -> (i32, bool) {
    let row = raw
        .query_one(
            "SELECT (SELECT version FROM oxid_schema), \
             to_regclass('oxid_server_heartbeats') IS NOT NULL",
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

fn keys(dir: &Path) -> usize {
    std::fs::read_dir(dir.join("data/keys")).unwrap().count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_server_of_the_previous_schema_keeps_serving_while_a_new_one_migrates() {
    let db = pg_cluster::fresh().await;
    let raw = pg_cluster::raw(&db).await;
    let old = Server::start("old", &db, 2).await.unwrap();
    assert_eq!(schema(&raw).await, (2, false), "the old server's schema");

    // An agent on the old server, with an entry, syncing.
    let trusted = old.bundle().await;
    let client = support::agent_api_client(old.addr, trusted.clone(), support::SERVER_ID, None)
        .await
        .unwrap();
    let agent = support::attest_token_with(client, &old.token().await, |c| c)
        .await
        .unwrap();
    let before = old.entry("before", agent.id.as_str()).await;
    let mut on_old = sync_from(&old, trusted.clone(), agent.certs.clone()).await;
    until_entry(&mut on_old, &before).await;

    // The new server migrates under the running old one. The old one has
    // no heartbeat, so the new one does not wait for it.
    let new = Server::start("new", &db, oxid_server::datastore::postgres::SCHEMA_VERSION)
        .await
        .unwrap();
    assert_eq!(schema(&raw).await, (3, true));
    assert_eq!(keys(old.dir.path()), 2);
    assert_eq!(keys(new.dir.path()), 2);

    // Both serve: each publishes both CAs, the new one serves the agent
    // the old one attested, entries created on either reach the agent on
    // the other, and each signs what the other's bundle verifies.
    let deadline = tokio::time::Instant::now() + WAIT;
    let union = loop {
        let (a, b) = (old.bundle().await, new.bundle().await);
        if a.x509_authorities().len() == 2 && b.x509_authorities().len() == 2 {
            break b;
        }
        assert!(tokio::time::Instant::now() < deadline, "never both CAs");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let mut on_new = sync_from(&new, union.clone(), agent.certs.clone()).await;
    until_entry(&mut on_new, &before).await;
    let from_new = new.entry("from-new", agent.id.as_str()).await;
    until_entry(&mut on_old, &from_new).await;
    let from_old = old.entry("from-old", agent.id.as_str()).await;
    until_entry(&mut on_new, &from_old).await;
    signs(&old, union.clone(), agent.certs.clone(), &from_new).await;
    signs(&new, old.bundle().await, agent.certs.clone(), &from_old).await;

    // The old server writes no heartbeat; the new one does.
    let beats: Vec<String> = raw
        .query("SELECT server FROM oxid_server_heartbeats", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(beats, ["new"]);

    // Restarted on its old version after the migration, the old server is
    // refused, saying what to do: it is upgraded instead.
    old.stop().await;
    let refused = Server::start("old", &db, 2).await.err().unwrap();
    assert!(
        refused.contains("newer than the 2 this oxid-server knows"),
        "{refused}"
    );
    new.stop().await;
}
