//! What a simulated agent's Sync stream has told it: a view built only from
//! the pages pushed, as the agent builds it (`pg_scale.rs`, `pg_outage.rs`).

#![allow(
    dead_code,
    unreachable_pub,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]

use std::collections::BTreeMap;
use std::net::SocketAddr;

use oxid_pki::bundle::Bundle;
use oxid_proto::agent as pb;
use tokio::sync::watch;

use crate::support;

/// An agent's view: entry ID → (revision, SPIFFE ID).
pub type View = BTreeMap<String, (u64, String)>;

/// Opens Sync from revision 0 for `agent` at `addr` and follows it in a
/// task; the view, published after every complete snapshot or delta (a
/// page without `more`), as the agent publishes. The channel closes when
/// the stream ends.
pub async fn follow(
    addr: SocketAddr,
    bundle: Bundle,
    agent: &support::Agent,
) -> watch::Receiver<View> {
    let stream = open(addr, bundle, agent).await;
    let (tx, rx) = watch::channel(View::new());
    tokio::spawn(async move {
        let mut stream = stream;
        let mut staged = View::new();
        while let Ok(Some(page)) = stream.message().await {
            let more = page.more;
            apply(&mut staged, page);
            if !more {
                tx.send_replace(staged.clone());
            }
        }
    });
    rx
}

/// One complete snapshot from `addr` for `agent`: what the server's index
/// holds for it now.
pub async fn snapshot(addr: SocketAddr, bundle: Bundle, agent: &support::Agent) -> View {
    let mut stream = open(addr, bundle, agent).await;
    let mut view = View::new();
    loop {
        let page = stream.message().await.unwrap().unwrap();
        let more = page.more;
        apply(&mut view, page);
        if !more {
            return view;
        }
    }
}

async fn open(
    addr: SocketAddr,
    bundle: Bundle,
    agent: &support::Agent,
) -> tonic::Streaming<pb::SyncResponse> {
    let mut client =
        support::agent_api_client(addr, bundle, support::SERVER_ID, Some(agent.certs.clone()))
            .await
            .unwrap();
    client
        .sync(pb::SyncRequest::default())
        .await
        .unwrap()
        .into_inner()
}

fn apply(view: &mut View, page: pb::SyncResponse) {
    if page.snapshot {
        view.clear();
    }
    for e in page.upserts {
        view.insert(e.id, (e.revision, e.spiffe_id));
    }
    for id in &page.removed_ids {
        view.remove(id);
    }
}
