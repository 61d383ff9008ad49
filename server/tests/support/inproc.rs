//! The one in-process server of the server's tests: a real server
//! (`run_with`) on a temp dir, the agent API and metrics on 127.0.0.1:0
//! with real TLS 1.3 on the agent API, the admin API on a Unix socket, and
//! a clock that runs with real time but can be moved forward (expiry tests
//! need both: timers that fire and certificates that lapse). Restartable
//! on the same directory (`stop`, `start_in`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use hyper_util::rt::TokioIo;
use oxid_pki::bundle::Bundle;
use oxid_pki::x509::{Csr, PublicKey, SvidParams, X509Ca};
use oxid_pki::{KeyAlgorithm, KeyPair, TrustDomain};
use oxid_proto::admin as admin_pb;
use oxid_proto::admin::admin_client::AdminClient;
use oxid_proto::agent as pb;
use oxid_proto::agent::agent_api_client::AgentApiClient;
use oxid_server::clock::Clock;
use oxid_server::config::{Config, Overrides};
use oxid_tls::SvidResolver;
use tonic::transport::{Channel, Endpoint, Uri};

use super::{Agent, SERVER_ID, chain_of};

/// How long a test waits for an event before failing.
pub(crate) const WAIT: Duration = Duration::from_secs(20);

/// Real time plus an offset the test moves forward.
#[derive(Debug, Default)]
pub(crate) struct OffsetClock {
    offset: Mutex<Duration>,
}

impl OffsetClock {
    /// Moves the clock forward by `by`.
    pub(crate) fn advance(&self, by: Duration) {
        *self.offset.lock().unwrap() += by;
    }
}

impl Clock for OffsetClock {
    fn now(&self) -> SystemTime {
        SystemTime::now() + *self.offset.lock().unwrap()
    }
}

/// A running server.
pub(crate) struct Server {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) addr: SocketAddr,
    /// `/metrics`, `/live`, `/ready`.
    pub(crate) metrics_addr: SocketAddr,
    pub(crate) clock: Arc<OffsetClock>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), oxid_server::run::RunError>>>,
}

impl Server {
    /// A server with `extra` as its config file.
    pub(crate) async fn start(extra: &str) -> Self {
        Self::start_in(tempfile::tempdir().unwrap(), extra)
            .await
            .unwrap()
    }

    /// A server on `dir` (a new one, or one a stopped server left) with
    /// `extra` as its config file; why it did not start, if it did not.
    pub(crate) async fn start_in(dir: tempfile::TempDir, extra: &str) -> Result<Self, String> {
        let path = dir.path().join("server.toml");
        std::fs::write(&path, extra).unwrap();
        let config = Config::load(
            Some(&path),
            Overrides {
                data_dir: Some(dir.path().join("data")),
                socket_path: Some(dir.path().join("run/admin.sock")),
                ..Default::default()
            },
        )
        .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let metrics_addr = metrics.local_addr().unwrap();
        let listeners = oxid_server::run::Listeners {
            agent_api: listener,
            metrics: Some(metrics),
        };
        let clock = Arc::new(OffsetClock::default());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(oxid_server::run::run_with(
            config,
            clock.clone(),
            listeners,
            async {
                let _ = stopped.await;
            },
        ));
        let s = Self {
            dir,
            addr,
            metrics_addr,
            clock,
            stop: Some(stop),
            task: Some(task),
        };
        // Ready when the admin socket answers (an event, not a sleep).
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Ok(mut admin) = s.admin_try().await {
                if admin.health(admin_pb::HealthRequest {}).await.is_ok() {
                    return Ok(s);
                }
            }
            if s.task.as_ref().unwrap().is_finished() {
                let mut s = s;
                let r = s.task.take().unwrap().await.unwrap();
                return Err(r.err().map(|e| e.to_string()).unwrap_or_default());
            }
            assert!(tokio::time::Instant::now() < deadline, "server not ready");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops the server and returns its directory (for a restart).
    pub(crate) async fn stop(mut self) -> tempfile::TempDir {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
        std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap())
    }

    /// The admin socket.
    pub(crate) fn socket(&self) -> PathBuf {
        self.dir.path().join("run/admin.sock")
    }

