//! `oxid-server entry import --format spire` (and `entry create --data` with
//! SPIRE's JSON) against a real server process: what is created, what is
//! refused or skipped and why, and that a refused entry leaves the store as
//! it was unless --partial is given. The JSON is what `spire-server entry
//! show -output json` (v1.13.3) printed; `tests/spire_interop.rs` runs the
//! same import against a live SPIRE.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use support::cli_process::Server;

/// A node entry, a workload entry under it, SPIRE's record of a join-token
/// alias, and a workload entry hanging from a SPIRE agent.
const SPIRE_ENTRIES: &str = r#"{"entries":[
 {"admin":false,"created_at":"1796288691","dns_names":[],"downstream":false,"expires_at":"0",
  "federates_with":[],"hint":"","id":"aec96ad2-6e09-4c41-829f-71605a3e6734","jwt_svid_ttl":0,
  "parent_id":{"path":"/spire/server","trust_domain":"example.org"},"revision_number":"0",
  "selectors":[{"type":"x509pop","value":"subject:cn:node-a"}],
  "spiffe_id":{"path":"/cluster/a","trust_domain":"example.org"},"store_svid":false,"x509_svid_ttl":0},
 {"admin":false,"created_at":"1796288691","dns_names":["web.local"],"downstream":false,
  "expires_at":"4102444800","federates_with":[],"hint":"web",
  "id":"f89972de-738f-4344-af87-e037b07af039","jwt_svid_ttl":300,
  "parent_id":{"path":"/cluster/a","trust_domain":"example.org"},"revision_number":"3",
  "selectors":[{"type":"unix","value":"uid:1000"}],
  "spiffe_id":{"path":"/web","trust_domain":"example.org"},"store_svid":false,"x509_svid_ttl":600},
 {"admin":false,"created_at":"1796288691","dns_names":[],"downstream":false,"expires_at":"0",
  "federates_with":[],"hint":"","id":"b2de2889-b9d3-4889-acf2-5dc5d8ca6d28","jwt_svid_ttl":0,
  "parent_id":{"path":"/spire/agent/join_token/2fd2","trust_domain":"example.org"},
  "revision_number":"0",
  "selectors":[{"type":"spiffe_id","value":"spiffe://example.org/spire/agent/join_token/2fd2"}],
  "spiffe_id":{"path":"/node/b","trust_domain":"example.org"},"store_svid":false,"x509_svid_ttl":0},
 {"admin":false,"created_at":"1796288691","dns_names":[],"downstream":false,"expires_at":"0",
  "federates_with":[],"hint":"","id":"0c4d1e6a-6f1e-4a57-9d0e-2f5f0b7e9a11","jwt_svid_ttl":0,
  "parent_id":{"path":"/spire/agent/join_token/2fd2","trust_domain":"example.org"},
  "revision_number":"0","selectors":[{"type":"unix","value":"uid:1001"}],
  "spiffe_id":{"path":"/db","trust_domain":"example.org"},"store_svid":false,"x509_svid_ttl":0}
],"next_page_token":""}"#;

const MAP_DB_PARENT: &str =
    "spiffe://example.org/spire/agent/join_token/2fd2=spiffe://example.org/node/b";

fn write(server: &Server, name: &str, text: &str) -> String {
    let path = server.dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

/// `entry import --format spire --data FILE` with the /db parent mapped,
/// then `extra`.
fn import_mapped<'a>(file: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "entry",
        "import",
        "--format",
        "spire",
        "--data",
        file,
        "--map-parent",
        MAP_DB_PARENT,
    ];
    args.extend_from_slice(extra);
    args
}

fn count(server: &Server) -> u64 {
    server.json(&["entry", "count"])["count"].as_u64().unwrap()
}

/// The report line of one entry, from pretty output on stdout or stderr.
fn line<'a>(out: &'a str, source: &str) -> &'a str {
    out.lines()
        .find(|l| l.starts_with(&format!("SPIRE entry {source} ")))
        .unwrap_or_else(|| panic!("no line for {source} in:\n{out}"))
}

