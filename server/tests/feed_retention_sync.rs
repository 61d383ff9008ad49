//! The server prunes its change feed on its own (`change_retention`, at
//! its 1m floor here, so this test takes over a minute), and an agent
//! resuming from a revision the feed no longer holds ends with exactly the
//! table: agent sync resumes against the entry index, never the feed.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/resume.rs"]
mod resume;
mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use resume::synced;
use support::cli_process::Server;

/// Waits for the INFO line of a prune that went past `revision`; the
/// revision it pruned up to, and how many changes the server's prunes
/// removed up to then.
fn pruned_past(s: &Server, revision: u64) -> (u64, u64) {
    let deadline = Instant::now() + Duration::from_secs(150);
    loop {
        let prunes: Vec<(u64, u64)> = s
            .log()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|l| {
                l["fields"]["message"]
                    == "pruned the change feed of changes older than the retention"
            })
            .map(|l| {
                let field = |f: &str| l["fields"][f].as_u64().unwrap();
                (field("up_to"), field("removed"))
            })
            .collect();
        if let Some((up_to, _)) = prunes.last().filter(|(up_to, _)| *up_to > revision) {
            return (*up_to, prunes.iter().map(|(_, removed)| removed).sum());
        }
        assert!(
            Instant::now() < deadline,
            "no prune past {revision}: {prunes:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn an_agent_resuming_from_a_pruned_revision_ends_with_the_table() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let s = Server::start_with_config("change_retention = \"1m\"\n", &[]);
    let bundle = s.spiffe_bundle();
    let token = s.json(&["token", "generate"]);
    let agent = rt.block_on(async {
        let client =
            support::agent_api_client(s.agent_addr(), bundle.clone(), support::SERVER_ID, None)
                .await
                .unwrap();
        support::attest_token_with(client, token["token"].as_str().unwrap(), |c| c)
            .await
            .unwrap()
    });
    let parent = agent.id.to_string();
    let [changed, gone, kept] = ["changed", "gone", "kept"].map(|n| s.create_id(n, &parent));
    let old = rt.block_on(synced(s.agent_addr(), &bundle, &agent, None, |v| {
        v.ttls.len() == 3
    }));

    s.ok(&[
        "entry",
        "update",
        "--entry-id",
        &changed,
        "--x509-svid-ttl",
        "17m",
    ]);
    s.ok(&["entry", "delete", "--entry-id", &gone]);
    let added = s.create_id("added", &parent);
    // The changes since the agent's view were committed after it: once a
    // prune has passed the current revision, the feed no longer holds them.
    let now = rt.block_on(synced(s.agent_addr(), &bundle, &agent, None, |v| {
        v.ttls.len() == 3 && v.ttls.contains_key(&added)
    }));
    assert!(now.revision > old.revision);
    let (up_to, removed) = pruned_past(&s, now.revision - 1);
    assert_eq!(removed, up_to, "every change up to the mark, each once");

    let resumed = rt.block_on(synced(s.agent_addr(), &bundle, &agent, Some(&old), |_| {
        true
    }));
    let table: BTreeMap<String, u64> = [(changed, 1020), (kept, 3600), (added, 3600)].into();
    assert_eq!(resumed.ttls, table);
    assert_eq!(resumed.revision, now.revision);
}
