//! The operator's side of the `oxid-server` binary (issue 13, "Operator
//! experience"): a real server process, driven by the real CLI and by a raw
//! admin API client over the real socket.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::io::{Read as _, Write as _};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use oxid_proto::admin as pb;

use support::cli_process::{AGENT, BIN, Server};

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// `2026-12-02T21:03:07Z` or with milliseconds.
fn is_rfc3339(v: &serde_json::Value) -> bool {
    let Some(s) = v.as_str() else { return false };
    let b = s.as_bytes();
    b.len() >= 20
        && b[4] == b'-'
        && b[10] == b'T'
        && s.ends_with('Z')
        && s[..4].bytes().all(|c| c.is_ascii_digit())
}

#[test]
fn token_generate_shows_the_token_id_and_the_agent_id() {
    let s = Server::start(&[]);
    let (out, err) = s.ok2(&["token", "generate"]);
    // The token alone on stdout, so `token generate > token` still works.
    assert_eq!(out.trim().len(), 64, "{out}");
    assert_eq!(out.lines().count(), 1, "{out}");
    let id = err
        .lines()
        .find_map(|l| l.strip_prefix("Token ID         : "))
        .unwrap_or_else(|| panic!("no token ID in {err}"));
    assert!(
        err.contains(&format!(
            "Agent SPIFFE ID  : spiffe://example.org/oxid/agent/join_token/{id}"
        )),
        "{err}"
    );
    assert!(err.contains("Expires at       : 20"), "{err}");

    let t = s.json(&["token", "generate"]);
    let id = t["id"].as_str().unwrap();
    assert_eq!(
        t["agent_id"],
        format!("spiffe://example.org/oxid/agent/join_token/{id}")
    );
    assert!(is_rfc3339(&t["expires_at"]), "{t}");
}

#[test]
fn selectors_are_checked_for_meaning_and_unknown_types_need_the_flag() {
    let s = Server::start(&[]);
    let create = |sel: &str, extra: &[&str]| {
        let mut a = vec![
            "entry",
            "create",
            "--spiffe-id",
            "spiffe://example.org/w",
            "--parent-id",
            AGENT,
            "--selector",
            "unix:uid:1000",
            "--selector",
            sel,
        ];
        a.extend_from_slice(extra);
        a.into_iter().map(str::to_owned).collect::<Vec<_>>()
    };
    for (bad, why) in [
        ("unix:gid:staff", "decimal"),
        ("unix:uid:4294967296", "decimal"),
        ("unix:sha256:abc", "64 lowercase hex"),
        ("unix:path:bin/app", "absolute"),
        ("unix:pid:1", "unix keys are"),
        ("x509pop:san:uri:x", "x509pop keys are"),
    ] {
        let err = s.fails(&strs(&create(bad, &[])));
        assert!(err.contains(why), "{bad}: {err}");
    }
    let err = s.fails(&strs(&create("k8s:ns:default", &[])));
    assert!(
        err.contains("known types: unix, x509pop")
            && err.contains("--allow-unknown-selector-type")
            && !err.contains("admin API"),
        "{err}"
    );
    let created = s.json(&strs(&create(
        "k8s:ns:default",
        &["--allow-unknown-selector-type"],
    )));
    let id = created["results"][0]["id"].as_str().unwrap().to_owned();
    // The flag lets an unknown type through, never an impossible known one.
    let err = s.fails(&strs(&create(
        "unix:uid:x",
        &["--allow-unknown-selector-type"],
    )));
    assert!(err.contains("decimal"), "{err}");
    // Update follows the same rule.
    let update = |extra: &[&str]| {
        let mut a = vec![
            "entry",
            "update",
            "--entry-id",
            &id,
            "--selector",
            "unix:uid:1000",
            "--selector",
            "docker:label:x",
        ];
        a.extend_from_slice(extra);
        a.into_iter().map(str::to_owned).collect::<Vec<_>>()
    };
    let err = s.fails(&strs(&update(&[])));
    assert!(err.contains("known types"), "{err}");
    s.ok(&strs(&update(&["--allow-unknown-selector-type"])));
}

