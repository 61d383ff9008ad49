//! Invariant checks over untrusted bytes, shared by the cargo-fuzz targets in
//! `fuzz/` and the corpus replay test, so CI runs what the fuzzers run. Each
//! panics only when an invariant breaks.

// Panicking on a broken invariant is how a fuzz oracle reports it.
#![allow(clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use oxid_pki::bundle::Bundle;
use oxid_pki::jwt::JwtSigner;
use oxid_pki::{KeyAlgorithm, KeyPair, TrustDomain};
use oxid_proto::workload as pb;
use prost::Message as _;

use crate::config::{AgentConfig, AgentFile};

/// `agent.toml` text: parsing never panics, and a config that loads has a
/// valid trust domain and log format.
pub fn agent_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = AgentConfig::from_toml(text, AgentFile::default()) {
        assert!(matches!(config.log_format.as_str(), "human" | "json"));
        assert!(!config.trust_domain.as_str().is_empty());
        assert!((64 * 1024..=64 << 20).contains(&config.max_request_bytes));
        assert!(config.max_streams_per_uid > 0);
    }
}

struct WorkloadFixture {
    bundles: BTreeMap<TrustDomain, Bundle>,
    token: String,
    now: SystemTime,
}

fn workload_fixture() -> &'static WorkloadFixture {
    static FIXTURE: OnceLock<WorkloadFixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let td = TrustDomain::new("example.org").expect("literal trust domain");
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(2_000_000_000);
        let key = KeyPair::generate(KeyAlgorithm::EcdsaP256).expect("key generation");
        let signer = JwtSigner::new(
            td.clone(),
            key,
            "fuzz",
            None,
            now + Duration::from_secs(3600),
        )
        .expect("signer");
        let id = "spiffe://example.org/w".parse().expect("literal SPIFFE ID");
        let token = signer
            .mint(
                &id,
                &["spiffe://example.org/db".to_owned()],
                Duration::from_secs(300),
                now,
            )
            .expect("a token")
            .token;
        let mut bundle = Bundle::new(td.clone());
        bundle
            .add_jwt_authority(signer.authority().clone())
            .expect("jwt authority");
        WorkloadFixture {
            bundles: BTreeMap::from([(td, bundle)]),
            token,
            now,
        }
    })
}

/// The Workload API requests a workload sends, decoded as the agent decodes
/// them, through the agent's own checks. Invariants: nothing panics; an
/// accepted FetchJWTSVID request has 1 to 32 audiences; ValidateJWTSVID
/// accepts only a token the fixture's key signed, and answers its claims.
pub fn workload_request(data: &[u8]) {
    let fixture = workload_fixture();
    if let Ok(r) = pb::JwtsvidRequest::decode(data) {
        if crate::workload::check_jwt_request(&r).is_ok() {
            assert!((1..=oxid_pki::jwt::MAX_AUDIENCES).contains(&r.audience.len()));
        }
    }
    if let Ok(r) = pb::ValidateJwtsvidRequest::decode(data) {
        if let Ok(resp) = crate::workload::validate_jwt(&r, &fixture.bundles, fixture.now) {
            assert_eq!(r.svid, fixture.token, "only the fixture's token verifies");
            assert_eq!(resp.spiffe_id, "spiffe://example.org/w");
            assert!(resp.claims.is_some());
        }
    }
    // The fixture's own token with the audience taken from the input.
    let audience = String::from_utf8_lossy(data).into_owned();
    let r = pb::ValidateJwtsvidRequest {
        audience: audience.clone(),
        svid: fixture.token.clone(),
    };
    let verdict = crate::workload::validate_jwt(&r, &fixture.bundles, fixture.now);
    assert_eq!(
        verdict.is_ok(),
        audience == "spiffe://example.org/db",
        "{audience:?}"
    );
    let _ = pb::X509svidRequest::decode(data);
    let _ = pb::X509BundlesRequest::decode(data);
    let _ = pb::JwtBundlesRequest::decode(data);
}

#[cfg(test)]
mod corpus_replay {
    //! Replays `fuzz/corpus/<target>/` and `fuzz/regressions/<target>/`.

    use oxid_pki::fuzzing::replay_corpus as replay;

    #[test]
    fn agent_config_corpus() {
        replay("agent_config", super::agent_config);
    }

    #[test]
    fn workload_request_corpus() {
        replay("workload_request", super::workload_request);
    }
}
