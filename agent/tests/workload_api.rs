//! The agent end to end, in process: a real server (temp dir, port 0), a
//! real agent attesting with a join token, and the real `spiffe` crate as
//! the workload, talking over the agent's Unix socket.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::SystemTime;

use common::{Harness, eventually, http_get, my_uid};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_spiffe_crate_gets_svids_bundles_and_jwts() {
    let h = Harness::start().await;
    let client = h.client().await;

    // Synced but no entry for us yet: the exact "no identity issued".
    let err = eventually(|| async {
        match client.fetch_x509_svid().await {
            Err(spiffe::WorkloadApiError::NoIdentityIssued) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let () = err;

    let uid = format!("unix:uid:{}", my_uid());
    let exe = std::env::current_exe().unwrap();
    let path = format!("unix:path:{}", exe.display());
    h.create_entry("spiffe://example.org/web", &[&uid, &path])
        .await;
    let svid = eventually(|| client.fetch_x509_svid()).await;
    assert_eq!(svid.spiffe_id().to_string(), "spiffe://example.org/web");
    assert_eq!(svid.hint(), Some("primary"));

    // Two matching entries: both SVIDs, in creation order.
    h.create_entry("spiffe://example.org/web-admin", &[&uid])
        .await;
    let all = eventually(|| async {
        let all = client
            .fetch_all_x509_svids()
            .await
            .map_err(|e| format!("{e:?}"))?;
        if all.len() == 2 {
            Ok(all)
        } else {
            Err(format!("{} SVIDs", all.len()))
        }
    })
    .await;
    assert_eq!(all[0].spiffe_id().to_string(), "spiffe://example.org/web");
    assert_eq!(
        all[1].spiffe_id().to_string(),
        "spiffe://example.org/web-admin"
    );

    let bundles = client.fetch_x509_bundles().await.unwrap();
    let td = spiffe::TrustDomain::new("example.org").unwrap();
    assert!(bundles.get(&td).is_some());

    let jwt = client
        .fetch_jwt_svid(&["spiffe://example.org/db"], None)
        .await
        .unwrap();
    assert_eq!(jwt.spiffe_id().to_string(), "spiffe://example.org/web");
    assert_eq!(jwt.audience(), ["spiffe://example.org/db"]);
    // Validation by the agent...
    let validated = client
        .validate_jwt_token("spiffe://example.org/db", jwt.token())
        .await
        .unwrap();
    assert_eq!(
        validated.spiffe_id().to_string(),
        "spiffe://example.org/web"
    );
    // ...and offline, from the JWT bundle the agent serves.
    let jwt_bundles = client.fetch_jwt_bundles().await.unwrap();
    spiffe::JwtSvid::parse_and_validate(jwt.token(), &jwt_bundles, &["spiffe://example.org/db"])
        .unwrap();
    // A cached JWT-SVID comes back for the same audience.
    let again = client
        .fetch_jwt_svid(&["spiffe://example.org/db"], None)
        .await
        .unwrap();
    assert_eq!(again.token(), jwt.token());
    // Wrong audience, bad tokens: refused.
    assert!(
        client
            .validate_jwt_token("other", jwt.token())
            .await
            .is_err()
    );
    assert!(
        client
            .validate_jwt_token("spiffe://example.org/db", "not.a.jwt")
            .await
            .is_err()
    );
    let too_many: Vec<String> = (0..33).map(|i| format!("a{i}")).collect();
    assert!(client.fetch_jwt_svid(&too_many, None).await.is_err());
    let _ = SystemTime::now();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn calls_without_the_security_header_are_refused() {
    let h = Harness::start().await;
    let mut raw = h.raw_client().await;
    let err = raw
        .fetch_x509svid(oxid_proto::workload::X509svidRequest {})
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert_eq!(err.message(), "security header missing from request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restarted_agent_needs_no_new_token() {
    let mut h = Harness::start().await;
    let uid = format!("unix:uid:{}", my_uid());
    h.create_entry("spiffe://example.org/web", &[&uid]).await;
    {
        let client = h.client().await;
        eventually(|| client.fetch_x509_svid()).await;
    }
    h.stop_agent().await;
    // No token this time: the saved identity and bundle are enough.
    h.start_agent(None);
    let client = h.client().await;
    let svid = eventually(|| client.fetch_x509_svid()).await;
    assert_eq!(svid.spiffe_id().to_string(), "spiffe://example.org/web");
    let key_mode = {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::metadata(h.dir.path().join("agent-data/agent-identity.pem"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(key_mode, 0o600);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn health_and_reflection_share_the_socket() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    let h = Harness::start().await;
    let channel = h.channel().await;
    // No security header needed here.
    let mut health = HealthClient::new(channel.clone());
    let status = eventually(|| {
        let mut health = health.clone();
        async move {
            let s = health
                .check(tonic_health::pb::HealthCheckRequest {
                    service: "SpiffeWorkloadAPI".into(),
                })
                .await
                .map_err(|e| e.to_string())?
                .into_inner()
                .status;
            if s == ServingStatus::Serving as i32 {
                Ok(s)
            } else {
                Err(format!("status {s}"))
            }
        }
    })
    .await;
    assert_eq!(status, ServingStatus::Serving as i32);
    let unknown = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "nope".into(),
        })
        .await
        .err()
        .unwrap();
    assert_eq!(unknown.code(), tonic::Code::NotFound);

    // Reflection lists the Workload API (and only it, with health's).
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let request = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            tonic_reflection::pb::v1::server_reflection_request::MessageRequest::ListServices(
                String::new(),
            ),
        ),
    };
    let path = http::uri::PathAndQuery::from_static(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    );
    let codec = tonic_prost::ProstCodec::<
        tonic_reflection::pb::v1::ServerReflectionRequest,
        tonic_reflection::pb::v1::ServerReflectionResponse,
    >::default();
    let mut responses = grpc
        .streaming(
            tonic::Request::new(tokio_stream::iter(vec![request])),
            path,
            codec,
        )
        .await
        .unwrap()
        .into_inner();
    let first = responses.message().await.unwrap().unwrap();
    let Some(
        tonic_reflection::pb::v1::server_reflection_response::MessageResponse::ListServicesResponse(
            list,
        ),
    ) = first.message_response
    else {
        panic!("unexpected reflection answer");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.contains(&"SpiffeWorkloadAPI".to_owned()), "{names:?}");
    assert!(!names.iter().any(|n| n.contains("oxid.admin")), "{names:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agent_metrics_and_health_endpoints() {
    let mut h = Harness::start().await;
    // Restart the agent with a metrics listener (its identity is saved).
    h.stop_agent().await;
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let metrics_addr = probe.local_addr().unwrap();
    drop(probe);
    h.jwt_cache_size = Some(2);
    h.start_agent_with_metrics(metrics_addr);
    let uid = format!("unix:uid:{}", my_uid());
    h.create_entry("spiffe://example.org/web", &[&uid]).await;
    let client = h.client().await;
    eventually(|| client.fetch_x509_svid()).await;
    // Five audiences through a cache of two: the cache stays at two and
    // the newest token is still served from it.
    let mut last = String::new();
    for aud in ["a", "b", "c", "d", "e"] {
        last = client
            .fetch_jwt_svid(&[aud], None)
            .await
            .unwrap()
            .token()
            .to_string();
    }
    let again = client.fetch_jwt_svid(&["e"], None).await.unwrap();
    assert_eq!(again.token(), last);
    let get = |path: &'static str| http_get(metrics_addr, path);
    let text = eventually(|| get("/metrics")).await;
    for needle in [
        "oxid_rpc_requests_total{api=\"workload\",method=\"FetchJWTSVID\",code=\"OK\"}",
        "oxid_agent_svids_cached 1",
        "oxid_agent_entries 1",
        "oxid_agent_jwt_svids_cached 2",
        "oxid_agent_sync_age_seconds",
    ] {
        assert!(text.contains(needle), "missing {needle} in:\n{text}");
    }
    assert!(eventually(|| get("/ready")).await.contains("200 OK"));
    assert!(eventually(|| get("/live")).await.contains("200 OK"));
    assert!(text.contains("oxid_agent_server_connected 1"), "{text}");

    // Server away: not ready, still serving what it holds, still live.
    let until = |path: &'static str, needle: &'static str| {
        move || async move {
            let text = get(path).await?;
            if text.contains(needle) {
                Ok(text)
            } else {
                Err(format!("{path} does not say {needle:?} yet"))
            }
        }
    };
    h.stop_server().await;
    eventually(until("/ready", "503")).await;
    eventually(until("/metrics", "oxid_agent_server_connected 0")).await;
    assert!(get("/live").await.unwrap().contains("200 OK"));
    let svid = client.fetch_x509_svid().await.unwrap();
    assert_eq!(svid.spiffe_id().to_string(), "spiffe://example.org/web");
    // Back without an agent restart.
    h.restart_server().await;
    eventually(until("/ready", "200 OK")).await;
}
