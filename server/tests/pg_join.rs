//! A new or rotated CA authority signs only once it has reached the agents
//! of every live server (issue 15 item 4; `server/src/ca/propagation.rs`).
//! Three real servers on one database, an agent-API client attested on
//! each that keeps its server's sync stream and verifies, as each SVID
//! arrives, SVIDs signed by the other servers with the bundle it holds at
//! that moment; a fourth server joins, and a server rotates, under that
//! load. One server's feed is held back (its role loses the right to read
//! the change table) so the new authority cannot reach its agent: the
//! joining server must not serve, and the rotating one must keep signing
//! with its old authority, until that server has caught up. Needs the
//! cluster `./scripts/test` starts.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/pg.rs"]
mod pg_cluster;
mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use oxid_pki::TrustDomain;
use oxid_pki::bundle::Bundle;
use oxid_pki::x509::{ExtendedKeyUsage, verify_x509_svid};
use oxid_proto::agent as pb;
use oxid_proto::agent::agent_api_client::AgentApiClient;
use oxid_server::datastore::PgConfig;
use oxid_tls::SvidResolver;
use rustls_pki_types::CertificateDer;
use support::cli_process::Server;
use tonic::transport::Channel;

fn td() -> TrustDomain {
    TrustDomain::new("example.org").unwrap()
}

/// The URL of `db` over the cluster's socket, as `user`.
fn url(db: &PgConfig, user: &str) -> String {
    let mut as_user = db.clone();
    as_user.user = user.to_owned();
    as_user.to_string()
}

/// A server named `name` on `url`, in `dir`.
fn start(name: &str, url: &str, dir: tempfile::TempDir) -> Server {
    let config = format!("server_name = {name:?}\n");
    Server::start_in(dir, &config, &["--datastore-url", url])
}

fn open_dir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// What the test's agents saw go wrong.
#[derive(Default)]
struct Failures(Mutex<Vec<String>>);

impl Failures {
    fn push(&self, what: String) {
        self.0.lock().unwrap().push(what);
    }

    fn assert_none(&self) {
        let seen = self.0.lock().unwrap();
        assert!(seen.is_empty(), "{} failures: {:?}", seen.len(), &seen[..]);
    }
}

/// An agent attested on one server: its SVID, its entry, and the own
/// bundle as its sync stream last brought it.
struct View {
    name: String,
    certs: Arc<SvidResolver>,
    entry_id: String,
    bundle: Arc<Mutex<Bundle>>,
}

impl View {
    fn bundle(&self) -> Bundle {
        self.bundle.lock().unwrap().clone()
    }
}

