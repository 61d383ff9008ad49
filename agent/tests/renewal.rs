//! The agent's own renewal when the server's answer is lost: the server
//! renewed, the agent never heard. The server then lets the old SVID renew
//! again only with the pending SVID's key (a copy of the old SVID must not
//! renew), so the agent has to retry with the same key, or it is locked out.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;

use common::{Harness, WAIT, admin, eventually, my_uid};
use oxid_proto::admin as admin_pb;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::watch;

/// Agent SVIDs of 30 s: renewed within 8 to 23 s, and the old one still
/// valid when the agent retries (every 3 to 8 s) after a lost answer.
const TTLS: &str = "[ca]\nttl = \"10m\"\nx509_svid_ttl = \"6s\"\nagent_svid_ttl = \"30s\"\njwt_svid_ttl = \"10s\"\n";

/// What the proxy does with the server's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Forward both ways.
    Open,
    /// Forward the agent's bytes, drop the server's: answers are lost.
    LoseAnswers,
}

/// A TCP proxy between agent and server that can lose the server's answers
/// and reset every connection it holds.
struct LossyProxy {
    addr: std::net::SocketAddr,
    /// The mode, and a generation bumped by each reset.
    mode: Arc<watch::Sender<(Mode, u64)>>,
    task: tokio::task::JoinHandle<()>,
}

impl LossyProxy {
    async fn start(target: std::net::SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (mode, watch) = watch::channel((Mode::Open, 0u64));
        let task = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                tokio::spawn(proxy_one(conn, target, watch.clone()));
            }
        });
        Self {
            addr,
            mode: Arc::new(mode),
            task,
        }
    }

    fn set(&self, mode: Mode) {
        self.mode.send_modify(|(m, _)| *m = mode);
    }

    /// Closes every connection opened so far.
    fn reset(&self) {
        self.mode.send_modify(|(_, generation)| *generation += 1);
    }
}

impl Drop for LossyProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn proxy_one(
    conn: tokio::net::TcpStream,
    target: std::net::SocketAddr,
    mut watch: watch::Receiver<(Mode, u64)>,
) {
    let born = watch.borrow_and_update().1;
    let Ok(upstream) = tokio::net::TcpStream::connect(target).await else {
        return;
    };
    let (mut a_read, mut a_write) = conn.into_split();
    let (mut b_read, mut b_write) = upstream.into_split();
    let answers = watch.clone();
    let down = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match b_read.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if answers.borrow().0 == Mode::LoseAnswers {
                continue;
            }
            if a_write.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    let forward = async { tokio::join!(tokio::io::copy(&mut a_read, &mut b_write), down) };
    tokio::select! {
        _ = forward => {}
        _ = watch.wait_for(|(_, generation)| *generation > born) => {}
    }
}

async fn serial(h: &Harness) -> String {
    admin(&h.admin_socket())
        .await
        .get_agent(admin_pb::AgentRequest {
            spiffe_id: h.agent_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .serial
}

/// Waits until the agent's stored serial is none of `old`; returns it.
async fn renewed_past(h: &Harness, old: &[&str]) -> String {
    eventually(|| async {
        let now = serial(h).await;
        if old.contains(&now.as_str()) {
            Err(format!("still {now}"))
        } else {
            Ok(now)
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lost_renewal_answer_is_recovered_with_the_same_key() {
    let mut h = Harness::start_with(TTLS).await;
    let uid = format!("unix:uid:{}", my_uid());
    h.create_entry("spiffe://example.org/web", &[&uid]).await;
    h.stop_agent().await;
    let proxy = LossyProxy::start(h.server_addr).await;
    h.agent_server_addr = Some(proxy.addr);
    // A server whose answers are lost is also silent to keepalive pings:
    // with the default (left after about 5 s) the agent would drop the
    // connection before its renewal is due, and nothing would be lost.
    h.agent_extra.server_keepalive_secs = Some(15);
    h.start_agent(None);
    let client = h.client().await;
    eventually(|| client.fetch_x509_svid()).await;
    let first = serial(&h).await;
    eprintln!("first {first}");

    // The server renews the agent, but the answer never reaches it.
    proxy.set(Mode::LoseAnswers);
    let lost = renewed_past(&h, &[&first]).await;
    proxy.set(Mode::Open);
    proxy.reset();
    eprintln!("lost {lost}");

    // The agent asks again on its old SVID: with the pending key this is
    // accepted; with a fresh key it is refused as a possible theft.
    let recovered = renewed_past(&h, &[&first, &lost]).await;
    // The recovered SVID is in use: the agent renews it in turn, and
    // workloads are served throughout.
    renewed_past(&h, &[&first, &lost, &recovered]).await;
    tokio::time::timeout(WAIT, client.fetch_x509_svid())
        .await
        .unwrap()
        .unwrap();
}