#[test]
fn spire_entries_import_field_by_field_with_a_report_per_entry() {
    let server = Server::start(&[]);
    let file = write(&server, "spire.json", SPIRE_ENTRIES);
    let import = import_mapped(&file, &[]);
    let (out, err) = server.ok2(&import);
    assert!(err.is_empty(), "{err}");
    assert!(
        line(&out, "aec96ad2-6e09-4c41-829f-71605a3e6734")
            .ends_with("created as aec96ad2-6e09-4c41-829f-71605a3e6734")
    );
    assert!(out.contains(
        "note: parent spiffe://example.org/spire/server is now spiffe://example.org/oxid/server"
    ));
    let skipped = line(&out, "b2de2889-b9d3-4889-acf2-5dc5d8ca6d28");
    assert!(
        skipped.contains("skipped: SPIRE's record of a join-token alias"),
        "{skipped}"
    );
    assert!(skipped.contains("token generate --spiffe-id spiffe://example.org/node/b"));
    // /db now hangs from /node/b, which no agent is known by yet.
    assert!(
        out.contains("note: parent spiffe://example.org/node/b maps to nothing yet"),
        "{out}"
    );
    assert!(
        out.ends_with("Imported 3 of 4 entries (1 skipped, 0 refused, 0 not created)\n"),
        "{out}"
    );

    let web = server.json(&[
        "entry",
        "show",
        "--entry-id",
        "f89972de-738f-4344-af87-e037b07af039",
    ]);
    let web = &web["entries"][0];
    assert_eq!(web["spiffe_id"], "spiffe://example.org/web");
    assert_eq!(web["parent_id"], "spiffe://example.org/cluster/a");
    assert_eq!(web["selectors"], serde_json::json!(["unix:uid:1000"]));
    assert_eq!(web["dns_names"], serde_json::json!(["web.local"]));
    assert_eq!(web["hint"], "web");
    assert_eq!(
        (web["x509_svid_ttl"].as_u64(), web["jwt_svid_ttl"].as_u64()),
        (Some(600), Some(300))
    );
    assert_eq!(web["expires_at"], "2100-01-01T00:00:00Z");
    let node = server.json(&[
        "entry",
        "show",
        "--entry-id",
        "aec96ad2-6e09-4c41-829f-71605a3e6734",
    ]);
    assert_eq!(
        node["entries"][0]["parent_id"],
        "spiffe://example.org/oxid/server"
    );
    assert_eq!(count(&server), 3);

    // The same file again: every entry already exists, nothing changes.
    let out = server.cli(&import);
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        line(&err, "f89972de-738f-4344-af87-e037b07af039").contains("already exists"),
        "{err}"
    );
    assert!(
        err.ends_with("error: 3 of 4 entries were not imported\n"),
        "{err}"
    );
    assert_eq!(count(&server), 3);
}

