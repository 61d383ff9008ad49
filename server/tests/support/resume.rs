//! An agent's resumed sync, as the agent resumes it: from the revision,
//! incarnation and entry IDs of what it holds (`pg_backup.rs`,
//! `sync_incarnation.rs`).

#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::panic)]

use std::collections::BTreeMap;
use std::net::SocketAddr;

use oxid_proto::agent as pb;

use crate::support;

/// What an agent holds after a sync: the revision and incarnation of the
/// last page, whether the stream started with a snapshot, and each entry's
/// X509-SVID TTL.
#[derive(Debug, Clone)]
pub struct View {
    pub revision: u64,
    pub incarnation: String,
    pub snapshot: bool,
    pub ttls: BTreeMap<String, u64>,
}

/// Opens Sync for `agent` (resuming from `resume`'s revision, incarnation
/// and entries, as an agent does, if given) and reads until a complete
/// view satisfies `done`.
pub async fn synced(
    addr: SocketAddr,
    bundle: &oxid_pki::bundle::Bundle,
    agent: &support::Agent,
    resume: Option<&View>,
    done: impl Fn(&View) -> bool,
) -> View {
    let mut client = support::agent_api_client(
        addr,
        bundle.clone(),
        support::SERVER_ID,
        Some(agent.certs.clone()),
    )
    .await
    .unwrap();
    let request = match resume {
        Some(view) => pb::SyncRequest {
            revision: view.revision,
            known_entry_ids: view.ttls.keys().cloned().collect(),
            incarnation: view.incarnation.clone(),
        },
        None => pb::SyncRequest::default(),
    };
    let mut stream = client.sync(request).await.unwrap().into_inner();
    let mut view = resume.cloned().unwrap_or(View {
        revision: 0,
        incarnation: String::new(),
        snapshot: false,
        ttls: BTreeMap::new(),
    });
    let mut first = true;
    loop {
        let page = stream.message().await.unwrap().unwrap();
        if first {
            view.snapshot = page.snapshot;
            first = false;
        }
        if page.snapshot {
            view.ttls.clear();
        }
        view.ttls
            .extend(page.upserts.into_iter().map(|e| (e.id, e.x509_svid_ttl)));
        for id in &page.removed_ids {
            view.ttls.remove(id);
        }
        view.revision = page.revision;
        view.incarnation = page.incarnation;
        if !page.more && done(&view) {
            return view;
        }
    }
}
