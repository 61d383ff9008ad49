//! Monitoring, with the real binaries as processes: every metric the server
//! and the agent serve moves when the thing it counts happens, scraped over
//! HTTP from their `/metrics`; `promtool` accepts what they serve, the alert
//! rules, and the rule tests that fire each alert; and every metric the
//! Grafana dashboard and the alerts query exists on a live `/metrics`.
//!
//! `promtool` comes from Debian's `prometheus` package (scripts/test
//! installs it); without it these tests fail and say so.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "monitoring/live.rs"]
mod live;

use std::collections::BTreeSet;

use oxid_e2e::{bin, run};

use crate::live::{Live, Scrape, attestation_refused, get, now_secs, promtool_run, repo, until};

/// An attested agent: counted by the server, connected and current (its
/// sync age 0, not the -1 it was stuck at), ready. Evicted: the server
/// stops counting it and refuses its calls by code name, and the agent's
/// view ages.
#[tokio::test(flavor = "multi_thread")]
async fn agents_and_the_sync_age_follow_attestation_and_eviction() {
    let live = Live::start().await;
    let (srv, agt) = (live.server_metrics, live.agent_metrics);
    let s = until(srv, "the server counts the agent", |s| {
        s.get("oxid_agents", &[]) == Some(1.0)
    })
    .await;
    assert_eq!(s.value("oxid_server_ready", &[]), 1.0);
    let a = until(agt, "the agent syncs", |a| {
        a.get("oxid_agent_server_connected", &[]) == Some(1.0)
            && a.get("oxid_agent_ready", &[]) == Some(1.0)
    })
    .await;
    let age = a.value("oxid_agent_sync_age_seconds", &[]);
    assert!((0.0..1.0).contains(&age), "sync age {age}");

    live.server
        .cli(&["agent", "evict", "--spiffe-id", &live.agent_id])
        .await;
    until(srv, "the server drops the agent", |s| {
        s.get("oxid_agents", &[]) == Some(0.0)
    })
    .await;
    let a = until(agt, "the agent's view ages", |a| {
        a.get("oxid_agent_server_connected", &[]) == Some(0.0)
            && a.value("oxid_agent_sync_age_seconds", &[]) > 0.0
    })
    .await;
    assert_eq!(a.value("oxid_agent_ready", &[]), 0.0);
    let first = a.value("oxid_agent_sync_age_seconds", &[]);
    let a = until(agt, "the sync age grows", |a| {
        a.value("oxid_agent_sync_age_seconds", &[]) >= first + 0.2
    })
    .await;
    assert!(a.value("oxid_agent_sync_age_seconds", &[]) < 60.0);
    until(srv, "the server refuses the evicted agent", |s| {
        s.get(
            "oxid_rpc_requests_total",
            &[("api", "agent"), ("code", "PermissionDenied")],
        )
        .is_some_and(|n| n >= 1.0)
    })
    .await;
}

