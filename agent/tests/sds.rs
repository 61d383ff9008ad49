//! Envoy SDS on the agent's socket, in process, with a generated SDS client
//! playing Envoy's part of the protocol exactly (and badly where a test
//! needs it): versions and nonces, ACKs, stale nonces, NACKs, names not
//! held yet, malformed names, the validator and trusted_ca forms, and the
//! settings, and the delta protocol. `tests/envoy.rs` (workspace root) runs the real Envoy.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::{Harness, WAIT, http_get, my_uid};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    Secret, SpiffeCertValidatorConfig, secret,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use envoy_types::pb::google::rpc;
use oxid_agent::sds::SdsFile;
use prost::Message as _;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

const SECRET: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

fn request(names: &[&str], version: &str, nonce: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        version_info: version.into(),
        resource_names: names.iter().map(|n| (*n).to_owned()).collect(),
        type_url: SECRET.into(),
        response_nonce: nonce.into(),
        ..DiscoveryRequest::default()
    }
}

fn secrets(r: &DiscoveryResponse) -> Vec<Secret> {
    assert_eq!(r.type_url, SECRET);
    r.resources
        .iter()
        .map(|a| {
            assert_eq!(a.type_url, SECRET);
            Secret::decode(a.value.as_slice()).unwrap()
        })
        .collect()
}

/// The SPIFFE ID of a `tls_certificate` secret's leaf, after checking its
/// key is a PKCS#8 PEM.
fn svid_id(s: &Secret) -> String {
    let Some(secret::Type::TlsCertificate(tls)) = &s.r#type else {
        panic!("not a tls_certificate: {s:?}");
    };
    let inline = |d: &Option<envoy_types::pb::envoy::config::core::v3::DataSource>| match d
        .as_ref()
        .and_then(|d| d.specifier.clone())
    {
        Some(envoy_types::pb::envoy::config::core::v3::data_source::Specifier::InlineBytes(b)) => b,
        other => panic!("not inline bytes: {other:?}"),
    };
    let key = String::from_utf8(inline(&tls.private_key)).unwrap();
    assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"), "{key}");
    oxid_pki::KeyPair::from_pkcs8_pem_or_der(key.as_bytes()).unwrap();
    let chain = oxid_pki::x509::certs_from_pem(&inline(&tls.certificate_chain)).unwrap();
    oxid_pki::x509::leaf_identity(&chain[0])
        .unwrap()
        .0
        .to_string()
}

/// The trust domains of a validation context in the SPIFFE validator form.
fn validator_domains(s: &Secret) -> Vec<String> {
    let Some(secret::Type::ValidationContext(v)) = &s.r#type else {
        panic!("not a validation_context: {s:?}");
    };
    let custom = v
        .custom_validator_config
        .as_ref()
        .expect("the SPIFFE validator");
    assert_eq!(custom.name, "envoy.tls.cert_validator.spiffe");
    let any = custom.typed_config.as_ref().unwrap();
    assert_eq!(
        any.type_url,
        "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.SPIFFECertValidatorConfig"
    );
    let config = SpiffeCertValidatorConfig::decode(any.value.as_slice()).unwrap();
    config.trust_domains.into_iter().map(|t| t.name).collect()
}

async fn next(stream: &mut tonic::Streaming<DiscoveryResponse>) -> DiscoveryResponse {
    tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("a response in time")
        .expect("no error")
        .expect("the stream stays open")
}

/// Nothing arrives for a while (the only way to see an ignored request).
async fn nothing(stream: &mut tonic::Streaming<DiscoveryResponse>) {
    if let Ok(r) = tokio::time::timeout(Duration::from_millis(500), stream.message()).await {
        panic!("expected no response, got {r:?}");
    }
}

/// The harness's agent restarted with `sds` settings and a metrics port.
async fn agent_with(sds: SdsFile) -> (Harness, std::net::SocketAddr) {
    let mut h = Harness::start().await;
    h.stop_agent().await;
    h.agent_extra.sds = Some(sds);
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let metrics = probe.local_addr().unwrap();
    drop(probe);
    h.start_agent_with_metrics(metrics);
    (h, metrics)
}