#[test]
fn the_admin_api_refuses_a_bad_selector_with_invalid_argument() {
    let s = Server::start(&[]);
    runtime().block_on(async {
        let mut admin = s.admin().await;
        let entry = |sel: &str| pb::Entry {
            spiffe_id: "spiffe://example.org/grpc".into(),
            parent_id: AGENT.into(),
            selectors: vec!["unix:uid:1".into(), sel.into()],
            ..Default::default()
        };
        // Creating: refused entry by entry, with the reason.
        let r = admin
            .create_entries(pb::CreateEntriesRequest {
                entries: vec![entry("k8s:ns:a"), entry("unix:sha256:XYZ")],
                allow_exe_only: false,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(r.results[0].error.contains("known types"), "{r:?}");
        assert!(r.results[1].error.contains("SHA-256"), "{r:?}");
        let good = admin
            .create_entries(pb::CreateEntriesRequest {
                entries: vec![entry("unix:gid:1")],
                allow_exe_only: false,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let id = good.results[0].id.clone();
        // Updating: the call's status.
        for bad in ["k8s:ns:a", "unix:uid:-1", "unix:path:rel"] {
            let mut e = entry(bad);
            e.id.clone_from(&id);
            let err = admin
                .update_entry(pb::UpdateEntryRequest {
                    entry: Some(e),
                    ..Default::default()
                })
                .await
                .unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{bad}: {err:?}");
            assert!(err.message().contains(bad), "{bad}: {err:?}");
        }
        let mut e = entry("k8s:ns:a");
        e.id.clone_from(&id);
        let err = admin
            .update_entry(pb::UpdateEntryRequest {
                entry: Some(e),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert!(
            err.message().contains("known types: unix, x509pop")
                && err
                    .message()
                    .contains("oxid-allow-unknown-selector-type: true"),
            "{err:?}"
        );
        // The metadata flag, and only `true` or `false` in it.
        let mut e = entry("k8s:ns:a");
        e.id.clone_from(&id);
        let mut req = tonic::Request::new(pb::UpdateEntryRequest {
            entry: Some(e.clone()),
            ..Default::default()
        });
        req.metadata_mut()
            .insert("oxid-allow-unknown-selector-type", "true".parse().unwrap());
        admin.update_entry(req).await.unwrap();
        let mut req = tonic::Request::new(pb::UpdateEntryRequest {
            entry: Some(e),
            ..Default::default()
        });
        req.metadata_mut()
            .insert("oxid-allow-unknown-selector-type", "yes".parse().unwrap());
        let err = admin.update_entry(req).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        // An expiry in the past is refused by the server too.
        let mut e = entry("unix:gid:2");
        e.expires_at = 1;
        let r = admin
            .create_entries(pb::CreateEntriesRequest {
                entries: vec![e],
                allow_exe_only: false,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(r.results[0].error.contains("not in the future"), "{r:?}");
    });
}

#[test]
fn expires_at_takes_rfc3339_or_unix_seconds_and_refuses_the_past() {
    let s = Server::start(&[]);
    let e = s.create(
        "spiffe://example.org/a",
        &[
            "--selector",
            "unix:uid:1",
            "--expires-at",
            "2999-01-01T00:00:00Z",
        ],
    );
    assert_eq!(e["expires_at"], "2999-01-01T00:00:00Z", "{e}");
    let e = s.create(
        "spiffe://example.org/b",
        &[
            "--selector",
            "unix:uid:1",
            "--expires-at",
            "2999-01-01T01:00:00+01:00",
        ],
    );
    assert_eq!(e["expires_at"], "2999-01-01T00:00:00Z", "{e}");
    let e = s.create(
        "spiffe://example.org/c",
        &["--selector", "unix:uid:1", "--expires-at", "32472144000"],
    );
    assert_eq!(e["expires_at"], "2999-01-01T00:00:00Z", "{e}");
    for past in ["2020-01-01T00:00:00Z", "1", "0"] {
        let err = s.fails(&[
            "entry",
            "create",
            "--spiffe-id",
            "spiffe://example.org/d",
            "--parent-id",
            AGENT,
            "--selector",
            "unix:uid:1",
            "--expires-at",
            past,
        ]);
        assert!(err.contains("not in the future"), "{past}: {err}");
    }
    let err = s.fails(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/d",
        "--parent-id",
        AGENT,
        "--selector",
        "unix:uid:1",
        "--expires-at",
        "next week",
    ]);
    assert!(err.contains("RFC 3339"), "{err}");
}

#[test]
fn times_are_rfc3339_and_pretty_shows_what_json_shows() {
    let s = Server::start(&[]);
    let e = s.create(
        "spiffe://example.org/t",
        &[
            "--selector",
            "unix:uid:1",
            "--expires-at",
            "2999-01-01T00:00:00Z",
        ],
    );
    assert!(is_rfc3339(&e["created_at"]), "{e}");
    let id = e["id"].as_str().unwrap();
    let pretty = s.ok(&["entry", "show", "--entry-id", id]);
    assert!(
        pretty.contains("Expires at       : 2999-01-01T00:00:00Z")
            && pretty.contains("Created at       : 20"),
        "{pretty}"
    );

    let rt = runtime();
    let t = s.json(&["token", "generate"]);
    let addr = s.ready_field("agent_api").parse().unwrap();
    let td = oxid_pki::TrustDomain::new("example.org").unwrap();
    let bundle_json = s.ok(&["bundle", "show", "--format", "spiffe"]);
    let bundle = oxid_pki::bundle::Bundle::from_spiffe_json(td, bundle_json.as_bytes()).unwrap();
    let agent = rt.block_on(async {
        let client = support::agent_api_client(addr, bundle, support::SERVER_ID, None)
            .await
            .unwrap();
        support::attest_token_with(client, t["token"].as_str().unwrap(), |csr| csr)
            .await
            .unwrap()
    });
    let agent_id = agent.id.to_string();
    let json = s.json(&["agent", "show", "--spiffe-id", &agent_id]);
    assert!(is_rfc3339(&json["expires_at"]), "{json}");
    let pretty = s.ok(&["agent", "show", "--spiffe-id", &agent_id]);
    let serial = json["serial"].as_str().unwrap();
    assert!(!serial.is_empty());
    for shown in [
        format!("SPIFFE ID        : {agent_id}"),
        "Attestation type : join_token".to_owned(),
        format!("Serial           : {serial}"),
        format!(
            "Expires at       : {}",
            json["expires_at"].as_str().unwrap()
        ),
        "Banned           : false".to_owned(),
    ] {
        assert!(pretty.contains(&shown), "{shown} not in {pretty}");
    }
    let list = s.json(&["agent", "list"]);
    assert!(is_rfc3339(&list["agents"][0]["expires_at"]), "{list}");

    let ca = s.json(&["ca", "show"]);
    let a = &ca["authorities"][0];
    assert!(
        is_rfc3339(&a["not_before"]) && is_rfc3339(&a["not_after"]),
        "{ca}"
    );
    assert!(s.ok(&["ca", "show"]).contains("not_after=20"));

    let jwt = s.json(&[
        "jwt",
        "mint",
        "--spiffe-id",
        "spiffe://example.org/j",
        "--audience",
        "a",
    ]);
    assert!(is_rfc3339(&jwt["expires_at"]), "{jwt}");
    let x509 = s.json(&["x509", "mint", "--spiffe-id", "spiffe://example.org/x"]);
    assert!(is_rfc3339(&x509["expires_at"]), "{x509}");

    // Evicting says what it did, naming the agent.
    let out = s.ok(&["agent", "evict", "--spiffe-id", &agent_id]);
    assert!(
        out.starts_with(&format!("Evicted agent {agent_id}: ")),
        "{out}"
    );
}

#[test]
fn bundle_show_output_json_is_json() {
    let s = Server::start(&[]);
    for format in ["pem", "spiffe"] {
        let b = s.json(&["bundle", "show", "--format", format]);
        assert!(b["spiffe_bundle"]["keys"].is_array(), "{b}");
        assert!(
            b["x509_authorities_pem"]
                .as_str()
                .unwrap()
                .starts_with("-----BEGIN CERTIFICATE-----"),
            "{b}"
        );
    }
    // Pretty output is unchanged: PEM by default.
    assert!(
        s.ok(&["bundle", "show"])
            .starts_with("-----BEGIN CERTIFICATE-----")
    );
}

#[test]
fn commands_that_change_state_say_what_they_did() {
    let s = Server::start(&[]);
    let out = s.ok(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/s",
        "--parent-id",
        AGENT,
        "--selector",
        "unix:uid:1",
    ]);
    let id = out
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("Created entry "))
        .unwrap_or_else(|| panic!("{out}"))
        .to_owned();
    let out = s.ok(&["entry", "delete", "--entry-id", &id]);
    assert!(out.starts_with(&format!("Deleted entry {id}\n")), "{out}");

    let dir = tempfile::tempdir().unwrap();
    let pem = s.ok(&["bundle", "show"]);
    let path = dir.path().join("b.pem");
    std::fs::write(&path, pem).unwrap();
    let out = s.ok(&[
        "bundle",
        "set",
        "--id",
        "other.org",
        "--path",
        path.to_str().unwrap(),
    ]);
    assert_eq!(out, "Set the federated bundle of other.org\n");
    let out = s.ok(&["bundle", "delete", "--id", "other.org"]);
    assert_eq!(out, "Deleted the federated bundle of other.org\n");

    let out = s.ok(&["ca", "rotate", "--prepare"]);
    assert!(out.starts_with("Prepared authority 2: "), "{out}");
    let out = s.ok(&["ca", "rotate", "--activate"]);
    assert!(out.starts_with("Activated authority 2: "), "{out}");
}

#[test]
fn ca_rotate_taint_says_it_only_records_the_taint() {
    let s = Server::start(&[]);
    let help = s.ok(&["ca", "rotate", "--help"]);
    let flat = help.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(
        flat.contains("stays in the bundle") && flat.contains("stay valid until they expire"),
        "{help}"
    );
    s.ok(&["ca", "rotate", "--prepare"]);
    s.ok(&["ca", "rotate", "--activate"]);
    let out = s.ok(&["ca", "rotate", "--taint", "1"]);
    let first = out.lines().next().unwrap();
    assert!(
        first.starts_with("Tainted authority 1: the taint is recorded")
            && first.contains("stays in the trust bundle")
            && first.contains("stay valid until they expire"),
        "{out}"
    );
    assert!(out.contains("authority 1: old (tainted)"), "{out}");
    // As said: the tainted authority is still in the bundle.
    let b = s.json(&["bundle", "show"]);
    let x509 = b["spiffe_bundle"]["keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["use"] == "x509-svid")
        .count();
    assert_eq!(x509, 2, "{b}");
    let j = s.json(&["ca", "rotate", "--taint", "1"]);
    assert_eq!(
        (j["step"].as_str(), j["sequence"].as_u64()),
        (Some("taint"), Some(1))
    );
    assert!(
        j["result"].as_str().unwrap().contains("Nothing is revoked"),
        "{j}"
    );
}

#[test]
fn entry_update_changes_only_the_flags_given_or_replaces_the_whole_entry() {
    let s = Server::start(&[]);
    let help = s.ok(&["entry", "update", "--help"]);
    let flat = help.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(
        flat.contains("the whole entry is replaced")
            && flat.contains("only the flags given change"),
        "{help}"
    );
    let e = s.create(
        "spiffe://example.org/u",
        &[
            "--selector",
            "unix:uid:1",
            "--hint",
            "keep me",
            "--dns-name",
            "u.example.org",
        ],
    );
    let id = e["id"].as_str().unwrap().to_owned();
    // Partial: only the TTL changes.
    let out = s.ok(&[
        "entry",
        "update",
        "--entry-id",
        &id,
        "--x509-svid-ttl",
        "1h",
    ]);
    assert!(
        out.starts_with(&format!(
            "Updated entry {id} (changed --x509-svid-ttl; the rest is kept)"
        )),
        "{out}"
    );
    let shown = &s.json(&["entry", "show", "--entry-id", &id])["entries"][0];
    assert_eq!(shown["x509_svid_ttl"], 3600);
    assert_eq!(shown["hint"], "keep me");
    assert_eq!(shown["dns_names"][0], "u.example.org");
    assert_eq!(shown["selectors"][0], "unix:uid:1");
    // Errors name the flags, not the API's fields.
    let err = s.fails(&[
        "entry",
        "update",
        "--entry-id",
        &id,
        "--jwt-svid-ttl",
        "999h",
    ]);
    assert!(
        err.contains("--jwt-svid-ttl") && !err.contains("jwt_svid_ttl"),
        "{err}"
    );
    let err = s.fails(&["entry", "update", "--entry-id", &id]);
    assert!(err.contains("nothing to change"), "{err}");
    // Concurrent partial updates of different fields: none is lost.
    let flags: [&[&str]; 4] = [
        &["--hint", "h2"],
        &["--jwt-svid-ttl", "90s"],
        &["--dns-name", "v.example.org"],
        &["--x509-svid-ttl", "2h"],
    ];
    let socket = s.socket();
    let children: Vec<Child> = flags
        .iter()
        .map(|f| {
            Command::new(BIN)
                .args(["entry", "update", "--entry-id", &id])
                .args(*f)
                .arg("--socket-path")
                .arg(&socket)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for mut c in children {
        let status = c.wait().unwrap();
        let mut err = String::new();
        c.stderr.take().unwrap().read_to_string(&mut err).unwrap();
        assert!(status.success(), "{err}");
    }
    let shown = &s.json(&["entry", "show", "--entry-id", &id])["entries"][0];
    assert_eq!(shown["hint"], "h2", "{shown}");
    assert_eq!(shown["jwt_svid_ttl"], 90, "{shown}");
    assert_eq!(shown["dns_names"], serde_json::json!(["v.example.org"]));
    assert_eq!(shown["x509_svid_ttl"], 7200, "{shown}");
    // Whole replacement: the three identifying flags; the rest reset.
    let out = s.ok(&[
        "entry",
        "update",
        "--entry-id",
        &id,
        "--spiffe-id",
        "spiffe://example.org/u2",
        "--parent-id",
        AGENT,
        "--selector",
        "unix:uid:2",
    ]);
    assert!(
        out.starts_with(&format!("Replaced entry {id} (the whole entry")),
        "{out}"
    );
    let shown = &s.json(&["entry", "show", "--entry-id", &id])["entries"][0];
    assert_eq!(shown["hint"], "");
    assert_eq!(shown["x509_svid_ttl"], 0);
    assert_eq!(shown["dns_names"], serde_json::json!([]));
}

#[test]
fn entry_create_data_takes_durations_like_the_flags() {
    let s = Server::start(&[]);
    let batch = serde_json::json!({"entries": [
        {"spiffe_id": "spiffe://example.org/d1", "parent_id": AGENT, "selectors": ["unix:uid:1"],
         "x509_svid_ttl": "1h", "jwt_svid_ttl": "90s", "expires_at": "2999-01-01T00:00:00Z"},
        {"spiffe_id": "spiffe://example.org/d2", "parent_id": AGENT, "selectors": ["unix:uid:2"],
         "x509_svid_ttl": 600},
    ]});
    let mut child = Command::new(BIN)
        .args([
            "entry",
            "create",
            "--data",
            "-",
            "--output",
            "json",
            "--socket-path",
        ])
        .arg(s.socket())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(batch.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let e = &r["results"][0]["entry"];
    assert_eq!(
        (&e["x509_svid_ttl"], &e["jwt_svid_ttl"]),
        (&3600.into(), &90.into())
    );
    assert_eq!(e["expires_at"], "2999-01-01T00:00:00Z");
    assert_eq!(r["results"][1]["entry"]["x509_svid_ttl"], 600);
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.json");
    std::fs::write(
        &bad,
        r#"{"entries":[{"spiffe_id":"spiffe://example.org/d3","parent_id":"x","selectors":[],
            "x509_svid_ttl":"an hour"}]}"#,
    )
    .unwrap();
    let err = s.fails(&["entry", "create", "--data", bad.to_str().unwrap()]);
    assert!(err.contains("an hour"), "{err}");
}

#[test]
fn run_takes_metrics_address() {
    let s = Server::start(&["--metrics-address", "127.0.0.1:0"]);
    let addr = s.ready_field("metrics");
    assert_ne!(addr, "off", "--metrics-address was not applied");
    let mut conn = std::net::TcpStream::connect(&addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    conn.write_all(b"GET /live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut reply = String::new();
    conn.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
}

#[test]
fn entry_count_and_show_work_past_the_4_mib_grpc_default() {
    let server = Server::start(&[]);
    // 5,000 entries with 1 KiB hints: a 5 MiB ListEntries answer, which the
    // CLI refused with "decoded message length too large" before.
    runtime().block_on(async {
        let mut admin = server.admin().await;
        for batch in 0..5 {
            let entries = (0..1000)
                .map(|i| pb::Entry {
                    spiffe_id: format!("spiffe://example.org/big/{batch}/{i}"),
                    parent_id: AGENT.into(),
                    selectors: vec![format!("unix:uid:{}", 1000 + batch * 1000 + i)],
                    hint: "h".repeat(1000),
                    ..Default::default()
                })
                .collect();
            let r = admin
                .create_entries(pb::CreateEntriesRequest {
                    entries,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            assert!(r.results.iter().all(|r| r.error.is_empty()));
        }
    });
    assert_eq!(server.json(&["entry", "count"])["count"], 5000);
    let shown = server.json(&["entry", "show"]);
    assert_eq!(shown["entries"].as_array().unwrap().len(), 5000);
}