/// An entry: stored (entries, revision), synced, signed (X509-SVIDs
/// signed), held (SVIDs cached, soonest expiry), rotated; then a JWT-SVID
/// for a workload, minted (JWT-SVIDs signed: it stayed 0) and cached, each
/// call counted with its latency on both sides.
#[tokio::test(flavor = "multi_thread")]
async fn signing_counts_entries_svids_rotations_and_jwt_svids() {
    let live = Live::start().await;
    let (srv, agt) = (live.server_metrics, live.agent_metrics);
    let s = until(srv, "the server counts the agent", |s| {
        s.get("oxid_agents", &[]) == Some(1.0)
    })
    .await;
    assert_eq!(s.value("oxid_entries", &[]), 0.0);
    let x509_before = s.value("oxid_svids_signed_total", &[("kind", "x509")]);
    assert_eq!(s.value("oxid_svids_signed_total", &[("kind", "jwt")]), 0.0);
    let revision = s.value("oxid_store_revision", &[]);
    let a = Scrape::of(agt).await;
    assert_eq!(a.value("oxid_agent_entries", &[]), 0.0);
    assert_eq!(a.value("oxid_agent_svid_min_remaining_seconds", &[]), -1.0);

    // The SVID lives 6 s, so it is rotated within about 4.
    live.entry("6s").await;
    let s = until(srv, "the server counts the entry and signs", |s| {
        s.get("oxid_entries", &[]) == Some(1.0)
            && s.value("oxid_svids_signed_total", &[("kind", "x509")]) > x509_before
    })
    .await;
    assert!(s.value("oxid_store_revision", &[]) > revision);
    let sign = [
        ("api", "agent"),
        ("method", "SignX509Svids"),
        ("code", "OK"),
    ];
    assert!(s.value("oxid_rpc_requests_total", &sign) >= 1.0);
    let a = until(agt, "the agent holds the SVID", |a| {
        a.get("oxid_agent_svids_cached", &[]) == Some(1.0)
    })
    .await;
    assert_eq!(a.value("oxid_agent_entries", &[]), 1.0);
    let remaining = a.value("oxid_agent_svid_min_remaining_seconds", &[]);
    assert!(remaining > 0.0 && remaining <= 6.0, "remaining {remaining}");
    let a = until(agt, "the agent rotates the SVID", |a| {
        a.value("oxid_agent_svid_rotations_total", &[]) >= 1.0
    })
    .await;
    assert_eq!(a.value("oxid_agent_svids_past_rotation", &[]), 0.0);

    let (code, err) = live
        .api(&["fetch", "jwt", "--audience", "monitoring"])
        .await;
    assert_eq!(code, 0, "{err}");
    let s = until(srv, "the server counts the JWT-SVID", |s| {
        s.value("oxid_svids_signed_total", &[("kind", "jwt")]) == 1.0
    })
    .await;
    let mint = [("api", "agent"), ("method", "MintJwtSvid")];
    let ok = [mint[0], mint[1], ("code", "OK")];
    assert_eq!(s.value("oxid_rpc_requests_total", &ok), 1.0);
    assert_eq!(s.value("oxid_rpc_duration_seconds_count", &mint), 1.0);
    let inf = [mint[0], mint[1], ("le", "+Inf")];
    assert_eq!(s.value("oxid_rpc_duration_seconds_bucket", &inf), 1.0);
    let a = Scrape::of(agt).await;
    assert_eq!(a.value("oxid_agent_jwt_svids_cached", &[]), 1.0);
    let fetch = [("api", "workload"), ("method", "FetchJWTSVID")];
    let ok = [fetch[0], fetch[1], ("code", "OK")];
    assert_eq!(a.value("oxid_rpc_requests_total", &ok), 1.0);
    assert_eq!(a.value("oxid_rpc_duration_seconds_count", &fetch), 1.0);
}

/// Refusals, counted under their gRPC code's name: an admin call for an
/// unknown agent (NotFound); a workload whose process is gone by the time
/// it calls (an attestation failure, PermissionDenied); a workload asking
/// after its entry left (PermissionDenied), once the agent has dropped the
/// entry and its SVID.
#[tokio::test(flavor = "multi_thread")]
async fn refusals_are_counted_by_code_name() {
    let live = Live::start().await;
    let (srv, agt) = (live.server_metrics, live.agent_metrics);
    let admin = live.server.admin_socket.display().to_string();
    let unknown = "spiffe://example.org/oxid/agent/join_token/none";
    let args = [
        "agent",
        "show",
        "--spiffe-id",
        unknown,
        "--socket-path",
        &admin,
    ];
    let (code, _, _) = run(&bin("oxid-server"), &args).await;
    assert_ne!(code, 0);
    let s = Scrape::of(srv).await;
    let not_found = [("api", "admin"), ("code", "NotFound")];
    assert_eq!(s.value("oxid_rpc_requests_total", &not_found), 1.0);

    let entry = live.entry("1h").await;
    until(agt, "the agent holds the SVID", |a| {
        a.get("oxid_agent_svids_cached", &[]) == Some(1.0)
    })
    .await;
    let (code, msg) = attestation_refused(&live).await;
    assert_eq!(code, tonic::Code::PermissionDenied, "{msg}");
    let a = Scrape::of(agt).await;
    assert_eq!(a.value("oxid_agent_attestation_failures_total", &[]), 1.0);
    let denied = [
        ("api", "workload"),
        ("method", "FetchX509SVID"),
        ("code", "PermissionDenied"),
    ];
    let denied_before = a.value("oxid_rpc_requests_total", &denied);

    live.server
        .cli(&["entry", "delete", "--entry-id", &entry])
        .await;
    until(srv, "the server counts the deletion", |s| {
        s.get("oxid_entries", &[]) == Some(0.0)
    })
    .await;
    until(agt, "the agent drops the entry", |a| {
        a.get("oxid_agent_entries", &[]) == Some(0.0)
            && a.get("oxid_agent_svids_cached", &[]) == Some(0.0)
            && a.get("oxid_agent_svid_min_remaining_seconds", &[]) == Some(-1.0)
    })
    .await;
    let (code, _) = live.api(&["fetch", "x509"]).await;
    assert_ne!(code, 0);
    let a = Scrape::of(agt).await;
    assert_eq!(
        a.value("oxid_rpc_requests_total", &denied),
        denied_before + 1.0
    );
}