async fn sds(h: &Harness) -> SecretDiscoveryServiceClient<Channel> {
    SecretDiscoveryServiceClient::new(h.channel().await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_follows_the_xds_protocol() {
    let (h, metrics) = agent_with(SdsFile::default()).await;
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tx.send(request(&["default"], "", "")).await.unwrap();
    // No header: Envoy sends none.
    let mut stream = sds(&h)
        .await
        .stream_secrets(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();

    // Not held yet: the stream waits, open, and answers once it is.
    nothing(&mut stream).await;
    h.create_entry(
        "spiffe://example.org/web",
        &[&format!("unix:uid:{}", my_uid())],
    )
    .await;
    let first = next(&mut stream).await;
    assert_eq!(first.version_info, "1");
    assert!(!first.nonce.is_empty());
    let s = secrets(&first);
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].name, "default");
    assert_eq!(svid_id(&s[0]), "spiffe://example.org/web");

    // An ACK gets nothing; a stale nonce is ignored, names and all.
    tx.send(request(&["default"], "1", &first.nonce))
        .await
        .unwrap();
    nothing(&mut stream).await;
    tx.send(request(&["ROOTCA"], "1", "stale")).await.unwrap();
    nothing(&mut stream).await;

    // A NACK (current nonce, error_detail) is counted; its new names are
    // answered.
    let mut nack = request(
        &["default", "ROOTCA", "spiffe://example.org", "ALL"],
        "0",
        &first.nonce,
    );
    nack.error_detail = Some(rpc::Status {
        code: 3,
        message: "Failed to load certificate chain".into(),
        details: vec![],
    });
    tx.send(nack).await.unwrap();
    let second = next(&mut stream).await;
    assert_eq!(second.version_info, "2");
    assert_ne!(second.nonce, first.nonce);
    let s = secrets(&second);
    let names: Vec<&str> = s.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["default", "ROOTCA", "spiffe://example.org", "ALL"]);
    for bundle in &s[1..] {
        assert_eq!(validator_domains(bundle), ["example.org"]);
    }
    let m = http_get(metrics, "/metrics").await.unwrap();
    assert!(m.contains("oxid_agent_sds_nacks_total 1"), "{m}");

    // A name that is no name ends the stream with InvalidArgument.
    tx.send(request(&["web"], "2", &second.nonce))
        .await
        .unwrap();
    let end = tokio::time::timeout(WAIT, stream.message())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(end.code(), tonic::Code::InvalidArgument, "{end:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_the_validator_bundles_are_one_trust_domains_trusted_ca() {
    let (h, _) = agent_with(SdsFile {
        disable_spiffe_cert_validation: Some(true),
        ..SdsFile::default()
    })
    .await;
    let _ = h.with_web_identity().await;
    let mut client = sds(&h).await;

    let r = client
        .fetch_secrets(request(&["ROOTCA"], "", ""))
        .await
        .unwrap()
        .into_inner();
    assert!(r.nonce.is_empty() && r.version_info.is_empty());
    let s = secrets(&r);
    let Some(secret::Type::ValidationContext(v)) = &s[0].r#type else {
        panic!("{s:?}");
    };
    assert!(v.custom_validator_config.is_none());
    let Some(envoy_types::pb::envoy::config::core::v3::data_source::Specifier::InlineBytes(pem)) =
        v.trusted_ca.as_ref().and_then(|d| d.specifier.clone())
    else {
        panic!("{v:?}");
    };
    assert!(!oxid_pki::x509::certs_from_pem(&pem).unwrap().is_empty());

    // ALL would merge roots: refused.
    let e = client
        .fetch_secrets(request(&["ALL"], "", ""))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");

    // No names: everything, each bundle by trust domain, each SVID by ID.
    let all = client
        .fetch_secrets(request(&[], "", ""))
        .await
        .unwrap()
        .into_inner();
    let names: Vec<String> = secrets(&all).into_iter().map(|s| s.name).collect();
    assert_eq!(names, ["spiffe://example.org", "spiffe://example.org/web"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sds_can_be_turned_off() {
    let (h, _) = agent_with(SdsFile {
        enabled: Some(false),
        ..SdsFile::default()
    })
    .await;
    let _ = h.with_web_identity().await;
    let e = sds(&h)
        .await
        .fetch_secrets(request(&["default"], "", ""))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unimplemented, "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_ends_when_its_entry_is_deleted() {
    let (h, _) = agent_with(SdsFile::default()).await;
    let _ = h.with_web_identity().await;
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tx.send(request(&["spiffe://example.org/web"], "", ""))
        .await
        .unwrap();
    let mut stream = sds(&h)
        .await
        .stream_secrets(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let first = next(&mut stream).await;
    assert_eq!(svid_id(&secrets(&first)[0]), "spiffe://example.org/web");

    let admin = common::admin(&h.admin_socket()).await;
    let list = admin
        .clone()
        .list_entries(oxid_proto::admin::ListEntriesRequest {
            spiffe_id: "spiffe://example.org/web".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    admin
        .clone()
        .delete_entries(oxid_proto::admin::DeleteEntriesRequest {
            ids: vec![list.entries[0].id.clone()],
        })
        .await
        .unwrap();
    // Envoy keeps what it has; the stream says why it ends.
    let end = tokio::time::timeout(WAIT, stream.message())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(end.code(), tonic::Code::PermissionDenied, "{end:?}");
    assert_eq!(end.message(), "no identity issued");
}

fn subscribe(names: &[&str], nonce: &str) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: SECRET.into(),
        resource_names_subscribe: names.iter().map(|n| (*n).to_owned()).collect(),
        response_nonce: nonce.into(),
        ..DeltaDiscoveryRequest::default()
    }
}

/// (name, version) of each resource in a delta response.
fn delta_resources(r: &DeltaDiscoveryResponse) -> Vec<(String, String)> {
    assert_eq!(r.type_url, SECRET);
    r.resources
        .iter()
        .map(|res| {
            let any = res.resource.as_ref().unwrap();
            assert_eq!(any.type_url, SECRET);
            assert_eq!(Secret::decode(any.value.as_slice()).unwrap().name, res.name);
            (res.name.clone(), res.version.clone())
        })
        .collect()
}

async fn next_delta(
    stream: &mut tonic::Streaming<DeltaDiscoveryResponse>,
) -> DeltaDiscoveryResponse {
    tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("a response in time")
        .expect("no error")
        .expect("the stream stays open")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn delta_sends_each_resource_the_client_does_not_hold() {
    let (h, _) = agent_with(SdsFile::default()).await;
    let _ = h.with_web_identity().await;
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tx.send(subscribe(&["default", "ROOTCA"], ""))
        .await
        .unwrap();
    let mut stream = sds(&h)
        .await
        .delta_secrets(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let first = next_delta(&mut stream).await;
    let got = delta_resources(&first);
    assert_eq!(
        got.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        ["ROOTCA", "default"]
    );
    let default_version = got[1].1.clone();
    assert!(!first.nonce.is_empty());

    // An ACK gets nothing; a new name gets only itself; an unsubscribe
    // gets nothing.
    let mut ack = subscribe(&[], &first.nonce);
    tx.send(ack.clone()).await.unwrap();
    if let Ok(r) = tokio::time::timeout(Duration::from_millis(500), stream.message()).await {
        panic!("expected nothing after an ACK, got {r:?}");
    }
    tx.send(subscribe(&["spiffe://example.org"], &first.nonce))
        .await
        .unwrap();
    let second = next_delta(&mut stream).await;
    let got = delta_resources(&second);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].0, "spiffe://example.org");
    ack.response_nonce = second.nonce.clone();
    ack.resource_names_unsubscribe = vec!["ROOTCA".into()];
    tx.send(ack).await.unwrap();
    if let Ok(r) = tokio::time::timeout(Duration::from_millis(500), stream.message()).await {
        panic!("expected nothing after an unsubscribe, got {r:?}");
    }

    // A reconnecting client says what it holds and gets only the rest.
    let (tx2, rx2) = tokio::sync::mpsc::channel(8);
    let mut again = subscribe(&["default", "ROOTCA"], "");
    again
        .initial_resource_versions
        .insert("default".into(), default_version);
    tx2.send(again).await.unwrap();
    let mut stream2 = sds(&h)
        .await
        .delta_secrets(ReceiverStream::new(rx2))
        .await
        .unwrap()
        .into_inner();
    let got = delta_resources(&next_delta(&mut stream2).await);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].0, "ROOTCA");

    // A malformed name ends the stream.
    tx2.send(subscribe(&["not a name"], "")).await.unwrap();
    let end = tokio::time::timeout(WAIT, stream2.message())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(end.code(), tonic::Code::InvalidArgument, "{end:?}");
}