#[test]
fn one_refused_entry_creates_nothing_unless_partial() {
    let server = Server::start(&[]);
    // The server refuses a TTL above its maximum (4 h by default): only it
    // can say so, so the dry run must ask it.
    let text = SPIRE_ENTRIES.replace(r#""x509_svid_ttl":600"#, r#""x509_svid_ttl":999999"#);
    let file = write(&server, "spire.json", &text);
    let args = import_mapped(&file, &[]);
    let out = server.cli(&args);
    assert!(!out.status.success());
    let (stdout, stderr) = (
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    );
    assert!(
        line(&stderr, "f89972de-738f-4344-af87-e037b07af039").contains("refused: x509_svid_ttl"),
        "{stderr}"
    );
    assert!(
        line(&stderr, "aec96ad2-6e09-4c41-829f-71605a3e6734")
            .contains("not created: 1 other entries failed"),
        "{stderr}"
    );
    assert!(
        stdout.contains("Imported 0 of 4 entries (1 skipped, 1 refused, 2 not created)"),
        "{stdout}"
    );
    assert!(
        stderr.ends_with("error: 3 of 4 entries were not imported\n"),
        "{stderr}"
    );
    assert_eq!(count(&server), 0);

    let (stdout, _) = server.ok2(&import_mapped(&file, &["--dry-run", "--partial"]));
    assert!(
        stdout.contains(
            "Dry run: 2 of 4 entries would be created, 1 skipped, 1 refused; nothing was written"
        ),
        "{stdout}"
    );
    assert_eq!(count(&server), 0);

    let (stdout, stderr) = server.ok2(&import_mapped(&file, &["--partial"]));
    assert!(
        stdout.contains("Imported 2 of 4 entries (1 skipped, 1 refused, 0 not created)"),
        "{stdout}"
    );
    assert!(stderr.contains("refused: x509_svid_ttl"), "{stderr}");
    assert_eq!(count(&server), 2);
}

#[test]
fn unhonoured_fields_and_unmapped_spire_agents_are_refused_with_the_fix() {
    let server = Server::start(&[]);
    let text = SPIRE_ENTRIES.replacen(r#""admin":false"#, r#""admin":true"#, 2);
    let file = write(&server, "spire.json", &text);
    let args = ["entry", "import", "--format", "spire", "--data", &file];
    let out = server.cli(&args);
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    let node = line(&stderr, "aec96ad2-6e09-4c41-829f-71605a3e6734");
    assert!(
        node.contains("admin: true cannot be honoured") && node.contains("--drop admin"),
        "{node}"
    );
    let db = line(&stderr, "0c4d1e6a-6f1e-4a57-9d0e-2f5f0b7e9a11");
    assert!(
        db.contains("is a SPIRE agent ID, which no oxid agent has: give --map-parent spiffe://example.org/spire/agent/join_token/2fd2="),
        "{db}"
    );
    assert_eq!(count(&server), 0);

    let (stdout, _) = server.ok2(
        &[
            &args[..],
            &["--drop", "admin", "--map-parent", MAP_DB_PARENT],
        ]
        .concat(),
    );
    assert!(
        stdout.contains("note: admin: true was dropped (--drop admin)"),
        "{stdout}"
    );
    assert_eq!(count(&server), 3);
    assert!(
        server
            .fails(&[&args[..], &["--drop", "hint"]].concat())
            .contains("only admin, downstream, store_svid can be dropped")
    );
    assert!(
        server
            .fails(&[&args[..], &["--map-parent", "nonsense"]].concat())
            .contains("expected OLD=NEW")
    );
}

#[test]
fn entry_create_data_recognises_spire_json() {
    let server = Server::start(&[]);
    let node_only = r#"{"entries":[{"id":"n1","parent_id":{"trust_domain":"example.org","path":"/spire/server"},
        "spiffe_id":{"trust_domain":"example.org","path":"/cluster/a"},
        "selectors":[{"type":"x509pop","value":"subject:cn:node-a"}]}]}"#;
    let file = write(&server, "node.json", node_only);
    let (stdout, _) = server.ok2(&["entry", "create", "--data", &file]);
    assert!(
        stdout.contains("SPIRE entry n1 (spiffe://example.org/cluster/a): created as n1"),
        "{stdout}"
    );
    let shown = server.json(&["entry", "show", "--entry-id", "n1"]);
    assert_eq!(
        shown["entries"][0]["parent_id"],
        "spiffe://example.org/oxid/server"
    );
    // A file that is neither form is one clear line.
    let bad = write(
        &server,
        "bad.json",
        r#"{"entries":[{"spiffe_id":{"path":"/x"}}]"#,
    );
    assert!(
        server
            .fails(&["entry", "import", "--format", "spire", "--data", &bad])
            .contains("invalid SPIRE entries file")
    );
}

#[test]
fn bundle_set_format_is_checked_and_takes_a_spiffe_id() {
    let server = Server::start(&[]);
    // The server's own bundle, in SPIFFE form, stands in for another trust
    // domain's (tests/spire_interop.rs uses SPIRE's).
    let own = server.ok(&["bundle", "show", "--format", "spiffe"]);
    let file = write(&server, "bundle.json", &own);
    let pem = write(&server, "bundle.pem", &server.ok(&["bundle", "show"]));
    assert!(
        server
            .fails(&[
                "bundle",
                "set",
                "--id",
                "spiffe://other.test",
                "--format",
                "pem",
                "--path",
                &file
            ])
            .contains("--format pem: the file is not PEM")
    );
    assert!(
        server
            .fails(&[
                "bundle",
                "set",
                "--id",
                "other.test",
                "--format",
                "spiffe",
                "--path",
                &pem
            ])
            .contains("--format spiffe: the file is not SPIFFE bundle JSON")
    );
    let set = server.ok(&[
        "bundle",
        "set",
        "--id",
        "spiffe://other.test",
        "--format",
        "spiffe",
        "--path",
        &file,
    ]);
    assert_eq!(set, "Set the federated bundle of other.test\n");
    let listed = server.json(&["bundle", "list"]);
    assert_eq!(listed["bundles"][0]["trust_domain"], "other.test");
}

#[test]
fn a_call_the_server_refuses_whole_creates_nothing() {
    let server = Server::start_with_config("max_admin_batch = 2\n", &[]);
    let file = write(&server, "spire.json", SPIRE_ENTRIES);
    let out = server.cli(&import_mapped(&file, &["--batch-size", "3"]));
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        line(&stderr, "f89972de-738f-4344-af87-e037b07af039")
            .contains("at most 2 (max_admin_batch)"),
        "{stderr}"
    );
    assert_eq!(count(&server), 0);
    // In calls the server accepts, the same file goes in whole.
    server.ok(&import_mapped(&file, &["--batch-size", "2"]));
    assert_eq!(count(&server), 3);
}
