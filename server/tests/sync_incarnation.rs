//! Revisions compare only within one incarnation of the store: an agent
//! resuming with another's (a restored backup) gets a snapshot, one of
//! this store's a delta. On sled, backed up by copying its directory while
//! the server is stopped: a restart resumes agents by a delta (the store
//! keeps its past openings), a restored copy sends a running agent the
//! copy's state, though the copy's revision has passed the agent's.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/resume.rs"]
mod resume;
mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use resume::{View, synced};
use support::cli_process::Server;

/// `cp -a from to`, as the README's backup does.
fn copy_dir(from: &Path, to: &Path) {
    let out = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_restored_sled_copy_sends_a_running_agent_a_snapshot() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let s = Server::start(&[]);
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
    let kept = s.create_id("kept", agent.id.as_str());
    let first = rt.block_on(synced(s.agent_addr(), &bundle, &agent, None, |v| {
        v.ttls.len() == 1
    }));
    assert!(first.snapshot && !first.incarnation.is_empty());

    // A matching incarnation resumes by a delta, a mismatching one (or one
    // of another history at this revision) by a snapshot, none (an older
    // agent) by the revision alone.
    let resumed = rt.block_on(synced(
        s.agent_addr(),
        &bundle,
        &agent,
        Some(&first),
        |_| true,
    ));
    assert!(!resumed.snapshot, "the same incarnation: a delta");
    let other = View {
        incarnation: "pg-1-2".into(),
        ..first.clone()
    };
    let resumed = rt.block_on(synced(
        s.agent_addr(),
        &bundle,
        &agent,
        Some(&other),
        |_| true,
    ));
    assert!(resumed.snapshot, "another incarnation: a snapshot");
    assert_eq!(resumed.ttls, first.ttls);
    let older_agent = View {
        incarnation: String::new(),
        ..first.clone()
    };
    let resumed = rt.block_on(synced(
        s.agent_addr(),
        &bundle,
        &agent,
        Some(&older_agent),
        |_| true,
    ));
    assert!(
        !resumed.snapshot,
        "no incarnation: by the revision alone, as before"
    );

    // A restart is a new opening, whose lineage holds the previous one: a
    // delta still.
    let s = Server::start_in(s.stop(), "", &[]);
    let restarted = rt.block_on(synced(
        s.agent_addr(),
        &bundle,
        &agent,
        Some(&first),
        |_| true,
    ));
    assert!(!restarted.snapshot, "a restart resumes by a delta");
    assert_ne!(restarted.incarnation, first.incarnation);
    assert_eq!(restarted.ttls, first.ttls);

    // The backup: the stopped server's data directory, copied.
    let dir = s.stop();
    let backup = tempfile::tempdir().unwrap();
    copy_dir(&dir.path().join("data"), &backup.path().join("data"));
    let s = Server::start_in(dir, "", &[]);
    s.ok(&[
        "entry",
        "update",
        "--entry-id",
        &kept,
        "--x509-svid-ttl",
        "17m",
    ]);
    let running = rt.block_on(synced(
        s.agent_addr(),
        &bundle,
        &agent,
        Some(&restarted),
        |v| v.ttls.get(&kept) == Some(&1020),
    ));

    // The restore: the copy in place of the data directory.
    let dir = s.stop();
    std::fs::remove_dir_all(dir.path().join("data")).unwrap();
    copy_dir(&backup.path().join("data"), &dir.path().join("data"));
    let s = Server::start_in(dir, "", &[]);
    // Past the agent's revision, so the revision alone would resume it by
    // a delta that keeps its 17m.
    let mut i = 0;
    while rt
        .block_on(synced(s.agent_addr(), &bundle, &agent, None, |_| true))
        .revision
        < running.revision
    {
        s.create_id(&format!("other-{i}"), "spiffe://example.org/elsewhere");
        i += 1;
    }
    let resumed = rt.block_on(synced(
        s.agent_addr(),
        &bundle,
        &agent,
        Some(&running),
        |_| true,
    ));
    assert!(
        resumed.snapshot,
        "the copy's opening is not in the agent's history"
    );
    let restored: BTreeMap<String, u64> = [(kept, 3600)].into();
    assert_eq!(
        resumed.ttls, restored,
        "the restored TTL, not the stale one"
    );
}