/// The CA gauges follow the authorities: the active one valid now and for
/// the CA's TTL; a prepared one appears, then takes over and the first
/// becomes old.
#[tokio::test(flavor = "multi_thread")]
async fn ca_gauges_follow_rotation() {
    let live = Live::start().await;
    let srv = live.server_metrics;
    let s = Scrape::of(srv).await;
    let active = [("state", "active")];
    let not_after = s.value("oxid_ca_not_after_seconds", &active);
    let not_before = s.value("oxid_ca_not_before_seconds", &active);
    assert!(not_before <= now_secs() && not_after > now_secs() + 5.0 * 3600.0);
    assert!(
        s.get("oxid_ca_not_after_seconds", &[("state", "prepared")])
            .is_none()
    );
    live.server.cli(&["ca", "rotate", "--prepare"]).await;
    let s = Scrape::of(srv).await;
    let prepared = [("state", "prepared")];
    let sequence = s.samples.iter().find_map(|(n, l, _)| {
        (n == "oxid_ca_not_after_seconds" && l.get("state").map(String::as_str) == Some("prepared"))
            .then(|| l["sequence"].clone())
    });
    let sequence = sequence.unwrap_or_else(|| panic!("no prepared authority in\n{}", s.text));
    assert!(s.value("oxid_ca_not_after_seconds", &prepared) >= not_after);
    live.server.cli(&["ca", "rotate", "--activate"]).await;
    let s = Scrape::of(srv).await;
    let now_active = [("state", "active"), ("sequence", sequence.as_str())];
    assert!(s.value("oxid_ca_not_before_seconds", &now_active) >= not_before);
    assert_eq!(
        s.value("oxid_ca_not_after_seconds", &[("state", "old")]),
        not_after
    );
}

/// A live server's and agent's scrapes, once the agent holds an SVID and
/// a JWT-SVID (so every family has samples).
async fn live_scrapes() -> (Live, Scrape, Scrape) {
    let live = Live::start().await;
    live.entry("1h").await;
    until(live.agent_metrics, "the agent holds the SVID", |a| {
        a.get("oxid_agent_svids_cached", &[]) == Some(1.0)
    })
    .await;
    let (code, err) = live
        .api(&["fetch", "jwt", "--audience", "monitoring"])
        .await;
    assert_eq!(code, 0, "{err}");
    let server = Scrape::of(live.server_metrics).await;
    let agent = Scrape::of(live.agent_metrics).await;
    (live, server, agent)
}