    pub(crate) async fn admin_try(&self) -> Result<AdminClient<Channel>, tonic::transport::Error> {
        let path = self.socket();
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

    /// An admin client.
    pub(crate) async fn admin(&self) -> AdminClient<Channel> {
        self.admin_try().await.unwrap()
    }

    /// The server's trust bundle.
    pub(crate) async fn bundle(&self) -> Bundle {
        let b = self
            .admin()
            .await
            .get_bundle(admin_pb::GetBundleRequest {})
            .await
            .unwrap()
            .into_inner();
        Bundle::from_spiffe_json(td(), b.spiffe_json.as_bytes()).unwrap()
    }

    /// A fresh join token, giving its agent `alias` too unless empty.
    pub(crate) async fn token(&self, alias: &str) -> String {
        self.admin()
            .await
            .create_join_token(admin_pb::CreateJoinTokenRequest {
                ttl: 0,
                spiffe_id: alias.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .token
    }

    /// Creates one entry; returns its ID. `expires_at` 0 is never.
    pub(crate) async fn create_entry(
        &self,
        spiffe_id: &str,
        parent: &str,
        selector: &str,
        expires_at: u64,
    ) -> String {
        let r = self
            .admin()
            .await
            .create_entries(admin_pb::CreateEntriesRequest {
                entries: vec![admin_pb::Entry {
                    spiffe_id: spiffe_id.into(),
                    parent_id: parent.into(),
                    selectors: vec![selector.into()],
                    expires_at,
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

    /// Creates one entry that never expires; returns its ID.
    pub(crate) async fn add_entry(&self, spiffe_id: &str, parent: &str, selector: &str) -> String {
        self.create_entry(spiffe_id, parent, selector, 0).await
    }

    /// The server's clock in Unix seconds.
    pub(crate) fn now_secs(&self) -> u64 {
        self.clock
            .now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    /// A new TLS connection to the agent API, presenting `certs` if given.
    pub(crate) async fn client(&self, certs: Option<Arc<SvidResolver>>) -> AgentApiClient<Channel> {
        self.channel_as(SERVER_ID, certs).await.unwrap()
    }

    /// A new TLS connection to the agent API expecting the server to be
    /// `server_id`, presenting `certs` if given.
    pub(crate) async fn channel_as(
        &self,
        server_id: &str,
        certs: Option<Arc<SvidResolver>>,
    ) -> Result<AgentApiClient<Channel>, String> {
        super::agent_api_client(self.addr, self.bundle().await, server_id, certs).await
    }

    /// A fresh agent, attested with a join token.
    pub(crate) async fn agent(&self) -> Agent {
        let token = self.token("").await;
        super::attest_token_with(self.client(None).await, &token, |csr| csr)
            .await
            .unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// The default trust domain.
pub(crate) fn td() -> TrustDomain {
    TrustDomain::new("example.org").unwrap()
}

/// Renews `agent` over `client` with `key`: the renewed agent, or why not.
pub(crate) async fn renew_with(
    client: &mut AgentApiClient<Channel>,
    agent: &Agent,
    key: &KeyPair,
) -> Result<Agent, tonic::Status> {
    let r = client
        .renew(pb::RenewRequest {
            csr: Csr::create(key).unwrap(),
        })
        .await?
        .into_inner();
    let chain = chain_of(r.svid_chain);
    let certs = Arc::new(SvidResolver::default());
    certs.set(chain.clone(), key).unwrap();
    Ok(Agent {
        id: agent.id.clone(),
        certs,
        chain,
    })
}

/// Asks `client` to sign one SVID for `entry_id`.
pub(crate) async fn sign_on(
    client: &mut AgentApiClient<Channel>,
    entry_id: &str,
) -> Result<pb::SignedSvid, tonic::Status> {
    let key = KeyPair::generate(KeyAlgorithm::EcdsaP256).unwrap();
    Ok(client
        .sign_x509_svids(pb::SignX509SvidsRequest {
            requests: vec![pb::SvidRequest {
                entry_id: entry_id.into(),
                csr: Csr::create(&key).unwrap(),
            }],
        })
        .await?
        .into_inner()
        .svids
        .remove(0))
}

/// The next message of a stream, within [`WAIT`].
pub(crate) async fn next<T>(stream: &mut tonic::Streaming<T>) -> Result<Option<T>, tonic::Status> {
    tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("the stream said nothing in time")
}

/// A node CA for x509pop, written to `dir/node-ca.pem`.
pub(crate) fn node_pki(dir: &Path) -> (X509Ca, PathBuf) {
    let node_ca = X509Ca::new_root(
        TrustDomain::new("nodes.example").unwrap(),
        KeyPair::generate(KeyAlgorithm::EcdsaP256).unwrap(),
        Duration::from_secs(86_400),
        SystemTime::now(),
    )
    .unwrap();
    let path = dir.join("node-ca.pem");
    std::fs::write(&path, oxid_pki::x509::certs_to_pem([node_ca.cert()])).unwrap();
    (node_ca, path)
}

/// A node certificate for `host` (DER chain) and its key.
pub(crate) fn node_cert(ca: &X509Ca, host: &str) -> (Vec<u8>, KeyPair) {
    let key = KeyPair::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let pk = PublicKey::from_spki_der(key.public_key_spki()).unwrap();
    let svid = ca
        .issue_x509_svid(
            &SvidParams {
                spiffe_id: &format!("spiffe://nodes.example/host/{host}")
                    .parse()
                    .unwrap(),
                public_key: &pk,
                ttl: Duration::from_secs(3600),
                dns_names: &[format!("{host}.nodes.example")],
            },
            SystemTime::now(),
        )
        .unwrap();
    (oxid_pki::x509::concat_der(svid.cert_chain()), key)
}

/// Attests by x509pop with `chain`, proving `signer`; the agent.
pub(crate) async fn attest_x509pop(s: &Server, chain: Vec<u8>, signer: &KeyPair) -> Agent {
    let agent_key = KeyPair::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    tx.send(pb::AttestRequest {
        data: Some(pb::AttestationData {
            r#type: "x509pop".into(),
            payload: chain,
        }),
        csr: Csr::create(&agent_key).unwrap(),
        challenge_response: vec![],
    })
    .await
    .unwrap();
    let mut c = s.client(None).await;
    let mut responses = c
        .attest(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let challenge = responses.message().await.unwrap().unwrap().challenge;
    let mut message = b"oxid x509pop v1\0".to_vec();
    message.extend_from_slice(&challenge);
    tx.send(pb::AttestRequest {
        data: None,
        csr: vec![],
        challenge_response: signer.sign_x509(&message).unwrap(),
    })
    .await
    .unwrap();
    let result = responses.message().await.unwrap().unwrap().result.unwrap();
    let chain = chain_of(result.svid_chain);
    let certs = Arc::new(SvidResolver::default());
    certs.set(chain.clone(), &agent_key).unwrap();
    Agent {
        id: result.spiffe_id.parse().unwrap(),
        certs,
        chain,
    }
}
