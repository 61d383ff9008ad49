//! Invariant checks over untrusted bytes, shared by the cargo-fuzz targets in
//! `fuzz/` and the corpus replay test, so CI runs what the fuzzers run. Each
//! panics only when an invariant breaks.

// Panicking on a broken invariant is how a fuzz oracle reports it.
#![allow(clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use oxid_pki::x509::{Csr, X509Ca};
use oxid_pki::{KeyAlgorithm, KeyPair, TrustDomain};
use oxid_proto::agent as pb;
use prost::Message as _;
use rustls_pki_types::CertificateDer;

use crate::config::{Config, Overrides};

/// `server.toml` text: parsing never panics, and a config that loads keeps
/// every SVID TTL within its CA's (at most a sixth of `ca.ttl`) and every
/// batch and request limit above zero.
pub fn server_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(c) = Config::from_toml(text, Path::new("server.toml"), Overrides::default()) {
        for ttl in [c.x509_svid_ttl, c.jwt_svid_ttl] {
            assert!(
                !ttl.is_zero() && ttl <= c.ca_ttl / 6,
                "{ttl:?} vs ca.ttl {:?}",
                c.ca_ttl
            );
        }
        assert!(matches!(c.log_format.as_str(), "human" | "json"));
        assert!(c.max_csrs_per_call > 0 && c.max_admin_batch > 0);
        assert!(c.max_request_bytes >= 64 * 1024);
    }
}

struct NodeCa {
    roots: Vec<CertificateDer<'static>>,
    trust_domain: TrustDomain,
    now: SystemTime,
}

fn node_ca() -> &'static NodeCa {
    static CA: OnceLock<NodeCa> = OnceLock::new();
    CA.get_or_init(|| {
        let trust_domain = TrustDomain::new("example.org").expect("literal trust domain");
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(2_000_000_000);
        let key = KeyPair::generate(KeyAlgorithm::EcdsaP256).expect("key generation");
        let ca = X509Ca::new_root(trust_domain.clone(), key, Duration::from_secs(86_400), now)
            .expect("a root CA");
        NodeCa {
            roots: ca.chain().to_vec(),
            trust_domain,
            now,
        }
    })
}

/// The agent-API messages an agent sends, decoded as the server decodes
/// them, through the server's parsers of their bytes: the x509pop node
/// chain, CSRs and audiences. Invariants: nothing panics, and no input
/// passes x509pop against a node CA whose key it never saw.
pub fn agent_api(data: &[u8]) {
    if let Ok(r) = pb::AttestRequest::decode(data) {
        if let Some(d) = r.data {
            let ca = node_ca();
            let begun = crate::agent_api::attest::x509pop_begin(
                &ca.roots,
                &ca.trust_domain,
                &d.payload,
                ca.now,
            );
            assert!(begun.is_err(), "an unsigned node chain passed x509pop");
        }
        let _ = Csr::parse(&r.csr);
    }
    if let Ok(r) = pb::RenewRequest::decode(data) {
        let _ = Csr::parse(&r.csr);
    }
    if let Ok(r) = pb::SignX509SvidsRequest::decode(data) {
        for req in r.requests.iter().take(16) {
            let _ = Csr::parse(&req.csr);
        }
    }
    if let Ok(r) = pb::MintJwtSvidRequest::decode(data) {
        if oxid_pki::jwt::check_audiences(&r.audience).is_ok() {
            assert!((1..=oxid_pki::jwt::MAX_AUDIENCES).contains(&r.audience.len()));
        }
    }
    let _ = pb::SyncRequest::decode(data);
}

#[cfg(test)]
mod corpus_replay {
    //! Replays `fuzz/corpus/<target>/` and `fuzz/regressions/<target>/`.

    use oxid_pki::fuzzing::replay_corpus as replay;

    #[test]
    fn server_config_corpus() {
        replay("server_config", super::server_config);
    }

    #[test]
    fn agent_api_corpus() {
        replay("agent_api", super::agent_api);
    }
}