/// Attests an agent on `s`, gives it an entry there, and follows `s`'s
/// sync stream into its bundle (a stream that fails is a failure).
async fn agent_on(name: &str, s: &Server, failures: Arc<Failures>) -> View {
    let addr: SocketAddr = s.ready_field("agent_api").parse().unwrap();
    let trusted = tokio::task::block_in_place(|| s.spiffe_bundle());
    let token = tokio::task::block_in_place(|| s.json(&["token", "generate"]));
    let client = support::agent_api_client(addr, trusted.clone(), support::SERVER_ID, None)
        .await
        .unwrap();
    let agent = support::attest_token_with(client, token["token"].as_str().unwrap(), |c| c)
        .await
        .unwrap();
    let created = tokio::task::block_in_place(|| {
        s.json(&[
            "entry",
            "create",
            "--spiffe-id",
            &format!("spiffe://example.org/{name}"),
            "--parent-id",
            agent.id.as_str(),
            "--selector",
            "unix:uid:1000",
        ])
    });
    let entry_id = created["results"][0]["entry"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let bundle = Arc::new(Mutex::new(trusted.clone()));
    let mut client =
        support::agent_api_client(addr, trusted, support::SERVER_ID, Some(agent.certs.clone()))
            .await
            .unwrap();
    let mut stream = client
        .sync(pb::SyncRequest::default())
        .await
        .unwrap()
        .into_inner();
    let (first_tx, first_rx) = tokio::sync::oneshot::channel();
    tokio::spawn({
        let bundle = bundle.clone();
        let name = name.to_owned();
        async move {
            let mut first = Some(first_tx);
            loop {
                match stream.message().await {
                    Ok(Some(message)) => {
                        if let Some(own) = message
                            .bundles
                            .iter()
                            .find(|b| b.trust_domain == "example.org")
                        {
                            *bundle.lock().unwrap() =
                                Bundle::from_spiffe_json(td(), own.spiffe_json.as_bytes()).unwrap();
                        }
                        if let Some(tx) = first.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(None) => return,
                    Err(e) => {
                        failures.push(format!("{name}'s sync stream failed: {e}"));
                        return;
                    }
                }
            }
        }
    });
    first_rx.await.unwrap();
    View {
        name: name.to_owned(),
        certs: agent.certs,
        entry_id,
        bundle,
    }
}

/// A channel from `view`'s agent to `addr`, trusting the bundle it holds.
async fn connect(view: &View, addr: SocketAddr) -> Result<AgentApiClient<Channel>, String> {
    support::agent_api_client(
        addr,
        view.bundle(),
        support::SERVER_ID,
        Some(view.certs.clone()),
    )
    .await
}

/// One X509-SVID for `view`'s entry over `client`.
async fn sign(
    client: &mut AgentApiClient<Channel>,
    view: &View,
) -> Result<Vec<CertificateDer<'static>>, String> {
    let one = support::inproc::sign_on(client, &view.entry_id)
        .await
        .map_err(|e| e.to_string())?;
    if !one.error.is_empty() {
        return Err(one.error);
    }
    Ok(support::chain_of(one.cert_chain))
}

/// Verifies `chain` with every view's bundle as it is now.
fn verify_everywhere(
    chain: &[CertificateDer<'static>],
    views: &[Arc<View>],
    what: &str,
) -> Vec<String> {
    let now = SystemTime::now();
    views
        .iter()
        .filter_map(|v| {
            verify_x509_svid(chain, &v.bundle(), ExtendedKeyUsage::ServerAuth, now)
                .err()
                .map(|e| format!("{what} did not verify at {}'s agent: {e}", v.name))
        })
        .collect()
}

/// Load: `view`'s agent signs at `addr` again and again, and every SVID
/// is verified at every agent as it arrives, until `stop`.
fn load(
    view: Arc<View>,
    addr: SocketAddr,
    views: Arc<Mutex<Vec<Arc<View>>>>,
    failures: Arc<Failures>,
    signed: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut client = match connect(&view, addr).await {
            Ok(c) => c,
            Err(e) => return failures.push(format!("{}: handshake failed: {e}", view.name)),
        };
        let mut pace = tokio::time::interval(Duration::from_millis(20));
        while !stop.load(Ordering::Relaxed) {
            pace.tick().await;
            match sign(&mut client, &view).await {
                Ok(chain) => {
                    let all = views.lock().unwrap().clone();
                    for f in verify_everywhere(&chain, &all, &format!("an SVID for {}", view.name))
                    {
                        failures.push(f);
                    }
                    signed.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => failures.push(format!("{}: signing failed: {e}", view.name)),
            }
        }
    })
}

/// A cluster of three servers, `c` as a role whose feed the test can hold
/// back, with an agent on each under load.
struct Cluster {
    rt: tokio::runtime::Runtime,
    db: PgConfig,
    role: String,
    raw: tokio_postgres::Client,
    servers: Vec<Server>,
    views: Arc<Mutex<Vec<Arc<View>>>>,
    failures: Arc<Failures>,
    signed: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    load: Vec<tokio::task::JoinHandle<()>>,
}

impl Cluster {
    fn start() -> Self {
        let rt = pg_cluster::runtime();
        let db = rt.block_on(pg_cluster::fresh());
        let raw = rt.block_on(pg_cluster::raw(&db));
        let a = start("a", &url(&db, "postgres"), open_dir());
        // The schema exists now; c logs in as a role of its own.
        let role = format!("{}_c", db.dbname);
        rt.block_on(raw.batch_execute(&format!(
            "CREATE ROLE {role} LOGIN; GRANT USAGE, CREATE ON SCHEMA public TO {role}; \
             GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}"
        )))
        .unwrap();
        let b = start("b", &url(&db, "postgres"), open_dir());
        let c = start("c", &url(&db, &role), open_dir());
        let failures = Arc::new(Failures::default());
        let mut cluster = Self {
            rt,
            db,
            role,
            raw,
            servers: vec![a, b, c],
            views: Arc::new(Mutex::new(Vec::new())),
            failures,
            signed: Arc::new(AtomicU64::new(0)),
            stop: Arc::new(AtomicBool::new(false)),
            load: Vec::new(),
        };
        for (i, name) in ["a", "b", "c"].into_iter().enumerate() {
            cluster.until_authorities(i, 3);
            let view = cluster.rt.block_on(agent_on(
                name,
                &cluster.servers[i],
                cluster.failures.clone(),
            ));
            cluster.views.lock().unwrap().push(Arc::new(view));
        }
        for i in 0..3 {
            cluster.load_on(i, i);
        }
        cluster
    }

    fn addr(&self, server: usize) -> SocketAddr {
        self.servers[server]
            .ready_field("agent_api")
            .parse()
            .unwrap()
    }

    fn view(&self, i: usize) -> Arc<View> {
        self.views.lock().unwrap()[i].clone()
    }

    /// Load from view `view`'s agent against server `server`.
    fn load_on(&mut self, view: usize, server: usize) {
        let _enter = self.rt.enter();
        self.load.push(load(
            self.view(view),
            self.addr(server),
            self.views.clone(),
            self.failures.clone(),
            self.signed.clone(),
            self.stop.clone(),
        ));
    }

    /// Waits until the agent of view `i` holds `n` X.509 authorities.
    fn until_authorities(&self, i: usize, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let held = match self.views.lock().unwrap().get(i) {
                Some(v) => v.bundle().x509_authorities().len(),
                None => self.servers[i].spiffe_bundle().x509_authorities().len(),
            };
            if held == n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{i} never held {n} authorities: {held}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Server c can no longer read the change table: its index, and so its
    /// agents' bundle, stay where they are; its heartbeat goes on.
    fn hold_back_c(&self) {
        self.sql(&format!("REVOKE SELECT ON oxid_changes FROM {}", self.role));
    }

    fn release_c(&self) {
        self.sql(&format!("GRANT SELECT ON oxid_changes TO {}", self.role));
    }

    fn sql(&self, sql: &str) {
        self.rt.block_on(self.raw.batch_execute(sql)).unwrap();
    }

    /// Lets the load run until `n` more SVIDs have been signed and checked.
    fn run_load(&self, n: u64) {
        let target = self.signed.load(Ordering::Relaxed) + n;
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.signed.load(Ordering::Relaxed) < target {
            assert!(Instant::now() < deadline, "the load stalled");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn finish(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for task in std::mem::take(&mut self.load) {
            self.rt.block_on(task).unwrap();
        }
        self.failures.assert_none();
    }
}

/// Waits until `log` has `n` lines whose message contains `text`.
fn until_logged(s: &std::path::Path, text: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let log = std::fs::read_to_string(s.join("server.log")).unwrap_or_default();
        if log.lines().filter(|l| l.contains(text)).count() >= n {
            return;
        }
        assert!(Instant::now() < deadline, "never logged {text:?}: {log}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

const WAITING: &str = "waiting for the other live servers to apply this server's new CA authority";

#[test]
fn a_fourth_server_joins_under_load_and_no_agent_sees_a_handshake_or_verification_failure() {
    let mut cluster = Cluster::start();
    cluster.run_load(30);

    // d starts while c cannot learn its authority.
    cluster.hold_back_c();
    let d_dir = open_dir();
    let d_path = d_dir.path().to_owned();
    let d_url = url(&cluster.db, "postgres");
    let joining = std::thread::spawn(move || start("d", &d_url, d_dir));
    until_logged(&d_path, WAITING, 1);
    // a and b have d's authority; c's agent does not, and d serves
    // nothing: its admin socket is not even bound.
    cluster.until_authorities(0, 4);
    cluster.until_authorities(1, 4);
    assert_eq!(cluster.view(2).bundle().x509_authorities().len(), 3);
    assert!(!d_path.join("run/admin.sock").exists());
    cluster.run_load(30);

    cluster.release_c();
    let d = joining.join().unwrap();
    // The moment d answers, every agent's handshake with it and every
    // SVID it signs verify, at every agent.
    let addr_d: SocketAddr = d.ready_field("agent_api").parse().unwrap();
    let views = cluster.views.lock().unwrap().clone();
    for view in &views {
        let chain = cluster.rt.block_on(async {
            let mut client = connect(view, addr_d)
                .await
                .unwrap_or_else(|e| panic!("{}'s handshake with d failed: {e}", view.name));
            sign(&mut client, view).await.unwrap()
        });
        let failed = verify_everywhere(&chain, &views, &format!("d's SVID for {}", view.name));
        assert!(failed.is_empty(), "{failed:?}");
    }
    assert!(
        d.log()
            .contains("every live server has this server's new CA authority")
    );
    cluster.servers.push(d);
    for view in 0..3 {
        cluster.load_on(view, 3);
    }
    cluster.run_load(60);
    cluster.finish();
}

#[test]
fn a_rotated_authority_signs_only_once_every_live_servers_agents_hold_it() {
    let mut cluster = Cluster::start();
    cluster.run_load(30);
    let b_dir = cluster.servers[1].dir.path().to_owned();

    cluster.hold_back_c();
    cluster.servers[1].ok(&["ca", "rotate", "--prepare"]);
    cluster.until_authorities(0, 4);
    let before = cluster.view(2).bundle();
    assert_eq!(
        before.x509_authorities().len(),
        3,
        "c's agent lacks b's new one"
    );
    std::thread::scope(|scope| {
        let activating = scope.spawn(|| cluster.servers[1].ok(&["ca", "rotate", "--activate"]));
        until_logged(&b_dir, WAITING, 1);
        // Meanwhile b signs with its old authority, which every agent
        // holds: the load goes on without a failure.
        cluster.run_load(30);
        assert!(!activating.is_finished());
        cluster.release_c();
        activating.join().unwrap();
    });
    let addr_b = cluster.addr(1);
    let views = cluster.views.lock().unwrap().clone();
    let chain = cluster.rt.block_on(async {
        let mut client = connect(&views[1], addr_b).await.unwrap();
        sign(&mut client, &views[1]).await.unwrap()
    });
    // Signed by the new authority (c's agent's bundle of before cannot
    // verify it), and verified by every agent.
    assert!(
        verify_x509_svid(
            &chain,
            &before,
            ExtendedKeyUsage::ServerAuth,
            SystemTime::now()
        )
        .is_err()
    );
    let failed = verify_everywhere(&chain, &views, "b's SVID from its new authority");
    assert!(failed.is_empty(), "{failed:?}");
    cluster.load_on(1, 1);
    cluster.run_load(60);
    cluster.finish();
}