#[tokio::test(flavor = "multi_thread")]
async fn promtool_accepts_the_metrics_the_rules_and_their_tests() {
    let (live, server, agent) = live_scrapes().await;
    for (who, scrape) in [("server", &server), ("agent", &agent)] {
        let (code, out) = promtool_run(&["check", "metrics"], &scrape.text).await;
        assert_eq!(
            code, 0,
            "promtool check metrics on the {who}'s /metrics:\n{out}\n{}",
            scrape.text
        );
    }
    // A scraper that asks for OpenMetrics (as Prometheus does) gets it.
    for address in [live.server_metrics, live.agent_metrics] {
        let om = get(
            address,
            "/metrics",
            Some("application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"),
        )
        .await;
        assert_eq!(
            om.content_type,
            "application/openmetrics-text; version=1.0.0; charset=utf-8"
        );
        assert!(om.body.ends_with("# EOF\n"), "{}", om.body);
        assert!(
            om.body.contains("# TYPE oxid_rpc_requests counter"),
            "{}",
            om.body
        );
    }
    let (code, out) = promtool_run(&["check", "rules", "deploy/prometheus/alerts.yml"], "").await;
    assert_eq!(code, 0, "promtool check rules:\n{out}");
    let (code, out) =
        promtool_run(&["test", "rules", "deploy/prometheus/alerts_test.yml"], "").await;
    assert_eq!(code, 0, "promtool test rules:\n{out}");
    let (code, out) =
        promtool_run(&["check", "config", "deploy/prometheus/prometheus.yml"], "").await;
    assert_eq!(code, 0, "promtool check config:\n{out}");

    // Each alert has a test case in which it fires.
    let alerts = std::fs::read_to_string(repo().join("deploy/prometheus/alerts.yml")).unwrap();
    let tests = std::fs::read_to_string(repo().join("deploy/prometheus/alerts_test.yml")).unwrap();
    let lines: Vec<&str> = tests.lines().map(str::trim).collect();
    for name in alerts
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
    {
        let fires = lines
            .windows(2)
            .any(|w| w[0] == format!("alertname: {name}") && w[1] == "exp_alerts:");
        assert!(fires, "no test case in alerts_test.yml fires {name}");
    }
}

/// Every PromQL expression of the dashboard.
fn dashboard_exprs() -> Vec<String> {
    let text = std::fs::read_to_string(repo().join("deploy/grafana/oxid-dashboard.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert!(dashboard["uid"].is_string() && dashboard["title"].is_string());
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        if panel["type"] == "row" {
            continue;
        }
        assert!(panel["gridPos"]["w"].as_u64().is_some(), "{panel}");
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{panel}");
        for t in targets {
            exprs.push(t["expr"].as_str().unwrap().to_owned());
        }
    }
    exprs
}

/// The `oxid_*` metric names in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("oxid_") {
        let boundary = i == 0 || {
            let b = rest.as_bytes()[i - 1];
            !(b.is_ascii_alphanumeric() || b == b'_')
        };
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        if boundary {
            names.insert(tail[..end].to_owned());
        }
        rest = &tail[end..];
    }
    names
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dashboard_and_alerts_query_only_metrics_that_exist() {
    let (_live, server, agent) = live_scrapes().await;
    let served: BTreeSet<String> = server.names().union(&agent.names()).cloned().collect();
    let exprs = dashboard_exprs();
    let alerts = std::fs::read_to_string(repo().join("deploy/prometheus/alerts.yml")).unwrap();
    // Comments (the federation placeholder) name metrics not built yet.
    let alert_exprs: String = alerts
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    let mut queried = metric_names(&exprs.join("\n"));
    // Annotations name metrics too; those in expressions are what matters,
    // but a name in a description must exist as well.
    queried.extend(metric_names(&alert_exprs));
    assert!(queried.len() >= 15, "{queried:?}");
    let missing: Vec<&String> = queried.iter().filter(|n| !served.contains(*n)).collect();
    assert!(
        missing.is_empty(),
        "queried but not served: {missing:?}\nserved: {served:?}"
    );

    // The dashboard's expressions are valid PromQL: promtool checks them as
    // recording rules, with Grafana's variables filled in.
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, e) in exprs.iter().enumerate() {
        let e = e
            .replace("$__rate_interval", "5m")
            .replace("$server", ".*")
            .replace("$agent", ".*");
        rules.push_str(&format!(
            "      - record: dashboard:expr{i}\n        expr: {}\n",
            serde_json::to_string(&e).unwrap()
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dashboard-rules.yml");
    std::fs::write(&file, rules).unwrap();
    let (code, out) = promtool_run(&["check", "rules", file.to_str().unwrap()], "").await;
    assert_eq!(code, 0, "the dashboard's PromQL:\n{out}");
}
